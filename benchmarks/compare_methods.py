#!/usr/bin/env python
"""Every few-shot method at the same wall-clock training budget, dense and ACDC-net, 1- and 5-shot, on glyphs.

A cell is (method, dense | ACDC-net, shots). Each cell is one run of ``run_fewshot.py`` in a subprocess (its
settings go in as a ``--config`` YAML file, written into the run folder) that trains for ``--train-seconds``
seconds of wall clock — the episodic loop stops after the meta-step, Baseline/Baseline++ pretraining after
the batch, that passes the budget, validation included — and is then tested on the same ``--test-episodes``
seeded 5-way episodes of the test split (``--test-seed 0``, 15 queries per class) as every other cell.
Every method runs at its best settings (``METHOD_SETTINGS``; MAML's are the tuned main job,
``configs/maml_glyphs_demo.yaml``) on one backbone: Conv4 at width 32 on 28 px glyphs by default, what
trains best on a CPU. RelationNet runs on Chen et al.'s variant of it where they use one
(``RELATION_BACKBONES``: ``conv4_nopool``, the same parameters, pooling in the first two blocks only).

Results (cells already in the JSON are skipped, so the comparison can be spread over several sessions;
``--methods``, ``--shots``, ``--variants`` select cells):

- ``benchmarks/results/compare_methods.json``: every cell's record (method, variant, shots, accuracy ± CI95
  and the per-episode accuracies, backbone parameters, training seconds, meta-steps or batches and epochs
  done, how training stopped, the settings, the command, the load average when it started);
- ``compare_methods.md``: methods × {1-shot, 5-shot} × {dense, ACDC-net}, accuracy ± CI95, under a line
  naming the budget; and what each run reached in its budget;
- ``compare_methods.png``: grouped bars with 95% CI error bars, groups = methods, bars = dense / ACDC-net,
  one panel per shot count.

    python benchmarks/compare_methods.py                                  # all 24 cells (about 85 min)
    python benchmarks/compare_methods.py --methods protonet maml --shots 1 # some cells
    python benchmarks/compare_methods.py --report                         # table and plot of what exists
    python benchmarks/compare_methods.py --quick --methods protonet --variants dense --shots 1  # smoke run
    python benchmarks/compare_methods.py --tune                           # the validation-split search

The default budget, 300 s of training per run with two runs at a time (``--jobs 2``, each on its own core
at 1 thread), is sized so that all 24 runs fit in 90 minutes on 2 cores. Costs measured with this script
(Conv4 width 32, ACDC-net, MAML as configs/maml_glyphs_demo.yaml with 5 test steps) on the 2-core machine
while it ran other jobs (load ~4), in seconds of one core:

    training: 24 runs x 300 s                                                   = 7200 s
    start-up: python + torch, glyphs, model: 24 x ~7 s                          =  170 s
    after the budget, per variant (x 2), 600 test episodes (+ the episodic runs' final 100-episode
    validation), 1-shot + 5-shot:
      MAML                       0.09 s + 0.32 s per episode x 700              =  285 s
      ProtoNet, MatchingNet, RelationNet  3 x (10 s + 21 s)                     =   95 s
      Baseline (100 head epochs) 0.045 s + 0.15 s per episode x 600             =  115 s
      Baseline++                 0.06 s + 0.21 s per episode x 600              =  160 s
                                                          2 variants x 655 s    = 1310 s
    MAML's 10 test-time inner steps (the main config) instead of 5              =  480 s
    total                                                  9160 s on 2 cores   = about 77 min (<= 90)

Why 300 s and two at a time: one run at a time left one of the two cores idle. A first search at 150 s
per run, one at a time (``benchmarks/results/compare_methods_tuning_150s.json``), showed every episodic
method still improving when the budget stopped it (ProtoNet 88.4% on validation after ~3,000 episodes),
and that the budget, not the settings, bounded them; runs that overlapped another job on the machine got
25-35% fewer steps and scored up to 5 points lower, so nothing else should run beside the benchmark.

``--tune`` is the search the settings table comes from: for every method but MAML (searched by
``benchmarks/tune_glyphs.py``) it runs the candidates of ``TUNE_CANDIDATES`` at the same budget on one cell
(ACDC-net 1-shot by default, where MAML was tuned) and evaluates them on ``--tune-episodes`` seeded episodes
of the **validation** split (``--test-split val --test-seed 100``); the test split is never read. Results:
``benchmarks/results/compare_methods_tuning.json`` (candidates already there are skipped, like the cells),
with the winner of each method under ``chosen``: copy those into ``METHOD_SETTINGS``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, load_average, markdown_table, measure_cells, run_fewshot_cli, write_json  # noqa: E402

from fewshot.cli import FEWSHOT_BACKBONES  # noqa: E402
from fewshot.config import cli_main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("maml", "protonet", "matchingnet", "relationnet", "baseline", "baseline_pp")
PRETRAINED = ("baseline", "baseline_pp")
VARIANTS = {"dense": "none", "acdc-net": "net"}  # column name -> --acdc
LABELS = {"dense": "dense", "acdc-net": "ACDC-net"}
MAML_CONFIG = ROOT / "configs/maml_glyphs_demo.yaml"
# Keys of MAML's config that the comparison sets itself (the same for every method) or replaces.
MAML_DROPPED = (
    "out",
    "train_seconds",
    "job_seconds",
    "vectorize",
    "train_episodes",
    "test_episodes",
    "backbone",
    "width",
    "stem",
    "acdc",
    "atoms",
    "group_size",
    "dataset",
    "image_size",
    "ways",
    "shots",
    "test_queries",
    "seed",
    "test_seed",
    "test_split",
    "device",
    "method",
    "eval_only",
    "checkpoint",
    "resume",
)
# Episodic runs are stopped by the budget; this many training episodes (and Baseline pretraining epochs,
# METHOD_SETTINGS) are only the upper bound, never reached at the default budget.
EPISODE_CAP = 1_000_000
COMMON = {"dataset": "glyphs", "test_queries": 15, "eval_batch": 32}
# RelationNet's backbone where Chen et al. change it: their Conv4 for RelationNet pools in the first two
# blocks only, so the relation module compares a map (5x5 on 28 px glyphs) instead of Conv4's 1x1.
RELATION_BACKBONES = {"conv4": "conv4_nopool"}
# Where the search starts: Chen et al.'s recipes at CPU sizes. TUNE_CANDIDATES override these.
SEARCH_START: dict[str, dict[str, Any]] = {
    "protonet": {"lr": 1e-3, "queries": 16, "val_every": 1000, "val_episodes": 100},
    "matchingnet": {"lr": 1e-3, "queries": 16, "fce": True, "val_every": 1000, "val_episodes": 100},
    "relationnet": {"lr": 1e-3, "queries": 16, "relation_loss": "mse", "val_every": 1000, "val_episodes": 100},
    "baseline": {"lr": 1e-3, "pretrain_batch": 64, "pretrain_epochs": 400, "head_epochs": 100},
    "baseline_pp": {"lr": 1e-3, "pretrain_batch": 64, "pretrain_epochs": 400, "head_epochs": 100},
}
# The settings of each method in the comparison: the winners of the validation-split search at the default
# budget (300 s, two runs at a time; ``--tune``, results in benchmarks/results/compare_methods_tuning.json,
# under "chosen"; validation accuracy, ACDC-net 1-shot, 600 episodes, in the comments). MAML's come from
# configs/maml_glyphs_demo.yaml, the winner of benchmarks/tune_glyphs.py (benchmarks/results/tune_glyphs.json).
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    # + configs/maml_glyphs_demo.yaml; its runs share the 2 cores one thread each, where task by task is
    # the faster (benchmarks/results/vectorize_1thread.json)
    "maml": {"vectorize": "off"},
    # 20-way training episodes, Adam 3e-3: 92.29% (5-way: 91.07% at 3e-3, 90.13% at 1e-3)
    "protonet": {**SEARCH_START["protonet"], "lr": 3e-3, "train_ways": 20},
    # without full-context embeddings, Adam 1e-3: 92.68% (with them: 92.19% at 3e-3, 91.50% at 1e-3)
    "matchingnet": {**SEARCH_START["matchingnet"], "fce": False},
    # on conv4_nopool: softmax over the relation scores, Adam 1e-3: 88.62% (MSE: 88.27% at 1e-3, 88.34% at 3e-3,
    # 58.55% with 20-way episodes; on conv4's 1x1 maps softmax reached 86.35%, MSE 81.60%)
    "relationnet": {**SEARCH_START["relationnet"], "relation_loss": "softmax"},
    # batch 64, Adam 3e-3: 91.39% (batch 16: 90.20%; 1e-3: 90.03%)
    "baseline": {**SEARCH_START["baseline"], "lr": 3e-3},
    # batch 64, Adam 3e-3: 91.73% (batch 64 at 1e-3: 91.32%, batch 16 at 1e-3: 90.90%); searched again after the
    # supervised loop took the episodes' normalization arithmetic (issue 15): before it, batch 16 at 1e-3 had won
    # by 0.20, within one run's interval
    "baseline_pp": {**SEARCH_START["baseline_pp"], "lr": 3e-3},
}
# The candidates of --tune: name -> overrides of SEARCH_START (the first is SEARCH_START itself).
TUNE_CANDIDATES: dict[str, dict[str, dict[str, Any]]] = {
    "protonet": {
        "adam1e-3": {},
        "adam3e-3": {"lr": 3e-3},
        "adam3e-3-cosine": {"lr": 3e-3, "lr_schedule": "cosine"},
        "adam1e-3-20way": {"train_ways": 20},
        "adam3e-3-20way": {"lr": 3e-3, "train_ways": 20},
    },
    "matchingnet": {
        "fce-adam1e-3": {},
        "fce-adam3e-3": {"lr": 3e-3},
        "nofce-adam1e-3": {"fce": False},
        "fce-adam1e-3-20way": {"train_ways": 20},
    },
    "relationnet": {
        "mse-adam1e-3": {},
        "softmax-adam1e-3": {"relation_loss": "softmax"},
        "mse-adam3e-3": {"lr": 3e-3},
        "mse-adam1e-3-20way": {"train_ways": 20},
    },
    "baseline": {"b64-adam1e-3": {}, "b16-adam1e-3": {"pretrain_batch": 16}, "b64-adam3e-3": {"lr": 3e-3}},
    "baseline_pp": {"b64-adam1e-3": {}, "b16-adam1e-3": {"pretrain_batch": 16}, "b64-adam3e-3": {"lr": 3e-3}},
}
# --quick: tiny sizes for a smoke run (a couple of seconds of training per run; the numbers mean nothing),
# and the method settings it shrinks (episodic: validation; Baselines: the head; MAML: test-time steps).
QUICK = {"train_seconds": 2.0, "test_episodes": 10, "width": 8, "tune_episodes": 10}
QUICK_OVERRIDES = {"val_every": 0, "val_episodes": 5, "head_epochs": 5, "test_inner_steps": 2}
# What the records of one JSON file must share (a cell measured otherwise is not comparable).
SHARED = (
    "train_seconds",
    "test_episodes",
    "test_seed",
    "seed",
    "backbone",
    "width",
    "stem",
    "atoms",
    "ways",
    "device",
    "threads",
    "jobs",
)


class _OneLineParser(argparse.ArgumentParser):
    """Bad flags: one ``error: ...`` line, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _OneLineParser(prog="compare_methods.py", description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    p.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="wall-clock seconds of training per run, validation included (default 300; --quick 2)",
    )
    p.add_argument("--test-episodes", type=int, default=None, help="seeded test episodes (default 600; --quick 10)")
    p.add_argument("--test-seed", type=int, default=0, help="seed of the test episodes, the same for every cell")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--backbone", choices=FEWSHOT_BACKBONES, default="conv4")
    p.add_argument("--width", type=int, default=None, help="channels of the first stage (default 32; --quick 8)")
    p.add_argument("--stem", choices=("imagenet", "small"), default=None, help="ResNet stem (ResNets only)")
    p.add_argument("--atoms", type=int, default=None, help="ACDC atoms per layer (default: MAML config's, else 8)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--maml-config", default=str(MAML_CONFIG), help="MAML's tuned settings (YAML)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: one per core of a 2-core machine)")
    p.add_argument("--runs", default=None, help="scratch folder of the runs (default runs/compare_methods[_quick])")
    p.add_argument(
        "--out",
        default=None,
        help="results JSON; .md and .png go next to it "
        "(default benchmarks/results/compare_methods.json; --quick: in --runs)",
    )
    p.add_argument("--report", action="store_true", help="only write the table and plot of what the JSON holds")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (numbers are meaningless)")
    tune = p.add_argument_group("the validation-split search (--tune)")
    tune.add_argument("--tune", action="store_true", help="run the search instead of the comparison")
    tune.add_argument("--tune-shots", type=int, default=1)
    tune.add_argument("--tune-variants", nargs="+", choices=list(VARIANTS), default=["acdc-net"])
    tune.add_argument(
        "--tune-episodes", type=int, default=None, help="validation episodes per candidate (default 600; --quick 10)"
    )
    tune.add_argument(
        "--tune-out", default=None, help="default benchmarks/results/compare_methods_tuning.json (--quick: in --runs)"
    )
    args = p.parse_args(argv)
    defaults = {"train_seconds": 300.0, "test_episodes": 600, "width": 32, "tune_episodes": 600}
    for name, value in (QUICK if args.quick else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    runs = Path(args.runs or ("runs/compare_methods_quick" if args.quick else "runs/compare_methods"))
    args.runs = str(runs)
    home = runs if args.quick else RESULTS
    args.out = args.out or str(home / "compare_methods.json")
    args.tune_out = args.tune_out or str(home / "compare_methods_tuning.json")
    return args


def check(args: argparse.Namespace) -> None:
    """Values argparse cannot check; one ``ValueError`` line each."""
    if not (math.isfinite(args.train_seconds) and args.train_seconds > 0):
        raise ValueError(f"--train-seconds must be a positive number of seconds, got {args.train_seconds}")
    for name in ("test_episodes", "width", "threads", "jobs", "tune_episodes", "tune_shots"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(k < 1 for k in args.shots):
        raise ValueError(f"--shots must be >= 1, got {' '.join(map(str, args.shots))}")
    if args.ways < 2:
        raise ValueError(f"--ways must be >= 2, got {args.ways}")
    if args.stem is not None and not args.backbone.startswith("resnet"):
        raise ValueError(f"--stem applies to the ResNet backbones, not --backbone {args.backbone}")
    if args.atoms is not None and args.atoms < 1:
        raise ValueError(f"--atoms must be >= 1, got {args.atoms}")
    if args.tune and args.report:
        raise ValueError("--tune and --report exclude each other")


# ------------------------------------------------------------------------------------------------ settings
def maml_config(path: str | Path) -> dict[str, Any]:
    """MAML's tuned settings: the config file without the keys the comparison sets (``MAML_DROPPED``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--maml-config {str(path)!r} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"--maml-config {str(path)!r} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in config.items()}


def default_atoms(args: argparse.Namespace) -> int:
    """``--atoms``, else the MAML config's (so MAML's ACDC-net is the one it was tuned with), else 8."""
    if args.atoms is not None:
        return args.atoms
    return int(maml_config(args.maml_config).get("atoms", 8))


def method_settings(args: argparse.Namespace, method: str, searching: bool = False) -> dict[str, Any]:
    """The settings of ``method`` (METHOD_SETTINGS, or SEARCH_START in the search; MAML: its config), with
    --quick's sizes."""
    settings = dict((SEARCH_START if searching else METHOD_SETTINGS)[method])
    if method == "maml":
        config = maml_config(args.maml_config)
        settings.update({k: v for k, v in config.items() if k not in MAML_DROPPED})
    if args.quick:
        keys = {"head_epochs"} if method in PRETRAINED else {"val_every", "val_episodes"}
        keys |= {"test_inner_steps"} if method == "maml" else set()
        settings.update({k: v for k, v in QUICK_OVERRIDES.items() if k in keys})
    return settings


def method_backbone(method: str, backbone: str) -> str:
    """The backbone ``method`` runs on in a comparison on ``backbone`` (RELATION_BACKBONES)."""
    return RELATION_BACKBONES.get(backbone, backbone) if method == "relationnet" else backbone


def cell_settings(
    args: argparse.Namespace,
    method: str,
    variant: str,
    shots: int,
    overrides: Mapping[str, Any] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """The complete ``run_fewshot.py`` settings of one run: the method's own, then what every run shares."""
    base = method_settings(args, method, searching=split != "test")
    settings: dict[str, Any] = {"method": method, **base, **dict(overrides or {})}
    settings.update(
        COMMON,
        backbone=method_backbone(method, args.backbone),
        width=args.width,
        acdc=VARIANTS[variant],
        ways=args.ways,
        shots=shots,
        train_seconds=args.train_seconds,
        seed=args.seed,
        device=args.device,
    )
    if args.stem is not None:
        settings["stem"] = args.stem
    if variant != "dense":
        settings["atoms"] = default_atoms(args)
    else:
        settings.pop("atom_drop", None)  # no atoms to drop
    if method not in PRETRAINED:
        settings["train_episodes"] = EPISODE_CAP
    if split == "test":
        settings.update(test_split="test", test_seed=args.test_seed, test_episodes=args.test_episodes)
    else:  # the search: validation episodes (seed 100; the checkpoint is chosen on seed 101)
        settings.update(test_split="val", test_seed=100, test_episodes=args.tune_episodes)
    return settings


def cell_key(method: str, variant: str, shots: int) -> str:
    return f"{method}/{variant}/{shots}shot"


# ------------------------------------------------------------------------------------------------ runs
def run_cell(settings: Mapping[str, Any], run_dir: Path, threads: int) -> dict[str, Any]:
    """One ``run_fewshot.py`` run in a subprocess (settings as a ``--config`` file); its ``result.json``."""
    if run_dir.exists():  # a run killed before it was recorded: start it again
        shutil.rmtree(run_dir)
    return run_fewshot_cli("run_fewshot.py", settings, run_dir, threads)


def cell_record(
    result: Mapping[str, Any],
    method: str,
    variant: str,
    shots: int,
    settings: Mapping[str, Any],
    wall: float,
    load: float | None,
) -> dict[str, Any]:
    """The JSON record of one cell from the run's ``result.json``."""
    pretrained = method in PRETRAINED
    return {
        "method": method,
        "variant": variant,
        "shots": shots,
        "acdc": result.get("acdc"),
        "split": result.get("split"),
        "test_seed": result.get("test_seed"),
        "episodes": result.get("episodes"),
        "accuracy_mean": result["accuracy_mean"],
        "accuracy_ci95": result["accuracy_ci95"],
        "parameters": result.get("parameters"),
        "train_seconds": result.get("train_seconds"),
        "stopped_by": result.get("stopped_by"),
        "steps": result.get("pretrain_steps" if pretrained else "meta_steps"),
        "steps_unit": "batches" if pretrained else "meta-steps",
        "epochs": result.get("pretrain_epochs") if pretrained else None,
        "best_step": result.get("best_step"),
        "run_seconds": result.get("seconds"),
        "wall_seconds": round(wall, 1),
        "load_average_1min_at_start": load,
        "settings": dict(settings),
        "episode_accuracies": result.get("episode_accuracies"),
    }


def measure(
    args: argparse.Namespace, method: str, variant: str, shots: int, settings: Mapping[str, Any], run_dir: Path
) -> dict[str, Any]:
    """Run one cell and build its record."""
    load, started = load_average(), time.perf_counter()
    result = run_cell(settings, run_dir, args.threads)
    return cell_record(result, method, variant, shots, settings, time.perf_counter() - started, load)


def load_payload(path: Path, shared: Mapping[str, Any]) -> dict[str, Any]:
    """The results JSON (or an empty one); refuses a file measured with other shared settings."""
    payload: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(payload.get("records", {}), dict):
        raise ValueError(
            f"{path} holds results of the earlier compare_methods.py (a list of records): move it "
            "away or use another --out"
        )
    payload.setdefault("records", {})
    payload.setdefault("commands", [])
    for key, value in payload.get("settings", {}).items():
        if key in shared and value != shared[key]:
            raise ValueError(
                f"{path} was measured with {key} = {value!r}, not {shared[key]!r}; use the same "
                "settings or another --out"
            )
    payload["settings"] = {**payload.get("settings", {}), **shared}
    return payload


def shared_settings(args: argparse.Namespace) -> dict[str, Any]:
    values = {**vars(args), "atoms": default_atoms(args)}
    return {key: values[key] for key in SHARED}


def stale_cells(records: Mapping[str, Any], wanted: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Cells in ``records`` whose settings are not the ones this run would use (METHOD_SETTINGS changed)."""
    return [key for key, settings in wanted.items() if key in records and records[key]["settings"] != dict(settings)]


def run_cells(
    args: argparse.Namespace,
    payload: dict[str, Any],
    path: Path,
    cells: Mapping[str, tuple[str, str, int, dict[str, Any]]],
    on_record: Callable[[str, dict[str, Any]], None] | None = None,
) -> None:
    """Measure each cell not yet in ``payload["records"]``, writing the JSON after every one."""
    records = payload["records"]
    stale = stale_cells(records, {k: c[3] for k, c in cells.items()})
    if stale:
        raise ValueError(
            f"{path} holds {', '.join(stale)} measured with other settings; delete them from it or use another --out"
        )
    todo = [key for key in cells if key not in records]
    print(
        f"{len(cells) - len(todo)} of {len(cells)} cells already in {path}; {len(todo)} to run, {args.jobs} at a time",
        flush=True,
    )

    def one(key: str) -> dict[str, Any]:
        method, variant, shots, settings = cells[key]
        print(f"  started {key}", flush=True)
        return measure(args, method, variant, shots, settings, Path(args.runs) / key.replace("/", "_"))

    def keep(key: str, record: dict[str, Any]) -> None:
        records[key] = record
        if on_record is not None:
            on_record(key, record)
        write_json(path, payload)
        print(
            f"  {key}: {record['accuracy_mean']:.2f} ± {record['accuracy_ci95']:.2f} % after {record['steps']} "
            f"{record['steps_unit']} in {record['train_seconds']} s ({record['wall_seconds']:.0f} s in all)",
            flush=True,
        )

    measure_cells(todo, one, keep, args.jobs)


# ------------------------------------------------------------------------------------------------ comparison
def comparison_cells(args: argparse.Namespace) -> dict[str, tuple[str, str, int, dict[str, Any]]]:
    return {
        cell_key(m, v, k): (m, v, k, cell_settings(args, m, v, k))
        for k in args.shots
        for m in args.methods
        for v in args.variants
    }


def compare(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """Run the selected cells that are not measured yet, then write the JSON, the table and the plot."""
    path = Path(args.out)
    payload = load_payload(path, shared_settings(args))
    if not args.report:
        command = command_line("compare_methods", argv)
        if command not in payload["commands"]:
            payload["commands"].append(command)
        run_cells(args, payload, path, comparison_cells(args))
    if not payload["records"]:
        raise ValueError(f"{path} holds no cells yet: run some first (without --report)")
    write_report(payload, path)
    print(markdown(payload))
    return payload


# ------------------------------------------------------------------------------------------------ report
def _ordered(records: Mapping[str, Any]) -> tuple[list[str], list[str], list[int]]:
    """The methods, variants and shot counts present, in the order of METHODS, VARIANTS, shots."""
    values = list(records.values())
    methods = [m for m in METHODS if any(r["method"] == m for r in values)]
    methods += sorted({r["method"] for r in values} - set(methods))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in values)]
    shots = sorted({int(r["shots"]) for r in values})
    return methods, variants, shots


def _by_cell(records: Mapping[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(r["method"], r["variant"], int(r["shots"])): r for r in records.values()}


def budget_line(payload: Mapping[str, Any]) -> str:
    s = payload["settings"]
    return (
        f"**Budget: {s['train_seconds']:g} s of training per run** (wall clock, validation included; "
        f"{s.get('jobs', 1)} run(s) at a time, each on {s['threads']} thread(s), device {s['device']}), "
        f"then {s['test_episodes']} seeded "
        f"{s['ways']}-way test episodes (--test-seed {s['test_seed']}, the same for every cell, 15 queries "
        f"per class). Backbone {s['backbone']} width {s['width']}{relation_note(s['backbone'])}, "
        f"ACDC-net with m={s['atoms']} atoms."
    )


def relation_note(backbone: str) -> str:
    """Where RelationNet's backbone differs (RELATION_BACKBONES): say so."""
    other = method_backbone("relationnet", backbone)
    return "" if other == backbone else f" (RelationNet: {other}, as Chen et al.)"


def markdown(payload: Mapping[str, Any]) -> str:
    """Methods × {shots} × {dense, ACDC-net}: accuracy ± CI95; then what each run reached in its budget."""
    records = payload["records"]
    methods, variants, shots = _ordered(records)
    by = _by_cell(records)
    columns = [(k, v) for k in shots for v in variants]
    header = ["method"] + [f"{k}-shot {LABELS[v]}" for k, v in columns]

    def accuracy(r: Mapping[str, Any] | None) -> str:
        return "not run" if r is None else f"{r['accuracy_mean']:.2f} ± {r['accuracy_ci95']:.2f}"

    def reached(r: Mapping[str, Any] | None) -> str:
        if r is None:
            return "–"
        epochs = f", {r['epochs']} epochs" if r.get("epochs") is not None else ""
        return f"{r['steps']} {r['steps_unit']}{epochs} in {r['train_seconds']} s"

    rows = [[m] + [accuracy(by.get((m, v, k))) for k, v in columns] for m in methods]
    steps = [[m] + [reached(by.get((m, v, k))) for k, v in columns] for m in methods]
    params = sorted({(r["variant"], r["parameters"]) for r in records.values() if r.get("parameters")})
    lines = [
        "# Few-shot methods at an equal training budget: dense vs ACDC-net on glyphs",
        "",
        budget_line(payload),
        "",
        "Test accuracy (%) ± 95% confidence interval (1.96·std/√n over the episodes). Chance: "
        f"{100 / payload['settings']['ways']:.0f}%. Each method at its settings of the validation-split search "
        "(`METHOD_SETTINGS` in the script; MAML: `configs/maml_glyphs_demo.yaml`).",
        "",
        markdown_table(header, rows),
        "",
        "Training reached in the budget (episodic: meta-steps; Baseline/Baseline++: batches and full epochs):",
        "",
        markdown_table(header, steps),
        "",
        "Backbone parameters: " + ", ".join(f"{LABELS.get(v, v)} {p:,}" for v, p in params) + ".",
        "",
        "Command(s): " + ", ".join(f"`{c}`" for c in payload.get("commands", [])),
        "",
    ]
    return "\n".join(lines)


def plot(payload: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars with 95% CI error bars: one panel per shot count, groups = methods, bars = variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = payload["records"]
    methods, variants, shots = _ordered(records)
    by = _by_cell(records)
    fig, axes = plt.subplots(
        1, len(shots), figsize=(1.2 * len(methods) * len(shots) + 2, 4), squeeze=False, sharey=True
    )
    width = 0.8 / max(len(variants), 1)
    for ax, k in zip(axes[0], shots):
        for j, v in enumerate(variants):
            cells = [(i, by[(m, v, k)]) for i, m in enumerate(methods) if (m, v, k) in by]
            xs = [i + (j - (len(variants) - 1) / 2) * width for i, _ in cells]
            ax.bar(
                xs,
                [r["accuracy_mean"] for _, r in cells],
                width,
                yerr=[r["accuracy_ci95"] for _, r in cells],
                capsize=3,
                label=LABELS[v],
                color=f"C{0 if v == 'dense' else 3}",
            )
        ax.axhline(100 / payload["settings"]["ways"], color="gray", linestyle=":", linewidth=1, label="chance")
        ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
        ax.set_title(f"{payload['settings']['ways']}-way {k}-shot")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%) ± 95% CI")
    legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="upper right", ncol=len(legend), fontsize=8)
    s = payload["settings"]
    fig.suptitle(
        f"{s['train_seconds']:g} s of training per run, {s['backbone']} width {s['width']}, "
        f"{s['test_episodes']} test episodes",
        fontsize=10,
        x=0.02,
        ha="left",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(payload: Mapping[str, Any], path: Path) -> None:
    """``path`` (JSON), and the table (.md) and plot (.png) next to it."""
    write_json(path, payload)
    path.with_suffix(".md").write_text(markdown(payload))
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path} and its .md, .png")


# ------------------------------------------------------------------------------------------------ tuning
def tuning_cells(args: argparse.Namespace) -> dict[str, tuple[str, str, int, dict[str, Any]]]:
    """Every candidate of every selected method (but MAML) on the tuning cell(s), on validation episodes."""
    cells = {}
    for method in args.methods:
        for name, overrides in TUNE_CANDIDATES.get(method, {}).items():
            for variant in args.tune_variants:
                settings = cell_settings(args, method, variant, args.tune_shots, overrides, split="val")
                cells[f"{method}/{name}/{variant}/{args.tune_shots}shot"] = (method, variant, args.tune_shots, settings)
    return cells


def chosen_settings(records: Mapping[str, Any], variants: Sequence[str], shots: int) -> dict[str, Any]:
    """Per method whose candidates are all measured: the winner (mean validation accuracy over the tuning
    cells) and its METHOD_SETTINGS entry."""
    chosen = {}
    for method, candidates in TUNE_CANDIDATES.items():
        keys = {name: [f"{method}/{name}/{v}/{shots}shot" for v in variants] for name in candidates}
        if not all(key in records for ks in keys.values() for key in ks):
            continue
        score = {name: statistics.fmean(records[key]["accuracy_mean"] for key in ks) for name, ks in keys.items()}
        winner = max(score, key=score.get)
        chosen[method] = {
            "candidate": winner,
            "val_accuracy": round(score[winner], 2),
            "settings": {**SEARCH_START[method], **candidates[winner]},
        }
    return chosen


def tune(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """The validation-split search: run the missing candidates, record the winners under ``chosen``."""
    if "maml" in args.methods:
        print("maml: not searched here (benchmarks/tune_glyphs.py chose configs/maml_glyphs_demo.yaml)")
    path = Path(args.tune_out)
    shared = {key: value for key, value in shared_settings(args).items() if key not in ("test_episodes", "test_seed")}
    shared.update(tune_shots=args.tune_shots, tune_variants=args.tune_variants, tune_episodes=args.tune_episodes)
    payload = load_payload(path, shared)
    command = command_line("compare_methods", argv)
    if command not in payload["commands"]:
        payload["commands"].append(command)
    run_cells(args, payload, path, tuning_cells(args))
    payload["chosen"] = chosen_settings(payload["records"], args.tune_variants, args.tune_shots)
    write_json(path, payload)
    for method, choice in payload["chosen"].items():
        print(
            f"{method}: {choice['candidate']} ({choice['val_accuracy']:.2f}% on validation) -> "
            f"METHOD_SETTINGS[{method!r}] = {choice['settings']}"
        )
    print(f"wrote {path}")
    return payload


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    check(args)
    return tune(args, argv) if args.tune else compare(args, argv)


if __name__ == "__main__":
    main()
