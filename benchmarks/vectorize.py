#!/usr/bin/env python
"""Task by task against one ``torch.func.vmap`` (``--vectorize``): MAML meta-steps and the test's
predictions of the main job's configurations.

With ``vectorize`` MAML puts the tasks of a meta-batch, and the ``--eval-batch`` episodes of an evaluation
batch, through one ``vmap`` (the convolutions with per-task weights become grouped convolutions); without
it they run one after the other. The results agree up to float rounding (``tests/test_maml.py``). This
measures which is faster, interleaved round by round, for

- ``main-acdc``: the README's main job (``configs/maml_glyphs_demo.yaml``: Conv4 width 32, ACDC-net
  m=16, one-channel 28×28 glyphs, first order, learned inner step sizes, 5 inner steps, 10 at test);
- ``main-dense``: the same with the dense Conv4;

and any other configuration of ``benchmarks/memory_format.py`` by name. Each times a meta-step
(``backward_batch`` of the config's meta-batch of synthetic 5-way 1-shot episodes, 16 queries per class)
and ``predict_batch`` of ``--eval-batch`` test episodes (15 queries per class), both variants built from
the same seed, weights and images laid out as ``run_maml.py`` lays them out on a CPU (channels-last).

    python benchmarks/vectorize.py                              # torch's threads (2 on a 2-core machine)
    python benchmarks/vectorize.py --threads 1 --out benchmarks/results/vectorize_1thread.json

Writes ``benchmarks/results/vectorize.json`` (or ``--out``): per configuration and measurement the medians,
IQRs and ``ratio`` = median over rounds of (vmap ms / task-by-task ms); < 1: the vmap is faster.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_format  # noqa: E402

from fewshot.cli import build_learner  # noqa: E402
from fewshot.config import cli_main  # noqa: E402

VARIANTS = {"task_by_task": "off", "vmap": "all"}  # --vectorize modes: "all" vmaps the meta-step and predict


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=tuple(memory_format.CONFIGS), default=["main-acdc", "main-dense"])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per measurement")
    p.add_argument("--eval-batch", type=int, default=None, help="test episodes per predict_batch (the config's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/vectorize.json)")
    args = p.parse_args(argv)
    for name in ("rounds", "eval_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def contenders(name: str, args: argparse.Namespace) -> tuple[dict[str, dict[str, Callable[[], None]]], dict]:
    """``{"train_step": {variant: step}, "predict": {variant: step}}`` for configuration ``name``, and the
    sizes used."""
    settings, channels = memory_format.run_settings(name)
    eval_batch = args.eval_batch or settings.eval_batch
    train = memory_format.episodes(settings, channels, settings.meta_batch, settings.queries, seed=1)
    test = memory_format.episodes(settings, channels, eval_batch, settings.test_queries, seed=2)
    layout = torch.channels_last
    train_batch = [e.to("cpu", memory_format=layout) for e in train]
    test_batch = [e.to("cpu", memory_format=layout) for e in test]
    steps: dict[str, dict[str, Callable[[], None]]] = {"train_step": {}, "predict": {}}
    for variant, vectorize in VARIANTS.items():
        settings.vectorize = vectorize
        torch.manual_seed(0)
        learner, _ = build_learner(settings, channels)
        learner = learner.to(memory_format=layout)

        def train_step(learner=learner) -> None:
            learner.train()
            learner.zero_grad(set_to_none=True)
            learner.backward_batch(train_batch)

        def predict(learner=learner) -> None:
            learner.eval()
            learner.predict_batch(test_batch)

        steps["train_step"][variant], steps["predict"][variant] = train_step, predict
    return steps, {"meta_batch": settings.meta_batch, "eval_batch": eval_batch}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    steps, sizes = contenders(name, args)
    result: dict[str, Any] = {"sizes": sizes}
    for kind, fns in steps.items():
        result[kind] = common.timed_ratio(f"{name} {kind}", fns, args.rounds, "vmap", "task_by_task")
    return result


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    notes = (
        "ratio = median over rounds of (vmap ms / task-by-task ms) within the round; < 1: the vmap "
        "is faster. train_step: backward_batch of the meta-batch; predict: predict_batch of eval_batch test "
        "episodes. Channels-last weights and images, as run_maml.py on a CPU."
    )
    return common.measure_configs("vectorize", argv, args, measure, {"rounds": args.rounds}, notes)


if __name__ == "__main__":
    main()
