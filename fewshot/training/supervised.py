"""The supervised training loop: pretraining on whole datasets, and the Baselines' base-class training.

``fit`` (epochs, DDP, checkpoints every epoch / every N steps, exact resume, a wall-clock budget, JSONL log,
progress bar) trains any ``nn.Module`` mapping a normalized image batch to logits, so a backbone with a
cosine head (Baseline++) goes through the same loop as a CIFAR ResNet. Its parts live beside it:
``fewshot.training.optim`` (optimizer, schedule, mixed precision, one step), ``classifier_metrics``
(loss / top-1 / top-5 over a loader) and ``models`` (backbones from a ``ModelSpec`` or a checkpoint).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fewshot.data.classification import AugmentedDataset, ClassificationData, EpochSampler, Normalizer, ShardSampler
from fewshot.training.budget import check_train_seconds
from fewshot.training.checkpoint import (
    ModelSpec,
    capture_rng_state,
    check_model_spec,
    load_checkpoint,
    load_model_state,
    restore_rank_rng_state,
    save_checkpoint,
    unwrap_model,
)
from fewshot.training.classifier_metrics import evaluate_classifier, topk_correct
from fewshot.training.distributed import DistInfo, all_gather_objects, all_reduce_sum, broadcast_buffers, wrap_ddp
from fewshot.training.optim import (
    AMP_MODES,
    OptimConfig,
    Precision,
    build_optimizer,
    build_scheduler,
    set_seed,
    train_step,
)
from fewshot.training.run_folder import LAST, LOG, JsonlLog, remove_stale_temporaries

__all__ = ["LoopConfig", "fit"]


@dataclass
class LoopConfig:
    """How ``fit`` runs: lengths, batch size (per process), speed options, checkpoints, logging.

    ``train_seconds`` (optional) is a wall-clock budget: training stops after the batch that passes it
    (``epochs`` is then the upper bound). The clock counts the whole loop: training steps, the
    per-epoch evaluation and checkpoints, as the episodic loop counts its validation; a resumed run
    counts the seconds of its earlier part.
    """

    epochs: int
    batch_size: int
    eval_batch_size: int | None = None
    workers: int = 0
    amp: str = "off"
    memory_format: torch.memory_format = torch.preserve_format  # of the model and the batches
    compile: bool = False
    sync_batchnorm: bool = False
    seed: int = 0
    label_smoothing: float = 0.0
    eval_every: int = 1
    save_every_steps: int = 0
    stop_at_step: int | None = None
    train_seconds: float | None = None
    progress: bool = True

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp {self.amp!r} is not valid; choose one of: {', '.join(AMP_MODES)}")
        if self.workers < 0 or self.eval_every < 1 or self.save_every_steps < 0:
            raise ValueError("workers and save_every_steps must be >= 0 and eval_every >= 1")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(f"--stop-at-step must be >= 1, got {self.stop_at_step}")
        check_train_seconds(self.train_seconds)


# ----------------------------------------------------------------------------------------- fit


@dataclass
class _Progress:
    epoch: int = 0  # current epoch (0-based); == epochs when done
    batch: int = 0  # batches of `epoch` already trained
    step: int = 0  # global optimization steps so far
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # this epoch: loss*n, correct, n
    seconds: float = 0.0  # training wall time so far
    images: int = 0  # training images seen (all ranks)
    clock: float = 0.0  # wall time of the loop so far (training + evaluation + checkpoints): the budget's clock


@dataclass
class _Epoch:
    """The running state of one epoch (what ``_Progress.sums`` saves mid-epoch)."""

    index: int
    sums: Tensor  # loss x images and correct, on the device (no per-step sync)
    seen: int  # images of this epoch on this rank
    images_before: int  # progress.images when the epoch (or its resumed part) started
    started: float = field(default_factory=time.perf_counter)
    out_of_time: bool = False
    stopped_by: str | None = None  # "stop_at_step" or "train_seconds" when it stopped mid-epoch


def _check_finite(loss: float, step: int, run_path: Path | None) -> None:
    """Stop before a checkpoint would save diverged weights: the last one written stays the last good one."""
    if not math.isfinite(loss):
        where = f"{run_path / LAST} holds the last good checkpoint" if run_path is not None else "nothing was saved"
        raise FloatingPointError(
            f"the training loss became {loss} by step {step}; stopped before saving: {where}. Lower --lr and "
            "continue with --resume or start again"
        )


def fit(
    model: nn.Module,
    data: ClassificationData,
    optim: OptimConfig,
    loop: LoopConfig,
    *,
    info: DistInfo = DistInfo(),
    run_dir: str | Path | None = None,
    meta: ModelSpec | None = None,
    resume: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` and return the final metrics.

    - ``info``: from ``setup_distributed``; with several processes the model is wrapped in DDP, each rank
      trains on its shard (``loop.batch_size`` images per rank and step) and only rank 0 writes.
    - ``run_dir``: where rank 0 writes ``last.pt`` (after every epoch, every ``save_every_steps``
      steps, and at ``stop_at_step``) and ``log.jsonl`` (a fresh run starts it anew; a resumed run keeps
      the records up to its checkpoint); None writes nothing.
    - ``meta``: the model's ``ModelSpec``, stored in checkpoints.
    - ``resume``: a checkpoint written by ``fit`` to continue exactly where it stopped: model, optimizer,
      scheduler, grad scaler, epoch and step, every rank's RNG state (checked against ``meta``).
    - ``extra``: more JSON-ready entries for checkpoints (e.g. the run's config under ``"config"``).

    Returns a dict with ``epoch`` (completed epochs), ``step``, ``steps_per_epoch``, ``train_loss``,
    ``train_top1``, ``val_loss``, ``top1``, ``top5``, ``seconds`` (training steps only),
    ``images_per_second``, ``stopped_early``, ``stopped_by`` (``epochs``, ``stop_at_step`` or
    ``train_seconds``), ``clock_seconds`` (the budget's clock: the loop's wall time, earlier parts of a
    resumed run included) and ``checkpoint``.

    With ``loop.train_seconds`` training stops after the batch that brings ``clock_seconds`` to the
    budget (not at the end of that epoch: an epoch can be long, and stopping after the batch gives every
    method of an equal-budget comparison the same seconds). Mid-epoch it writes a resumable checkpoint,
    as ``stop_at_step`` does; at an epoch's end the epoch is closed as usual (evaluation, checkpoint).
    """
    loop.check()
    run = _Run(model, data, optim, loop, info, run_dir, meta, extra)
    if resume is not None:
        run.restore(resume)
    else:
        set_seed(loop.seed + info.rank)
    run.log.start(run.progress.step if resume is not None else None)
    run.prepare()
    stopped_by: str | None = None
    while run.progress.epoch < loop.epochs and stopped_by is None:
        epoch = run.train_epoch()
        stopped_by = epoch.stopped_by
        if stopped_by is None:
            run.close_epoch(epoch)
            stopped_by = run.stop_after(epoch)
    return run.result(stopped_by)


