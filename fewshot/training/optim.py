"""Optimization for the supervised loop: optimizer and per-epoch schedule, mixed precision, one training step,
and seeding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OptimConfig", "Precision", "build_optimizer", "build_scheduler", "train_step", "set_seed"]

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


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
