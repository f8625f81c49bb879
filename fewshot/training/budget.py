"""Wall-clock budgets: ``--train-seconds`` (training alone, shared by the episodic and supervised loops)
and ``--job-seconds`` (a whole episodic command: data, training, validation and test)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def check_seconds(seconds: float | None, flag: str) -> float | None:
    """``seconds`` if it is None (no budget) or a positive, finite number; else a ValueError naming ``flag``."""
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{flag} must be a positive number of seconds, got {seconds}")
    return seconds


def check_train_seconds(seconds: float | None) -> float | None:
    """``check_seconds`` for ``--train-seconds``."""
    return check_seconds(seconds, "--train-seconds")


@dataclass
class JobBudget:
    """A wall-clock budget for a whole job: everything up to the end of its test within ``seconds`` of
    ``started`` (a reading of ``clock``).

    Episodic training asks it after every meta-step whether one more step, the validation of the step
    training stops at and the ``test_episodes`` test episodes still fit. The evaluation is priced per
    episode from the latest timed evaluation (``note_evaluation``) with the test's settings: a slice of
    the validation episodes before the first meta-step, then every validation pass. Until one is noted
    only the step itself is counted.
    """

    seconds: float
    test_episodes: int
    started: float = field(default_factory=time.perf_counter)
    clock: Callable[[], float] = time.perf_counter
    eval_episode_seconds: float | None = None

    def __post_init__(self) -> None:
        check_seconds(self.seconds, "--job-seconds")
        if self.test_episodes < 0:
            raise ValueError(f"test_episodes must be >= 0, got {self.test_episodes}")

    def elapsed(self) -> float:
        """Seconds since the job started."""
        return self.clock() - self.started

    def note_evaluation(self, seconds: float, episodes: int) -> None:
        """Record a timed evaluation pass: ``episodes`` episodes in ``seconds``."""
        if episodes > 0:
            self.eval_episode_seconds = seconds / episodes

    def predicted_evaluation(self, episodes: int) -> float:
        """Predicted seconds to evaluate ``episodes`` episodes (0 before any pass was timed)."""
        return (self.eval_episode_seconds or 0.0) * episodes

    def room_for_another_step(self, step_seconds: float, val_episodes: int) -> bool:
        """Whether a meta-step of ``step_seconds``, a validation of ``val_episodes`` episodes and the test
        still end within the budget."""
        rest = step_seconds + self.predicted_evaluation(val_episodes + self.test_episodes)
        return self.elapsed() + rest <= self.seconds
