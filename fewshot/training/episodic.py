"""The episodic (meta-)training loop: meta-batches of episodes, seeded validation, best and last
checkpoints, exact resume, a tqdm bar and a JSONL log; under torchrun each meta-batch's tasks are split
across the processes and their meta-gradients summed."""

from __future__ import annotations

import math
import sys
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
from fewshot.training.budget import JobBudget, check_train_seconds
from fewshot.training.checkpoint import (
    ModelSpec,
    capture_rng_state,
    check_model_spec,
    load_checkpoint,
    load_model_state,
    restore_rank_rng_state,
    save_checkpoint,
)
from fewshot.training.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_gradients,
    all_reduce_max,
    all_reduce_sum,
    average_buffers,
    barrier,
    broadcast_module,
)
from fewshot.training.run_folder import BEST, LAST, LOG, JsonlLog, remove_stale_temporaries

LR_SCHEDULES = ("constant", "cosine")

PRICED_MIN_EPISODES = 8
"""The fewest validation episodes a job budget times before training (more when ``eval_batch`` is larger:
one whole batch, after a batch of warm-up)."""


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
    produced on its own, in any worker, which makes resuming exact. Rank ``r`` of ``world`` processes
    gets tasks ``r, r+world, ...`` of each meta-batch (and produces only those)."""

    def __init__(
        self, episodes: Sequence[Episode], meta_batch: int, start: int, stop: int, rank: int = 0, world: int = 1
    ) -> None:
        needed = stop * meta_batch
        if len(episodes) < needed:
            raise ValueError(
                f"the training episode source has {len(episodes)} episodes; {stop} meta-steps of "
                f"{meta_batch} need {needed}"
            )
        self.episodes, self.meta_batch, self.start, self.stop = episodes, meta_batch, start, stop
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> list[Episode]:
        first = (self.start + i) * self.meta_batch
        return [self.episodes[first + k] for k in range(self.rank, self.meta_batch, self.world)]


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


def _resume(
    path: Path, learner: Learner, optimizer: torch.optim.Optimizer, spec: ModelSpec, device, info: DistInfo
) -> _Progress:
    """Load ``last.pt`` into the learner, the optimizer and this rank's RNGs (checked against ``spec``)."""
    state = load_checkpoint(path, map_location=device)
    check_model_spec(state.get("meta"), spec, path)
    load_model_state(learner, state["model"], source=str(path))
    optimizer.load_state_dict(state["optimizer"])
    saved = state["progress"]
    note = restore_rank_rng_state(state["rng"], info.rank, info.world_size, int(saved["step"]) * 1000)
    if note and info.is_main:
        print(note, file=sys.stderr)
    return _Progress(saved["step"], saved["best_val_acc"], saved["best_step"], float(saved.get("train_seconds", 0.0)))


