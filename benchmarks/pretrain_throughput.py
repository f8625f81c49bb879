#!/usr/bin/env python
"""Training throughput (images/s) of ResNet18 (CIFAR): dense vs ACDC-net vs ACDC-g-net, fp32 vs AMP.

Synthetic 32x32 batches already on the device, SGD (momentum 0.9, weight decay 1e-4), one full training
step (forward, cross-entropy, backward, update) through ``fewshot.training.optim.train_step``, the
step the pretraining loop runs. Warm-up steps first (cuDNN autotuning, torch.compile, allocator); on
CUDA the timed loop is bracketed by ``torch.cuda.synchronize()`` so queued kernels are counted.

    python benchmarks/pretrain_throughput.py                 # CUDA when present: batch 128, 50 timed steps
    python benchmarks/pretrain_throughput.py --quick         # CPU-sized: batch 8, 2 timed steps
    python benchmarks/pretrain_throughput.py --channels-last --compile

Writes ``benchmarks/results/pretrain_throughput_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository on sys.path)

from fewshot.config import cli_main  # noqa: E402
from fewshot.training.optim import Precision, train_step  # noqa: E402

# (name, acdc scope, atoms, group size): Table 1's ResNet18 rows (net m8; g-net m16 s64).
VARIANTS = {
    "dense": (None, 8, None),
    "acdc-net": ("net", 8, None),
    "acdc-g-net": ("g-net", 16, 64),
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (8 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 50; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, the median is kept (3; 1 --quick)")
    p.add_argument(
        "--amp",
        choices=("bf16", "fp16", "none"),
        default=None,
        help="the AMP dtype measured next to fp32 (default bf16 where supported, else fp16); none: fp32 only",
    )
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (warm-up includes compiling)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--quick", action="store_true", help="tiny settings for a CPU smoke run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    defaults = {"batch_size": (128, 8), "steps": (50, 2), "warmup": (10, 1), "repeats": (3, 1)}
    for name, (full, quick) in defaults.items():
        value, minimum = getattr(args, name), 0 if name == "warmup" else 1
        if value is None:
            setattr(args, name, quick if args.quick else full)
        elif value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    return args


def measure(variant: str, precision_mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median images/s over ``repeats`` timed loops of ``steps`` training steps."""
    from fewshot.backbones import create_backbone

    acdc, atoms, group_size = VARIANTS[variant]
    sync = common.synchronizer(device)
    torch.manual_seed(0)
    model = create_backbone("resnet18_cifar", acdc=acdc, atoms=atoms, group_size=group_size, num_classes=10).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    parameters = sum(p.numel() for p in model.parameters())
    if args.compile:
        model.compile()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    precision = Precision(precision_mode, device)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device, generator=g).contiguous(memory_format=memory_format)
    targets = torch.randint(0, 10, (args.batch_size,), device=device, generator=g)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        train_step(model, images, targets, optimizer, precision)
    sync()
    rates, losses = [], []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss, _ = train_step(model, images, targets, optimizer, precision)
        sync()
        seconds = time.perf_counter() - start
        rates.append(args.steps * args.batch_size / seconds)
        losses.append(float(loss))
    row = {
        "variant": variant,
        "acdc": acdc or "none",
        "atoms": atoms if acdc else None,
        "group_size": group_size,
        "precision": precision_mode,
        "parameters": parameters,
        "images_per_second": statistics.median(rates),
        "images_per_second_all": rates,
        "ms_per_step": 1000 * args.batch_size / statistics.median(rates),
        "final_loss": losses[-1],
    }
    if device.type == "cuda":
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = common.prepare_device(args.device, args.threads)
    if device.type == "cuda":
        amp = args.amp or ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        name = torch.cuda.get_device_name(device)
    else:
        amp = args.amp or "bf16"
        name = platform.processor() or platform.machine()
    rows = []
    for variant in args.variants:
        for mode in ("off",) if amp == "none" else ("off", amp):
            row = measure(variant, mode, args, device)
            rows.append(row)
            print(
                f"{variant:11s} {'fp32' if mode == 'off' else mode:5s} {row['images_per_second']:9.1f} img/s "
                f"{row['ms_per_step']:8.1f} ms/step  {row['parameters'] / 1e6:.2f}M params",
                flush=True,
            )
    dense = {r["precision"]: r["images_per_second"] for r in rows if r["variant"] == "dense"}
    for r in rows:
        r["relative_to_dense"] = r["images_per_second"] / dense[r["precision"]] if r["precision"] in dense else None
    result = {
        "benchmark": "pretrain_throughput",
        "command": common.command_line("pretrain_throughput", argv),
        "network": "resnet18_cifar",
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "quick": args.quick,
        "results": rows,
    }
    common.save_result(args.out, f"pretrain_throughput_{device.type}", result)
    return result


if __name__ == "__main__":
    main()
