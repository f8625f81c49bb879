"""The network of the subspace measurement: a Conv4 with per-layer ACDC convs (scope ``layer``: every conv
its own coefficients, nothing shared, no atom-drop), trained briefly with the supervised loop ``fit``, or
loaded from a checkpoint written by it (``last.pt`` of this command or of ``run_pretrain.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fewshot.data.classification import ClassificationData
from fewshot.training.checkpoint import ModelSpec
from fewshot.training.models import build_model, model_from_checkpoint
from fewshot.training.optim import OptimConfig
from fewshot.training.run_folder import LAST
from fewshot.training.supervised import LoopConfig, fit

__all__ = ["TrainSettings", "subspace_spec", "train_network", "load_network"]


@dataclass
class TrainSettings:
    """The short training: Adam at ``lr``, constant schedule, ``epochs`` (bounded by ``seconds`` of wall time)."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seconds: float | None = None
    seed: int = 0


def subspace_spec(data: ClassificationData, width: int, atoms: int) -> ModelSpec:
    """Conv4 of ``width`` channels with per-layer ACDC convs of ``atoms`` atoms, for ``data``."""
    kwargs = {"width": width, "image_size": data.image_size, "in_channels": data.channels}
    return ModelSpec("conv4", "layer", atoms, None, data.num_classes, kwargs).normalized()


def train_network(
    data: ClassificationData, spec: ModelSpec, settings: TrainSettings, run_dir: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``spec`` (no atom-drop) and train it with ``fit``; ``run_dir`` receives ``last.pt`` and the log."""
    model = build_model(spec, atom_drop=0.0)
    optim = OptimConfig(optimizer="adam", lr=settings.lr, weight_decay=0.0, schedule="constant")
    loop = LoopConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        seed=settings.seed,
        train_seconds=settings.seconds,
        progress=False,
    )
    metrics = fit(model, data, optim, loop, run_dir=run_dir, meta=spec)
    return model, {**metrics, "checkpoint": str(Path(run_dir) / LAST)}


def load_network(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a checkpoint with metadata (``model_from_checkpoint``), and that metadata."""
    model, ckpt = model_from_checkpoint(path)
    return model, {"checkpoint": str(path), "meta": ckpt.get("meta")}
