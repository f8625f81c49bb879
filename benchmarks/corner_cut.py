#!/usr/bin/env python
"""Cutting the shared coefficients' corners once per pass against slicing them per conv: MAML meta-steps.

Every ACDC conv of a shared scope reads a leading corner ``A[:c_out, :c_in]`` of one coefficient tensor.
``CoefficientCorners`` can cut all of a pass's corners in one autograd node, whose backward adds each
corner's gradient in place at its own size; sliced per conv, autograd instead builds one full-size
gradient per reader and sums them. The cut saves that work and costs a fixed overhead per pass, so it
pays only for large tensors: ``CoefficientCorners.min_elements`` is the size from which it is used. This
measures both ways for the main job's and the sweep's configurations (``benchmarks/memory_format.py``'s,
ACDC-net), a meta-step of the config's meta-batch of synthetic 5-way 1-shot episodes task by task,
channels-last as ``run_maml.py`` on a CPU, both learners built from the same seed, interleaved:

    python benchmarks/corner_cut.py                     # main-acdc, sweep-resnet10, sweep-resnet18, chen-resnet10

Writes ``benchmarks/results/corner_cut.json`` (or ``--out``): per configuration the coefficient tensor's
elements, the medians, IQRs and ``ratio`` = median over rounds of (sliced ms / cut ms); < 1: slicing is
faster.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_format  # noqa: E402

from fewshot.acdc import SharedCoefficients  # noqa: E402
from fewshot.cli import build_learner  # noqa: E402
from fewshot.config import cli_main  # noqa: E402

# variant -> CoefficientCorners.min_elements of every scope of the learner
VARIANTS: dict[str, float] = {"cut": 0, "sliced": math.inf}
DEFAULT_CONFIGS = ["main-acdc", "sweep-resnet10", "sweep-resnet18", "chen-resnet10"]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=tuple(memory_format.CONFIGS), default=DEFAULT_CONFIGS)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per configuration")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/corner_cut.json)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if any(memory_format.CONFIGS[name][0].count("--acdc") for name in args.configs):
        raise ValueError("--configs: only ACDC-net configurations have shared coefficients to cut")
    return args


def contenders(name: str) -> tuple[dict[str, Callable[[], None]], int]:
    """``{variant: meta_step}`` for configuration ``name``, and its coefficient tensor's elements."""
    settings, channels = memory_format.run_settings(name)
    settings.vectorize = "off"
    layout = torch.channels_last
    batch = memory_format.episodes(settings, channels, settings.meta_batch, settings.queries, seed=1)
    batch = [e.to("cpu", memory_format=layout) for e in batch]
    steps: dict[str, Callable[[], None]] = {}
    elements = 0
    for variant, min_elements in VARIANTS.items():
        torch.manual_seed(0)
        learner, _ = build_learner(settings, channels)
        learner = learner.to(memory_format=layout).train()
        holders = [m for m in learner.modules() if isinstance(m, SharedCoefficients)]
        for holder in holders:
            holder.corners.min_elements = min_elements  # this learner's scopes only
        elements = max(h.coefficients.numel() for h in holders)

        def step(learner=learner) -> None:
            learner.zero_grad(set_to_none=True)
            learner.backward_batch(batch)

        steps[variant] = step
    return steps, elements


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    steps, elements = contenders(name)
    label = f"{name} (A: {elements:,} elements)"
    result = {"coefficient_elements": elements, **common.timed_ratio(label, steps, args.rounds, "sliced", "cut")}
    return result


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    notes = (
        "ratio = median over rounds of (sliced ms / cut ms) within the round; < 1: slicing each "
        "corner per conv is faster than cutting them once per pass. A MAML meta-step (backward_batch of the "
        "meta-batch, task by task), channels-last."
    )
    return common.measure_configs("corner_cut", argv, args, measure, {"rounds": args.rounds}, notes)


if __name__ == "__main__":
    main()