class _Run:
    """One call of ``fit``: model, optimizer, schedule, precision and progress; the data loaders; the budget's
    clock; and what rank 0 writes (``last.pt``, ``log.jsonl``)."""

    def __init__(
        self,
        model: nn.Module,
        data: ClassificationData,
        optim: OptimConfig,
        loop: LoopConfig,
        info: DistInfo,
        run_dir: str | Path | None,
        meta: ModelSpec | None,
        extra: Mapping[str, Any] | None,
    ) -> None:
        self.data, self.loop, self.info, self.meta, self.extra = data, loop, info, meta, dict(extra or {})
        self.device = info.device
        self.run_path = Path(run_dir) if run_dir is not None and info.is_main else None
        if self.run_path is not None:
            self.run_path.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.run_path)
        self.log = JsonlLog(None if self.run_path is None else self.run_path / LOG)
        raw = unwrap_model(model).to(self.device)
        self.raw = raw.to(memory_format=loop.memory_format)
        self.optimizer = build_optimizer(self.raw, optim)
        self.scheduler = build_scheduler(self.optimizer, optim, loop.epochs)
        self.precision = Precision(loop.amp, self.device)
        self.progress = _Progress()
        self.loss_fn = partial(F.cross_entropy, label_smoothing=loop.label_smoothing)
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.checkpoint_path: str | None = None
        self._clock_before, self._clock_started = 0.0, time.perf_counter()

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint of ``fit`` (model, optimizer, schedule, scaler, progress, RNG states)."""
        _restore(
            path,
            load_checkpoint(path, "cpu"),
            self.raw,
            self.optimizer,
            self.scheduler,
            self.precision,
            self.progress,
            self.info,
            self.meta,
        )

    def prepare(self) -> None:
        """Compile, wrap in DDP, build the loaders; then start the budget's clock."""
        if self.loop.compile:
            self.raw.compile()  # in place: state-dict keys keep their names
        self.net = wrap_ddp(self.raw, self.info, self.loop.sync_batchnorm)
        self.sampler, self.train_loader, self.val_loader = _loaders(self.data, self.loop, self.info)
        self.steps_per_epoch = len(self.sampler) // self.loop.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.data.train)} training images give no full batch of {self.loop.batch_size} per "
                f"process on {self.info.world_size} process(es); lower --batch-size"
            )
        self.normalize = Normalizer(self.data.mean, self.data.std, self.device, self.loop.memory_format)
        self._clock_before, self._clock_started = self.progress.clock, time.perf_counter()
        self.net.train()

    def clock(self) -> float:
        """Seconds on the budget's clock: this loop's wall time plus a resumed run's earlier part."""
        return self._clock_before + time.perf_counter() - self._clock_started

    def checkpoint(self, metrics: Mapping[str, Any] | None = None) -> None:
        """Save ``last.pt`` (rank 0; every rank hands in its RNG state)."""
        self.progress.clock = self.clock()
        rng = all_gather_objects(capture_rng_state(), self.info)  # every rank takes part
        if self.run_path is None:
            return
        path = self.run_path / LAST
        save_checkpoint(
            path,
            model=self.raw,
            meta=self.meta,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.precision.scaler.state_dict(),
            progress=asdict(self.progress),
            rng=rng,
            world_size=self.info.world_size,
            data=self.data.describe(),
            metrics=dict(metrics or {}),
            **self.extra,
        )
        self.checkpoint_path = str(path)

    def train_epoch(self) -> _Epoch:
        """Train the rest of the current epoch. At ``stop_at_step`` or the end of the budget mid-epoch it
        saves a resumable checkpoint and stops (``stopped_by``); a periodic save does not stop."""
        loop, progress, info = self.loop, self.progress, self.info
        sums = torch.tensor(progress.sums[:2], dtype=torch.float64, device=self.device)
        epoch = _Epoch(progress.epoch, sums, int(progress.sums[2]), progress.images)
        self.sampler.set_epoch(epoch.index, skip=progress.batch * loop.batch_size)
        bar = _progress_bar(
            loop.progress and info.is_main, self.steps_per_epoch, progress.batch, epoch.index, loop.epochs
        )
        started = time.perf_counter()
        for images, targets in self.train_loader:
            y = targets.to(self.device, non_blocking=True)
            loss, logits = train_step(self.net, self.normalize(images), y, self.optimizer, self.precision, self.loss_fn)
            epoch.sums += torch.stack([loss.double() * y.numel(), topk_correct(logits, y, (1,))[0].double()])
            epoch.seen += y.numel()
            progress.batch += 1
            progress.step += 1
            progress.images += y.numel() * info.world_size
            if bar is not None:
                bar.update(1)
                if progress.batch % 20 == 0 or progress.batch == self.steps_per_epoch:
                    bar.set_postfix(loss=f"{epoch.sums[0].item() / epoch.seen:.3f}", lr=f"{_lr(self.optimizer):.3g}")
            mid_epoch = progress.batch < self.steps_per_epoch
            stop_now = loop.stop_at_step is not None and progress.step >= loop.stop_at_step
            periodic = loop.save_every_steps > 0 and progress.step % loop.save_every_steps == 0
            if loop.train_seconds is not None:
                epoch.out_of_time = _on_any_rank(self.clock() >= loop.train_seconds, info)
            if mid_epoch and (stop_now or periodic or epoch.out_of_time):
                _check_finite(epoch.sums[0].item(), progress.step, self.run_path)
                progress.sums = [*epoch.sums.tolist(), float(epoch.seen)]
                progress.seconds += time.perf_counter() - started
                started = time.perf_counter()
                self.checkpoint()
                self.log.write(
                    {"event": "checkpoint", "epoch": epoch.index, "step": progress.step, "batch": progress.batch}
                )
                if stop_now or epoch.out_of_time:
                    epoch.stopped_by = "stop_at_step" if stop_now else "train_seconds"
                    break
        if bar is not None:
            bar.close()
        if epoch.stopped_by is None:
            progress.seconds += time.perf_counter() - started
        return epoch

    def close_epoch(self, epoch: _Epoch) -> None:
        """After a full epoch: sum it over ranks, step the schedule, evaluate, log, save ``last.pt``."""
        loop, progress = self.loop, self.progress
        epoch_seconds = time.perf_counter() - epoch.started
        totals = all_reduce_sum(torch.cat([epoch.sums, epoch.sums.new_tensor([float(epoch.seen)])]), self.info)
        train = {"train_loss": (totals[0] / totals[2]).item(), "train_top1": (totals[1] / totals[2]).item()}
        _check_finite(train["train_loss"], progress.step, self.run_path)
        self.last_train = train
        lr = _lr(self.optimizer)
        self.scheduler.step()
        broadcast_buffers(self.raw, self.info)  # one model on every rank for evaluation and the checkpoint
        evaluated: dict[str, Any] = {}
        if self.val_loader is not None and ((epoch.index + 1) % loop.eval_every == 0 or epoch.index + 1 == loop.epochs):
            self.last_eval = evaluated = evaluate_classifier(
                self.raw, self.val_loader, self.normalize, self.precision, self.info
            )
        progress.epoch, progress.batch, progress.sums = epoch.index + 1, 0, [0.0, 0.0, 0.0]
        record = {
            "event": "epoch",
            "epoch": epoch.index + 1,
            "step": progress.step,
            "lr": lr,
            **train,
            "val_loss": evaluated.get("loss"),
            "top1": evaluated.get("top1"),
            "top5": evaluated.get("top5"),
            "epoch_seconds": epoch_seconds,
            "images_per_second": (progress.images - epoch.images_before) / max(epoch_seconds, 1e-9),
        }
        self.log.write(record)
        if self.info.is_main and loop.progress:
            print(_summary(record), file=sys.stderr, flush=True)
        self.checkpoint(record)

    def stop_after(self, epoch: _Epoch) -> str | None:
        """Why training stops after this full epoch before its last one (None: it goes on, or it is done)."""
        if self.progress.epoch >= self.loop.epochs:
            return None
        if self.loop.stop_at_step is not None and self.progress.step >= self.loop.stop_at_step:
            return "stop_at_step"
        return "train_seconds" if epoch.out_of_time else None

    def result(self, stopped_by: str | None) -> dict[str, Any]:
        """The metrics ``fit`` returns."""
        progress = self.progress
        return {
            "epoch": progress.epoch,
            "step": progress.step,
            "steps_per_epoch": self.steps_per_epoch,
            "train_loss": self.last_train.get("train_loss"),
            "train_top1": self.last_train.get("train_top1"),
            "val_loss": self.last_eval.get("loss"),
            "top1": self.last_eval.get("top1"),
            "top5": self.last_eval.get("top5"),
            "seconds": progress.seconds,
            "images_per_second": progress.images / max(progress.seconds, 1e-9),
            "stopped_early": stopped_by is not None,
            "stopped_by": stopped_by or "epochs",
            "clock_seconds": self.clock(),
            "checkpoint": self.checkpoint_path,
        }


