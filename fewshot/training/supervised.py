"""The supervised training loop: pretraining on whole datasets, and the Baselines' base-class training.

Building blocks, usable one by one:
- ``OptimConfig`` + ``build_optimizer`` / ``build_scheduler`` (SGD/Adam/AdamW; multistep/step/cosine/constant,
  stepped once per epoch);
- ``Precision`` (autocast bf16/fp16 + GradScaler) and ``train_step`` (one optimization step);
- ``evaluate_classifier`` (loss, top-1, top-5 over a loader, summed across DDP ranks);
- ``fit`` (epochs, DDP, checkpoints every epoch / every N steps, exact resume, a wall-clock budget, JSONL
  log, progress bar);
- ``build_model`` / ``model_from_checkpoint`` (a registry backbone from a ``ModelSpec``), ``expand_model``
  (capacity growth).

``fit`` trains any ``nn.Module`` mapping a normalized image batch to logits, so a backbone with a cosine
head (Baseline++) goes through the same loop as a CIFAR ResNet.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fewshot.data.classification import AugmentedDataset, ClassificationData, EpochSampler, Normalizer, ShardSampler
from fewshot.modes import eval_mode
from fewshot.training.budget import check_train_seconds
from fewshot.training.checkpoint import (
    ModelSpec,
    capture_rng_state,
    check_model_spec,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from fewshot.training.distributed import DistInfo, all_gather_objects, all_reduce_sum, broadcast_buffers, wrap_ddp
from fewshot.training.run_folder import LAST, LOG, JsonlLog, remove_stale_temporaries

__all__ = [
    "OptimConfig",
    "LoopConfig",
    "Precision",
    "build_optimizer",
    "build_scheduler",
    "train_step",
    "evaluate_classifier",
    "topk_correct",
    "fit",
    "build_model",
    "model_from_checkpoint",
    "set_seed",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "step", "cosine", "constant")
AMP_MODES = ("off", "bf16", "fp16")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (stepped once per epoch).

    ``multistep``: lr × ``gamma`` at each of ``milestones`` (epochs); ``step``: every ``step_size`` epochs;
    ``cosine``: cosine decay to 0 over the run; ``constant``.
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "multistep"
    milestones: Sequence[int] = (150, 250)
    gamma: float = 0.1
    step_size: int = 30


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
    channels_last: bool = False
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


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------ optimizer, schedule


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over the model's parameters (weight decay on all of them, as in App. A)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"--optimizer {cfg.optimizer!r} is not valid; choose one of: {', '.join(OPTIMIZERS)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule of ``cfg``."""
    if cfg.schedule == "multistep":
        milestones = list(cfg.milestones)
        if sorted(milestones) != milestones or any(m < 1 for m in milestones):
            raise ValueError(f"--milestones must be increasing epochs >= 1, got {milestones}")
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.gamma)
    if cfg.schedule == "step":
        if cfg.step_size < 1:
            raise ValueError(f"--step-size must be >= 1, got {cfg.step_size}")
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"--schedule {cfg.schedule!r} is not valid; choose one of: {', '.join(SCHEDULES)}")


# ------------------------------------------------------------------------------ mixed precision


