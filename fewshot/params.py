"""The ACDC paper's parameter counts (Tables 1-3, C) and multiply-add ratios (Table 4), recomputed.

``python -m fewshot.params`` (console: ``fewshot-params``) prints one row per published figure with our
count and the difference, and exits 1 if any row is off by more than its tolerance:
max(1% of the paper's figure, 0.01M) for parameter counts, 2% (relative) for the compute ratios.

Counting conventions (the paper's):
- parameters: ``sum(p.numel() for p in model.parameters())`` (a shared coefficient tensor counts once,
  BatchNorm affine parameters count, buffers do not); CIFAR networks with a 10-class classifier,
  ImageNet networks without one.
- multiply-adds: ``torch.utils.flop_counter.FlopCounterMode`` on a forward pass in eval mode with 64x64
  inputs, as in the paper's Table 4. Only the network's per-image work counts, i.e. its convolutions and
  the classifier: the ACDC kernel reconstruction (``K = A·D``, done once per forward pass whatever the
  batch size) is excluded, as the paper's ratios ignore it. It is separated out exactly by counting a
  batch of 2 and a batch of 1: their difference is the per-image cost.

Models are built on the ``meta`` device by default (shapes only, no memory, no init cost), so the whole
table takes about 10 s of CPU time, half of it importing torch; ``--device cpu`` builds real tensors
instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fewshot.acdc import ACDCConv2d, count_parameters
from fewshot.backbones import create_backbone

PARAM_TOLERANCE = 0.01  # relative, with an absolute floor of PARAM_FLOOR millions
PARAM_FLOOR = 0.01
RATIO_TOLERANCE = 0.02  # relative


@dataclass(frozen=True)
class Spec:
    """One published figure: which network, which ACDC variant, and the paper's number."""

    table: str
    network: str
    backbone: str
    num_classes: int
    acdc: str | None  # None = dense baseline
    atoms: int | None
    group_size: int | None
    paper: float
    note: str = ""


@dataclass(frozen=True)
class Row:
    """A published figure next to ours. ``paper`` and ``ours`` are in millions (counts) or ratios."""

    spec: Spec
    kind: str  # "params" or "macs-ratio"
    ours: float
    exact: int  # the exact parameter count, or the per-image multiply-adds of the ACDC network

    @property
    def diff(self) -> float:
        return self.ours - self.spec.paper

    @property
    def tolerance(self) -> float:
        if self.kind == "params":
            return max(PARAM_TOLERANCE * self.spec.paper, PARAM_FLOOR)
        return RATIO_TOLERANCE * self.spec.paper

    @property
    def ok(self) -> bool:
        return abs(self.diff) <= self.tolerance + 1e-12


def _spec(
    table: str,
    network: str,
    backbone: str,
    classes: int,
    acdc: str | None,
    m: int | None,
    s: int | None,
    paper: float,
    note: str = "",
) -> Spec:
    return Spec(table, network, backbone, classes, acdc, m, s, paper, note)


_VGG, _R18, _W404 = ("VGG16 (CIFAR)", "vgg16_cifar"), ("ResNet18 (CIFAR)", "resnet18_cifar"), ("WRN-40-4", "wrn40_4")
_W2810, _R34, _R50 = (
    ("WRN-28-10", "wrn28_10"),
    ("ResNet34 (ImageNet)", "resnet34_imagenet"),
    ("ResNet50 (ImageNet)", "resnet50_imagenet"),
)

PARAM_SPECS: tuple[Spec, ...] = (
    _spec("1", *_VGG, 10, None, None, None, 14.72),
    _spec("1", *_R18, 10, None, None, None, 11.17),
    _spec("1", *_W404, 10, None, None, None, 8.90),
    _spec("1", *_VGG, 10, "net", 8, None, 2.11),
    _spec("1", *_VGG, 10, "net", 16, None, 4.21),
    _spec("1", *_R18, 10, "net", 8, None, 2.28),
    _spec("1", *_R18, 10, "net", 16, None, 4.38),
    _spec("1", *_W404, 10, "net", 8, None, 0.58),
    _spec("1", *_W404, 10, "net", 16, None, 1.11),
    _spec("1", *_VGG, 10, "block", 8, None, 4.89),
    _spec("1", *_VGG, 10, "block", 16, None, 9.78),
    _spec("1", *_R18, 10, "block", 8, None, 2.96),
    _spec("1", *_R18, 10, "block", 16, None, 5.76),
    _spec("1", *_W404, 10, "block", 8, None, 0.74),
    _spec("1", *_W404, 10, "block", 16, None, 1.43),
    _spec("1", *_VGG, 10, "g-block", 16, 64, 0.35),
    _spec("1", *_R18, 10, "g-net", 16, 64, 0.26),
    _spec("1", *_W404, 10, "g-layer", 8, 32, 0.36),
    _spec("2", *_W404, 10, "g-layer", 16, 32, 0.67),
    _spec("2", *_W2810, 10, "net", 12, None, 5.21),
    _spec("2", *_W2810, 10, "block", 24, None, 13.20),
    _spec("C", *_W2810, 10, "net", 8, None, 3.57),
    _spec("C", *_W2810, 10, "block", 8, None, 4.59),
    _spec("C", *_W2810, 10, "block", 12, None, 6.74),
    _spec("3", *_R34, 0, None, None, None, 21.28),
    _spec("3", *_R34, 0, "net", 12, None, 3.34),
    _spec("3", *_R34, 0, "block", 16, None, 5.77),
    _spec("3", *_R50, 0, "net", 8, None, 14.29),
    _spec("3", *_R50, 0, "block", 12, None, 16.37, "printed as m8; the count fits m12"),
)

