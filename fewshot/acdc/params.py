"""Finding the ACDC convs and parameters of a model (e.g. to give atoms and coefficients their own
learning rates, or to adapt only the atoms in a meta-learning inner loop)."""

from __future__ import annotations

from torch import nn

from fewshot.acdc.layer import ACDCConv2d

__all__ = ["acdc_convs", "acdc_named_parameters", "acdc_parameters", "count_parameters", "PARAMETER_KINDS"]

PARAMETER_KINDS = ("atoms", "coefficients", "all")


def acdc_convs(model: nn.Module) -> list[tuple[str, ACDCConv2d]]:
    """``(name, conv)`` for every :class:`ACDCConv2d` of ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ACDCConv2d)]


def acdc_named_parameters(model: nn.Module, which: str = "all") -> list[tuple[str, nn.Parameter]]:
    """The atoms and/or coefficients of ``model`` with their ``named_parameters()`` names, each once.

    ``which``: ``"atoms"`` (names end in ``.atoms``), ``"coefficients"`` (``.coefficients``) or ``"all"``.
    A shared coefficient tensor appears once, under its first name.
    """
    if which not in PARAMETER_KINDS:
        raise ValueError(f"which must be one of {', '.join(PARAMETER_KINDS)}; got {which!r}")
    wanted = ("atoms", "coefficients") if which == "all" else (which,)
    return [(n, p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in wanted]


def acdc_parameters(model: nn.Module, which: str = "all") -> list[nn.Parameter]:
    """Like :func:`acdc_named_parameters`, without the names."""
    return [p for _, p in acdc_named_parameters(model, which)]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, counting each shared tensor once."""
    return sum(p.numel() for p in model.parameters())
