#!/usr/bin/env python
"""channels_last against contiguous (NCHW) memory layout: MAML meta-steps and predictions, per configuration.

``run_maml.py --memory-format auto`` (the default) stores the learner's 4-D weights and every episode's
images channels-last on a CPU (``Module.to`` / ``Episode.to(memory_format=...)``); the values, and so the
results up to float rounding, are the same (``tests/test_memory_format.py``). This measures what the
layout costs or saves where MAML spends its time, one interleaved run per configuration:

- ``main-acdc``: the README's main job (``configs/maml_glyphs_demo.yaml``: Conv4 width 32, ACDC-net
  m=16, one-channel 28×28 glyphs, first order, learned inner step sizes, 5 inner steps, 10 at test);
- ``main-dense``: the same with the dense Conv4;
- ``sweep-resnet10`` / ``sweep-resnet18``: the depth sweep's ResNets (width 16, small stem, the main
  job's settings otherwise), ACDC-net;
- ``chen-resnet10``: Chen et al.'s ResNet10 (width 64, ImageNet stem, three-channel 84×84), ACDC-net m=8,
  inner lr 0.01 and 5 steps in training and test (the main job's otherwise).

and two supervised ones, ``fit``'s training step (forward, cross-entropy, backward, SGD step with momentum):

- ``pretrain-cifar``: ``run_pretrain.py --config configs/pretrain_cifar10.yaml``'s network and batch
  (ResNet18-CIFAR, ACDC-net m=8, 128 three-channel 32×32 images, 10 classes);
- ``baseline-glyphs``: the Baselines' base-class training in ``run_fewshot.py`` on glyphs (the main job's
  Conv4 with ACDC-net m=16 and a linear head over the 377 base classes, batch 16 one-channel 28×28 images).

Each few-shot configuration times a meta-step (``backward_batch`` of a meta-batch of 4 synthetic 5-way 1-shot
episodes, 16 queries per class) and the test-time ``predict`` of 4 episodes (15 queries per class), both
layouts built from the same seed and interleaved round by round.

    python benchmarks/memory_format.py                         # the five few-shot configurations, 5 rounds
    python benchmarks/memory_format.py --configs main-acdc main-dense --rounds 7
    python benchmarks/memory_format.py --configs pretrain-cifar baseline-glyphs \\
        --out benchmarks/results/memory_format_supervised.json

Writes ``benchmarks/results/memory_format.json`` (or ``--out``): per configuration and measurement the
medians, IQRs and ``ratio`` = median over rounds of (channels_last ms / contiguous ms); < 1: channels_last
is faster.
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

from fewshot.cli import build_learner, build_parser, resolve  # noqa: E402
from fewshot.config import cli_main, parse_args_with_config  # noqa: E402
from fewshot.data.episode import Episode  # noqa: E402

MAIN_CONFIG = common.REPO / "configs" / "maml_glyphs_demo.yaml"
# configuration -> (run_maml.py flags on top of the main job's config, image channels)
CONFIGS: dict[str, tuple[list[str], int]] = {
    "main-acdc": ([], 1),
    "main-dense": (["--acdc", "none"], 1),
    "sweep-resnet10": (["--backbone", "resnet10", "--width", "16", "--stem", "small"], 1),
    "sweep-resnet18": (["--backbone", "resnet18", "--width", "16", "--stem", "small"], 1),
    "chen-resnet10": (
        [
            "--backbone",
            "resnet10",
            "--width",
            "64",
            "--stem",
            "imagenet",
            "--image-size",
            "84",
            "--atoms",
            "8",
            "--inner-lr",
            "0.01",
            "--test-inner-lr",
            "0.01",
            "--test-inner-steps",
            "5",
        ],
        3,
    ),
}
# supervised configuration -> (backbone and its options, ACDC scope, atoms, classes, batch, channels, image size)
SUPERVISED: dict[str, tuple[str, dict[str, Any], str, int, int, int, int, int]] = {
    "pretrain-cifar": ("resnet18_cifar", {}, "net", 8, 10, 128, 3, 32),
    "baseline-glyphs": ("conv4", {"width": 32, "image_size": 28, "in_channels": 1}, "net", 16, 377, 16, 1, 28),
}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--configs",
        nargs="+",
        choices=(*CONFIGS, *SUPERVISED),
        default=list(CONFIGS),
        help="default: the few-shot ones (the supervised ones by name)",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/memory_format.json)")
    args = p.parse_args(argv)
    for name in ("rounds", "meta_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def run_settings(name: str) -> tuple[argparse.Namespace, int]:
    """The resolved run_maml.py settings of configuration ``name`` and its image channels."""
    flags, channels = CONFIGS[name]
    argv = ["--config", str(MAIN_CONFIG), *flags, "--device", "cpu", "--out", "unused"]
    return resolve(parse_args_with_config(build_parser("maml"), argv)), channels


def episodes(settings: argparse.Namespace, channels: int, count: int, queries: int, seed: int) -> list[Episode]:
    """``count`` synthetic episodes (``common.synthetic_episode``) of the run's ways, shots and image size."""
    g = torch.Generator().manual_seed(seed)
    sizes = argparse.Namespace(
        ways=settings.ways, shots=settings.shots, queries=queries, image_size=settings.image_size
    )
    return [common.synthetic_episode(g, sizes, torch.float32, channels) for _ in range(count)]


