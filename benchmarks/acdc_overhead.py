#!/usr/bin/env python
"""Cost of ACDC-net (or another ``--scope``) over the dense network: forward+backward of one batch,
interleaved, median ratio.

For each backbone (ResNet10, ResNet18 with Chen et al.'s ImageNet stem, 84×84) and each batch size
(``--batch``: 80 = one 5-way 1-shot 15-query episode's images; 5 = a 5-way 1-shot support set, what
MAML's inner loop sees), the dense network and its ACDC-net conversion (m=8 atoms, coefficients shared
net-wide, atom-drop ``--atom-drop`` in training mode) run the same batch through backbone + a linear
head, cross-entropy, backward (gradients only, no optimizer step). ``two_stage_layers`` counts the ACDC
layers that skip building their kernel at that batch (``ACDCConv2d.prefers_two_stage``). Round ``r`` times each once, in
alternating order; ``ratio`` is the median over rounds of ACDC time / dense time of that round
(``ratio_of_medians`` is the other common summary).

    python benchmarks/acdc_overhead.py                      # ResNet10 and ResNet18, batches 80 and 5
    python benchmarks/acdc_overhead.py --device cuda --batch 256 80
    python benchmarks/acdc_overhead.py --scope layer --out benchmarks/results/acdc_overhead_layer.json

``--scope`` picks what the coefficients are shared over (default ``net``; ``layer`` gives every conv its
own ``A``, so no layer reads a slice of a shared tensor).

``--per-layer`` also times each 3×3 conv shape of the ResNets at 84 px (64→64 at 21×21 … 512→512 at
3×3) alone at each batch: the dense conv against one ACDC layer forced to build its kernel and one forced
to run two-stage (forward+backward, interleaved, ratios to dense), next to the intermediate/kernel size
ratio that ``ACDCConv2d.prefers_two_stage`` compares: the evidence for its threshold.

    python benchmarks/acdc_overhead.py --per-layer --batch 5 25 80

Writes ``benchmarks/results/acdc_overhead.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from fewshot.config import cli_main  # noqa: E402

BACKBONE_CHOICES = ("resnet10", "resnet18", "conv4")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", choices=BACKBONE_CHOICES, default=["resnet10", "resnet18"])
    p.add_argument("--batch", type=int, nargs="+", default=[80, 5], help="batch sizes, each measured")
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--classes", type=int, default=5, help="size of the linear head")
    p.add_argument("--atoms", type=int, default=8)
    p.add_argument(
        "--scope",
        choices=("net", "block", "layer"),
        default="net",
        help="what the ACDC coefficients are shared over (default net)",
    )
    p.add_argument("--atom-drop", type=float, default=0.1, help="ACDC atom-drop (training mode; default 0.1)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2, help="untimed passes of each network first")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--per-layer", action="store_true", help="also time each ResNet conv shape alone: kernel vs two-stage"
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/acdc_overhead.json)")
    args = p.parse_args(argv)
    if min(args.batch) < 1:
        raise ValueError(f"--batch must be >= 1, got {min(args.batch)}")
    for name in ("image_size", "classes", "atoms", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    return args


def build(backbone: str, acdc: bool, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """Backbone + linear head in training mode; the dense and ACDC variants start from the same seed."""
    from fewshot import create_backbone

    torch.manual_seed(0)
    options = {"image_size": args.image_size} if backbone == "conv4" else {"stem": "imagenet"}
    extra = {"acdc": args.scope, "atoms": args.atoms, "atom_drop": args.atom_drop} if acdc else {}
    return create_backbone(backbone, num_classes=args.classes, **options, **extra).to(device).train()


def forward_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()

    return step


def two_stage_layers(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """(ACDC layers that run two-stage on this batch, all ACDC layers), from one forward pass."""
    from fewshot.acdc import ACDCConv2d

    layers = [m for m in model.modules() if isinstance(m, ACDCConv2d)]
    chosen: list[bool] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, inputs: chosen.append(m.prefers_two_stage(inputs[0], m.padding)))
        for m in layers
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return sum(chosen), len(layers)


def measure(backbone: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.image_size, args.image_size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (batch,), generator=g).to(device)
    models = {"dense": build(backbone, False, args, device), "acdc": build(backbone, True, args, device)}
    steps = {name: forward_backward(m, images, labels) for name, m in models.items()}
    sync = common.synchronizer(device)
    for _ in range(args.warmup):
        for step in steps.values():
            step()

    def progress(r: int, seconds: dict[str, float]) -> None:
        print(
            f"  {backbone} batch {batch} round {r + 1}/{args.rounds}: dense {1000 * seconds['dense']:.1f} ms  "
            f"acdc {1000 * seconds['acdc']:.1f} ms",
            flush=True,
        )

    times = common.interleaved_times(steps, args.rounds, sync, progress)
    ratios = [a / d for a, d in zip(times["acdc"], times["dense"])]
    stats = {name: common.summarize_ms(t) for name, t in times.items()}
    q1, ratio, q3 = common.quartiles(ratios)
    two_stage, layers = two_stage_layers(models["acdc"], images)
    row = {
        "batch": batch,
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "two_stage_layers": two_stage,
        "acdc_layers": layers,
        "dense_ms": stats["dense"]["median_ms"],
        "acdc_ms": stats["acdc"]["median_ms"],
        "ratio": round(ratio, 4),
        "ratio_iqr": round(q3 - q1, 4),
        "ratio_of_medians": round(stats["acdc"]["median_ms"] / stats["dense"]["median_ms"], 4),
        "round_ratios": [round(x, 4) for x in ratios],
        "contenders": stats,
    }
    if device.type == "cuda":
        for name, step in steps.items():
            torch.cuda.reset_peak_memory_stats(device)
            step()
            sync()
            stats[name]["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return row


# (in, out, input size, stride): the 3x3 convs of Chen et al.'s ResNets at 84 px with the ImageNet stem
RESNET_CONV_SHAPES = (
    (64, 64, 21, 1),
    (64, 128, 21, 2),
    (128, 128, 11, 1),
    (128, 256, 11, 2),
    (256, 256, 6, 1),
    (256, 512, 6, 2),
    (512, 512, 3, 1),
)


def measure_layer(
    shape: tuple[int, int, int, int], batch: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """One conv shape alone: dense against an ACDC layer in each evaluation, forward+backward."""
    from fewshot.acdc import ACDCConv2d

    c_in, c_out, size, stride = shape
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, size, size, device=device, requires_grad=True)
    layers: dict[str, nn.Module] = {"dense": nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)}
    for evaluation in ("kernel", "two-stage"):
        layer = ACDCConv2d(c_in, c_out, 3, args.atoms, stride=stride, padding=1, bias=False, atom_drop=args.atom_drop)
        layer.evaluation = evaluation
        layers[evaluation] = layer
    for layer in layers.values():
        layer.to(device).train()
    grad = torch.randn_like(layers["dense"](x))

    def step(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(grad)

        return run

    steps = {name: step(layer) for name, layer in layers.items()}
    for _ in range(args.warmup):
        for run in steps.values():
            run()
    times = common.interleaved_times(steps, args.rounds, common.synchronizer(device))
    auto = ACDCConv2d(c_in, c_out, 3, args.atoms, stride=stride, padding=1, bias=False).to(device)
    positions = batch * ((size - 1) // stride + 1) ** 2
    row: dict[str, Any] = {
        "shape": f"{c_in}->{c_out} at {size}x{size}, stride {stride}",
        "batch": batch,
        "intermediate_over_kernel": round(positions * args.atoms / (c_out * 9), 4),
        "auto_runs_two_stage": auto.prefers_two_stage(x, auto.padding),
        "dense_ms": common.summarize_ms(times["dense"])["median_ms"],
    }
    for name in ("kernel", "two-stage"):
        q1, ratio, q3 = common.quartiles([a / d for a, d in zip(times[name], times["dense"])])
        row[f"{name}_ratio"] = round(ratio, 4)
        row[f"{name}_ratio_iqr"] = round(q3 - q1, 4)
    return row


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = common.prepare_device(args.device, args.threads)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "acdc_overhead",
        "command": common.command_line("acdc_overhead", argv),
        "machine": common.machine(device),
        "settings": {
            "batches": args.batch,
            "image_size": args.image_size,
            "stem": "imagenet (ResNets)",
            "classes": args.classes,
            "acdc": args.scope,
            "atoms": args.atoms,
            "atom_drop": args.atom_drop,
            "rounds": args.rounds,
            "warmup": args.warmup,
        },
        "notes": "backbones.<name>.<batch>: ratio = median over rounds of (ACDC ms / dense ms) within the "
        "round; > 1: ACDC is slower.",
        "backbones": {},
    }
    for backbone in args.backbones:
        result["backbones"][backbone] = {}
        for batch in args.batch:
            row = measure(backbone, batch, args, device)
            result["backbones"][backbone][str(batch)] = row
            print(
                f"{backbone} batch {batch}: dense {row['dense_ms']:.1f} ms, acdc-{args.scope} {row['acdc_ms']:.1f} ms, "
                f"ratio {row['ratio']:.3f} (IQR {row['ratio_iqr']:.3f}), two-stage layers "
                f"{row['two_stage_layers']}/{row['acdc_layers']}",
                flush=True,
            )
    if args.per_layer:
        result["layers"] = []
        for batch in args.batch:
            for shape in RESNET_CONV_SHAPES:
                row = measure_layer(shape, batch, args, device)
                result["layers"].append(row)
                print(
                    f"layer {row['shape']}, batch {batch}: dense {row['dense_ms']:.2f} ms, kernel "
                    f"{row['kernel_ratio']:.2f}x, two-stage {row['two-stage_ratio']:.2f}x "
                    f"(intermediate/kernel {row['intermediate_over_kernel']:.3f}, auto: "
                    f"{'two-stage' if row['auto_runs_two_stage'] else 'kernel'})",
                    flush=True,
                )
    result["machine"]["load_average_1min_at_end"] = common.load_average()
    result["seconds"] = round(time.perf_counter() - start, 1)
    common.save_result(args.out, "acdc_overhead", result)
    return result


if __name__ == "__main__":
    main()
