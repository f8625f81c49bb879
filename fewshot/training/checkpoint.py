"""Checkpoints: atomic save, ``weights_only`` load, RNG capture/restore, model metadata and its check.

A checkpoint is a plain dict (every entry optional except ``format``)::

    {"format": "fewshot-checkpoint", "version": 1,
     "model": state_dict (no DDP "module." / torch.compile "_orig_mod." prefixes),
     "meta": {"backbone": ..., "acdc": ..., "atoms": ..., "group_size": ..., ...},
     "optimizer": ..., "scheduler": ..., "scaler": ...,
     "progress": {"epoch": ..., "step": ..., ...},   # where training stands
     "rng": [state of rank 0, state of rank 1, ...],  # see capture_rng_state
     "config": {...}, "metrics": {...}}

Everything in it loads with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fewshot.io import atomic_write

__all__ = [
    "FORMAT",
    "ModelSpec",
    "unwrap_model",
    "model_state_dict",
    "strip_prefixes",
    "load_model_state",
    "capture_rng_state",
    "restore_rng_state",
    "restore_rank_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "check_model_spec",
]

FORMAT = "fewshot-checkpoint"
VERSION = 1
_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model's architecture, enough to rebuild it and to refuse a wrong checkpoint.

    ``acdc`` is the ACDC sharing scope (None = dense convs); ``atoms`` only matters with ``acdc`` and
    ``group_size`` only with the grouped ``g-*`` scopes: ``normalized()`` blanks them otherwise, so that
    two specs of the same network compare equal. ``kwargs`` are the other backbone arguments.
    ``decompose_stem``: the ImageNet 7x7 stem is decomposed too. ``expanded_from`` is provenance, not
    architecture: the (acdc, atoms) of the checkpoint a capacity-grown model was expanded from
    (``fewshot.acdc.expand`` gives the same parameter structure as building the target scope directly),
    so ``check_model_spec`` does not compare it.
    """

    backbone: str
    acdc: str | None = None
    atoms: int | None = 8
    group_size: int | None = None
    num_classes: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)
    expanded_from: dict[str, Any] | None = None
    decompose_stem: bool = False

    def normalized(self) -> ModelSpec:
        acdc = self.acdc if self.acdc not in ("", "none", "dense") else None
        atoms = self.atoms if acdc is not None else None
        grouped = acdc is not None and acdc.startswith("g-")
        group_size = self.group_size if grouped else None
        return ModelSpec(
            self.backbone,
            acdc,
            atoms,
            group_size,
            int(self.num_classes),
            dict(sorted(self.kwargs.items())),
            self.expanded_from,
            bool(self.decompose_stem) and acdc is not None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.normalized())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).normalized()

    def describe(self) -> str:
        spec = self.normalized()
        parts = [f"backbone={spec.backbone}", f"acdc={spec.acdc}"]
        if spec.acdc is not None:
            parts.append(f"atoms={spec.atoms}")
        if spec.group_size is not None:
            parts.append(f"group_size={spec.group_size}")
        parts.append(f"num_classes={spec.num_classes}")
        parts += [f"{k}={v}" for k, v in spec.kwargs.items()]
        if spec.decompose_stem:
            parts.append("decompose_stem=True")
        return ", ".join(parts)


def check_model_spec(
    saved: Mapping[str, Any] | ModelSpec | None,
    requested: ModelSpec,
    path: str | os.PathLike,
    ignore: tuple[str, ...] = (),
) -> None:
    """Raise ValueError when the checkpoint at ``path`` was saved for another model than ``requested``.

    ``ignore`` names fields not to compare (e.g. ``("num_classes",)`` when only the features are loaded).
    """
    if saved is None:
        raise ValueError(
            f"checkpoint {str(path)!r} holds no model metadata, so it cannot be checked against "
            f"{requested.describe()}; save it with fewshot.training.checkpoint.save_checkpoint(meta=...)"
        )
    saved_spec = saved if isinstance(saved, ModelSpec) else ModelSpec.from_dict(saved)
    a, b = saved_spec.to_dict(), requested.to_dict()
    differs = [k for k in a if k not in ignore and k != "expanded_from" and a[k] != b[k]]
    if differs:
        raise ValueError(
            f"checkpoint {str(path)!r} was saved for {saved_spec.describe()}; "
            f"you asked for {requested.describe()} (differs in: {', '.join(differs)})"
        )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes from every key."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unwrapped model (no wrapper prefixes), ready for any same-architecture module."""
    return strip_prefixes(unwrap_model(model).state_dict())