def contenders(name: str, args: argparse.Namespace) -> dict[str, dict[str, Callable[[], None]]]:
    """``{"train_step": {layout: step}, "predict": {layout: step}}`` for configuration ``name``."""
    settings, channels = run_settings(name)
    train = episodes(settings, channels, args.meta_batch, settings.queries, seed=1)
    test = episodes(settings, channels, args.meta_batch, settings.test_queries, seed=2)
    steps: dict[str, dict[str, Callable[[], None]]] = {"train_step": {}, "predict": {}}
    for layout, memory_format in LAYOUTS.items():
        settings.memory_format = layout
        torch.manual_seed(0)
        learner, _ = build_learner(settings, channels)
        train_batch = [e.to("cpu", memory_format=memory_format) for e in train]
        test_batch = [e.to("cpu", memory_format=memory_format) for e in test]

        def train_step(learner=learner, batch=train_batch) -> None:
            learner.train()
            learner.zero_grad(set_to_none=True)
            learner.backward_batch(batch)

        def predict(learner=learner, batch=test_batch) -> None:
            learner.eval()
            learner.predict_batch(batch)

        steps["train_step"][layout], steps["predict"][layout] = train_step, predict
    return steps


def supervised_contenders(name: str) -> dict[str, dict[str, Callable[[], None]]]:
    """``{"supervised_step": {layout: step}}``: one training step of ``fit`` on a fixed batch, per layout."""
    from fewshot.training.checkpoint import ModelSpec
    from fewshot.training.models import build_model

    backbone, kwargs, acdc, atoms, classes, batch, channels, size = SUPERVISED[name]
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(batch, channels, size, size, generator=g), torch.arange(batch) % classes
    steps: dict[str, Callable[[], None]] = {}
    for layout, memory_format in LAYOUTS.items():
        torch.manual_seed(0)
        model = build_model(ModelSpec(backbone, acdc, atoms, num_classes=classes, kwargs=kwargs))
        model = model.to(memory_format=memory_format).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = images.to(memory_format=memory_format)

        def step(model=model, optimizer=optimizer, x=x) -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), labels).backward()
            optimizer.step()

        steps[layout] = step
    return {"supervised_step": steps}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    steps = supervised_contenders(name) if name in SUPERVISED else contenders(name, args)
    for kind, fns in steps.items():
        result[kind] = common.timed_ratio(f"{name} {kind}", fns, args.rounds, "channels_last", "contiguous")
    return result


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    notes = (
        "ratio = median over rounds of (channels_last ms / contiguous ms) within the round; < 1: "
        "channels_last is faster. train_step: backward_batch of the meta-batch; predict: predict_batch of "
        "as many test episodes; supervised_step: one SGD step of fit on a fixed batch."
    )
    return common.measure_configs(
        "memory_format", argv, args, measure, {"rounds": args.rounds, "meta_batch": args.meta_batch}, notes
    )


if __name__ == "__main__":
    main()
