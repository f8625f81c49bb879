"""fewshot.modes.eval_mode: eval mode for a block, every submodule's own flag restored afterwards."""

from __future__ import annotations

import pytest
from torch import nn

from fewshot.modes import eval_mode


def flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_mode_restores_each_submodule_even_after_an_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(2)))
    model.train()
    model[2][1].eval()  # a frozen BatchNorm inside a training model
    before = flags(model)
    assert before == [True, True, True, True, True, False]
    with pytest.raises(RuntimeError), eval_mode(model) as inside:
        assert inside is model and flags(model) == [False] * 6
        raise RuntimeError("stop")
    assert flags(model) == before  # model.train(True) would have unfrozen the inner BatchNorm


def test_eval_mode_only_some_types():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout())
    with eval_mode(model, only=nn.modules.batchnorm._BatchNorm):
        assert flags(model) == [True, True, False, True]
    assert flags(model) == [True] * 4
