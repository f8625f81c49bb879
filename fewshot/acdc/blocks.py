"""Block membership of convs (for the ``block`` / ``g-block`` scopes) from a forward trace.

A block is a run of consecutive decomposed convs, in forward execution order, with the same number of
output channels and the same output feature-map size (ResNet: one per stage, VGG16: 5, WRN: 3).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fewshot.acdc.layer import ACDCConv2d
from fewshot.modes import eval_mode

__all__ = ["infer_blocks", "default_example_input", "BlockOf"]

BlockOf = Callable[[str, nn.Module], Hashable]


class _TraceComplete(Exception):
    """Raised by a hook once every traced conv has run, to skip the rest of the forward pass."""


def default_example_input(model: nn.Module) -> Tensor:
    """Zeros of shape ``(2, in_channels of the first conv, 64, 64)`` on the model's device and dtype."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, ACDCConv2d)):
            ref = module.weight if isinstance(module, nn.Conv2d) else module.atoms
            return torch.zeros(2, module.in_channels, 64, 64, device=ref.device, dtype=ref.dtype)
    raise ValueError("the model has no conv layer, so no example input can be made; pass example_input=")


def _run(model: nn.Module, example_input: Any) -> None:
    if isinstance(example_input, (tuple, list)):
        model(*example_input)
    elif isinstance(example_input, dict):
        model(**example_input)
    else:
        model(example_input)


def _describe(example_input: Any) -> str:
    if isinstance(example_input, Tensor):
        return f"an input of shape {tuple(example_input.shape)}"
    return f"the given example_input ({type(example_input).__name__})"


def infer_blocks(
    model: nn.Module, convs: Sequence[tuple[str, nn.Module]], example_input: Any = None, block_of: BlockOf | None = None
) -> dict[str, Hashable]:
    """Block key of each conv in ``convs`` (name -> key; convs with equal keys share a block).

    With ``block_of`` the key is ``block_of(name, conv)``. Otherwise the model is run once on
    ``example_input`` (default :func:`default_example_input`) in eval mode under ``no_grad`` (BatchNorm
    statistics untouched, every module's training flag restored) with forward hooks on ``convs``; the
    pass stops as soon as every conv has run. Keys are then block indices 0, 1, ... in execution order.
    """
    if block_of is not None:
        return {name: block_of(name, conv) for name, conv in convs}
    if example_input is None:
        example_input = default_example_input(model)
    seen: dict[str, tuple[int, tuple[int, ...]]] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            if name not in seen:
                seen[name] = (len(seen), tuple(out.shape[1:]))  # (order, (channels, H, W))
                if len(seen) == len(convs):
                    raise _TraceComplete

        return hook

    handles = [conv.register_forward_hook(make_hook(name)) for name, conv in convs]
    try:
        with eval_mode(model), torch.no_grad():
            _run(model, example_input)
    except _TraceComplete:
        pass
    except Exception as exc:
        raise ValueError(
            f"could not infer ACDC blocks by running the model on {_describe(example_input)} "
            f"({type(exc).__name__}: {exc}); pass example_input=<a batch the model accepts> or "
            f"block_of=<function (name, conv) -> block key>"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, _ in convs if name not in seen]
    if missing:
        raise ValueError(
            f"the forward pass on {_describe(example_input)} never ran conv(s) {', '.join(map(repr, missing))}, "
            f"so their block is unknown; pass block_of=<function (name, conv) -> block key>"
        )
    keys: dict[str, Hashable] = {}
    block, previous = -1, None
    for name, (_order, shape) in sorted(seen.items(), key=lambda item: item[1][0]):
        if shape != previous:
            block, previous = block + 1, shape
        keys[name] = block
    return keys
