#!/usr/bin/env python
"""MAML evaluation speed: ``fewshot.evaluation.evaluate(learner, episodes, batch=K)`` vs a per-episode loop.

Each test episode (synthetic: a per-class colour plus noise; 5-way 1-shot 15-query) is adapted by 5 SGD
steps at lr 0.01 on its support set, then its query set is predicted. The defaults are the evaluation of
the README's main job (``configs/maml_glyphs_demo.yaml``: 3,000 episodes of 28×28 images, ResNet10 with
stage widths 16-128, ACDC-net m=8, 32 episodes per batch); ``--width 64 --image-size 84 --acdc none`` is
Chen et al.'s ResNet10. Two implementations:

- ``ours``: ``evaluate(learner, episodes, batch=K)`` with ``fewshot.learners.MAML`` (``predict_batch``:
  K episodes through one ``torch.func.vmap`` with ``--vectorize on``, else one after the other;
  first-order inner loop, no graph to the meta-parameters), with weights and images laid out as
  ``run_maml.py`` lays them out (``--memory-format``, default auto: channels_last on a CPU; pass
  ``contiguous`` to compare the implementations alone);
- ``loop``: what a user writes: ``copy.deepcopy(model)``, ``torch.optim.SGD`` on the support loss,
  prediction under ``torch.no_grad()``; BatchNorm transductive (train mode: batch statistics), every
  other module in eval mode (so ACDC atom-drop is off, as in ``MAML.predict`` under ``learner.eval()``).

Both see the same episodes, chunk by chunk (K per round), interleaved with the order alternating per round;
episodes are generated before a round's clock starts. The per-episode accuracies of the two are stored and
compared (``identical``); in float32 a query whose two best logits nearly tie can flip (see README), in
float64 (``--dtype float64``, slow) they agree exactly.

    python benchmarks/evaluate.py                         # the main job's 3,000-episode evaluation
    python benchmarks/evaluate.py --width 64 --image-size 84 --acdc none --vectorize off --episodes 48 \
        --batch 8 --out benchmarks/results/evaluate_resnet10_84px.json   # Chen et al.'s ResNet10 (a sample)
    python benchmarks/evaluate.py --device cuda --width 64 --image-size 84 --batch 64

Writes ``benchmarks/results/evaluate.json`` (or ``--out``) with ``speedup`` = loop seconds / ours seconds.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import DTYPES  # noqa: E402

from fewshot.cli.common import MEMORY_FORMATS, resolved_memory_format  # noqa: E402
from fewshot.config import cli_main  # noqa: E402
from fewshot.data.episode import Episode  # noqa: E402
from fewshot.evaluation import EvaluationResult, episode_accuracy, evaluate  # noqa: E402
from fewshot.learners.maml import MAML  # noqa: E402

BACKBONE_CHOICES = ("resnet10", "resnet18", "conv4")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=3000, help="timed test episodes")
    p.add_argument("--batch", type=int, default=32, help="K: episodes per predict_batch (one vmap); one round")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of K episodes first")
    p.add_argument("--backbone", choices=BACKBONE_CHOICES, default="resnet10")
    p.add_argument("--acdc", choices=("none", "net"), default="net", help="dense or ACDC-net")
    p.add_argument("--atoms", type=int, default=8)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--width", type=int, default=16, help="first-stage channels (64: Chen et al.)")
    p.add_argument("--steps", type=int, default=5, help="test-time inner steps")
    p.add_argument("--lr", type=float, default=0.01, help="test-time inner step size")
    p.add_argument(
        "--vectorize",
        choices=("on", "off"),
        default="on",
        help="ours: K episodes through one vmap (on, as the main job) or one after the other (off, "
        "MAML's default; faster for full-width networks on a CPU)",
    )
    p.add_argument(
        "--memory-format",
        choices=("auto", *MEMORY_FORMATS),
        default="auto",
        help="ours: the layout of the learner's weights and the episodes' images, as run_maml.py's flag (auto: "
        "channels_last on a CPU); the loop always runs the model as built (contiguous)",
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic episodes")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/evaluate.json)")
    args = p.parse_args(argv)
    for name in ("episodes", "batch", "ways", "shots", "queries", "image_size", "atoms"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    return args


def make_episode(index: int, args: argparse.Namespace, device: torch.device) -> Episode:
    """Synthetic test episode number ``index`` (its own seed: the same tensors for both contenders)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
    return common.synthetic_episode(g, args, DTYPES[args.dtype]).to(device)


def build_learner(args: argparse.Namespace, device: torch.device) -> MAML:
    """MAML around a freshly initialised backbone (seed 0) in eval mode (no atom-drop)."""
    from fewshot import create_backbone

    torch.manual_seed(0)
    acdc = {"acdc": "net", "atoms": args.atoms} if args.acdc == "net" else {}
    options = {"image_size": args.image_size} if args.backbone == "conv4" else {"stem": "imagenet"}
    backbone = create_backbone(args.backbone, width=args.width, **options, **acdc)
    learner = MAML(
        backbone,
        ways=args.ways,
        test_inner_steps=args.steps,
        test_inner_lr=args.lr,
        vectorize="eval" if args.vectorize == "on" else "off",
    )
    return learner.to(device=device, dtype=DTYPES[args.dtype]).eval()