def _loaders(
    data: ClassificationData, loop: LoopConfig, info: DistInfo
) -> tuple[EpochSampler, DataLoader, DataLoader | None]:
    """This rank's epoch sampler and training loader, and its shard of the validation set (if any)."""
    train_set = AugmentedDataset(data.train, data.train_transform, loop.seed)
    sampler = EpochSampler(train_set, info.world_size, info.rank, loop.seed)
    workers = dict(num_workers=loop.workers, persistent_workers=loop.workers > 0, pin_memory=info.device.type == "cuda")
    train_loader = DataLoader(
        train_set,
        batch_size=loop.batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(loop.seed),
        **workers,
    )
    if data.val is None or len(data.val) == 0:
        return sampler, train_loader, None
    val_set = AugmentedDataset(data.val, data.eval_transform, loop.seed)
    val_loader = DataLoader(
        val_set,
        batch_size=loop.eval_batch_size or loop.batch_size,
        sampler=ShardSampler(len(val_set), info.world_size, info.rank),
        **workers,
    )
    return sampler, train_loader, val_loader


def _on_any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any (so that all ranks stop at the same step)."""
    if not info.distributed:
        return flag
    return all_reduce_sum(torch.tensor([float(flag)], device=info.device), info).item() > 0


def _restore(
    path: str | Path,
    ckpt: Mapping[str, Any],
    raw: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
    progress: _Progress,
    info: DistInfo,
    meta: ModelSpec | None,
) -> None:
    missing = [k for k in ("model", "optimizer", "scheduler", "progress") if k not in ckpt]
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} lacks {', '.join(missing)}: it is not a training checkpoint of fit()"
        )
    if meta is not None:
        check_model_spec(ckpt.get("meta"), meta, path)
    load_model_state(raw, ckpt["model"], source=f"checkpoint {str(path)!r}")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if "scaler" in ckpt and ckpt["scaler"]:
        precision.scaler.load_state_dict(ckpt["scaler"])
    saved = dict(ckpt["progress"])
    progress.epoch, progress.batch, progress.step = int(saved["epoch"]), int(saved["batch"]), int(saved["step"])
    progress.sums = [float(v) for v in saved["sums"]]
    progress.seconds, progress.images = float(saved["seconds"]), int(saved["images"])
    progress.clock = float(saved.get("clock", saved["seconds"]))  # checkpoints before the budget: training time
    note = restore_rank_rng_state(ckpt.get("rng") or [], info.rank, info.world_size, int(progress.step) * 1000)
    if note and info.is_main:
        print(note, file=sys.stderr)


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _progress_bar(enabled: bool, total: int, done: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr, dynamic_ncols=True
    )


def _summary(record: Mapping[str, Any]) -> str:
    text = (
        f"epoch {record['epoch']} step {record['step']} lr {record['lr']:.4g} "
        f"train loss {record['train_loss']:.4f} top1 {record['train_top1']:.4f}"
    )
    if record.get("top1") is not None:
        text += f" | val loss {record['val_loss']:.4f} top1 {record['top1']:.4f} top5 {record['top5']:.4f}"
    return text + f" | {record['images_per_second']:.0f} img/s"
