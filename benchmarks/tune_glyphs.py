#!/usr/bin/env python
"""Tune MAML (ACDC-net) on glyphs at a fixed wall-clock budget, selecting on the validation split only.

A staged coordinate search. Stage ``k`` tries each of its candidates on top of the best settings found
by stages ``1 .. k-1`` (the starting point is ``BASE``), one axis at a time: architecture, inner step
sizes, atom-drop inside the inner loop, order and meta-batch, outer learning rate and its schedule, the
number of atoms. Each candidate is one run of ``run_maml.py`` (a subprocess, so runs can go side by
side) that trains for ``--budget`` seconds and is then evaluated on ``--val-episodes`` seeded 5-way
episodes of the **validation** split (``--test-split val --test-seed 100``; the checkpoint is chosen on
other validation episodes, seed 101). The test split is never read here.

Results go to one JSON file (``benchmarks/results/tune_glyphs.json``; every run's settings, accuracy,
meta-steps reached and seconds) and a markdown table next to it. A candidate already in the JSON is not
run again, so the search can be spread over several sessions; ``--stages`` runs a subset.

    python benchmarks/tune_glyphs.py                       # every stage, 2 runs side by side, 1 thread each
    python benchmarks/tune_glyphs.py --stages 1 2 --jobs 1 --threads 2

Budgets are wall-clock seconds on the machine that runs the search: with ``--jobs 2 --threads 1`` on a
2-core machine one run gets about 0.6x the meta-steps it would get alone with 2 threads.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, markdown_table, run_fewshot_cli, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# The starting point: the settings of the best ACDC Conv4 row (first order, inner lr 0.1,
# 10 test steps, learned step sizes) at width 32, which trains 2x faster than width 64 on 28 px glyphs.
BASE: dict[str, Any] = {
    "dataset": "glyphs", "backbone": "conv4", "width": 32, "acdc": "net", "atoms": 8, "atom_drop": 0.1,
    "inner_atom_drop": "step", "ways": 5, "shots": 1, "queries": 16, "meta_batch": 4, "lr": 1e-3,
    "lr_schedule": "constant", "inner_steps": 5, "inner_lr": 0.1, "test_inner_steps": 10,
    "first_order": True, "learn_inner_lr": False, "train_episodes": 200000, "val_every": 250,
    "val_episodes": 100, "eval_batch": 32, "vectorize": False,
}

# (stage name, why, candidates: name -> overrides of the best settings so far).
STAGES: list[tuple[str, str, dict[str, dict[str, Any]]]] = [
    ("architecture", "what trains fastest to the highest accuracy on 28 px at this budget", {
        "conv4-w32": {},
        "conv4-w64": {"width": 64},
        "resnet10-w16-small": {"backbone": "resnet10", "width": 16, "stem": "small"},
    }),
    ("inner step size", "the shared coefficient tensor gets the sum of every layer's gradient: one global "
     "step size may suit it badly; learned per-tensor step sizes, or larger/smaller global ones", {
        "lr0.1": {},
        "lr0.1-learned": {"learn_inner_lr": True},
        "lr0.3": {"inner_lr": 0.3},
        "lr0.03": {"inner_lr": 0.03},
    }),
    ("atom-drop in the inner loop", "a new mask per forward (default) changes the function between inner "
     "steps; one mask per task, none on the support steps, or none at all", {
        "drop0.1-step": {},
        "drop0.1-task": {"inner_atom_drop": "task"},
        "drop0.1-query": {"inner_atom_drop": "query"},
        "drop0": {"atom_drop": 0.0},
    }),
    ("meta-batch and order", "more tasks per update against more updates; second order at its cost", {
        "mb4-first": {},
        "mb2-first": {"meta_batch": 2},
        "mb8-first": {"meta_batch": 8},
        "mb4-second": {"first_order": False},
    }),
    ("outer learning rate", "Adam 1e-3 (Chen et al.) against larger steps, constant or cosine-annealed", {
        "adam1e-3": {},
        "adam3e-3": {"lr": 3e-3},
        "adam3e-3-cosine": {"lr": 3e-3, "lr_schedule": "cosine"},
        "adam1e-3-cosine": {"lr_schedule": "cosine"},
    }),
    ("test-time steps and atoms", "steps at test (trained with 5) and the number of atoms per layer", {
        "test10-m8": {},
        "test5-m8": {"test_inner_steps": 5},
        "test10-m16": {"atoms": 16},
        "test10-m4": {"atoms": 4},
    }),
]


def run_candidate(settings: Mapping[str, Any], run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train one candidate for the budget and evaluate it on validation episodes; returns its record."""
    started = time.perf_counter()
    result = run_fewshot_cli("run_maml.py", {
        **settings, "train_seconds": args.budget, "test_split": "val", "test_seed": 100,
        "test_episodes": args.val_episodes, "seed": args.seed,
    }, run_dir, args.threads)
    return {
        "settings": dict(settings),
        "val_accuracy": result["accuracy_mean"],
        "val_ci95": result["accuracy_ci95"],
        "val_episodes": result["episodes"],
        "meta_steps": result.get("meta_steps"),
        "best_step": result.get("best_step"),
        "train_seconds": result.get("train_seconds"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "parameters": result.get("parameters"),
    }


def best_settings(records: Mapping[str, Any], upto: int) -> dict[str, Any]:
    """BASE updated with the winner (highest validation accuracy) of each stage before ``upto``."""
    settings = dict(BASE)
    for index, (stage, _, candidates) in enumerate(STAGES[:upto], start=1):
        measured = {name: records[f"{index}/{name}"] for name in candidates if f"{index}/{name}" in records}
        if len(measured) < len(candidates):
            missing = sorted(set(candidates) - set(measured))
            raise RuntimeError(f"stage {index} ({stage}) is not complete (missing: {', '.join(missing)}); "
                               "run it first")
        winner = max(measured, key=lambda name: measured[name]["val_accuracy"])
        settings.update(candidates[winner])
    return settings


def write_report(path: Path, payload: Mapping[str, Any]) -> None:
    records = payload["records"]
    rows = []
    for index, (stage, _, candidates) in enumerate(STAGES, start=1):
        measured = {n: records[f"{index}/{n}"] for n in candidates if f"{index}/{n}" in records}
        winner = max(measured, key=lambda n: measured[n]["val_accuracy"]) if measured else None
        for name in candidates:
            r = measured.get(name)
            if r is None:
                rows.append([index, stage, name, "not run", "", "", ""])
                continue
            mark = " **(chosen)**" if name == winner and len(measured) == len(candidates) else ""
            rows.append([index, stage, name + mark, f"{r['val_accuracy']:.2f} ± {r['val_ci95']:.2f}",
                         r["meta_steps"], r["best_step"], r["train_seconds"]])
    final = payload.get("chosen")
    text = [
        "# MAML on glyphs: validation-split search",
        "",
        f"Command: `{payload['command']}`. Budget: {payload['budget']} s of training per run "
        f"({payload['jobs']} runs side by side, {payload['threads']} thread(s) each); accuracy on "
        f"{payload['val_episodes']} seeded 5-way 1-shot episodes of the validation split (Greek). "
        "Each stage varies one axis around the best settings of the stages before it.",
        "",
        markdown_table(["stage", "axis", "candidate", "val acc % ± CI95", "meta-steps", "best step",
                        "train s"], rows),
        "",
    ]
    if final:
        text += ["Chosen settings (all stages complete):", "", "```", *(f"{k}: {v}" for k, v in final.items()),
                 "```", ""]
    path.write_text("\n".join(text))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, nargs="*", default=None, help="stages to run (1-based; default all)")
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per run")
    p.add_argument("--val-episodes", type=int, default=600)
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/tune_glyphs", help="scratch folder of the runs' checkpoints")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/tune_glyphs.json"))
    args = p.parse_args(argv)
    for name in ("budget", "val_episodes", "jobs", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    stages = args.stages or list(range(1, len(STAGES) + 1))
    bad = [s for s in stages if not 1 <= s <= len(STAGES)]
    if bad:
        p.error(f"--stages must be in 1..{len(STAGES)}, got {bad}")
    out = Path(args.out)
    payload: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"records": {}}
    for key in ("budget", "val_episodes", "seed"):
        if key in payload and payload[key] != getattr(args, key):
            p.error(f"{out} was measured with --{key.replace('_', '-')} {payload[key]}; "
                    f"use the same or another --out")
    payload.update(command=command_line("tune_glyphs", argv), budget=args.budget,
                   val_episodes=args.val_episodes, seed=args.seed, jobs=args.jobs, threads=args.threads)
    records = payload["records"]
    for index in sorted(stages):
        stage, why, candidates = STAGES[index - 1]
        base = best_settings(records, index - 1)
        todo = [n for n in candidates if f"{index}/{n}" not in records]
        print(f"stage {index} ({stage}): {len(todo)} of {len(candidates)} candidates to run", flush=True)

        def one(name: str) -> tuple[str, dict[str, Any]]:
            settings = {**base, **candidates[name]}
            run_dir = Path(args.runs) / f"{index}-{name}"
            if run_dir.exists():  # a run killed earlier: start it again
                shutil.rmtree(run_dir)
            return name, run_candidate(settings, run_dir, args)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for name, record in pool.map(one, todo):
                records[f"{index}/{name}"] = {"stage": stage, "why": why, **record}
                print(f"  {index}/{name}: {record['val_accuracy']:.2f}% ± {record['val_ci95']:.2f} "
                      f"({record['meta_steps']} meta-steps)", flush=True)
                write_json(out, payload)
        write_report(out.with_suffix(".md"), payload)
    if all(f"{i}/{n}" in records for i, (_, _, c) in enumerate(STAGES, start=1) for n in c):
        payload["chosen"] = best_settings(records, len(STAGES))
    write_json(out, payload)
    write_report(out.with_suffix(".md"), payload)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