def _batches(train_episodes: Sequence[Episode], schedule: EpisodicSchedule, start: int, info: DistInfo) -> DataLoader:
    """This rank's tasks of the meta-batches from meta-step ``start`` on, produced by ``schedule.num_workers``
    workers."""
    batches = _MetaBatches(train_episodes, schedule.meta_batch, start, schedule.meta_steps, info.rank, info.world_size)
    return DataLoader(
        batches,
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
    info: DistInfo
    memory_format: torch.memory_format = torch.preserve_format  # of the images (Episode.to)

    def save(self, name: str, step: int, seconds: float) -> None:
        """``last.pt`` or ``best.pt`` at meta-step ``step`` after ``seconds`` of training (rank 0 writes it,
        with every rank's RNG state)."""
        progress = {"step": step, "best_val_acc": self.state.best_acc, "best_step": self.state.best_step}
        rng = all_gather_objects(capture_rng_state(), self.info)  # every rank takes part
        if not self.info.is_main:
            return
        save_checkpoint(
            self.out / name,
            model=self.learner,
            meta=self.spec,
            optimizer=self.optimizer.state_dict(),
            progress={**progress, "train_seconds": seconds},
            rng=rng,
            config=self.config,
            schedule=asdict(self.schedule),
        )

    def meta_step(self, batch: list[Episode], lr: float, step: int) -> tuple[torch.Tensor, float]:
        """One meta-update at step size ``lr`` on this rank's tasks of the meta-batch (the meta-gradients
        summed over the ranks); returns the meta-batch's summed loss and mean query accuracy. A non-finite
        loss stops training before the parameters change."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, accuracy = backward_meta_batch(self.learner, batch, self.info)
        if not torch.isfinite(loss):  # before the step: the parameters (and last.pt, best.pt) stay good
            raise FloatingPointError(
                f"the training loss became {loss.item()} at meta-step {step}; stopped without updating the "
                f"parameters: {self.out / LAST} holds the last validated ones. Lower --lr (now "
                f"{self.schedule.lr:g}) or the inner step size, then continue with --resume or start again"
            )
        self.optimizer.step()
        average_buffers(self.learner, self.info)  # BatchNorm running statistics: one model on every rank
        return loss, accuracy

    def validate(
        self, episodes: Sequence[Episode], step: int, seconds: float, device
    ) -> tuple[EvaluationResult, float]:
        """Accuracy on the validation episodes and the seconds their evaluation took (checkpoints not
        counted); saves ``best.pt`` when it is the best so far, and ``last.pt``."""
        val, evaluation_seconds = self._timed_evaluation(episodes, device)
        if val.mean > self.state.best_acc:
            self.state.best_acc, self.state.best_step = val.mean, step
            self.save(BEST, step, seconds)
        self.save(LAST, step, seconds)
        return val, evaluation_seconds

    def price_evaluation(self, episodes: Sequence[Episode], device) -> tuple[float, int]:
        """Time the evaluation of a slice of ``episodes`` with the validation's settings, after one
        ``eval_batch`` of them as warm-up: (seconds, episodes timed). The model, its buffers and the random
        state are left as they were (nothing is saved); the job budget prices its evaluations with it until
        the first validation pass."""
        batch, n = self.schedule.eval_batch, len(episodes)
        warm_up = [episodes[i] for i in range(min(batch, n))]
        timed = [episodes[i] for i in range(len(warm_up), min(n, batch + max(batch, PRICED_MIN_EPISODES)))]
        if not timed:  # too few episodes for a warm-up: time them all, cold
            warm_up, timed = [], warm_up
        buffers = {name: b.clone() for name, b in self.learner.named_buffers()}
        cuda = [self.info.device] if self.info.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            if warm_up:
                self._timed_evaluation(warm_up, device)
            _, seconds = self._timed_evaluation(timed, device)
        with torch.no_grad():
            for name, b in self.learner.named_buffers():
                b.copy_(buffers[name])
        return seconds, len(timed)

    def _timed_evaluation(self, episodes: Sequence[Episode], device) -> tuple[EvaluationResult, float]:
        """Accuracy on ``episodes`` in eval mode with the validation's settings, and the seconds it took
        (the slowest rank's)."""
        self.learner.eval()
        started = time.perf_counter()
        result = evaluate(
            self.learner,
            episodes,
            device=device,
            progress=False,
            batch=self.schedule.eval_batch,
            info=self.info,
            memory_format=self.memory_format,
        )
        return result, all_reduce_max(time.perf_counter() - started, self.info)


def backward_meta_batch(learner: Learner, batch: list[Episode], info: DistInfo) -> tuple[torch.Tensor, float]:
    """Meta-gradients of this rank's tasks into ``.grad``, summed over the ranks (the meta-batch's loss is
    a sum over its tasks, so the result is one process's); returns the meta-batch's summed loss and mean
    query accuracy, the same on every rank."""
    loss, logits = learner.backward_batch(batch)
    all_reduce_gradients([p for p in learner.parameters() if p.requires_grad], info)
    correct = sum(episode_accuracy(lg, e.query_labels) for lg, e in zip(logits, batch))
    sums = torch.tensor([loss.item(), correct, len(batch)], dtype=torch.float64, device=info.device)
    totals = all_reduce_sum(sums, info)
    return totals[0].to(loss.dtype), float(totals[1] / totals[2])


def _step_record(step: int, loss: torch.Tensor, accuracy: float, seconds: float) -> dict[str, Any]:
    """The log record of one meta-step: its loss, the mean query accuracy of its episodes, the seconds so far."""
    return {"step": step, "loss": round(loss.item(), 6), "train_acc": round(accuracy, 3), "seconds": round(seconds, 2)}


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
    info: DistInfo | None = None,
    memory_format: torch.memory_format = torch.preserve_format,
    job: JobBudget | None = None,
) -> dict[str, Any]:
    """Meta-train ``learner`` (already on ``device``); returns a summary with the best validation accuracy.

    With ``job`` (a budget for the whole job, ``--job-seconds``) training also stops after the meta-step
    past which another step, its validation and the job's test would no longer fit (``JobBudget``); the
    summary then says ``stopped_by: job_seconds`` and gives the predicted test seconds.

    Every training and validation episode is moved to ``device`` with its images in ``memory_format``
    (``Episode.to``; ``torch.channels_last`` runs faster on CPU, where the learner should be converted too).

    Writes ``last.pt`` (at every validation: resume point) and ``best.pt`` (best validation accuracy)
    and ``log.jsonl`` under ``out_dir``. With ``resume=True`` training continues from ``last.pt`` and
    ends with the same parameters as an uninterrupted run.

    Under torchrun (``info.distributed``) every rank holds the model (rank 0's parameters at the start),
    computes the meta-gradients of its share of each meta-batch (``_MetaBatches``), and the sums are
    all-reduced, so a step is one process's step; validation is sharded (``evaluate``); rank 0 alone
    writes. Atom-drop masks and other random draws come from each rank's own generator (rank ``r``
    re-seeded with the initial seed + ``r``), so with atom-drop the run is not bitwise one process's.
    """
    info = info or DistInfo(device=torch.device(device))
    if schedule.meta_batch < info.world_size:
        raise ValueError(
            f"meta_batch {schedule.meta_batch} is smaller than the {info.world_size} processes: each process "
            "needs at least one task per meta-step"
        )
    if job is not None and not schedule.val_every:
        raise ValueError("a job budget needs validation during training (val_every > 0): it times the evaluation")
    out = Path(out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
    optimizer = torch.optim.Adam(learner.parameters(), lr=schedule.lr)
    if resume:
        state = _resume(out / LAST, learner, optimizer, spec, device, info)
    else:
        state = _Progress()
        broadcast_module(learner, info)
        if info.rank:
            torch.manual_seed(torch.initial_seed() + info.rank)
    run = _Run(out, learner, optimizer, state, spec, schedule, config or {}, info, memory_format)
    summary = _meta_train(run, train_episodes, val_episodes, device, resume, progress, job)
    barrier(info)  # best.pt and last.pt are written before any rank reads them
    return summary


def _meta_train(
    run: _Run,
    train_episodes: Sequence[Episode],
    val_episodes: Sequence[Episode],
    device,
    resume: bool,
    progress: bool,
    job: JobBudget | None,
) -> dict[str, Any]:
    """The loop of ``train_episodic``: meta-steps, validation and checkpoints, the log on rank 0."""
    schedule, state, info = run.schedule, run.state, run.info
    start, seconds_before = state.step, state.seconds
    log = JsonlLog(run.out / LOG) if info.is_main else None
    if log:
        log.start(start if resume else None)
    started = time.perf_counter()
    batches = _batches(train_episodes, schedule, start, info)
    bar = tqdm(
        batches, initial=start, total=schedule.meta_steps, desc="meta-train", disable=not (progress and info.is_main)
    )
    priced: dict[str, Any] = {}
    if job is not None:  # the test's price before the first validation pass, which may come too late
        priced_seconds, priced_episodes = run.price_evaluation(val_episodes, device)
        job.note_evaluation(priced_seconds, priced_episodes)
        priced = {"priced_eval_episodes": priced_episodes, "priced_eval_seconds": round(priced_seconds, 3)}
    step, stopped_by, seconds = start, "meta_steps", seconds_before
    step_began = time.perf_counter()
    for step, batch in enumerate(bar, start=start + 1):
        run.learner.train()
        batch = [e.to(device, memory_format=run.memory_format) for e in batch]
        lr = schedule.learning_rate(step - 1, seconds)
        loss, accuracy = run.meta_step(batch, lr, step)
        step_seconds = time.perf_counter() - step_began  # its episodes' loading included, validation not
        seconds = all_reduce_max(seconds_before + time.perf_counter() - started, info)  # one clock for all ranks
        out_of_time = schedule.train_seconds is not None and seconds >= schedule.train_seconds
        record = _step_record(step, loss, accuracy, seconds)
        if schedule.lr_schedule != "constant":
            record["lr"] = lr
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.1f}")
        validated = (
            out_of_time or step == schedule.meta_steps or bool(schedule.val_every and step % schedule.val_every == 0)
        )
        if validated:
            _validate(run, val_episodes, step, seconds, device, record, bar, job)
        out_of_job = job is not None and step < schedule.meta_steps and not out_of_time
        out_of_job = out_of_job and _no_room_for_another_step(job, step_seconds, len(val_episodes), info)
        if out_of_job and not validated:
            _validate(run, val_episodes, step, seconds, device, record, bar, job)
        if log:
            log.write(record)
        if (out_of_time or out_of_job) and step < schedule.meta_steps:
            stopped_by = "train_seconds" if out_of_time else "job_seconds"
            break
        step_began = time.perf_counter()
    bar.close()
    if stopped_by == "job_seconds" and info.is_main:
        print(_job_stop_note(job, step, schedule.meta_steps), file=sys.stderr)
    summary = {
        "meta_steps": step,
        "meta_steps_planned": schedule.meta_steps,
        "stopped_by": stopped_by,
        "best_val_acc": state.best_acc,
        "best_step": state.best_step,
        "train_seconds": round(seconds, 2),
    }
    if job is not None:
        summary.update(
            job_seconds=job.seconds,
            predicted_test_seconds=round(job.predicted_evaluation(job.test_episodes), 2),
            **priced,
        )
    return summary


def _job_stop_note(job: JobBudget, step: int, planned: int) -> str:
    """What the job budget did and why, for stderr: where training stopped and the predicted test."""
    elapsed, test = job.elapsed(), job.predicted_evaluation(job.test_episodes)
    note = (
        f"--job-seconds {job.seconds:g}: training stopped after meta-step {step} of {planned} at "
        f"{elapsed:.0f} s, leaving room for the test of {job.test_episodes} episodes (predicted {test:.0f} s)"
    )
    if elapsed + test > job.seconds:
        note += (
            f"; the job will still end past {job.seconds:g} s: this machine evaluates too slowly for the "
            "budget (raise --job-seconds, or lower --test-episodes)"
        )
    return note


def _no_room_for_another_step(job: JobBudget, step_seconds: float, val_episodes: int, info: DistInfo) -> bool:
    """Whether the job budget has no room for another meta-step (one decision: any rank's no is a no)."""
    return all_reduce_max(float(not job.room_for_another_step(step_seconds, val_episodes)), info) > 0


def _validate(
    run: _Run, val_episodes: Sequence[Episode], step: int, seconds: float, device, record: dict[str, Any], bar, job
) -> None:
    """Validate at ``step``: the accuracy and the evaluation's seconds into the step's log ``record``, the
    accuracy into the progress bar, the seconds into the job budget."""
    val, evaluation_seconds = run.validate(val_episodes, step, seconds, device)
    if job is not None:
        job.note_evaluation(evaluation_seconds, len(val_episodes))
    record.update(val_acc=round(val.mean, 4), val_ci95=round(val.ci95, 4), val_seconds=round(evaluation_seconds, 3))
    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_acc']:.1f}", val=f"{val.mean:.1f}")
