#!/usr/bin/env python
"""Tune MAML (ACDC-net) on glyphs at an equal training budget, selecting on the validation split only.

A staged coordinate search. Stage ``k`` tries each of its candidates on top of the best settings found
by stages ``1 .. k-1`` (the starting point is ``BASE``), one axis at a time: architecture, inner step
sizes, atom-drop inside the inner loop, order and meta-batch, outer learning rate and its schedule, test
steps and atoms, the cost of a meta-step. Each candidate is one run of ``run_maml.py`` (a subprocess, so
runs can go side by side) that trains on ``--episodes`` training episodes and is then evaluated on
``--val-episodes`` seeded 5-way 1-shot episodes of the **validation** split (``--test-split val
--test-seed 100``; the checkpoint is chosen on other validation episodes, seed 101). The test split is
never read here.

The budget is a number of episodes, not seconds, so that a run's result does not depend on what else
the machine is doing and anyone can rerun it. Where a stage changes what a meta-step costs (architecture,
learned step sizes, order, meta-batch, queries, inner steps) the comparison is at equal *time*: before
the stage, one meta-step of each candidate is timed, interleaved in one process (whatever else runs
slows all of them alike; median of ``--calibration-rounds``), and each candidate gets the episodes that
fit in the time the stage's first candidate spends on ``--episodes``.

Results go to one JSON file (``benchmarks/results/tune_glyphs.json``: every run's settings, episodes,
accuracy, meta-steps, seconds, and the stages' step costs) and a markdown table next to it. A candidate
already in the JSON is not run again, so the search can be spread over several sessions; ``--stages``
runs a subset.

    python benchmarks/tune_glyphs.py                       # every stage, 2 runs side by side, 1 thread each
    python benchmarks/tune_glyphs.py --stages 1 2 --jobs 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, markdown_table, run_fewshot_cli, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# The starting point: the settings of the best ACDC Conv4 row (first order, inner lr 0.1,
# 10 test steps, learned step sizes) at width 32, which trains 2x faster than width 64 on 28 px glyphs.
BASE: dict[str, Any] = {
    "dataset": "glyphs",
    "backbone": "conv4",
    "width": 32,
    "acdc": "net",
    "atoms": 8,
    "atom_drop": 0.1,
    "inner_atom_drop": "step",
    "ways": 5,
    "shots": 1,
    "queries": 16,
    "meta_batch": 4,
    "lr": 1e-3,
    "lr_schedule": "constant",
    "inner_steps": 5,
    "inner_lr": 0.1,
    "test_inner_steps": 10,
    "first_order": True,
    "learn_inner_lr": False,
    "val_every": 250,
    "val_episodes": 100,
    "eval_batch": 32,
    "vectorize": "off",
}


@dataclass(frozen=True)
class Stage:
    """One axis of the search: candidates (name -> overrides of the best settings so far), and whether
    they are compared at equal time (they change what a meta-step costs) or at equal episodes."""

    name: str
    why: str
    candidates: dict[str, dict[str, Any]]
    equal_time: bool = False


STAGES: list[Stage] = [
    Stage(
        "architecture",
        "what reaches the highest accuracy in the same time on 28 px images",
        {
            "conv4-w32": {},
            "conv4-w64": {"width": 64},
            "resnet10-w16-small": {"backbone": "resnet10", "width": 16, "stem": "small"},
        },
        equal_time=True,
    ),
    Stage(
        "inner step size",
        "the shared coefficient tensor gets the sum of every layer's gradient: one "
        "global step size may suit it badly; a larger one (a smaller one, 0.03, reached 46.6% against 68.8% "
        "for 0.1 in a first, time-budgeted trial on a loaded machine that is not part of this record; 0.01, "
        "Chen et al.'s, gave the old main job's 48-49%)",
        {
            "lr0.1": {},
            "lr0.2": {"inner_lr": 0.2},
        },
    ),
    Stage(
        "learned step sizes",
        "one learned step size per tensor and step (Meta-SGD / MAML++) lets the "
        "shared tensor take its own; costs the extra graph to the step sizes",
        {
            "fixed": {},
            "learned": {"learn_inner_lr": True},
        },
        equal_time=True,
    ),
    Stage(
        "atom-drop in the inner loop",
        "a new mask per forward (default) changes the function between "
        "inner steps; one mask per task, none on the support steps, or none at all",
        {
            "drop0.1-step": {},
            "drop0.1-task": {"inner_atom_drop": "task"},
            "drop0.1-query": {"inner_atom_drop": "query"},
            "drop0": {"atom_drop": 0.0},
        },
    ),
    Stage(
        "order",
        "second-order meta-gradients at their measured cost (ms/episode)",
        {
            "first": {},
            "second": {"first_order": False},
        },
        equal_time=True,
    ),
    Stage(
        "outer learning rate",
        "Adam 1e-3 (Chen et al.) against larger steps, constant or cosine-annealed",
        {
            "adam1e-3": {},
            "adam3e-3": {"lr": 3e-3},
            "adam3e-3-cosine": {"lr": 3e-3, "lr_schedule": "cosine"},
            "adam1e-3-cosine": {"lr_schedule": "cosine"},
        },
    ),
    Stage(
        "test steps and atoms",
        "steps at test (trained with 5; 10 costs twice the test time) and the number of atoms per layer",
        {
            "test10-m8": {},
            "test5-m8": {"test_inner_steps": 5},
            "test10-m16": {"atoms": 16},
            "test10-m4": {"atoms": 4},
        },
    ),
    Stage(
        "cost and size of a meta-step",
        "the 80 query images and the support steps set a step's cost: "
        "fewer of either buys more meta-steps in the same time; more tasks per update against more updates",
        {
            "q16-s5-mb4": {},
            "q8-s5-mb4": {"queries": 8},
            "q16-s3-mb4": {"inner_steps": 3},
            "q16-s5-mb8": {"meta_batch": 8},
        },
        equal_time=True,
    ),
]


def step_costs(settings: Sequence[Mapping[str, Any]], rounds: int) -> list[float]:
    """Seconds per training episode of each settings' meta-step, timed interleaved in this process (one
    meta-step of each in turn, ``rounds`` times, after one warm-up; medians)."""
    import tempfile

    from common import write_settings

    from fewshot.cli import build_learner, build_parser, episode_source, resolve
    from fewshot.cli.common import MEMORY_FORMATS
    from fewshot.config import parse_args_with_config

    contenders = []
    for one in settings:
        with tempfile.TemporaryDirectory() as tmp:
            config = write_settings(
                {**one, "train_episodes": 4 * (rounds + 1) * one["meta_batch"]}, Path(tmp) / "settings.yaml"
            )
            args = resolve(parse_args_with_config(build_parser("maml"), ["--config", str(config), "--out", "unused"]))
        source = episode_source(args, "train", args.train_episodes, 0, train=True)
        torch.manual_seed(0)
        learner, _ = build_learner(args, source.dataset.channels)
        learner.train()
        optimizer = torch.optim.Adam(learner.parameters(), lr=args.lr)
        layout = MEMORY_FORMATS[args.memory_format]  # as run_maml.py lays out learner and images
        batches = [
            [source[i * args.meta_batch + k].to("cpu", memory_format=layout) for k in range(args.meta_batch)]
            for i in range(rounds + 1)
        ]
        contenders.append((learner, optimizer, batches, args.meta_batch))
    times: list[list[float]] = [[] for _ in contenders]
    for r in range(rounds + 1):
        for i, (learner, optimizer, batches, _) in enumerate(contenders):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            learner.backward_batch(batches[r])
            optimizer.step()
            if r > 0:  # the first round warms up
                times[i].append(time.perf_counter() - started)
    return [statistics.median(t) / meta_batch for t, (*_, meta_batch) in zip(times, contenders)]


def stage_budgets(
    stage: Stage, settings: Sequence[Mapping[str, Any]], args: argparse.Namespace
) -> tuple[list[int], list[float] | None]:
    """Training episodes per candidate: ``--episodes`` each, or at equal time the episodes that fit in
    the time the first candidate spends on ``--episodes`` (rounded to whole meta-batches)."""
    if not stage.equal_time:
        return [args.episodes] * len(settings), None
    costs = step_costs(settings, args.calibration_rounds)
    budgets = []
    for one, cost in zip(settings, costs):
        batch = one["meta_batch"]
        budgets.append(max(batch, round(args.episodes * costs[0] / cost / batch) * batch))
    return budgets, costs


def run_candidate(
    settings: Mapping[str, Any], episodes: int, run_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Train one candidate on ``episodes`` training episodes, evaluate it on validation episodes; its record."""
    started = time.perf_counter()
    result = run_fewshot_cli(
        "run_maml.py",
        {
            **settings,
            "train_episodes": episodes,
            "test_split": "val",
            "test_seed": 100,
            "test_episodes": args.val_episodes,
            "seed": args.seed,
        },
        run_dir,
        args.threads,
    )
    return {
        "settings": dict(settings),
        "train_episodes": episodes,
        "val_accuracy": result["accuracy_mean"],
        "val_ci95": result["accuracy_ci95"],
        "val_episodes": result["episodes"],
        "meta_steps": result.get("meta_steps"),
        "best_step": result.get("best_step"),
        "train_seconds": result.get("train_seconds"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "parameters": result.get("parameters"),
    }


def stage_winner(records: Mapping[str, Any], index: int) -> str | None:
    """The candidate of stage ``index`` (1-based) with the highest validation accuracy, once all are measured."""
    candidates = STAGES[index - 1].candidates
    measured = {n: records[f"{index}/{n}"] for n in candidates if f"{index}/{n}" in records}
    if len(measured) < len(candidates):
        return None
    return max(measured, key=lambda n: measured[n]["val_accuracy"])


def best_settings(records: Mapping[str, Any], upto: int) -> dict[str, Any]:
    """BASE updated with the winner (highest validation accuracy) of each stage before ``upto``."""
    settings = dict(BASE)
    for index, stage in enumerate(STAGES[:upto], start=1):
        winner = stage_winner(records, index)
        if winner is None:
            missing = sorted(n for n in stage.candidates if f"{index}/{n}" not in records)
            raise RuntimeError(
                f"stage {index} ({stage.name}) is not complete (missing: {', '.join(missing)}); run it first"
            )
        settings.update(stage.candidates[winner])
    return settings


def write_report(path: Path, payload: Mapping[str, Any]) -> None:
    records = payload["records"]
    rows = []
    for index, stage in enumerate(STAGES, start=1):
        winner = stage_winner(records, index)
        costs = payload.get("stages", {}).get(str(index), {}).get("seconds_per_episode")
        for k, name in enumerate(stage.candidates):
            r = records.get(f"{index}/{name}")
            cost = f"{1000 * costs[k]:.0f}" if costs else ""
            if r is None:
                rows.append([index, stage.name, name, "not run", "", "", cost, ""])
                continue
            mark = " **(chosen)**" if name == winner else ""
            rows.append(
                [
                    index,
                    stage.name,
                    name + mark,
                    f"{r['val_accuracy']:.2f} ± {r['val_ci95']:.2f}",
                    r["train_episodes"],
                    r["best_step"],
                    cost,
                    r["train_seconds"],
                ]
            )
    final = payload.get("chosen")
    text = [
        "# MAML on glyphs: validation-split search",
        "",
        f"Command: `{payload['command']}`. {payload['episodes']} training episodes per run, or, in the "
        "stages marked equal-time, the episodes that fit in the time the stage's first candidate spends "
        "on them (ms/episode: one meta-step of each candidate timed interleaved, per episode); "
        f"{payload['jobs']} runs side by side, {payload['threads']} thread(s) each. Accuracy on "
        f"{payload['val_episodes']} seeded 5-way 1-shot episodes of the validation split (Greek). "
        "Each stage varies one axis around the best settings of the stages before it.",
        "",
        markdown_table(
            ["stage", "axis", "candidate", "val acc % ± CI95", "train episodes", "best step", "ms/episode", "train s"],
            rows,
        ),
        "",
        "Why each axis: "
        + " ".join(
            f"({i}) {st.name}{' [equal time]' if st.equal_time else ''}: {st.why}."
            for i, st in enumerate(STAGES, start=1)
        ),
        "",
    ]
    if final:
        text += [
            "Chosen settings (all stages complete):",
            "",
            "```",
            *(f"{k}: {v}" for k, v in final.items()),
            "```",
            "",
        ]
    path.write_text("\n".join(text))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, nargs="*", default=None, help="stages to run (1-based; default all)")
    p.add_argument("--episodes", type=int, default=2000, help="training episodes per run (the equal budget)")
    p.add_argument("--val-episodes", type=int, default=600)
    p.add_argument("--calibration-rounds", type=int, default=5, help="timed meta-steps per candidate")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (and for the timing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/tune_glyphs", help="scratch folder of the runs' checkpoints")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/tune_glyphs.json"))
    args = p.parse_args(argv)
    for name in ("episodes", "val_episodes", "calibration_rounds", "jobs", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    stages = args.stages or list(range(1, len(STAGES) + 1))
    bad = [s for s in stages if not 1 <= s <= len(STAGES)]
    if bad:
        p.error(f"--stages must be in 1..{len(STAGES)}, got {bad}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    payload: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"records": {}, "stages": {}}
    for key in ("episodes", "val_episodes", "seed"):
        if key in payload and payload[key] != getattr(args, key):
            p.error(f"{out} was measured with --{key.replace('_', '-')} {payload[key]}; use the same or another --out")
    payload.update(
        command=command_line("tune_glyphs", argv),
        episodes=args.episodes,
        val_episodes=args.val_episodes,
        seed=args.seed,
        jobs=args.jobs,
        threads=args.threads,
    )
    records = payload["records"]
    for index in sorted(stages):
        stage = STAGES[index - 1]
        base = best_settings(records, index - 1)
        settings = [{**base, **overrides} for overrides in stage.candidates.values()]
        todo = [k for k, n in enumerate(stage.candidates) if f"{index}/{n}" not in records]
        print(f"stage {index} ({stage.name}): {len(todo)} of {len(settings)} candidates to run", flush=True)
        if not todo:
            continue
        planned = payload["stages"].get(str(index))
        if planned is None or planned["settings"] != settings:  # (re)plan: new stage or new base
            budgets, costs = stage_budgets(stage, settings, args)
            planned = {"settings": settings, "train_episodes": budgets, "seconds_per_episode": costs}
            payload["stages"][str(index)] = planned
            write_json(out, payload)

        for k in list(todo):  # the same settings and budget measured before (e.g. the last winner): reuse
            name = list(stage.candidates)[k]
            same = next(
                (
                    key
                    for key, r in records.items()
                    if r["settings"] == settings[k] and r["train_episodes"] == planned["train_episodes"][k]
                ),
                None,
            )
            if same is not None:
                records[f"{index}/{name}"] = {**records[same], "stage": stage.name, "reused_from": same}
                print(f"  {index}/{name}: the run of {same} (same settings and budget)", flush=True)
                todo.remove(k)
        write_json(out, payload)

        def one(k: int, stage=stage, index=index, settings=settings, planned=planned) -> tuple[str, dict[str, Any]]:
            name = list(stage.candidates)[k]
            run_dir = Path(args.runs) / f"{index}-{name}"
            if run_dir.exists():  # a run killed earlier: start it again
                shutil.rmtree(run_dir)
            return name, run_candidate(settings[k], planned["train_episodes"][k], run_dir, args)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for name, record in pool.map(one, todo):
                records[f"{index}/{name}"] = {"stage": stage.name, **record}
                print(
                    f"  {index}/{name}: {record['val_accuracy']:.2f}% ± {record['val_ci95']:.2f} "
                    f"({record['train_episodes']} episodes, {record['train_seconds']} s)",
                    flush=True,
                )
                write_json(out, payload)
        write_report(out.with_suffix(".md"), payload)
    if all(stage_winner(records, i) for i in range(1, len(STAGES) + 1)):
        payload["chosen"] = best_settings(records, len(STAGES))
    write_json(out, payload)
    write_report(out.with_suffix(".md"), payload)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
