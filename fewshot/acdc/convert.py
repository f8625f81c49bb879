"""Turn the convs of any ``nn.Module`` into ACDC convs with a chosen sharing scope.

Scopes (the rules of the options: ``fewshot.acdc.rules``):

- ``net``: one coefficient tensor ``A`` for all decomposed convs, sized to the largest ``c_out`` and
  ``c_in`` among them; each conv reads the leading corner ``A[:c_out, :c_in]``.
- ``block``: one ``A`` per block (a run of consecutive decomposed convs, in forward execution order, with
  the same output channels and output feature-map size); the first conv of a stage reads ``A[:c, :c/2]``.
- ``layer``: every conv owns its ``A``.
- ``g-net`` / ``g-block`` / ``g-layer``: the grouped variant (``group_size=s``): ``A`` is ``s x s x m``,
  shared across the filter groups of a layer and across the scope; per-group atoms; channel shuffle.

Every owner is sized to the largest corner its convs read (for grouped scopes ``s x s``, smaller only when
all its convs are narrower than ``s``, e.g. a ``g-layer`` 3->16 stem with ``s = 32``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from fewshot.acdc.blocks import BlockOf, infer_blocks
from fewshot.acdc.layer import ACDCConv2d, SharedCoefficients, grouped_layout_error
from fewshot.acdc.rules import GROUPED_SCOPES, SCOPES, check_acdc_options

__all__ = ["SCOPES", "GROUPED_SCOPES", "convert", "is_imagenet_stem", "owner_shape", "build_owners"]


def is_imagenet_stem(conv: nn.Conv2d) -> bool:
    """The kernel test of the stem rule: kernel at least 7x7 (both sides) and at most 4 input channels."""
    kh, kw = conv.kernel_size
    return kh >= 7 and kw >= 7 and conv.in_channels <= 4


def _plan(model: nn.Module, decompose_stem: bool) -> list[tuple[str, nn.Conv2d]]:
    """The convs to decompose, in registration order, after checking that each can be decomposed."""
    for name, module in model.named_modules():
        if isinstance(module, ACDCConv2d):
            raise ValueError(
                f"the model already contains ACDC convs (e.g. {name!r}); "
                f"use fewshot.acdc.expand() to change the scope or the number of atoms"
            )
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    plan = []
    for index, (name, conv) in enumerate(convs):
        if conv.kernel_size == (1, 1):
            continue  # 1x1 convs (shortcuts, projections) stay dense
        if index == 0 and not decompose_stem and is_imagenet_stem(conv):
            continue  # the ImageNet 7x7 stem stays dense by default
        if type(conv) is not nn.Conv2d:
            raise ValueError(
                f"layer {name!r} is a {type(conv).__name__} (a subclass of nn.Conv2d with its own "
                f"behaviour); convert() only replaces plain nn.Conv2d layers"
            )
        if conv.groups != 1:
            raise ValueError(
                f"layer {name!r} is a grouped conv (groups={conv.groups}, kernel {conv.kernel_size}); "
                f"ACDC decomposes only convs with groups=1 (1x1 grouped convs stay dense)"
            )
        plan.append((name, conv))
    if not plan:
        raise ValueError(
            "the model has no conv with a kernel larger than 1x1 to decompose "
            "(1x1 convs and the 7x7 stem stay dense; pass decompose_stem=True for the stem)"
        )
    return plan


def owner_shape(convs: list[nn.Module], group_size: int | None) -> tuple[int, int]:
    """``(rows, cols)`` of the coefficient tensor shared by ``convs``: the largest corner they read."""
    if group_size is None:
        return max(c.out_channels for c in convs), max(c.in_channels for c in convs)
    return (max(min(group_size, c.out_channels) for c in convs), max(min(group_size, c.in_channels) for c in convs))


def scope_keys(
    model: nn.Module, convs: list[tuple[str, nn.Module]], scope: str, example_input: Any, block_of: BlockOf | None
) -> dict[str, Hashable]:
    """Owner key of each conv for ``scope``: convs with equal keys share one coefficient tensor."""
    level = scope.removeprefix("g-")
    if level == "net":
        return {name: "net" for name, _ in convs}
    if level == "layer":
        return {name: name for name, _ in convs}
    return infer_blocks(model, convs, example_input, block_of)


def build_owners(
    convs: list[tuple[str, nn.Module]], keys: dict[str, Hashable], atoms: int, group_size: int | None
) -> dict[Hashable, SharedCoefficients]:
    """One freshly initialized :class:`SharedCoefficients` per key, sized by :func:`owner_shape`."""
    members: dict[Hashable, list[nn.Module]] = {}
    for name, conv in convs:
        members.setdefault(keys[name], []).append(conv)
    owners = {}
    for key, group in members.items():
        ref = group[0].weight if isinstance(group[0], nn.Conv2d) else group[0].atoms
        rows, cols = owner_shape(group, group_size)
        owners[key] = SharedCoefficients(rows, cols, atoms, device=ref.device, dtype=ref.dtype)
    return owners


def replace_modules(model: nn.Module, replacement: dict[int, nn.Module]) -> None:
    """Swap every child ``c`` with ``id(c)`` in ``replacement`` (also where a module is registered twice)."""
    for module in model.modules():
        for child_name, child in list(module._modules.items()):
            if child is not None and id(child) in replacement:
                setattr(module, child_name, replacement[id(child)])


def _acdc_copy(
    conv: nn.Conv2d, shared: SharedCoefficients, scope: str, group_size: int | None, atom_drop: float
) -> ACDCConv2d:
    """An :class:`ACDCConv2d` reading ``shared`` in place of ``conv``: its geometry, device, dtype, bias
    values and train mode kept; fresh atoms."""
    new = ACDCConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        shared=shared,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        group_size=group_size,
        atom_drop=atom_drop,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    if conv.bias is not None:
        with torch.no_grad():
            new.bias.copy_(conv.bias)
        new.bias.requires_grad_(conv.bias.requires_grad)
    new.scope = scope
    new.train(conv.training)
    return new


def convert(
    model: nn.Module,
    scope: str,
    atoms: int = 8,
    group_size: int | None = None,
    atom_drop: float = 0.1,
    decompose_stem: bool = False,
    example_input: Any = None,
    block_of: BlockOf | None = None,
) -> nn.Module:
    """Replace the convs of ``model`` (in place) by :class:`ACDCConv2d` sharing coefficients; return it.

    Decomposed: every ``nn.Conv2d`` with a kernel larger than 1x1 (``groups=1``). Kept dense: 1x1 convs,
    and the ImageNet stem, i.e. the *first* ``nn.Conv2d`` in registration order (``model.modules()``) if
    its kernel is at least 7x7 and it has at most 4 input channels, unless ``decompose_stem=True``.
    Stride, padding (also 'same'/'valid'), dilation, padding_mode, device, dtype and the bias (its values)
    are kept; atoms and coefficients are freshly initialized.

    Args:
        scope: one of :data:`SCOPES`.
        atoms: ``m``, filter atoms per layer (per group for the grouped scopes).
        group_size: ``s``, channels per filter group; required by the ``g-*`` scopes, refused otherwise.
        atom_drop: training-time atom-drop probability in ``[0, 1)``.
        example_input: a batch (tensor, or tuple of args) for the forward trace that finds the blocks of
            the ``block``/``g-block`` scopes; default zeros ``(2, in_channels of the first conv, 64, 64)``.
        block_of: ``block_of(name, conv) -> hashable`` overrides the trace: convs with equal keys share.
    """
    if check_acdc_options(scope, atoms, group_size, atom_drop) is None:
        raise ValueError(f"convert needs an ACDC scope, one of {', '.join(SCOPES)}; got scope={scope!r}")
    plan = _plan(model, decompose_stem)
    if group_size is not None:
        for name, conv in plan:
            problem = grouped_layout_error(conv.in_channels, conv.out_channels, group_size)
            if problem:
                raise ValueError(
                    f"layer {name!r} ({conv.in_channels} -> {conv.out_channels} channels) cannot use "
                    f"scope {scope!r}: {problem}"
                )
    keys = scope_keys(model, plan, scope, example_input, block_of)
    owners = build_owners(plan, keys, atoms, group_size)
    replacement = {id(conv): _acdc_copy(conv, owners[keys[name]], scope, group_size, atom_drop) for name, conv in plan}
    replace_modules(model, replacement)
    return model