def transductive(model: nn.Module) -> nn.Module:
    """Every module in eval mode except BatchNorm, which normalizes with the statistics of its batch."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return model


def loop_predict(model: nn.Module, episode: Episode, steps: int, lr: float) -> torch.Tensor:
    """The straightforward test-time MAML: copy, fine-tune on the support set, predict the query set."""
    fast = transductive(copy.deepcopy(model))
    optimizer = torch.optim.SGD(fast.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(fast(episode.support_images), episode.support_labels).backward()
        optimizer.step()
    with torch.no_grad():
        return fast(episode.query_images)


def loop_accuracies(model: nn.Module, episodes: Sequence[Episode], args: argparse.Namespace) -> list[float]:
    return [episode_accuracy(loop_predict(model, e, args.steps, args.lr), e.query_labels) for e in episodes]


def ours_accuracies(
    learner: MAML, episodes: Sequence[Episode], args: argparse.Namespace, layout: torch.memory_format
) -> list[float]:
    return evaluate(learner, episodes, progress=False, batch=args.batch, memory_format=layout).accuracies


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = common.prepare_device(args.device, args.threads)
    sync = common.synchronizer(device)
    learner = build_learner(args, device)
    args.memory_format = resolved_memory_format(args.memory_format, device)
    layout = MEMORY_FORMATS[args.memory_format]
    ours_learner = copy.deepcopy(learner).to(memory_format=layout)  # the same weights, laid out as run_maml.py does
    runs = {
        "ours": lambda chunk: ours_accuracies(ours_learner, chunk, args, layout),
        "loop": lambda chunk: loop_accuracies(learner, chunk, args),
    }
    start = time.perf_counter()
    for w in range(args.warmup):  # untimed, with episodes that are not measured
        chunk = [make_episode(-1 - w * args.batch - i, args, device) for i in range(args.batch)]
        for run in runs.values():
            run(chunk)

    accuracies: dict[str, list[float]] = {n: [] for n in runs}
    seconds: dict[str, list[float]] = {n: [] for n in runs}
    sizes: list[int] = []
    for r, first in enumerate(range(0, args.episodes, args.batch)):
        chunk = [make_episode(i, args, device) for i in range(first, min(first + args.batch, args.episodes))]
        sizes.append(len(chunk))
        for name in common.rotated(list(runs), r):
            sync()
            t0 = time.perf_counter()
            accuracies[name] += runs[name](chunk)
            sync()
            seconds[name].append(time.perf_counter() - t0)
        print(
            f"  episodes {first + len(chunk)}/{args.episodes}: "
            + "  ".join(f"{n} {len(chunk) / seconds[n][-1]:.2f} ep/s" for n in runs),
            flush=True,
        )

    rates = {n: [k / s for k, s in zip(sizes, seconds[n])] for n in runs}
    contenders = {}
    for name in runs:
        q1, median, q3 = common.quartiles(rates[name])
        result = EvaluationResult(accuracies[name])
        contenders[name] = {
            "seconds": round(sum(seconds[name]), 3),
            "episodes_per_second": round(args.episodes / sum(seconds[name]), 4),
            "round_episodes_per_second_median": round(median, 4),
            "round_episodes_per_second_iqr": round(q3 - q1, 4),
            "round_seconds": [round(s, 4) for s in seconds[name]],
            "accuracy_mean": round(result.mean, 4),
            "accuracy_ci95": round(result.ci95, 4),
            "episode_accuracies": [round(a, 4) for a in accuracies[name]],
        }
    mismatched = [i for i, (a, b) in enumerate(zip(accuracies["ours"], accuracies["loop"])) if a != b]
    round_speedups = [lo / ou for lo, ou in zip(seconds["loop"], seconds["ours"])]
    payload: dict[str, Any] = {
        "benchmark": "evaluate",
        "command": common.command_line("evaluate", argv),
        "machine": {**common.machine(device), "load_average_1min_at_end": common.load_average()},
        "settings": {
            "backbone": args.backbone,
            "width": args.width,
            "acdc": args.acdc,
            "atoms": args.atoms if args.acdc == "net" else None,
            "ways": args.ways,
            "shots": args.shots,
            "queries": args.queries,
            "image_size": args.image_size,
            "steps": args.steps,
            "lr": args.lr,
            "episodes": args.episodes,
            "batch": args.batch,
            "vectorize": args.vectorize,
            "memory_format": args.memory_format,
            "warmup_rounds": args.warmup,
            "dtype": args.dtype,
            "seed": args.seed,
            "parameters": sum(p.numel() for p in learner.parameters()),
        },
        "speedup": round(sum(seconds["loop"]) / sum(seconds["ours"]), 4),
        "speedup_round_median": round(common.quartiles(round_speedups)[1], 4),
        "identical": not mismatched,
        "mismatched_episodes": mismatched,
        "contenders": contenders,
        "notes": "speedup = loop seconds / ours seconds over the same episodes (rounds of `batch` episodes, "
        "interleaved). Episode generation is outside the clock.",
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(
        f"ours {contenders['ours']['episodes_per_second']:.3f} ep/s, loop "
        f"{contenders['loop']['episodes_per_second']:.3f} ep/s, speedup {payload['speedup']:.2f}x; "
        f"accuracies {'identical' if not mismatched else f'differ in {len(mismatched)} episodes'} "
        f"({contenders['ours']['accuracy_mean']:.2f}% vs {contenders['loop']['accuracy_mean']:.2f}%)"
    )
    common.save_result(args.out, "evaluate", payload)
    return payload


if __name__ == "__main__":
    main()
