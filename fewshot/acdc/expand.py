"""Capacity growth (paper App. E, Table C): relax coefficient sharing and/or add atoms to a trained
ACDC model so that it computes the same function at the moment of expansion.

- Relaxing ``net -> block -> layer`` (``g-net -> g-block -> g-layer``): every new owner gets a copy of the
  leading corner of the coefficient tensor its convs used, so each conv reads exactly the values it read.
- Adding atoms ``m -> m'``: every conv gets ``m' - m`` fresh (orthogonally initialized) atoms whose
  coefficients are zero. Each kernel ``K[o, i] = sum_k A[o, i, k] D[k]`` only gains terms ``0 * D[k]``,
  so it is unchanged; training then moves the new coefficients away from zero (their gradient is
  ``sum dL/dK * D[k]``, not zero, while the new atoms' gradient starts at zero).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from fewshot.acdc.blocks import BlockOf
from fewshot.acdc.convert import GROUPED_SCOPES, SCOPES, owner_shape, scope_keys
from fewshot.acdc.layer import ACDCConv2d, SharedCoefficients, init_atoms_
from fewshot.acdc.params import acdc_convs

__all__ = ["expand"]

_LEVEL = {"net": 0, "block": 1, "layer": 2}


def _current_scope(convs: list[tuple[str, ACDCConv2d]]) -> tuple[str, int]:
    scopes = {c.scope for _, c in convs}
    if len(scopes) != 1 or None in scopes:
        raise ValueError(
            f"expand() needs a model made by convert() with one scope; its ACDC convs have scopes "
            f"{sorted(map(repr, scopes))}"
        )
    atoms = {c.num_atoms for _, c in convs}
    if len(atoms) != 1:
        raise ValueError(f"expand() needs every ACDC conv to have the same number of atoms; found {sorted(atoms)}")
    return scopes.pop(), atoms.pop()


def _check_target(current: str, target: object, atoms: int, new_atoms: object) -> None:
    if target not in SCOPES:
        raise ValueError(f"unknown ACDC scope {target!r}; valid scopes: {', '.join(SCOPES)}")
    if (target in GROUPED_SCOPES) != (current in GROUPED_SCOPES):
        raise ValueError(
            f"cannot expand scope {current!r} to {target!r}: grouped (g-*) and plain scopes do not turn into each other"
        )
    if _LEVEL[target.removeprefix("g-")] < _LEVEL[current.removeprefix("g-")]:
        order = "g-net -> g-block -> g-layer" if current in GROUPED_SCOPES else "net -> block -> layer"
        raise ValueError(f"cannot tighten sharing from {current!r} to {target!r}; expand() only relaxes it: {order}")
    if isinstance(new_atoms, bool) or not isinstance(new_atoms, int) or new_atoms < 1:
        raise ValueError(f"atoms must be an integer >= 1, got {new_atoms!r}")
    if new_atoms < atoms:
        raise ValueError(f"cannot reduce atoms from {atoms} to {new_atoms}; expand() only adds atoms")


def _grown_atoms(atoms: nn.Parameter, new_atoms: int) -> nn.Parameter:
    """``atoms`` (``..., m, kh, kw``) followed by ``new_atoms - m`` fresh orthogonal atoms."""
    extra_shape = (*atoms.shape[:-3], new_atoms - atoms.shape[-3], *atoms.shape[-2:])
    extra = init_atoms_(torch.empty(extra_shape, device=atoms.device, dtype=atoms.dtype))
    grown = torch.cat([atoms.detach(), extra], dim=-3)
    return nn.Parameter(grown, requires_grad=atoms.requires_grad)


def expand(
    model: nn.Module,
    scope: str | None = None,
    atoms: int | None = None,
    example_input: Any = None,
    block_of: BlockOf | None = None,
) -> nn.Module:
    """Relax the sharing of ``model``'s ACDC convs to ``scope`` and/or grow them to ``atoms`` atoms, in place.

    The model computes the same function right after the call (see the module docstring). Trained values
    are inherited; the parameters are new tensors, so build a new optimizer afterwards. ``scope=None`` keeps
    the scope, ``atoms=None`` the number of atoms. ``example_input`` / ``block_of`` as in
    :func:`fewshot.acdc.convert` (used when relaxing to ``block`` / ``g-block``).
    """
    convs = acdc_convs(model)
    if not convs:
        raise ValueError("the model has no ACDC convs; call fewshot.acdc.convert() first")
    current, m = _current_scope(convs)
    target = current if scope is None else scope
    new_m = m if atoms is None else atoms
    _check_target(current, target, m, new_m)
    if target == current and new_m == m:
        return model
    if target == current:
        target_keys: dict[str, Hashable] = {name: None for name, _ in convs}
    else:
        target_keys = scope_keys(model, convs, target, example_input, block_of)
    # a new owner never spans two old owners: key by (old tensor, new scope key)
    members: dict[Hashable, list[ACDCConv2d]] = {}
    for name, conv in convs:
        members.setdefault((id(conv.shared.coefficients), target_keys[name]), []).append(conv)
    group_size = convs[0][1].group_size
    for group in members.values():
        old = group[0].shared.coefficients
        rows, cols = owner_shape(group, group_size)
        new = torch.zeros(rows, cols, new_m, device=old.device, dtype=old.dtype)
        new[:, :, :m] = old.detach()[:rows, :cols]
        owner = SharedCoefficients.holding(nn.Parameter(new, requires_grad=old.requires_grad))
        for conv in group:
            conv.read_from(owner)
            if new_m > m:
                conv.atoms = _grown_atoms(conv.atoms, new_m)
            conv.scope = target
    return model
