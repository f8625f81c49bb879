"""Device choice and torchrun / DistributedDataParallel plumbing.

A script calls ``setup_distributed(device)`` once: under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) it joins the process group (NCCL on CUDA, gloo on CPU) and picks ``cuda:LOCAL_RANK``;
otherwise it returns a single-process ``DistInfo``. Only ``DistInfo.is_main`` logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "resolve_device",
    "setup_distributed",
    "cleanup_distributed",
    "wrap_ddp",
    "all_gather_objects",
    "all_reduce_sum",
    "all_reduce_max",
    "all_reduce_gradients",
    "average_buffers",
    "broadcast_module",
    "broadcast_buffers",
    "barrier",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``auto``/None (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, ``mps``.

    Asking for a device this machine lacks raises a ValueError saying so and what is available.
    """
    name = (name or "auto").strip().lower()
    cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not cuda:
            raise ValueError(
                f"--device {name} was requested but no CUDA GPU is available "
                f"(torch.cuda.is_available() is False, torch {torch.__version__}); use --device cpu"
            )
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--device cuda:{index} does not exist; this machine has {torch.cuda.device_count()} GPU(s)"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("--device mps was requested but MPS is not available; use --device cpu")
        return device
    if device.type != "cpu":
        raise ValueError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def setup_distributed(device: str | None = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun; choose this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, chosen, None)
    if chosen.type == "cuda":
        if device not in (None, "auto", "cuda"):
            raise ValueError(
                f"--device {device} pins one GPU, but under torchrun each process uses cuda:LOCAL_RANK; "
                "use --device cuda (or auto)"
            )
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
        backend = "nccl"
    elif chosen.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training supports cpu (gloo) and cuda (nccl), not {chosen.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, **({"device_id": chosen} if backend == "nccl" else {}))
    return DistInfo(rank, world_size, local_rank, chosen, backend)


def cleanup_distributed() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, sync_batchnorm: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed (optionally with SyncBatchNorm), else ``model``."""
    if not info.distributed:
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``values`` over all ranks (``values`` itself when not distributed)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(model: nn.Module, info: DistInfo, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every rank.

    DDP broadcasts them at the start of each forward, so after the last training step the ranks' running
    statistics differ; call this before evaluating or saving so that all ranks hold one model.
    """
    if info.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=src)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if info.distributed:
        dist.barrier()


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The largest ``value`` over all ranks (``value`` itself when not distributed): one decision for all,
    e.g. whether the wall-clock budget is spent."""
    if not info.distributed:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return float(box.item())


def all_reduce_gradients(parameters: list[torch.Tensor], info: DistInfo) -> None:
    """Replace every ``.grad`` by its sum over the ranks, in one collective.

    A parameter without a gradient on some ranks counts as zero there; one without a gradient on every
    rank keeps ``grad = None`` (so that optimizers skip it, as in one process). Shared tensors (ACDC
    coefficients) appear once in ``parameters`` and are summed once.
    """
    if not info.distributed or not parameters:
        return
    present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=info.device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(parameters, present.tolist()) if flag]
    if not used:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in used])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in used:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def average_buffers(module: nn.Module, info: DistInfo) -> None:
    """Floating-point buffers (BatchNorm running statistics) become their mean over the ranks, the
    others (``num_batches_tracked``) rank 0's, so that every rank holds one model."""
    if not info.distributed:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer.data, op=dist.ReduceOp.SUM)
            buffer.data /= info.world_size
        else:
            dist.broadcast(buffer.data, src=0)


def broadcast_module(module: nn.Module, info: DistInfo, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (one starting point for all)."""
    if info.distributed:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)
