"""Train/eval mode for a block of code, restored afterwards module by module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(
    module: nn.Module, only: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Module
) -> Iterator[nn.Module]:
    """Put ``module``'s submodules that are instances of ``only`` (default: all of them) in eval mode for the
    block, then give every one of them back its own previous train/eval flag (a submodule that was already in
    eval mode inside a training model stays so)."""
    chosen = [m for m in module.modules() if isinstance(m, only)]
    modes = [m.training for m in chosen]
    try:
        for m in chosen:
            m.training = False
        yield module
    finally:
        for m, training in zip(chosen, modes):
            m.training = training
