"""``fewshot.params``: every published row agrees, the counts match a closed-form count from the rules of
the paper's conventions, multiply-adds match an analytic count, and the command's exit status."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fewshot.params as P
from fewshot.backbones import create_backbone


@pytest.fixture(scope="module")
def rows() -> list[P.Row]:
    return P.parameter_rows() + P.ratio_rows()


def test_every_published_row_agrees(rows):
    assert len(rows) == len(P.PARAM_SPECS) + len(P.RATIO_SPECS) == 31
    bad = [(r.spec, r.ours) for r in rows if not r.ok]
    assert bad == []


def closed_form_count(spec: P.Spec) -> int:
    """Parameters of ``spec``'s network from the dense network and the rules (not from fewshot.acdc):
    convs with kernels > 1x1 lose their weight and gain atoms (m*k*k per layer, per group if grouped), plus
    one coefficient tensor per owner, sized to the largest corner its convs read."""
    with torch.device("meta"):
        dense = create_backbone(spec.backbone, num_classes=spec.num_classes)
    total = sum(p.numel() for p in dense.parameters())
    if spec.acdc is None:
        return total
    m, s = spec.atoms, spec.group_size
    convs = [(n, c) for n, c in dense.named_modules() if isinstance(c, nn.Conv2d) and c.kernel_size != (1, 1)]
    if convs[0][1].kernel_size == (7, 7):
        convs = convs[1:]  # the ImageNet stem stays dense
    corners: dict[object, list[tuple[int, int]]] = {}
    for name, conv in convs:
        k = conv.kernel_size[0] * conv.kernel_size[1]
        groups = 1 if s is None else max(conv.out_channels // s, 1)
        total += groups * m * k - conv.weight.numel()
        level = spec.acdc.removeprefix("g-")
        key = {"net": "net", "layer": name}.get(level) or dense.acdc_block_of(name, conv)
        corner = (
            (conv.out_channels, conv.in_channels)
            if s is None
            else (min(s, conv.out_channels), min(s, conv.in_channels))
        )
        corners.setdefault(key, []).append(corner)
    for members in corners.values():
        total += max(r for r, _ in members) * max(c for _, c in members) * m
    return total


@pytest.mark.parametrize(
    "spec", P.PARAM_SPECS, ids=lambda s: f"{s.table}-{s.backbone}-{s.acdc}-m{s.atoms}-s{s.group_size}"
)
def test_counts_follow_the_closed_form_rules(rows, spec):
    row = next(r for r in rows if r.spec == spec)
    assert row.exact == closed_form_count(spec)
    assert row.ours == pytest.approx(row.exact / 1e6)


def test_meta_and_cpu_builds_count_the_same():
    spec = next(s for s in P.PARAM_SPECS if s.acdc == "g-net")
    assert P.count_parameters(P.build(spec, "cpu")) == P.count_parameters(P.build(spec, "meta")) == 261_082


def conv_output_sizes(model: nn.Module, image_size: int) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: sizes.__setitem__(n, tuple(out.shape[-2:])))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    model(torch.zeros(1, 3, image_size, image_size, device="meta"))
    for h in hooks:
        h.remove()
    return sizes


def analytic_macs(backbone: str, group_size: int | None, image_size: int = 64) -> int:
    """Per-image multiply-adds of a CIFAR network: every output channel of a decomposed grouped conv reads
    min(s, c_in) inputs; 1x1 convs and the classifier are dense."""
    with torch.device("meta"):
        model = create_backbone(backbone, num_classes=10).eval()
    sizes = conv_output_sizes(model, image_size)
    total = model.fc.in_features * model.fc.out_features
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            reads = conv.in_channels
            if group_size is not None and conv.kernel_size != (1, 1):
                reads = min(group_size, conv.in_channels)
            h, w = sizes[name]
            total += conv.out_channels * reads * conv.kernel_size[0] * conv.kernel_size[1] * h * w
    return total


def test_dense_resnet18_cifar_macs_match_the_papers_baseline():
    with torch.device("meta"):
        model = create_backbone("resnet18_cifar", num_classes=10)
    per_image, per_forward = P.count_macs(model, 64)
    assert per_image == analytic_macs("resnet18_cifar", None) == 2_221_675_520
    assert per_forward == 0
    assert per_image * 100 / 1e9 == pytest.approx(222.4, rel=0.002)  # Table 4: 222.4B for 100 images


@pytest.mark.parametrize("s, paper", [(64, 0.525), (32, 0.270)])
def test_grouped_macs_follow_the_layout_and_exclude_kernel_reconstruction(rows, s, paper):
    row = next(r for r in rows if r.kind == "macs-ratio" and r.spec.group_size == s)
    assert row.exact == analytic_macs("resnet18_cifar", s)
    assert row.ours == pytest.approx(row.exact / 2_221_675_520)
    assert row.ours == pytest.approx(paper, rel=0.02)


def test_count_macs_separates_the_kernel_reconstruction():
    with torch.device("meta"):
        dense = create_backbone("conv4", image_size=28)
        acdc = create_backbone("conv4", image_size=28, acdc="net", atoms=6)
    convs = 28 * 28 * 64 * 3 * 9 + 14 * 14 * 64 * 64 * 9 + 7 * 7 * 64 * 64 * 9 + 3 * 3 * 64 * 64 * 9
    assert P.count_macs(dense, 28) == (convs, 0)
    assert P.count_macs(acdc, 28) == (convs, (64 * 3 + 3 * 64 * 64) * 6 * 9)  # K = A·D, once per pass


def test_tolerances():
    spec = P.PARAM_SPECS[0]
    row = lambda paper, ours, kind="params": P.Row(dataclasses.replace(spec, paper=paper), kind, ours, 0)  # noqa: E731
    assert row(0.26, 0.2699).ok and not row(0.26, 0.2701).ok  # 0.01M floor
    assert row(14.29, 14.43).ok and not row(14.29, 14.44).ok  # 1%
    assert row(0.525, 0.535, "macs-ratio").ok and not row(0.525, 0.5365, "macs-ratio").ok  # 2%


def test_main_prints_every_row_and_exits_zero(rows, monkeypatch, capsys):
    monkeypatch.setattr(P, "parameter_rows", lambda device="meta": [r for r in rows if r.kind == "params"])
    monkeypatch.setattr(P, "ratio_rows", lambda device="meta": [r for r in rows if r.kind == "macs-ratio"])
    assert P.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["table", "network", "variant", "m", "s", "paper", "ours", "diff", "ok", "exact"]
    assert len(out) == 1 + 31 + 2 and out[-1].startswith("31/31 rows agree with the paper")
    assert "16,370,432  (printed as m8; the count fits m12)" in out[29]
    assert out[1].split() == [
        "1",
        "VGG16",
        "(CIFAR)",
        "baseline",
        "-",
        "-",
        "14.72M",
        "14.724M",
        "+0.004M",
        "yes",
        "14,724,042",
    ]


def test_main_exits_nonzero_when_a_row_is_off(rows, monkeypatch, capsys):
    off = [dataclasses.replace(rows[0], spec=dataclasses.replace(rows[0].spec, paper=15.0))] + rows[1:]
    monkeypatch.setattr(P, "parameter_rows", lambda device="meta": [r for r in off if r.kind == "params"])
    monkeypatch.setattr(P, "ratio_rows", lambda device="meta": [r for r in off if r.kind == "macs-ratio"])
    assert P.main([]) == 1
    out = capsys.readouterr().out
    assert " NO " in out.splitlines()[1] and "30/31 rows agree" in out