class Precision:
    """Autocast (bf16 / fp16) and, for fp16, a ``torch.amp.GradScaler``; ``off`` is plain fp32."""

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in AMP_MODES:
            raise ValueError(f"--amp {mode!r} is not valid; choose one of: {', '.join(AMP_MODES)}")
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--amp bf16 needs a GPU with bfloat16 support; use --amp fp16 on this GPU")
        self.mode = mode
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def train_step(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One optimization step; returns the (detached) loss and logits."""
    with precision.autocast():
        logits = model(images)
    loss = (loss_fn or F.cross_entropy)(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()
    precision.scaler.step(optimizer)
    precision.scaler.update()
    return loss.detach(), logits.detach()


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> list[Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(targets.view(-1, 1))
    return [hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, loader: Iterable, normalize: Normalizer, precision: Precision, info: DistInfo = DistInfo()
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (fractions) over ``loader``, combined over DDP ranks."""
    device = normalize.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top1, top5 (summed on the device)
    count = 0
    with eval_mode(model):
        for images, targets in loader:
            x = normalize(images)
            y = targets.to(device, non_blocking=True)
            with precision.autocast():
                logits = model(x)
            top1, top5 = topk_correct(logits.float(), y)
            sums += torch.stack(
                [F.cross_entropy(logits.float(), y, reduction="sum").double(), top1.double(), top5.double()]
            )
            count += y.numel()
    sums = all_reduce_sum(torch.cat([sums, sums.new_tensor([float(count)])]), info)
    count = max(sums[3].item(), 1.0)
    return {
        "loss": sums[0].item() / count,
        "top1": sums[1].item() / count,
        "top5": sums[2].item() / count,
        "images": int(sums[3].item()),
    }


# ------------------------------------------------------------------------------------- models


def build_model(spec: ModelSpec, atom_drop: float = 0.1) -> nn.Module:
    """A registry backbone as ``spec`` describes it (``fewshot.backbones.create_backbone``).

    A capacity-grown model (``spec.expanded_from``) is built at its target scope and atoms directly:
    ``fewshot.acdc.expand`` yields the same parameter structure, so its checkpoints load into it.
    """
    from fewshot.backbones import create_backbone

    spec = spec.normalized()
    return create_backbone(
        spec.backbone,
        acdc=spec.acdc,
        atoms=spec.atoms or 8,
        group_size=spec.group_size,
        num_classes=spec.num_classes,
        atom_drop=atom_drop,
        decompose_stem=spec.decompose_stem,
        **spec.kwargs,
    )


def expand_model(model: nn.Module, scope: str | None, atoms: int | None) -> nn.Module:
    """``fewshot.acdc.expand(model, scope=..., atoms=...)``: relax sharing / add atoms, same function."""
    from fewshot.acdc import expand

    # Registry backbones know their sharing blocks (as create_backbone used them for convert).
    block_of = getattr(model, "acdc_block_of", None)
    out = expand(model, scope=scope, atoms=atoms, block_of=block_of)
    return model if out is None else out


def model_from_checkpoint(
    path: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    expect: ModelSpec | None = None,
    ignore: tuple[str, ...] = (),
) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint was saved for (from its metadata) and load its weights.

    With ``expect``, first check the checkpoint's metadata against it (fields in ``ignore`` excepted).
    Works for checkpoints written by any number of DDP processes. Returns ``(model, checkpoint)``.
    """
    ckpt = load_checkpoint(path, map_location)
    if "meta" not in ckpt:
        raise ValueError(
            f"checkpoint {str(path)!r} has no model metadata; build the model yourself and use load_model_state"
        )
    spec = ModelSpec.from_dict(ckpt["meta"])
    if expect is not None:
        check_model_spec(spec, expect, path, ignore)
    model = build_model(spec)
    load_model_state(model, ckpt["model"], source=f"checkpoint {str(path)!r}")
    return model, ckpt


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
    device = info.device
    run_path = Path(run_dir) if run_dir is not None and info.is_main else None
    if run_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_path)
    log = JsonlLog(None if run_path is None else run_path / LOG)

    raw = unwrap_model(model).to(device)
    if loop.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(raw, optim)
    scheduler = build_scheduler(optimizer, optim, loop.epochs)
    precision = Precision(loop.amp, device)
    progress = _Progress()

    if resume is not None:
        _restore(resume, load_checkpoint(resume, "cpu"), raw, optimizer, scheduler, precision, progress, info, meta)
    else:
        set_seed(loop.seed + info.rank)
    log.start(progress.step if resume is not None else None)

    if loop.compile:
        raw.compile()  # in place: state-dict keys keep their names
    net = wrap_ddp(raw, info, loop.sync_batchnorm)

    train_set = AugmentedDataset(data.train, data.train_transform, loop.seed)
    sampler = EpochSampler(train_set, info.world_size, info.rank, loop.seed)
    pin = device.type == "cuda"
    workers = dict(num_workers=loop.workers, persistent_workers=loop.workers > 0, pin_memory=pin)
    train_loader = DataLoader(
        train_set,
        batch_size=loop.batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(loop.seed),
        **workers,
    )
    steps_per_epoch = len(sampler) // loop.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(data.train)} training images give no full batch of {loop.batch_size} per process "
            f"on {info.world_size} process(es); lower --batch-size"
        )
    val_loader = None
    if data.val is not None and len(data.val) > 0:
        val_set = AugmentedDataset(data.val, data.eval_transform, loop.seed)
        val_loader = DataLoader(
            val_set,
            batch_size=loop.eval_batch_size or loop.batch_size,
            sampler=ShardSampler(len(val_set), info.world_size, info.rank),
            **workers,
        )
    normalize = Normalizer(data.mean, data.std, device, loop.channels_last)

    clock_before, clock_started = progress.clock, time.perf_counter()

    def clock() -> float:
        """Seconds on the budget's clock: this loop's wall time plus a resumed run's earlier part."""
        return clock_before + time.perf_counter() - clock_started

    def checkpoint(metrics: Mapping[str, Any] | None = None) -> str | None:
        progress.clock = clock()
        rng = all_gather_objects(capture_rng_state(), info)  # every rank takes part
        if run_path is None:
            return None
        path = run_path / LAST
        save_checkpoint(
            path,
            model=raw,
            meta=meta,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=precision.scaler.state_dict(),
            progress=asdict(progress),
            rng=rng,
            world_size=info.world_size,
            data=data.describe(),
            metrics=dict(metrics or {}),
            **dict(extra or {}),
        )
        return str(path)

    last_eval: dict[str, Any] = {}
    last_train: dict[str, Any] = {}
    ckpt_path: str | None = None
    stopped, stopped_by = False, "epochs"
    net.train()
    while progress.epoch < loop.epochs and not stopped:
        epoch = progress.epoch
        sampler.set_epoch(epoch, skip=progress.batch * loop.batch_size)
        # Running sums of this epoch: loss x images and correct on the device (no per-step sync), images here.
        sums = torch.tensor(progress.sums[:2], dtype=torch.float64, device=device)
        seen = int(progress.sums[2])
        bar = _progress_bar(loop.progress and info.is_main, steps_per_epoch, progress.batch, epoch, loop.epochs)
        started = epoch_started = time.perf_counter()
        images_before = progress.images
        out_of_time = False
        for images, targets in train_loader:
            x = normalize(images)
            y = targets.to(device, non_blocking=True)
            loss, logits = train_step(
                net,
                x,
                y,
                optimizer,
                precision,
                lambda z, t: F.cross_entropy(z, t, label_smoothing=loop.label_smoothing),
            )
            sums += torch.stack([loss.double() * y.numel(), topk_correct(logits, y, (1,))[0].double()])
            seen += y.numel()
            progress.batch += 1
            progress.step += 1
            progress.images += y.numel() * info.world_size
            if bar is not None:
                bar.update(1)
                if progress.batch % 20 == 0 or progress.batch == steps_per_epoch:
                    bar.set_postfix(loss=f"{sums[0].item() / seen:.3f}", lr=f"{_lr(optimizer):.3g}")
            mid_epoch = progress.batch < steps_per_epoch
            stop_now = loop.stop_at_step is not None and progress.step >= loop.stop_at_step
            periodic = loop.save_every_steps > 0 and progress.step % loop.save_every_steps == 0
            if loop.train_seconds is not None:
                out_of_time = _on_any_rank(clock() >= loop.train_seconds, info)
            if mid_epoch and (stop_now or periodic or out_of_time):
                _check_finite(sums[0].item(), progress.step, run_path)
                progress.sums = [*sums.tolist(), float(seen)]
                progress.seconds += time.perf_counter() - started
                started = time.perf_counter()
                ckpt_path = checkpoint()
                log.write({"event": "checkpoint", "epoch": epoch, "step": progress.step, "batch": progress.batch})
                if stop_now or out_of_time:
                    stopped, stopped_by = True, "stop_at_step" if stop_now else "train_seconds"
                    break
        if bar is not None:
            bar.close()
        if stopped:
            break
        progress.seconds += time.perf_counter() - started
        epoch_seconds = time.perf_counter() - epoch_started
        totals = all_reduce_sum(torch.cat([sums, sums.new_tensor([float(seen)])]), info)
        train = {"train_loss": (totals[0] / totals[2]).item(), "train_top1": (totals[1] / totals[2]).item()}
        _check_finite(train["train_loss"], progress.step, run_path)
        last_train = train
        lr = _lr(optimizer)
        scheduler.step()
        broadcast_buffers(raw, info)  # one model on every rank for evaluation and the checkpoint
        evaluated: dict[str, Any] = {}
        if val_loader is not None and ((epoch + 1) % loop.eval_every == 0 or epoch + 1 == loop.epochs):
            last_eval = evaluated = evaluate_classifier(raw, val_loader, normalize, precision, info)
        progress.epoch, progress.batch, progress.sums = epoch + 1, 0, [0.0, 0.0, 0.0]
        record = {
            "event": "epoch",
            "epoch": epoch + 1,
            "step": progress.step,
            "lr": lr,
            **train,
            "val_loss": evaluated.get("loss"),
            "top1": evaluated.get("top1"),
            "top5": evaluated.get("top5"),
            "epoch_seconds": epoch_seconds,
            "images_per_second": (progress.images - images_before) / max(epoch_seconds, 1e-9),
        }
        log.write(record)
        if info.is_main and loop.progress:
            print(_summary(record), file=sys.stderr, flush=True)
        ckpt_path = checkpoint(record)
        if progress.epoch < loop.epochs:
            if loop.stop_at_step is not None and progress.step >= loop.stop_at_step:
                stopped, stopped_by = True, "stop_at_step"
            elif out_of_time:
                stopped, stopped_by = True, "train_seconds"
    return {
        "epoch": progress.epoch,
        "step": progress.step,
        "steps_per_epoch": steps_per_epoch,
        "train_loss": last_train.get("train_loss"),
        "train_top1": last_train.get("train_top1"),
        "val_loss": last_eval.get("loss"),
        "top1": last_eval.get("top1"),
        "top5": last_eval.get("top5"),
        "seconds": progress.seconds,
        "images_per_second": progress.images / max(progress.seconds, 1e-9),
        "stopped_early": stopped,
        "stopped_by": stopped_by,
        "clock_seconds": clock(),
        "checkpoint": ckpt_path,
    }


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
    states = ckpt.get("rng") or []
    if len(states) == info.world_size:
        restore_rng_state(states[info.rank])
    else:
        # Another process count changes the data shards anyway: continue reproducibly, not identically.
        set_seed(int(progress.step) * 1000 + info.rank)
        if info.is_main:
            print(
                f"note: the checkpoint was written by {len(states)} process(es), this run has "
                f"{info.world_size}; RNG states are re-seeded, so the run continues reproducibly "
                f"but not identically",
                file=sys.stderr,
            )


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
