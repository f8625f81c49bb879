"""``fewshot.params``: every published figure is listed, every must-match row agrees, every explained row
is off with the reason it prints, the counts match a closed-form count from the rules of the paper's
conventions, multiply-adds match an analytic count, and the command's exit status."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fewshot.params as P
from fewshot.backbones import create_backbone

PUBLISHED_PER_TABLE = {"1": 33, "2": 8, "C": 3, "3": 7, "4": 10}  # read off the paper, table by table
PUBLISHED = sum(PUBLISHED_PER_TABLE.values())  # 61


@pytest.fixture(scope="module")
def rows() -> list[P.Row]:
    return P.compute_rows()


def find(rows, table, backbone, acdc, m, s, kind=P.PARAMS) -> P.Row:
    (row,) = [
        r
        for r in rows
        if (r.figure.table, r.figure.backbone, r.figure.acdc, r.figure.atoms, r.figure.group_size, r.figure.kind)
        == (table, backbone, acdc, m, s, kind)
    ]
    return row


def test_every_published_figure_is_listed(rows):
    assert len(rows) == len(P.FIGURES) == PUBLISHED == 61
    tables = [r.figure.table for r in rows]
    assert {t: tables.count(t) for t in PUBLISHED_PER_TABLE} == PUBLISHED_PER_TABLE


def test_every_must_match_row_agrees_and_every_explained_row_is_off(rows):
    must = [r for r in rows if r.figure.must_match]
    assert len(must) == 45
    assert [(r.figure, r.ours) for r in must if not r.ok] == []
    explained = [r for r in rows if not r.figure.must_match]
    assert [r.figure for r in explained if r.ok] == []
    fits = [r for r in explained if r.figure.reason.startswith("fits")]
    assert all(r.alternative is not None and r.alternative_ok for r in fits)
    assert all(r.alternative is None for r in explained if r.figure.reason.startswith("misprint"))
    assert all(r.as_expected for r in rows)


def test_an_explained_row_prints_its_reason(rows):
    row = find(rows, "3", "resnet50_imagenet", "block", 8, None)
    assert (row.figure.paper, row.exact) == (16.37, 14_977_216)
    assert P._note(row) == "fits m12 not m8: 16.370M ✓"
    table_c = find(rows, "C", "wrn28_10", "net", 8, None)
    assert P._note(table_c) == "fits with a 10-class head (the CIFAR-10 network's, as in Table 2): 3.562M ✓"


@pytest.mark.parametrize(
    "table, backbone, acdc, m, s, change, value",
    [
        ("1", "vgg16_cifar", "g-layer", 8, 32, {P.NO_BATCHNORM: True}, 0.11),  # VGG16 g-layer m16 s64's reading
        ("1", "resnet18_cifar", "g-net", 16, 64, {P.GROUPED_POINTWISE: True}, 0.15),  # ResNet34 g-layer's
        ("2", "wrn28_10", "net", 12, None, {"num_classes": 200}, 5.32),  # WRN-28-10 g-block's
    ],
)
def test_the_readings_named_in_reasons_break_rows_that_fit(rows, table, backbone, acdc, m, s, change, value):
    figure = find(rows, table, backbone, acdc, m, s).figure
    assert round(P.count_figure_parameters(figure, **change) / 1e6, 2) == value
    assert abs(value - figure.paper) > P.tolerance(P.PARAMS, figure.paper)


def test_vgg_macs_reading_would_break_resnet18(rows):
    for s, value in [(64, 0.589), (32, 0.300)]:
        row = find(rows, "4", "resnet18_cifar", "g-net", 8, s, P.RATIO)
        macs = P.figure_macs(row.figure, **{P.FIRST_CONV_READS_S: True})
        assert macs == analytic_macs("resnet18_cifar", s) + 64 * (s - 3) * 9 * 64 * 64
        assert round(macs / 2_221_675_520, 3) == value


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
    "spec",
    [f for f in P.FIGURES if f.kind == P.PARAMS],
    ids=lambda s: f"{s.table}-{s.backbone}-{s.acdc}-m{s.atoms}-s{s.group_size}",
)
def test_counts_follow_the_closed_form_rules(rows, spec):
    row = next(r for r in rows if r.figure == spec)
    assert row.exact == closed_form_count(spec)
    assert row.ours == pytest.approx(row.exact / 1e6)


def test_meta_and_cpu_builds_count_the_same(rows):
    figure = find(rows, "1", "resnet18_cifar", "g-net", 16, 64).figure
    assert P.count_figure_parameters(figure, "cpu") == P.count_figure_parameters(figure, "meta") == 261_082


def test_pointwise_grouping_saving():
    with torch.device("meta"):
        model = create_backbone("resnet18_cifar")  # 1x1 shortcuts 64->128, 128->256, 256->512
    assert P.pointwise_grouping_saving(model, 64) == 256 * 64 + 512 * 192


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


@pytest.mark.parametrize("m", [8, 16])
@pytest.mark.parametrize("s, paper", [(64, 0.525), (32, 0.270)])
def test_grouped_macs_follow_the_layout_and_exclude_kernel_reconstruction(rows, m, s, paper):
    row = find(rows, "4", "resnet18_cifar", "g-net", m, s, P.RATIO)
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
    figure = P.FIGURES[0]

    def row(paper: float, ours: float, kind: str = P.PARAMS) -> P.Row:
        return P.Row(dataclasses.replace(figure, paper=paper, kind=kind), ours, 0)

    assert row(0.26, 0.2699).ok and not row(0.26, 0.2701).ok  # 0.01M floor
    assert row(14.29, 14.43).ok and not row(14.29, 14.44).ok  # 1%
    assert row(0.525, 0.535, P.RATIO).ok and not row(0.525, 0.5365, P.RATIO).ok  # 2%
    assert row(125.66, 128.17, P.MACS).ok and not row(125.66, 128.19, P.MACS).ok  # 2%


SUMMARY = "45 of 61 published figures reproduced; 16 explained ✗"


def test_main_prints_every_row_and_exits_zero(rows, monkeypatch, capsys):
    monkeypatch.setattr(P, "compute_rows", lambda device="meta": rows)
    assert P.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [*P.HEADER[:-1], "exact", "/", "reason"]
    assert len(out) == 1 + 61 + 2 and out[-1].startswith(SUMMARY + " (tolerance")
    first = "1 VGG16 (CIFAR) baseline - - 14.72M 14.724M +0.004M ✓ yes 14,724,042"
    assert out[1].split() == first.split()
    r50 = next(line for line in out if "ResNet50" in line and "ACDC-block" in line)
    assert r50.split()[9:11] == ["✗", "no"] and r50.endswith("fits m12 not m8: 16.370M ✓")
    assert sum(" ✗ " in line for line in out[1:-2]) == 16


def replace_paper(rows, index, paper):
    return (
        rows[:index]
        + [dataclasses.replace(rows[index], figure=dataclasses.replace(rows[index].figure, paper=paper))]
        + rows[index + 1 :]
    )


def test_main_exits_nonzero_when_a_must_match_row_is_off(rows, monkeypatch, capsys):
    monkeypatch.setattr(P, "compute_rows", lambda device="meta": replace_paper(rows, 0, 15.0))
    assert P.main([]) == 1
    out = capsys.readouterr().out
    assert " ✗ " in out.splitlines()[1]
    assert "44 of 61 published figures reproduced; 16 explained ✗; 1 not as expected" in out


def test_main_exits_nonzero_when_an_explained_row_matches(rows, monkeypatch, capsys):
    index = next(i for i, r in enumerate(rows) if r.figure.backbone == "resnet50_imagenet" and r.figure.acdc == "block")
    monkeypatch.setattr(P, "compute_rows", lambda device="meta": replace_paper(rows, index, 14.98))
    assert P.main([]) == 1
    assert "46 of 61 published figures reproduced; 15 explained ✗; 1 not as expected" in capsys.readouterr().out
