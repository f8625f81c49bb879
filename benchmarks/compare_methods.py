#!/usr/bin/env python
"""Every few-shot method on one backbone, dense and ACDC-net, on glyphs, on the same seeded test episodes.

Each (method, backbone variant) is one call of ``fewshot.cli.main([...])`` — the command line of
``run_maml.py`` / ``run_fewshot.py``, so nothing of the training code is repeated here — with the same
``--test-seed``, hence the same test episodes for every run. The ``result.json`` records of the runs are
collected into

- ``benchmarks/results/compare_methods.json``: settings, the command, the machine and every record
  (per-episode accuracies included),
- ``compare_methods.md``: method × {dense, ACDC-net}: accuracy ± CI95, backbone parameters, seconds,
- ``compare_methods.png``: accuracy with 95% confidence bars per method, dense and ACDC-net side by side.

    python benchmarks/compare_methods.py                       # the default run (19 min on 2 busy cores)
    python benchmarks/compare_methods.py --quick               # smoke run at tiny sizes (about 1 min)
    python benchmarks/compare_methods.py --methods protonet maml --shots 1

The default sizes are CPU sizes, far below Chen et al.'s (see ``SIZES``); the markdown header says which.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, load_average, machine, markdown_table, write_json  # noqa: E402

import torch  # noqa: E402

from fewshot.cli import FEWSHOT_BACKBONES  # noqa: E402
from fewshot.config import cli_main  # noqa: E402

METHODS = ("maml", "protonet", "matchingnet", "relationnet", "baseline", "baseline_pp")
EPISODIC = ("maml", "protonet", "matchingnet", "relationnet")
PRETRAINED = ("baseline", "baseline_pp")
VARIANTS = {"dense": "none", "acdc-net": "net"}  # column name -> --acdc
# Default sizes (full run, --quick). The full default run of all 12 runs took 19 minutes on 2 CPU cores
# shared with other jobs (load 2-3.5; MAML is a quarter of it); Chen et al. train 60,000-episode / 400-epoch runs and test 600 episodes.
SIZES: dict[str, dict[str, int]] = {
    "full": {"train_episodes": 300, "maml_train_episodes": 200, "pretrain_epochs": 3, "pretrain_batch": 64,
             "head_epochs": 25, "test_episodes": 600, "val_every": 0, "val_episodes": 50},
    "quick": {"train_episodes": 8, "maml_train_episodes": 8, "pretrain_epochs": 1, "pretrain_batch": 256,
              "head_epochs": 2, "test_episodes": 10, "val_every": 0, "val_episodes": 5},
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--backbone", choices=FEWSHOT_BACKBONES, default="resnet10")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (default 16)")
    p.add_argument("--atoms", type=int, default=8, help="ACDC atoms per layer (default 8)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--test-episodes", type=int, default=None, help="default 600 (10 with --quick)")
    p.add_argument("--train-episodes", type=int, default=None,
                   help="ProtoNet/MatchingNet/RelationNet training episodes (default 300; 8 with --quick)")
    p.add_argument("--maml-train-episodes", type=int, default=None,
                   help="MAML training episodes, 4 per meta-step (default 200; 8 with --quick)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="Baseline(++) epochs (default 3)")
    p.add_argument("--pretrain-batch", type=int, default=None, help="Baseline(++) batch size (default 64)")
    p.add_argument("--head-epochs", type=int, default=None,
                   help="Baseline(++) epochs of the new head per test episode (default 25; Chen et al. 100)")
    p.add_argument("--val-every", type=int, default=None, help="meta-steps between validations (default 0: once, after training)")
    p.add_argument("--val-episodes", type=int, default=None, help="validation episodes (default 50)")
    p.add_argument("--test-seed", type=int, default=0, help="seed of the test episodes, the same for every run")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads that wait "
                        "on each other made a ResNet10 step 3-30x slower; 0 keeps torch's default)")
    p.add_argument("--out-dir", default=None,
                   help="folder of the runs, one subfolder each (default runs/compare_methods[_quick])")
    p.add_argument("--results", default=None,
                   help="folder of compare_methods.{json,md,png} (default benchmarks/results; --quick: --out-dir)")
    p.add_argument("--reuse", action="store_true",
                   help="take a run's result.json from --out-dir when it is there instead of running it again")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the earlier run folders <out-dir>/<method>_<variant> of this comparison first")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (numbers are meaningless)")
    p.add_argument("--progress", action="store_true", help="progress bars of the runs")
    args = p.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.reuse and args.overwrite:
        p.error("--reuse and --overwrite exclude each other")
    if args.out_dir is None:
        args.out_dir = "runs/compare_methods_quick" if args.quick else "runs/compare_methods"
    if args.results is None:
        args.results = args.out_dir if args.quick else str(RESULTS)
    return args


def run_argv(args: argparse.Namespace, method: str, acdc: str, out: Path) -> list[str]:
    """The ``fewshot.cli`` arguments of one run."""
    argv = [
        "--method", method, "--dataset", "glyphs", "--backbone", args.backbone, "--width", str(args.width),
        "--acdc", acdc, "--ways", str(args.ways), "--shots", str(args.shots),
        "--test-episodes", str(args.test_episodes), "--test-seed", str(args.test_seed), "--seed", str(args.seed),
        "--eval-batch", str(args.eval_batch), "--device", args.device, "--out", str(out),
    ]
    if acdc != "none":
        argv += ["--atoms", str(args.atoms)]
    if not args.progress:
        argv.append("--no-progress")
    if method in EPISODIC:
        episodes = args.maml_train_episodes if method == "maml" else args.train_episodes
        argv += ["--train-episodes", str(episodes), "--val-every", str(args.val_every),
                 "--val-episodes", str(args.val_episodes)]
    if method == "maml":
        argv += ["--first-order", "--vectorize"]
    if method in PRETRAINED:
        argv += ["--pretrain-epochs", str(args.pretrain_epochs), "--pretrain-batch", str(args.pretrain_batch),
                 "--head-epochs", str(args.head_epochs)]
    return argv


def run_one(args: argparse.Namespace, method: str, variant: str) -> dict[str, Any]:
    """Run (or with --reuse, read back) one method on one backbone variant; returns its result record."""
    from fewshot.cli import main as fewshot_main

    out = Path(args.out_dir) / f"{method}_{variant}"
    result_file = out / "result.json"
    argv = run_argv(args, method, VARIANTS[variant], out)
    if args.reuse and result_file.is_file():
        record = json.loads(result_file.read_text())
        print(f"{method} {variant}: reused {result_file}", flush=True)
    else:
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"run folder {out} is not empty: pass --reuse to take its result.json, "
                             f"--overwrite to run it again, or choose another --out-dir")
        record = fewshot_main(argv)
    record = dict(record)
    record["variant"] = variant
    record["argv"] = argv
    record["command"] = "python run_fewshot.py " + shlex.join(argv)
    return record


def markdown(args: argparse.Namespace, records: list[dict[str, Any]]) -> str:
    """The method × {dense, ACDC-net} table with a header naming the sizes."""
    by_key = {(r["method"], r["variant"]): r for r in records}
    header = ["method"]
    for variant in args.variants:
        header += [f"{variant} acc % ± CI95", f"{variant} params", f"{variant} s"]
    rows = []
    for method in args.methods:
        row: list[Any] = [method]
        for variant in args.variants:
            r = by_key[(method, variant)]
            row += [f"{r['accuracy_mean']:.2f} ± {r['accuracy_ci95']:.2f}", f"{r['parameters']:,}", r["seconds"]]
        rows.append(row)
    lines = [
        f"# Few-shot methods on glyphs: {args.backbone} (width {args.width}), dense vs ACDC-net (m={args.atoms})",
        "",
        f"{args.ways}-way {args.shots}-shot, {args.test_episodes} seeded test episodes (--test-seed "
        f"{args.test_seed}, the same episodes for every run), 15 queries per class; accuracy ± 1.96·std/√n. "
        f"Chance: {100 / args.ways:.0f}%.",
        "",
        "**CPU-sized training, far below Chen et al.'s settings:** "
        f"ProtoNet / MatchingNet / RelationNet {args.train_episodes} training episodes (meta-batch 1); "
        f"MAML first-order, vmapped (--vectorize), {args.maml_train_episodes} training episodes "
        f"(meta-batch 4, 5 inner steps at lr 0.01); Baseline / Baseline++ {args.pretrain_epochs} pretraining "
        f"epochs at batch {args.pretrain_batch} (Chen et al.: 400 at 16), new head {args.head_epochs} epochs "
        f"per test episode (Chen et al.: 100). Episodic runs validate every {args.val_every} meta-steps on "
        f"{args.val_episodes} episodes (0: once, after training) and test the best checkpoint. `s` is the wall time of the whole run "
        "(training + test) on a shared 2-core CPU: compare seconds only within this table.",
        "",
        markdown_table(header, rows),
        "",
        "Command: `" + args.command + "`",
        "",
    ]
    return "\n".join(lines)


def plot(args: argparse.Namespace, records: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart of accuracy with 95% CI bars, variants side by side per method (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(r["method"], r["variant"]): r for r in records}
    fig, ax = plt.subplots(figsize=(1.3 * len(args.methods) + 2, 4))
    width = 0.8 / len(args.variants)
    for k, variant in enumerate(args.variants):
        xs = [i + (k - (len(args.variants) - 1) / 2) * width for i in range(len(args.methods))]
        means = [by_key[(m, variant)]["accuracy_mean"] for m in args.methods]
        cis = [by_key[(m, variant)]["accuracy_ci95"] for m in args.methods]
        ax.bar(xs, means, width, yerr=cis, capsize=3, label=variant)
    ax.axhline(100 / args.ways, color="gray", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(range(len(args.methods)), args.methods)
    ax.set_ylabel("test accuracy (%) ± 95% CI")
    ax.set_ylim(0, 100)
    ax.set_title(f"glyphs {args.ways}-way {args.shots}-shot, {args.backbone} width {args.width}, "
                 f"{args.test_episodes} test episodes")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.command = ("python benchmarks/compare_methods.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    started = time.perf_counter()
    info = machine(torch.device(args.device))
    records = []
    for method in args.methods:
        for variant in args.variants:
            records.append(run_one(args, method, variant))
    info["load_average_1min_at_end"] = load_average()
    results = Path(args.results)
    settings = {k: v for k, v in vars(args).items() if k != "command"}
    payload = {
        "command": args.command,
        "settings": settings,
        "machine": info,
        "seconds_total": round(time.perf_counter() - started, 1),
        "records": records,
    }
    write_json(results / "compare_methods.json", payload)
    (results / "compare_methods.md").write_text(markdown(args, records))
    plot(args, records, results / "compare_methods.png")
    print(markdown(args, records))
    print(f"total {payload['seconds_total']:.0f} s; wrote {results}/compare_methods.{{json,md,png}}")
    return payload


if __name__ == "__main__":
    main()
