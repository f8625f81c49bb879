#!/usr/bin/env python
"""Meta-training and the test under torchrun: wall time at 1 and 2 processes (each on 1 thread).

Runs the README's main job (``configs/maml_glyphs_demo.yaml``, its whole-job budget ``job_seconds``
dropped) for a fixed number of meta-steps and a 600-episode test, under ``torchrun --nproc_per_node N``
for each N of ``--processes``, round by round (the order rotates each round). Each run reports its
training seconds (the meta-steps and one final validation) and its test seconds from its
``result.json``; the script writes the medians and the speed-ups over one process. A run killed or
failed is an error, not a number.

    python benchmarks/torchrun_scaling.py                     # 1 and 2 processes, 2 rounds (~8 min)
    python benchmarks/torchrun_scaling.py --processes 1 2 4 8 --device cuda   # N GPUs

Writes ``benchmarks/results/torchrun_scaling.json`` (or ``--out``). Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from common import REPO, command_line, machine, rotated, save_result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, else ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--meta-steps", type=int, default=100, help="meta-steps of 4 tasks each (default 100)")
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--config", default="configs/maml_glyphs_demo.yaml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/torchrun_scaling.json)")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.processes) or args.rounds < 1 or args.meta_steps < 1:
        p.error("--processes, --rounds and --meta-steps must be >= 1")
    return args


def fixed_length_config(config: Path, scratch: Path) -> Path:
    """A copy of ``config`` in ``scratch`` without its whole-job budget: every run trains all its meta-steps."""
    settings = yaml.safe_load(config.read_text())
    settings.pop("job_seconds", None)
    copy = scratch / "config.yaml"
    copy.write_text(yaml.safe_dump(settings))
    return copy


def one_run(processes: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """One run of the main job under torchrun with ``processes`` processes; its seconds from result.json."""
    out = scratch / f"n{processes}"
    config = fixed_length_config(REPO / args.config, scratch)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        "run_maml.py", "--config", str(config), "--device", args.device, "--no-progress", "--out", str(out),
        "--train-episodes", str(4 * args.meta_steps), "--val-every", "0", "--val-episodes", "100",
        "--test-episodes", str(args.test_episodes),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: torchrun with {processes} process(es) failed: {done.stderr.strip()[-2000:]}")
    record = json.loads((out / "result.json").read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return {
        "train_seconds": record["train_seconds"],
        "test_seconds": record["test_seconds"],
        "meta_steps": record["meta_steps"],
        "accuracy_mean": record["accuracy_mean"],
    }


def main() -> None:
    args = parse()
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.processes}
    with tempfile.TemporaryDirectory(prefix="torchrun-scaling-") as tmp:
        for r in range(args.rounds):
            for n in rotated(args.processes, r):
                runs[n].append(one_run(n, args, Path(tmp)))
                print(f"round {r + 1}, {n} process(es): {runs[n][-1]}", flush=True)
    medians = {
        n: {key: statistics.median(run[key] for run in done) for key in ("train_seconds", "test_seconds")}
        for n, done in runs.items()
    }
    base = medians[min(args.processes)]
    payload = {
        "command": command_line("torchrun_scaling", None),
        "machine": machine(torch.device(args.device)),
        "config": args.config,
        "meta_steps": args.meta_steps,
        "meta_batch": 4,
        "test_episodes": args.test_episodes,
        "threads_per_process": 1,
        "runs": {str(n): done for n, done in runs.items()},
        "median_seconds": {str(n): m for n, m in medians.items()},
        "speedup_over_fewest": {
            str(n): {k: round(base[k] / m[k], 3) for k in ("train_seconds", "test_seconds")} for n, m in medians.items()
        },
    }
    save_result(args.out, "torchrun_scaling", payload)
    print(json.dumps(payload["median_seconds"]), json.dumps(payload["speedup_over_fewest"]))


if __name__ == "__main__":
    main()