# Table 4: multiply-adds of ResNet18 (CIFAR) with grouped ACDC relative to the dense network.
RATIO_SPECS: tuple[Spec, ...] = (
    _spec("4", *_R18, 10, "g-net", 8, 64, 0.525),
    _spec("4", *_R18, 10, "g-net", 8, 32, 0.270),
)
RATIO_IMAGE_SIZE = 64


def build(spec: Spec, device: str | torch.device = "meta") -> nn.Module:
    """The network of ``spec`` on ``device`` (atom-drop off: counting only)."""
    with torch.device(device):
        return create_backbone(
            spec.backbone,
            acdc=spec.acdc,
            atoms=spec.atoms or 8,
            group_size=spec.group_size,
            num_classes=spec.num_classes,
            atom_drop=0.0,
        )


def _flops(model: nn.Module, batch: int, image_size: int, device: torch.device) -> int:
    x = torch.zeros(batch, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def count_macs(model: nn.Module, image_size: int = RATIO_IMAGE_SIZE) -> tuple[int, int]:
    """``(per_image, per_forward)`` multiply-adds of ``model`` on ``image_size`` RGB inputs (eval mode).

    ``per_image`` is the convolutions and linear layers (batch 2 minus batch 1); ``per_forward`` is the
    work done once per forward pass whatever the batch size (the ACDC kernel reconstruction). ACDC layers
    are counted in their kernel form (``evaluation="kernel"``), whatever form they would pick at run time.
    """
    device = next(model.parameters()).device
    model.eval()
    acdc_layers = [m for m in model.modules() if isinstance(m, ACDCConv2d)]
    settings = [m.evaluation for m in acdc_layers]
    try:  # count the kernel form (the paper's): the two-stage form's cost depends on the batch
        for m in acdc_layers:
            m.evaluation = "kernel"
        one, two = _flops(model, 1, image_size, device), _flops(model, 2, image_size, device)
    finally:
        for m, setting in zip(acdc_layers, settings):
            m.evaluation = setting
    per_image = two - one
    return per_image // 2, (one - per_image) // 2  # FlopCounterMode counts a multiply-add as 2 FLOPs


def parameter_rows(device: str | torch.device = "meta") -> list[Row]:
    """Every parameter count of ``PARAM_SPECS`` next to ours (millions)."""
    rows = []
    for spec in PARAM_SPECS:
        n = count_parameters(build(spec, device))
        rows.append(Row(spec, "params", n / 1e6, n))
    return rows


def ratio_rows(device: str | torch.device = "meta") -> list[Row]:
    """Table 4's multiply-add ratios (ACDC-g over dense, per image at 64x64) next to ours."""
    rows = []
    dense_cache: dict[str, int] = {}
    for spec in RATIO_SPECS:
        if spec.backbone not in dense_cache:
            dense = _spec(spec.table, spec.network, spec.backbone, spec.num_classes, None, None, None, 0.0)
            dense_cache[spec.backbone] = count_macs(build(dense, device))[0]
        macs = count_macs(build(spec, device))[0]
        rows.append(Row(spec, "macs-ratio", macs / dense_cache[spec.backbone], macs))
    return rows


def _dash(v: object) -> str:
    return "-" if v is None else str(v)


def format_rows(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table."""
    header = ("table", "network", "variant", "m", "s", "paper", "ours", "diff", "ok", "exact")
    lines = [header]
    for r in rows:
        s = r.spec
        variant = "baseline" if s.acdc is None else f"ACDC-{s.acdc}"
        if r.kind == "macs-ratio":
            variant += " MACs/dense"
            paper, ours, diff, exact = f"{s.paper:.3f}", f"{r.ours:.3f}", f"{r.diff:+.3f}", f"{r.exact:,} MACs"
        else:
            paper, ours, diff, exact = f"{s.paper:.2f}M", f"{r.ours:.3f}M", f"{r.diff:+.3f}M", f"{r.exact:,}"
        if s.note:
            exact += f"  ({s.note})"
        lines.append(
            (
                s.table,
                s.network,
                variant,
                _dash(s.atoms),
                _dash(s.group_size),
                paper,
                ours,
                diff,
                "yes" if r.ok else "NO",
                exact,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; return 0 if every row agrees with the paper within tolerance, else 1."""
    parser = argparse.ArgumentParser(prog="fewshot-params", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default="meta",
        choices=("meta", "cpu"),
        help="where to build the networks (meta: shapes only, fastest)",
    )
    args = parser.parse_args(argv)
    rows = parameter_rows(args.device) + ratio_rows(args.device)
    print(format_rows(rows))
    bad = [r for r in rows if not r.ok]
    print(
        f"\n{len(rows) - len(bad)}/{len(rows)} rows agree with the paper "
        f"(tolerance: max(1%, 0.01M) for counts, 2% for ratios)"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
