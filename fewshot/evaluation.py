"""The one place that turns test episodes into mean accuracy ± 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from fewshot.data.episode import Episode
from fewshot.learners.base import Learner
from fewshot.training.distributed import DistInfo, all_gather_objects


@dataclass
class EvaluationResult:
    """Per-episode query accuracies (in %) and their summary."""

    accuracies: list[float] = field(repr=False)

    @property
    def episodes(self) -> int:
        return len(self.accuracies)

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def ci95(self) -> float:
        """1.96·std/√N with the population standard deviation, as Chen et al. report it."""
        n = len(self.accuracies)
        mean = self.mean
        std = math.sqrt(sum((a - mean) ** 2 for a in self.accuracies) / n)
        return 1.96 * std / math.sqrt(n)

    def __str__(self) -> str:
        return f"{self.mean:.2f}% ± {self.ci95:.2f}% over {self.episodes} episodes"


def episode_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Query accuracy of one episode, in %."""
    return 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()


def evaluate(
    learner: Learner,
    episodes: Iterable[Episode],
    device: torch.device | str = "cpu",
    progress: bool = True,
    total: int | None = None,
    batch: int = 1,
    info: DistInfo | None = None,
    memory_format: torch.memory_format = torch.preserve_format,
) -> EvaluationResult:
    """Accuracy of the learner's predictions on every episode, in order.

    Each episode is moved to ``device`` with its images in ``memory_format`` (``Episode.to``).

    ``batch`` episodes at a time go to ``learner.predict_batch`` (MAML with ``vectorize`` ``eval`` or
    ``all`` runs them through one ``vmap``); it computes the same logits at every ``batch``. Only
    floating-point rounding can differ: under ``vmap`` the convs of the batch run as one grouped conv,
    whose float32 sums round differently from one episode's, and a near-tie query can then flip (float64:
    equal to 1e-10, tested). The learner's train/eval mode is the caller's choice: each learner's
    ``predict`` decides how BatchNorm behaves (MAML transductively, as Chen et al.).

    Under torchrun (``info.distributed``) rank ``r`` of ``W`` evaluates episodes ``r, r+W, r+2W, ...`` of
    the indexable ``episodes`` and every rank gets all the accuracies, in episode order: the same result
    as one process (with ``batch`` 1; with larger ones the groups differ, see above).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if info is None or not info.distributed:
        accuracies = _accuracies(learner, episodes, device, batch, progress, total, memory_format)
    else:
        if not (hasattr(episodes, "__len__") and hasattr(episodes, "__getitem__")):
            raise TypeError("evaluation across processes needs an indexable episode source (an EpisodeSampler)")
        n, world = len(episodes), info.world_size
        mine = (episodes[i] for i in range(info.rank, n, world))
        local = _accuracies(learner, mine, device, batch, progress and info.is_main, -(-n // world), memory_format)
        parts = all_gather_objects(local, info)
        accuracies = [parts[i % world][i // world] for i in range(n)]
    if not accuracies:
        raise ValueError("no episodes to evaluate: the episode source was empty")
    return EvaluationResult(accuracies)


def _accuracies(
    learner: Learner,
    episodes: Iterable[Episode],
    device: torch.device | str,
    batch: int,
    progress: bool,
    total: int | None,
    memory_format: torch.memory_format,
) -> list[float]:
    """Per-episode query accuracies, ``batch`` episodes at a time, with a progress bar showing the running CI."""
    accuracies: list[float] = []
    bar = tqdm(total=total, desc="evaluate", disable=not progress, leave=False)
    pending: list[Episode] = []
    reported = 0

    def flush() -> None:
        nonlocal reported
        for episode, logits in zip(pending, learner.predict_batch(pending)):
            accuracies.append(episode_accuracy(logits, episode.query_labels))
        bar.update(len(pending))
        pending.clear()
        if progress and len(accuracies) - reported >= 50:  # the running CI costs O(n): not every step
            reported = len(accuracies)
            running = EvaluationResult(accuracies)
            bar.set_postfix(acc=f"{running.mean:.2f}±{running.ci95:.2f}")

    for episode in episodes:
        pending.append(episode.to(device, memory_format=memory_format))
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    bar.close()
    return accuracies


def result_record(result: EvaluationResult, **metadata: Any) -> dict[str, Any]:
    """The stable JSON record of a test run: ``metadata`` (dataset, backbone, acdc, atoms, ways, shots,
    parameters, seconds, ...) plus ``episodes``, ``accuracy_mean``, ``accuracy_ci95`` and the
    per-episode accuracies."""
    return {
        **metadata,
        "episodes": result.episodes,
        "accuracy_mean": round(result.mean, 4),
        "accuracy_ci95": round(result.ci95, 4),
        "episode_accuracies": [round(a, 4) for a in result.accuracies],
    }
