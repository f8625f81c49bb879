#!/usr/bin/env python
"""The paper's Fig. 5 at CPU scale: MAML with dense against ACDC-net backbones over Conv4, ResNet10/18/34.

A cell is (backbone, dense|ACDC-net, shots, seed). Each cell is one run of ``run_maml.py`` (a subprocess)
with the tuned settings of the main job (``configs/maml_glyphs_demo.yaml``) except: the backbone; all
ResNets at one reduced width (``--resnet-width``, default 16) with the stem the search chose (``small``);
the same number of training episodes for dense and ACDC-net at each depth (``--train-episodes``, no
wall-clock stop, so a cell is reproducible); ``--test-episodes`` seeded test episodes (the same for every
cell). Results:

- ``benchmarks/results/depth_sweep.json``: every cell's record (settings, accuracy ± CI95 over the test
  episodes, meta-steps, seconds, parameters);
- ``depth_sweep.md``: per backbone and shot count, the mean over seeds ± the standard deviation across
  seeds for dense and ACDC-net, and the number of seeds;
- ``depth_sweep.png``: accuracy against depth (4, 10, 18, 34 layers), dense and ACDC-net as two lines per
  shot count, error bars = standard deviation across seeds (as Fig. 5 of the paper).

Cells already in the JSON are skipped, so the sweep is built up over several runs:

    python benchmarks/depth_sweep.py --shots 1 --seeds 0              # one seed of the 1-shot row
    python benchmarks/depth_sweep.py                                   # every cell (hours on 2 cores)
    python benchmarks/depth_sweep.py --report                          # table and plot of what exists
    python benchmarks/depth_sweep.py --dataset miniimagenet --data-root /data/miniimagenet --device cuda \\
        --out benchmarks/results/depth_sweep_miniimagenet.json          # the paper's settings (configs/)

With ``--dataset miniimagenet`` the settings of each cell come from the paper's configs
(``configs/maml_miniimagenet_<backbone>_<dense|acdc-net>_5w<shots>s.yaml``; Conv4 takes ResNet10's at
84 px) and ``--train-episodes`` defaults to the configs' (60,000 / 40,000).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, markdown_table, measure_cells, run_fewshot_cli, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = ("conv4", "resnet10", "resnet18", "resnet34")
DEPTHS = {"conv4": 4, "resnet10": 10, "resnet18": 18, "resnet34": 34}
VARIANTS = {"none": "dense", "net": "ACDC-net"}
GLYPHS_CONFIG = ROOT / "configs/maml_glyphs_demo.yaml"
# Settings of the main job that a sweep cell replaces or drops (the cell sets its own budget and output).
DROPPED = (
    "train_seconds",
    "job_seconds",
    "vectorize",
    "out",
    "test_episodes",
    "seed",
    "shots",
    "backbone",
    "acdc",
    "width",
    "stem",
    "image_size",
    "train_episodes",
    "lr_schedule",
)


def cell_key(backbone: str, acdc: str, shots: int, seed: int) -> str:
    return f"{backbone}/{acdc}/{shots}shot/seed{seed}"


def load_yaml(path: Path) -> dict[str, Any]:
    return {k: v for k, v in yaml.safe_load(path.read_text()).items()}


def cell_settings(args: argparse.Namespace, backbone: str, acdc: str, shots: int, seed: int) -> dict[str, Any]:
    """The run_maml.py settings of one cell."""
    if args.dataset == "glyphs":
        settings = {k: v for k, v in load_yaml(Path(args.config)).items() if k not in DROPPED}
        # One thread per cell, where task by task is the faster (benchmarks/results/vectorize_1thread.json).
        settings.update(backbone=backbone, acdc=acdc, vectorize="off")
        if backbone.startswith("resnet"):
            settings.update(width=args.resnet_width, stem=args.stem)
        else:
            settings["width"] = load_yaml(Path(args.config)).get("width")
        episodes = args.train_episodes
    else:
        source = "resnet10" if backbone == "conv4" else backbone
        variant = "dense" if acdc == "none" else "acdc-net"
        config = load_yaml(ROOT / f"configs/maml_miniimagenet_{source}_{variant}_5w{shots}s.yaml")
        episodes = args.train_episodes or config["train_episodes"]
        settings = {k: v for k, v in config.items() if k not in DROPPED}
        settings.update(backbone=backbone, acdc=acdc, data_root=args.data_root)
        if backbone == "conv4":
            settings["image_size"] = 84
        else:
            settings.update(stem=config.get("stem"), image_size=config.get("image_size"))
    settings.update(
        shots=shots, seed=seed, train_episodes=episodes, test_episodes=args.test_episodes, device=args.device
    )
    return settings


def summarize(records: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Mean and standard deviation across seeds per (backbone, acdc, shots)."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for r in records.values():
        groups.setdefault((r["backbone"], r["acdc"], r["shots"]), []).append(r["accuracy_mean"])
    rows = []
    for (backbone, acdc, shots), accs in groups.items():
        rows.append(
            {
                "backbone": backbone,
                "acdc": acdc,
                "shots": shots,
                "seeds": len(accs),
                "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            }
        )
    order = {b: i for i, b in enumerate(BACKBONES)}
    return sorted(rows, key=lambda r: (r["shots"], order.get(r["backbone"], 99), r["acdc"]))


def write_table(path: Path, payload: Mapping[str, Any]) -> None:
    summary = summarize(payload["records"])
    by = {(r["backbone"], r["acdc"], r["shots"]): r for r in summary}
    shots_seen = sorted({r["shots"] for r in summary})
    header = ["backbone"]
    for k in shots_seen:
        header += [f"{k}-shot dense", f"{k}-shot ACDC-net"]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "not run"
        return f"{r['mean']:.2f} ± {r['std']:.2f} ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})"

    rows = [
        [b] + [cell(by.get((b, a, k))) for k in shots_seen for a in VARIANTS]
        for b in BACKBONES
        if any((b, a, k) in by for a in VARIANTS for k in shots_seen)
    ]
    text = [
        "# MAML depth sweep: dense against ACDC-net (the paper's Fig. 5)",
        "",
        f"Command(s): `{'`, `'.join(payload.get('commands', []))}`.",
        "",
        f"Test accuracy (%) over {payload.get('test_episodes')} seeded 5-way test episodes per run: "
        "mean over seeds ± standard deviation across seeds.",
        "",
        markdown_table(header, rows),
        "",
    ]
    if payload.get("settings_note"):
        text += [payload["settings_note"], ""]
    path.write_text("\n".join(text))


def write_plot(path: Path, payload: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(payload["records"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = {
        ("none", 1): ("C0", "o", "--"),
        ("net", 1): ("C3", "s", "--"),
        ("none", 5): ("C0", "o", "-"),
        ("net", 5): ("C3", "s", "-"),
    }
    for (acdc, shots), (color, marker, line) in styles.items():
        points = [r for r in summary if r["acdc"] == acdc and r["shots"] == shots]
        if not points:
            continue
        points.sort(key=lambda r: DEPTHS[r["backbone"]])
        label = f"MAML{'-ACDC' if acdc == 'net' else ''} 5W{shots}S"
        ax.errorbar(
            [DEPTHS[r["backbone"]] for r in points],
            [r["mean"] for r in points],
            yerr=[r["std"] for r in points],
            color=color,
            marker=marker,
            linestyle=line,
            capsize=3,
            label=label,
        )
    ax.set_xticks([DEPTHS[b] for b in BACKBONES], [f"{b}\n({DEPTHS[b]})" for b in BACKBONES])
    ax.set_xlabel("backbone (layers)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MAML, dense vs ACDC-net ({payload.get('dataset')})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("glyphs", "miniimagenet"), default="glyphs")
    p.add_argument("--data-root", default=None, help="miniImageNet folder (with --dataset miniimagenet)")
    p.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    p.add_argument("--acdc", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--train-episodes",
        type=int,
        default=None,
        help="training episodes per cell, the same for dense and ACDC-net (glyphs default 2000; "
        "miniimagenet: the configs')",
    )
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--resnet-width", type=int, default=16, help="glyphs: channels of the ResNets' first stage")
    p.add_argument("--stem", choices=("small", "imagenet"), default="small", help="glyphs: ResNet stem")
    p.add_argument("--config", default=str(GLYPHS_CONFIG), help="glyphs: the tuned settings the cells start from")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="cells at a time (default 2: one per core of a 2-core machine, each on --threads 1); "
        "results do not depend on it (the budget is in episodes), wall_seconds do",
    )
    p.add_argument("--runs", default="runs/depth_sweep", help="scratch folder of the runs' checkpoints")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/depth_sweep.json)")
    p.add_argument("--report", action="store_true", help="only write the table and plot of what exists")
    args = p.parse_args(argv)
    if args.dataset == "miniimagenet" and not args.data_root:
        p.error("--dataset miniimagenet needs --data-root DIR (see data/miniimagenet/README.md)")
    if args.dataset == "glyphs" and args.data_root:
        p.error("--data-root applies to --dataset miniimagenet only")
    if args.dataset == "glyphs" and args.train_episodes is None:
        args.train_episodes = 2000
    for name in ("train_episodes", "test_episodes", "resnet_width", "threads", "jobs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if any(k <= 0 for k in args.shots):
        p.error(f"--shots must be positive, got {args.shots}")
    if args.out is None:
        args.out = str(
            ROOT
            / "benchmarks/results"
            / ("depth_sweep.json" if args.dataset == "glyphs" else f"depth_sweep_{args.dataset}.json")
        )
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    out = Path(args.out)
    payload: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"records": {}, "commands": []}
    for key in ("dataset", "test_episodes"):
        if key in payload and payload[key] != getattr(args, key):
            raise SystemExit(
                f"error: {out} holds --{key.replace('_', '-')} {payload[key]}; use the same or another --out"
            )
    payload.update(dataset=args.dataset, test_episodes=args.test_episodes)
    records = payload["records"]
    if not args.report:
        command = command_line("depth_sweep", argv)
        if command not in payload["commands"]:
            payload["commands"].append(command)
        cells = [(b, a, k, s) for k in args.shots for s in args.seeds for b in args.backbones for a in args.acdc]
        todo = [c for c in cells if cell_key(*c) not in records]
        print(f"{len(cells) - len(todo)} of {len(cells)} cells already measured; running {len(todo)}", flush=True)

        def one(cell: tuple[str, str, int, int]) -> dict[str, Any]:
            settings = cell_settings(args, *cell)
            run_dir = Path(args.runs) / args.dataset / cell_key(*cell).replace("/", "_")
            if run_dir.exists():  # a cell killed earlier: start it again
                shutil.rmtree(run_dir)
            started = time.perf_counter()
            result = run_fewshot_cli("run_maml.py", settings, run_dir, args.threads)
            kept = (
                "backbone",
                "acdc",
                "shots",
                "seed",
                "accuracy_mean",
                "accuracy_ci95",
                "episodes",
                "parameters",
                "meta_steps",
                "best_step",
                "best_val_acc",
                "train_seconds",
                "seconds",
            )
            return {
                **{k: result.get(k) for k in kept},
                "settings": settings,
                "wall_seconds": round(time.perf_counter() - started, 1),
                "threads": args.threads,
                "jobs": args.jobs,
            }

        def keep(cell: tuple[str, str, int, int], record: dict[str, Any]) -> None:
            records[cell_key(*cell)] = record
            write_json(out, payload)
            print(
                f"  {cell_key(*cell)}: {record['accuracy_mean']:.2f}% ± {record['accuracy_ci95']:.2f} "
                f"({record['wall_seconds']:.0f} s)",
                flush=True,
            )

        measure_cells(todo, one, keep, args.jobs)
    if not records:
        raise SystemExit(f"error: {out} has no measured cell yet; run some cells first")
    write_json(out, payload)
    write_table(out.with_suffix(".md"), payload)
    write_plot(out.with_suffix(".png"), payload)
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return out


if __name__ == "__main__":
    main()