def load_model_state(
    model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True, source: str = "checkpoint"
) -> None:
    """Load ``state_dict`` into ``model`` (or the module a wrapper holds), whatever prefixes either has.

    A mismatch raises a ValueError listing the first missing / unexpected / wrongly shaped keys.
    """
    target = unwrap_model(model)
    state = strip_prefixes(state_dict)
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        problems = []
        if missing and strict:
            problems.append(f"missing keys {_first(missing)}")
        if unexpected and strict:
            problems.append(f"unexpected keys {_first(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches (checkpoint vs model) {_first(shapes)}")
        raise ValueError(f"{source} does not fit the model {type(target).__name__}: " + "; ".join(problems))
    target.load_state_dict(state, strict=strict)


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)} in all)"


# --------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device) in weights_only form."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what ``capture_rng_state`` captured (CUDA states only where CUDA is present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].cpu().numpy().astype(np.uint32), "pos": int(np_state["pos"])},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())  # the checkpoint may have been loaded onto a GPU
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"checkpoint holds RNG states of {len(cuda_states)} CUDA devices but this process sees "
                f"{torch.cuda.device_count()}; resume with the same visible devices"
            )
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# ----------------------------------------------------------------------------------- save / load


def restore_rank_rng_state(states: Sequence[Mapping[str, Any]], rank: int, world_size: int, reseed: int) -> str | None:
    """Put back rank ``rank``'s saved RNG state when the checkpoint was written by ``world_size`` processes.

    Otherwise (another process count changes the data shards anyway) seed python, numpy and torch with
    ``reseed + rank`` and return the note to print: the run continues reproducibly, not identically.
    """
    if len(states) == world_size:
        restore_rng_state(states[rank])
        return None
    from fewshot.training.optim import set_seed

    set_seed(reseed + rank)
    return (
        f"note: the checkpoint was written by {len(states)} process(es), this run has {world_size}; RNG "
        "states are re-seeded, so the run continues reproducibly but not identically"
    )


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    meta: ModelSpec | Mapping[str, Any] | None = None,
    **entries: Any,
) -> Path:
    """Write a checkpoint atomically: a temporary file in the same folder, then ``os.replace``.

    ``model`` (any wrapper) is stored as a prefix-free state dict; ``meta`` as a dict; ``entries`` are
    stored as given (state dicts of optimizer / scheduler / scaler, ``progress``, ``rng``, ``config``, ...)
    and must be weights_only-loadable: tensors, numbers, strings, None, lists, tuples, dicts.
    """
    payload: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if model is not None:
        payload["model"] = model_state_dict(model)
    if meta is not None:
        payload["meta"] = meta.to_dict() if isinstance(meta, ModelSpec) else dict(meta)
    payload.update(entries)
    return atomic_write(path, lambda f: torch.save(payload, f), binary=True)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; ``mmap=True`` leaves the tensors in the
    file until read (for checks that need the metadata only: a large checkpoint is then not read twice).

    A bare state dict (e.g. ``torch.save(model.state_dict())``) is accepted and returned as
    ``{"format": ..., "model": state_dict}``; anything else that is not ours raises a ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes), not a saved checkpoint")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # unpickling errors come in many types
        text = str(exc).strip()
        if "WeightsUnpickler error:" in text:  # torch's long advice around it: keep the reason itself
            text = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0]
        reason = " ".join(text.split()) or f"{type(exc).__name__} (the file is truncated or not a torch file)"
        raise ValueError(f"checkpoint {str(path)!r} cannot be loaded with weights_only=True: {reason}") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        if data.get("version", 0) > VERSION:
            raise ValueError(
                f"checkpoint {str(path)!r} has format version {data['version']}; this code reads <= {VERSION}"
            )
        return data
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"format": FORMAT, "version": VERSION, "model": dict(data)}
    raise ValueError(
        f"checkpoint {str(path)!r} is neither a fewshot checkpoint nor a state dict of tensors "
        f"(got {type(data).__name__})"
    )
