"""The learners and episodes that tests/test_episodic_distributed.py and its torchrun driver both build
(the same seeds give the same tensors in every process)."""

from __future__ import annotations

import torch

from fewshot.acdc import convert
from fewshot.data.episode import Episode
from fewshot.learners.maml import MAML
from fewshot.training.checkpoint import ModelSpec
from tests.helpers import DropNet, TinyNet, make_episode

# name -> (ACDC-net?, first order?, tasks in the meta-batch); 3 tasks split 2 + 1 over two processes
GRADIENT_CASES = {
    "plain-second": (False, False, 4),
    "plain-first": (False, True, 4),
    "acdc-second": (True, False, 4),
    "acdc-first": (True, True, 4),
    "acdc-second-uneven": (True, False, 3),
}


def gradient_case(name: str) -> tuple[MAML, list[Episode]]:
    """A float64 MAML (learned step sizes included) over TinyNet, plain or ACDC-net, and its meta-batch."""
    acdc, first_order, tasks = GRADIENT_CASES[name]
    torch.manual_seed(0)
    backbone = TinyNet(channels=8)
    if acdc:
        backbone = convert(backbone, "net", atoms=4, atom_drop=0.0)
    learner = MAML(backbone, ways=3, inner_steps=2, inner_lr=0.1, first_order=first_order, learn_inner_lr=True)
    learner = learner.double().train()
    with torch.no_grad():
        learner.head.weight.normal_(0, 0.3)
        learner.head.bias.normal_(0, 0.1)
    return learner, [make_episode(seed=40 + s) for s in range(tasks)]


def eval_episodes() -> tuple[MAML, list[Episode]]:
    """A float32 ACDC MAML and 7 test episodes (4 + 3 over two processes)."""
    torch.manual_seed(1)
    learner = MAML(convert(TinyNet(channels=8), "net", atoms=4, atom_drop=0.0), ways=3, inner_steps=2, inner_lr=0.5)
    return learner.eval(), [make_episode(seed=70 + s, dtype=torch.float32) for s in range(7)]


RESUME_SPEC = ModelSpec(backbone="dropnet")
RESUME_TRAIN = [make_episode(seed=100 + i, dtype=torch.float32) for i in range(18)]
RESUME_VAL = [make_episode(seed=900 + i, dtype=torch.float32) for i in range(3)]


def resume_learner() -> MAML:
    torch.manual_seed(0)
    return MAML(DropNet(), ways=3, inner_steps=2, test_inner_steps=2)
