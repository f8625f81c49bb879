"""``python -m fewshot.analysis subspace``: train (or load) the per-layer ACDC Conv4, measure, write the files."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from fewshot.analysis.images import held_out_images
from fewshot.analysis.network import TrainSettings, load_network, subspace_spec, train_network
from fewshot.analysis.subspace import analyze_model
from fewshot.analysis.subspace_report import PAPER, write_report
from fewshot.cli.common import check_at_least, check_number
from fewshot.training.run_folder import LAST

__all__ = ["add_subspace_options", "check_subspace_args", "run_subspace"]

DEFAULT_OUT = "benchmarks/results/analysis_subspace"
FEWSHOT_HOLDOUT = 0.2  # few-shot datasets: fraction of each base class held out (the analysis images)


def add_subspace_options(p: argparse.ArgumentParser) -> None:
    """The flags of ``subspace``."""
    from fewshot.data import list_datasets

    p.add_argument("--dataset", choices=list_datasets(), default="glyphs", help="a registered dataset (glyphs)")
    p.add_argument("--data-root", default=None, help="dataset folder (as for run_pretrain.py)")
    p.add_argument("--holdout", type=float, default=None, help="few-shot datasets: held-out fraction per class (0.2)")
    p.add_argument("--checkpoint", default=None, help="analyze this checkpoint instead of training")
    p.add_argument("--width", type=int, default=32, help="channels of the four convs (32, as in the paper)")
    p.add_argument("--atoms", type=int, default=9, help="m, atoms per conv (9 = 3x3: a lossless decomposition)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--train-seconds", type=float, default=None, help="stop training after this wall time")
    p.add_argument("--images", type=int, default=1000, help="held-out images whose activations are aligned")
    p.add_argument("--max-samples", type=int, default=50_000, help="SVCCA: (image, position) samples per pair")
    p.add_argument("--keep-variance", type=float, default=0.99, help="SVCCA: variance kept of the atom outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="where training writes last.pt (runs/analysis/subspace_...)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"files <out>.json/.md/.png ({DEFAULT_OUT})")


def check_subspace_args(args: argparse.Namespace) -> None:
    """One ValueError naming the flag for a value that cannot work."""
    check_at_least(args, ["width", "atoms", "epochs", "batch_size"])
    check_at_least(args, ["images"], 2)
    check_at_least(args, ["max_samples"], 10)
    check_number(args, "lr")
    check_number(args, "train_seconds")
    check_number(args, "holdout", below=1.0)
    check_number(args, "keep_variance", below=1.0 + 1e-12)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist; give a last.pt written by training")
    if args.checkpoint is None and (Path(_run_dir(args)) / LAST).exists():
        raise ValueError(
            f"--run-dir {_run_dir(args)} already holds a trained network; analyze it with "
            f"--checkpoint {Path(_run_dir(args)) / LAST} or choose another --run-dir"
        )


def _run_dir(args: argparse.Namespace) -> str:
    return args.run_dir or f"runs/analysis/subspace_{args.dataset}_w{args.width}_m{args.atoms}_s{args.seed}"


def _load_data(args: argparse.Namespace):
    from fewshot.data.classification import load_classification_data
    from fewshot.data.factory import dataset_entry

    holdout = args.holdout
    if holdout is None and dataset_entry(args.dataset).few_shot:
        holdout = FEWSHOT_HOLDOUT
    return load_classification_data(args.dataset, args.data_root, augment=False, holdout=holdout), holdout


def run_subspace(args: argparse.Namespace) -> dict[str, Any]:
    """Everything after parsing; returns the report (also written to ``--out``)."""
    check_subspace_args(args)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    data, holdout = _load_data(args)
    if args.checkpoint:
        model, training = load_network(args.checkpoint)
    else:
        settings = TrainSettings(args.epochs, args.batch_size, args.lr, args.train_seconds, args.seed)
        spec = subspace_spec(data, args.width, args.atoms)
        model, training = train_network(data, spec, settings, Path(_run_dir(args)))
    trained = time.perf_counter()
    images = held_out_images(data, args.images)
    with torch.no_grad():
        accuracy = float((model.eval()(images.inputs).argmax(1) == torch.tensor(images.targets)).float().mean())
    report = analyze_model(model, images.inputs, args.keep_variance, args.max_samples)
    config = {k: getattr(args, k) for k in ("dataset", "width", "atoms", "epochs", "batch_size", "lr", "seed")}
    config.update(
        holdout=holdout, images=len(images.indices), keep_variance=args.keep_variance, max_samples=args.max_samples
    )
    report.update(
        config=config,
        training={k: training.get(k) for k in ("checkpoint", "epoch", "step", "top1", "clock_seconds", "meta")},
        analysis_images_top1=accuracy,
        paper=PAPER,
        seconds={"train": trained - started, "analysis": time.perf_counter() - trained},
    )
    report["seconds"]["total"] = time.perf_counter() - started
    paths = write_report(report, args.out)
    print(_summary_line(report, paths))
    return report


def _summary_line(report: dict[str, Any], paths: list[Path]) -> str:
    s, w = report["summary"]["all_pairs"], report["summary"]["without_layer_1"]
    text = f"mean erank Â_i {s['a_i']:.2f}, [Â_i; Â_j] {s['concat']:.2f} over {s['pairs']} pairs"
    if w["pairs"]:
        text += f"; without layer 1: {w['a_i']:.2f}, {w['concat']:.2f}"
    return f"{text} (paper: {PAPER['a_i']}, {PAPER['concat']}); wrote {', '.join(map(str, paths))}"
