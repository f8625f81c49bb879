"""``python -m fewshot.analysis cam``: Grad-CAM at every conv layer of one or two classifiers (e.g. dense and
ACDC side by side) for held-out images of their dataset; one PNG grid and a JSON of per-layer agreement."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fewshot.analysis.cam import agreement_with_last, grad_cam
from fewshot.analysis.cam_models import Classifier, load_classifier
from fewshot.analysis.cam_plot import plot_cam_grid
from fewshot.analysis.images import held_out_images
from fewshot.cli.common import check_at_least
from fewshot.io import write_json

__all__ = ["add_cam_options", "run_cam"]

DEFAULT_OUT = "benchmarks/results/analysis_cam.png"


def add_cam_options(p: argparse.ArgumentParser) -> None:
    """The flags of ``cam``."""
    from fewshot.data import list_datasets

    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a run_pretrain.py checkpoint or run folder, or a Baseline run's pretrain/last.pt (give 1 or 2)",
    )
    p.add_argument("--dataset", choices=list_datasets(), default=None, help="default: the checkpoint's, else glyphs")
    p.add_argument("--data-root", default=None, help="default: the checkpoint's")
    p.add_argument("--images", type=int, default=6, help="the first N held-out images (6)")
    p.add_argument("--indices", type=int, nargs="+", default=None, help="these held-out images instead")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the PNG; a JSON of the same name beside it ({DEFAULT_OUT})")


def check_cam_args(args: argparse.Namespace) -> None:
    """One ValueError naming the flag for a value that cannot work."""
    if len(args.checkpoint) > 2:
        raise ValueError(f"--checkpoint: give one or two (dense and ACDC side by side), got {len(args.checkpoint)}")
    check_at_least(args, ["images"])
    if args.indices is not None and args.images != 6:
        raise ValueError("--images and --indices exclude each other; give one")
    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out {args.out} must name a .png file")


def _data_for(classifiers: list[Classifier], args: argparse.Namespace):
    """The dataset the classifiers were trained on (flag, else their run's config, else glyphs)."""
    from fewshot.data.classification import load_classification_data

    config = classifiers[0].config
    name = args.dataset or config.get("dataset") or "glyphs"
    root = args.data_root or config.get("data_root")
    size = classifiers[0].spec.kwargs.get("image_size") or config.get("image_size")
    sizes = {c.spec.kwargs.get("image_size") or c.config.get("image_size") for c in classifiers}
    if len(sizes) > 1:
        raise ValueError(f"--checkpoint: the networks were built for different image sizes {sorted(sizes, key=str)}")
    return load_classification_data(name, root, image_size=size, augment=False, holdout=config.get("holdout"))


def run_cam(args: argparse.Namespace) -> dict[str, Any]:
    """Everything after parsing; returns the JSON record (also written beside the PNG)."""
    check_cam_args(args)
    classifiers = [load_classifier(path) for path in args.checkpoint]
    data = _data_for(classifiers, args)
    images = held_out_images(data, None if args.indices else args.images, args.indices)
    cams = [(c.label, grad_cam(c.model, images.inputs)) for c in classifiers]
    png = plot_cam_grid(images.pixels, images.targets, cams, args.out)
    record = {
        "dataset": data.name,
        "indices": images.indices,
        "targets": images.targets,
        "method": "Grad-CAM at each conv layer's output for the predicted class",
        "networks": [
            {
                "checkpoint": str(c.path),
                "label": label,
                "layers": cam.layers,
                "predicted": [int(v) for v in cam.classes],
                "agreement_with_last_layer": agreement_with_last(cam.maps),
            }
            for c, (label, cam) in zip(classifiers, cams)
        ],
    }
    write_json(png.with_suffix(".json"), record)
    print(f"wrote {png} and {png.with_suffix('.json')}")
    return record
