"""The episodic (meta-)training loop: meta-batches of episodes, seeded validation, best and last
checkpoints, exact resume, a tqdm bar and a JSONL log."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fewshot.data.episode import Episode
from fewshot.evaluation import EvaluationResult, episode_accuracy, evaluate
from fewshot.learners.base import Learner
from fewshot.training.budget import check_train_seconds
from fewshot.training.checkpoint import (
    ModelSpec,
    capture_rng_state,
    check_model_spec,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from fewshot.training.run_folder import BEST, LAST, LOG, JsonlLog, remove_stale_temporaries

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class EpisodicSchedule:
    """How long and how to meta-train.

    ``meta_steps`` meta-updates of ``meta_batch`` episodes each (Adam, ``lr``); validation on the fixed
    validation episodes every ``val_every`` meta-steps and after the last one; ``num_workers``
    DataLoader workers produce the training episodes; ``eval_batch`` validation episodes are predicted
    together. ``train_seconds`` (optional) also ends training after the meta-step that passes that many
    seconds of training (a resumed run counts the seconds of its earlier part); the last step is then
    validated as at the end of the budget. ``lr_schedule``: ``constant`` or ``cosine`` (annealed to 0
    over the fraction of the budget used: meta-steps, or seconds when that fraction is larger).
    """

    meta_steps: int
    meta_batch: int = 4
    lr: float = 1e-3
    val_every: int = 0
    num_workers: int = 0
    eval_batch: int = 1
    train_seconds: float | None = None
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        for name in ("meta_steps", "meta_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0 (0: validate only at the end), got {self.val_every}")
        check_train_seconds(self.train_seconds)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")

    def budget_used(self, step: int, seconds: float) -> float:
        """The fraction of the training budget used after ``step`` meta-steps and ``seconds`` of training."""
        used = step / self.meta_steps
        if self.train_seconds is not None:
            used = max(used, seconds / self.train_seconds)
        return min(used, 1.0)

    def learning_rate(self, step: int, seconds: float) -> float:
        """The outer learning rate for the meta-step after ``step`` steps and ``seconds`` of training."""
        if self.lr_schedule == "constant":
            return self.lr
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * self.budget_used(step, seconds)))


class _MetaBatches(torch.utils.data.Dataset):
    """Meta-batch ``i`` = training episodes ``i*meta_batch .. (i+1)*meta_batch - 1``: any step can be
    produced on its own, in any worker, which makes resuming exact."""

    def __init__(self, episodes: Sequence[Episode], meta_batch: int, start: int, stop: int) -> None:
        needed = stop * meta_batch
        if len(episodes) < needed:
            raise ValueError(
                f"the training episode source has {len(episodes)} episodes; {stop} meta-steps of "
                f"{meta_batch} need {needed}"
            )
        self.episodes, self.meta_batch, self.start, self.stop = episodes, meta_batch, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> list[Episode]:
        first = (self.start + i) * self.meta_batch
        return [self.episodes[first + k] for k in range(self.meta_batch)]


def _as_list(batch: list[Episode]) -> list[Episode]:
    return batch


@dataclass
class _Progress:
    """Where meta-training stands: meta-steps done, the best validation so far, training seconds (a
    resumed run's earlier part included)."""

    step: int = 0
    best_acc: float = float("-inf")
    best_step: int = -1
    seconds: float = 0.0


def _resume(path: Path, learner: Learner, optimizer: torch.optim.Optimizer, spec: ModelSpec, device) -> _Progress:
    """Load ``last.pt`` into the learner, the optimizer and the RNGs (checked against ``spec``)."""
    state = load_checkpoint(path, map_location=device)
    check_model_spec(state.get("meta"), spec, path)
    load_model_state(learner, state["model"], source=str(path))
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"][0])
    saved = state["progress"]
    return _Progress(saved["step"], saved["best_val_acc"], saved["best_step"], float(saved.get("train_seconds", 0.0)))


def _batches(train_episodes: Sequence[Episode], schedule: EpisodicSchedule, start: int) -> DataLoader:
    """The meta-batches from meta-step ``start`` on, produced by ``schedule.num_workers`` workers."""
    return DataLoader(
        _MetaBatches(train_episodes, schedule.meta_batch, start, schedule.meta_steps),
        batch_size=None,
        num_workers=schedule.num_workers,
        collate_fn=_as_list,
        # Its own generator: creating the iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(0),
    )


@dataclass
class _Run:
    """What one meta-training run saves: the learner, its optimizer and progress, into ``out``."""

    out: Path
    learner: Learner
    optimizer: torch.optim.Optimizer
    state: _Progress
    spec: ModelSpec
    schedule: EpisodicSchedule
    config: dict[str, Any]

    def save(self, name: str, step: int, seconds: float) -> None:
        """``last.pt`` or ``best.pt`` at meta-step ``step`` after ``seconds`` of training."""
        progress = {"step": step, "best_val_acc": self.state.best_acc, "best_step": self.state.best_step}
        save_checkpoint(
            self.out / name,
            model=self.learner,
            meta=self.spec,
            optimizer=self.optimizer.state_dict(),
            progress={**progress, "train_seconds": seconds},
            rng=[capture_rng_state()],
            config=self.config,
            schedule=asdict(self.schedule),
        )

    def meta_step(self, batch: list[Episode], lr: float, step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One meta-update at step size ``lr``; a non-finite loss stops training before the parameters change."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self.learner.backward_batch(batch)
        if not torch.isfinite(loss):  # before the step: the parameters (and last.pt, best.pt) stay good
            raise FloatingPointError(
                f"the training loss became {loss.item()} at meta-step {step}; stopped without updating the "
                f"parameters: {self.out / LAST} holds the last validated ones. Lower --lr (now "
                f"{self.schedule.lr:g}) or the inner step size, then continue with --resume or start again"
            )
        self.optimizer.step()
        return loss, logits

    def validate(self, episodes: Sequence[Episode], step: int, seconds: float, device) -> EvaluationResult:
        """Accuracy on the validation episodes; saves ``best.pt`` when it is the best so far, and ``last.pt``."""
        self.learner.eval()
        val = evaluate(self.learner, episodes, device=device, progress=False, batch=self.schedule.eval_batch)
        if val.mean > self.state.best_acc:
            self.state.best_acc, self.state.best_step = val.mean, step
            self.save(BEST, step, seconds)
        self.save(LAST, step, seconds)
        return val


def _step_record(step: int, loss: torch.Tensor, logits: list, batch: list[Episode], seconds: float) -> dict[str, Any]:
    """The log record of one meta-step: its loss, the mean query accuracy of its episodes, the seconds so far."""
    acc = sum(episode_accuracy(lg, e.query_labels) for lg, e in zip(logits, batch)) / len(batch)
    return {"step": step, "loss": round(loss.item(), 6), "train_acc": round(acc, 3), "seconds": round(seconds, 2)}


def train_episodic(
    learner: Learner,
    train_episodes: Sequence[Episode],
    val_episodes: Sequence[Episode],
    schedule: EpisodicSchedule,
    out_dir: str | Path,
    *,
    spec: ModelSpec,
    config: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Meta-train ``learner`` (already on ``device``); returns a summary with the best validation accuracy.

    Writes ``last.pt`` (at every validation: resume point) and ``best.pt`` (best validation accuracy)
    and ``log.jsonl`` under ``out_dir``. With ``resume=True`` training continues from ``last.pt`` and
    ends with the same parameters as an uninterrupted run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    optimizer = torch.optim.Adam(learner.parameters(), lr=schedule.lr)
    state = _resume(out / LAST, learner, optimizer, spec, device) if resume else _Progress()
    run = _Run(out, learner, optimizer, state, spec, schedule, config or {})
    start, seconds_before = state.step, state.seconds
    log = JsonlLog(out / LOG)
    log.start(start if resume else None)
    started = time.perf_counter()
    batches = _batches(train_episodes, schedule, start)
    bar = tqdm(batches, initial=start, total=schedule.meta_steps, desc="meta-train", disable=not progress)
    step, stopped_by, seconds = start, "meta_steps", seconds_before
    for step, batch in enumerate(bar, start=start + 1):
        learner.train()
        batch = [e.to(device) for e in batch]
        lr = schedule.learning_rate(step - 1, seconds_before + time.perf_counter() - started)
        loss, logits = run.meta_step(batch, lr, step)
        seconds = seconds_before + time.perf_counter() - started
        out_of_time = schedule.train_seconds is not None and seconds >= schedule.train_seconds
        record = _step_record(step, loss, logits, batch, seconds)
        if schedule.lr_schedule != "constant":
            record["lr"] = lr
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{record['train_acc']:.1f}")
        if out_of_time or step == schedule.meta_steps or (schedule.val_every and step % schedule.val_every == 0):
            val = run.validate(val_episodes, step, seconds, device)
            record.update(val_acc=round(val.mean, 4), val_ci95=round(val.ci95, 4))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{record['train_acc']:.1f}", val=f"{val.mean:.1f}")
        log.write(record)
        if out_of_time and step < schedule.meta_steps:
            stopped_by = "train_seconds"
            break
    bar.close()
    return {
        "meta_steps": step,
        "meta_steps_planned": schedule.meta_steps,
        "stopped_by": stopped_by,
        "best_val_acc": state.best_acc,
        "best_step": state.best_step,
        "train_seconds": round(seconds, 2),
    }
