"""Models of the supervised runs: a registry backbone from its ``ModelSpec``, capacity growth, and a model
rebuilt from a checkpoint's metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fewshot.training.checkpoint import ModelSpec, check_model_spec, load_checkpoint, load_model_state

__all__ = ["build_model", "expand_model", "model_from_checkpoint"]


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
