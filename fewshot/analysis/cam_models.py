"""Classifiers (images -> class logits) from checkpoints, for the CAMs.

Accepted: a checkpoint of ``run_pretrain.py`` (a registry backbone with its linear ``fc``; ``last.pt``), and
the base-class training of a Baseline run of ``run_fewshot.py`` (``<run>/pretrain/last.pt``: the backbone
and its linear ``head``). A run folder stands for its ``last.pt`` or ``pretrain/last.pt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fewshot.training.checkpoint import ModelSpec, load_checkpoint, load_model_state
from fewshot.training.models import build_model
from fewshot.training.run_folder import LAST

__all__ = ["Classifier", "resolve_checkpoint", "load_classifier"]


@dataclass
class Classifier:
    """``model`` maps normalized images to logits; ``spec`` is its backbone; ``config`` its run's settings."""

    model: nn.Module
    spec: ModelSpec
    config: dict[str, Any]
    path: Path

    @property
    def label(self) -> str:
        """``dense`` or ``ACDC-<scope> m<atoms>``."""
        return "dense" if self.spec.acdc is None else f"ACDC-{self.spec.acdc} m{self.spec.atoms}"


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or for a run folder its ``last.pt`` (pretraining) or ``pretrain/last.pt`` (Baseline)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / LAST, path / "pretrain" / LAST):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"--checkpoint {path}: the folder has neither {LAST} nor pretrain/{LAST}")
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    return path


def load_classifier(path: str | Path) -> Classifier:
    """The classifier saved in ``path`` (see the module docstring); a ValueError for anything else."""
    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path)
    if "meta" not in ckpt:
        raise ValueError(
            f"--checkpoint {path} has no model metadata (not written by run_pretrain.py or run_fewshot.py)"
        )
    spec = ModelSpec.from_dict(ckpt["meta"])
    state = ckpt["model"]
    config = dict(ckpt.get("config") or {})
    if "head.weight" in state:
        return Classifier(_baseline_model(spec, state, path), spec, config, path)
    if spec.num_classes < 1:
        raise ValueError(
            f"--checkpoint {path} holds a backbone without a classifier; give a run_pretrain.py checkpoint or a "
            f"Baseline run's pretrain/{LAST}"
        )
    model = build_model(spec)
    load_model_state(model, state, source=f"checkpoint {str(path)!r}")
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        raise ValueError(f"--checkpoint {path}: the classifier is not linear; CAMs need a linear one")
    return Classifier(model, spec, config, path)


def _baseline_model(spec: ModelSpec, state: dict[str, Any], path: Path) -> nn.Module:
    """Backbone + linear head of a Baseline's base-class training (``PretrainModel``)."""
    from fewshot.learners.baseline import PretrainModel

    head_keys = {k for k in state if k.startswith("head.")}
    if head_keys != {"head.weight", "head.bias"} or state["head.weight"].dim() != 2:
        raise ValueError(
            f"--checkpoint {path}: the head ({', '.join(sorted(head_keys))}) is not a linear classifier "
            f"(Baseline++'s cosine head is not supported); use a Baseline run"
        )
    classes, features = state["head.weight"].shape
    model = PretrainModel(build_model(spec), nn.Linear(features, classes))
    load_model_state(model, state, source=f"checkpoint {str(path)!r}")
    return model
