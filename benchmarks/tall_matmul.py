#!/usr/bin/env python
"""The narrow product that builds an ACDC kernel, ``(R x m) @ (m x 9)``, forward and backward: plain (what
``fewshot.acdc.layer`` runs), against two rows at a time on a block-diagonal pair of the small matrix.

``R`` is ``c_out * c_in`` of a conv (the kernel form) or the unfolded positions times input channels (the
two-stage form); ``m`` the atoms. The pairs trick was meant to run BLAS's k-wide product better for tall
products, at the cost of a ``block_diag`` and two reshapes; the layers used it from 2,048 rows on until
this benchmark, rerun on a quiet machine, found it slower at every size (its first run, which found it
faster from 4,096 rows on, was taken under a load average of 1.95 on 2 cores). Each size is timed both
ways, interleaved over rounds of ``--calls`` calls.

    python benchmarks/tall_matmul.py

Writes ``benchmarks/results/tall_matmul.json`` (or ``--out``): per ``R`` the medians (microseconds per
call) and ``ratio`` = median over rounds of (pairs / plain); < 1: the pairs are faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from fewshot.config import cli_main  # noqa: E402


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[32, 1024, 2048, 4096, 16384, 65536, 262144])
    p.add_argument("--atoms", type=int, default=16, help="m: the product's inner size")
    p.add_argument("--cols", type=int, default=9, help="kh * kw of the kernel")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=50, help="forward + backward calls per round")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/tall_matmul.json)")
    args = p.parse_args(argv)
    for name in ("atoms", "cols", "rounds", "calls"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(r < 2 or r % 2 for r in args.rows):
        raise ValueError(f"--rows must be even numbers >= 2 (the pairs need them), got {args.rows}")
    return args


def paired_matmul(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows @ weight`` (``R`` even) two rows at a time against ``weight`` twice on a block diagonal."""
    r, k = rows.shape
    return (rows.reshape(r // 2, 2 * k) @ torch.block_diag(weight, weight)).view(r, weight.shape[1])


def contenders(rows: int, args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, args.atoms, generator=g).requires_grad_()
    w = torch.randn(args.atoms, args.cols, generator=g).requires_grad_()
    grad = torch.randn(rows, args.cols, generator=g)
    products = {"plain": lambda: a @ w, "pairs": lambda: paired_matmul(a, w)}

    def calls(product: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.calls):
                product().backward(grad)

        return run

    return {name: calls(product) for name, product in products.items()}


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    started = time.perf_counter()
    device = common.prepare_device("cpu", args.threads)
    sizes: dict[str, Any] = {}
    for rows in args.rows:
        fns = contenders(rows, args)
        for fn in fns.values():  # warm-up
            fn()
        times = common.interleaved_times(fns, args.rounds)
        ratios = sorted(p / q for p, q in zip(times["pairs"], times["plain"]))
        q1, ratio, q3 = common.quartiles(ratios)
        per_call = {name: sorted(t)[len(t) // 2] / args.calls * 1e6 for name, t in times.items()}
        sizes[str(rows)] = {
            "ratio": round(ratio, 4),
            "ratio_iqr": round(q3 - q1, 4),
            "median_us_per_call": {name: round(us, 1) for name, us in per_call.items()},
        }
        print(
            f"R={rows}: plain {per_call['plain']:.0f} us, pairs {per_call['pairs']:.0f} us, ratio {ratio:.2f} "
            f"(IQR {q3 - q1:.2f})",
            flush=True,
        )
    payload: dict[str, Any] = {
        "benchmark": "tall_matmul",
        "command": common.command_line("tall_matmul", argv),
        "machine": common.machine(device),
        "settings": {"atoms": args.atoms, "cols": args.cols, "rounds": args.rounds, "calls": args.calls},
        "rows": sizes,
        "notes": "ratio = median over rounds of (pairs / plain) for (R x atoms) @ (atoms x cols), forward and "
        "backward to both inputs; < 1: the pairs are faster.",
    }
    return common.finish_result(args.out, "tall_matmul", payload, started)


if __name__ == "__main__":
    main()
