"""The backbone registry: ``register_backbone``, ``create_backbone`` and ``list_backbones``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from fewshot.acdc.rules import check_acdc_options
from fewshot.backbones.base import check_int

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

_BACKBONES: dict[str, Builder] = {}
_FEWSHOT: set[str] = set()


def register_backbone(name: str | B, *, fewshot: bool = False) -> Callable[[B], B] | B:
    """Register a builder ``fn(num_classes=0, *, **options) -> Backbone`` under ``name``.

    Use as ``@register_backbone("my_net")`` or bare ``@register_backbone`` (registers the function's name).
    The builder's keyword-only parameters are the options ``create_backbone`` accepts for it. ``fewshot=True``
    marks a backbone of the few-shot command lines: it takes ``width``, and its ``forward_map`` serves
    RelationNet (``list_backbones(fewshot=True)``).
    """

    def add(fn: B, key: str) -> B:
        if key in _BACKBONES:
            raise ValueError(f"backbone {key!r} is registered twice")
        _BACKBONES[key] = fn
        if fewshot:
            _FEWSHOT.add(key)
        return fn

    if callable(name):
        return add(name, name.__name__)
    return lambda fn: add(fn, name)


def list_backbones(fewshot: bool = False) -> list[str]:
    """Names of the registered backbones, sorted; ``fewshot=True``: only those of the few-shot command lines."""
    return sorted(_FEWSHOT if fewshot else _BACKBONES)


def backbone_options(name: str) -> list[str]:
    """The keyword options backbone ``name`` accepts (besides ``num_classes`` and the ACDC arguments)."""
    params = inspect.signature(_builder(name)).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _builder(name: str) -> Builder:
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(list_backbones())}")
    return _BACKBONES[name]


def create_backbone(
    name: str,
    acdc: str | None = None,
    atoms: int = 8,
    group_size: int | None = None,
    num_classes: int = 0,
    atom_drop: float = 0.1,
    decompose_stem: bool = False,
    **kw: Any,
) -> nn.Module:
    """Build backbone ``name``; with ``acdc`` set, convert its convs to ACDC convs sharing coefficients.

    Args:
        name: one of ``list_backbones()``.
        acdc: ``None`` or ``"none"`` for the dense network, else a sharing scope of ``fewshot.acdc.SCOPES``
            (``net``, ``block``, ``layer``, ``g-net``, ``g-block``, ``g-layer``).
        atoms: m, filter atoms per layer (per group for the grouped scopes).
        group_size: s, channels per group; only for the grouped scopes.
        num_classes: > 0 appends ``fc = nn.Linear(out_features, num_classes)`` and ``forward`` returns
            logits; 0 returns ``out_features``-dimensional features.
        atom_drop: atom-drop probability in training (ACDC only).
        decompose_stem: also decompose the ImageNet 7x7 stem (ACDC only).
        **kw: options of the backbone (``backbone_options(name)``), e.g. ``stem`` for the ResNets,
            ``image_size`` for conv4, ``depth`` / ``widen_factor`` for ``wrn``.

    The block structure under the ``block`` scopes is the backbone's own (``acdc_block_of``): one block
    per ResNet stage, per VGG stage, per WRN group, per conv4 layer.
    """
    builder = _builder(name)
    num_classes = check_int(num_classes, "num_classes", 0)
    unknown = sorted(set(kw) - set(backbone_options(name)))
    if unknown:
        valid = ", ".join(backbone_options(name)) or "none"
        raise ValueError(f"backbone {name!r} got unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    scope = check_acdc_options(acdc, atoms, group_size, atom_drop, decompose_stem, scope_name="acdc")
    model = builder(num_classes, **kw)
    if scope is None:
        return model

    from fewshot.acdc import convert

    return convert(
        model,
        scope,
        atoms=atoms,
        group_size=group_size,
        atom_drop=atom_drop,
        decompose_stem=decompose_stem,
        block_of=model.acdc_block_of,
    )
