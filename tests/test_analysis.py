"""fewshot.analysis: effective rank, SVCCA, aligned coefficients, Grad-CAM, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fewshot.analysis import aligned_coefficients, analyze_model, effective_rank, svcca, svd_reduce
from fewshot.analysis.cam import agreement_with_last, conv_layers, grad_cam
from fewshot.analysis.cli import main
from fewshot.analysis.rank import spectrum_effective_rank
from fewshot.analysis.sublayers import acdc_layers, atom_outputs, coefficient_outputs, layer_inputs
from fewshot.backbones import create_backbone
from fewshot.training.checkpoint import ModelSpec, save_checkpoint


def orthonormal_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T


# ------------------------------------------------------------------------------------- effective rank
def test_effective_rank_of_flat_spectra_is_the_count():
    assert effective_rank(torch.diag(torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0]))) == pytest.approx(5.0)
    assert effective_rank(orthonormal_rows(7, 20, 0)) == pytest.approx(7.0)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    assert spectrum_effective_rank(torch.tensor([1.0, 0.0])) == pytest.approx(1.0)


def test_stacked_bases_sharing_k_dims():
    basis = orthonormal_rows(12, 40, 1)  # 12 orthonormal directions of R^40
    shared = basis[:4]
    # both layers span the same 4-dim subspace (different bases of it): the stack has effective rank 4
    rotation = orthonormal_rows(4, 4, 2)
    assert effective_rank(torch.cat([shared, rotation @ shared])) == pytest.approx(4.0)
    # 4 shared + 4 own directions each: singular values sqrt(2) x4 and 1 x8, erank exp(H) of that spectrum
    a_i, a_j = torch.cat([shared, basis[4:8]]), torch.cat([shared, basis[8:12]])
    s = torch.tensor([math.sqrt(2)] * 4 + [1.0] * 8)
    p = s / s.sum()
    expected = math.exp(-float((p * p.log()).sum()))
    assert effective_rank(torch.cat([a_i, a_j])) == pytest.approx(expected)
    assert 8.0 < expected < 12.0
    # disjoint subspaces: the full 16... here 12 (all directions), each once
    assert effective_rank(torch.cat([basis[:6], basis[6:]])) == pytest.approx(12.0)


# ---------------------------------------------------------------------------------------------- SVCCA
def test_svd_reduce_keeps_the_variance_asked_for():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    z = z / z.std(0) * torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt().double()
    rotation = orthonormal_rows(4, 4, 3)
    x = (z - z.mean(0)) @ rotation
    assert svd_reduce(x, 0.79)[0].shape == (4, 2)
    assert svd_reduce(x, 0.94)[0].shape == (4, 3)
    assert svd_reduce(x, 0.99)[0].shape == (4, 4)
    assert svd_reduce(x, 1.0)[1].sum().item() == pytest.approx(1.0, rel=1e-3)


def test_svcca_correlations_known_answers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 6, generator=g)
    same = svcca(x, x, 1.0, 1.0)
    assert same.correlations.tolist() == pytest.approx([1.0] * 6, abs=1e-6)
    mixed = svcca(x, x @ torch.randn(6, 6, generator=g) + 3.0, 1.0, 1.0)
    assert mixed.correlations.tolist() == pytest.approx([1.0] * 6, abs=1e-6)
    unrelated = svcca(x, torch.randn(5000, 6, generator=g), 1.0, 1.0)
    assert unrelated.mean_correlation < 0.05
    # canonical variates are white and pairwise correlated by the correlations
    half = torch.cat([x[:, :3], torch.randn(5000, 3, generator=g)], 1)
    r = svcca(x, half, 1.0, 1.0)
    u, v = (x.double() - r.mean_x) @ r.transform_x.T, (half.double() - r.mean_y) @ r.transform_y.T
    assert torch.allclose(u.T @ u / 5000, torch.eye(6, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(torch.diag(u.T @ v / 5000), r.correlations, atol=1e-8)
    assert r.correlations[:3].tolist() == pytest.approx([1.0] * 3, abs=1e-6)


def test_aligned_coefficients_of_whitened_views_have_orthonormal_rows():
    g = torch.Generator().manual_seed(0)
    z_i = torch.randn(8000, 10, generator=g) @ torch.randn(10, 10, generator=g)
    z_j = z_i @ torch.randn(10, 10, generator=g) + 0.5 * torch.randn(8000, 10, generator=g)
    a_i, a_j = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    cz, cy = svcca(z_i, z_j, 1.0, 1.0), svcca(z_i @ a_i.T, z_j @ a_j.T, 1.0, 1.0)
    hat = aligned_coefficients(a_i, cy.transform_x, cz.transform_x)
    assert hat.shape == (4, 10)
    assert torch.allclose(hat @ hat.T, torch.eye(4, dtype=torch.float64), atol=1e-8)  # Q Cov(Y) Q^T = I
    assert effective_rank(hat) == pytest.approx(4.0)


# --------------------------------------------------------------------------------- the ACDC sub-layers
def tiny_acdc_conv4(width: int = 4, atoms: int = 3, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(
        "conv4",
        acdc="layer",
        atoms=atoms,
        atom_drop=0.0,
        image_size=16,
        width=width,
        in_channels=1,
        num_classes=classes,
    ).eval()


def test_sublayers_rebuild_the_conv_output():
    model = tiny_acdc_conv4()
    layers = acdc_layers(model)
    assert [name for name, _ in layers] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    x = torch.randn(3, 1, 16, 16)
    for (_, layer), inp in zip(layers, layer_inputs(model, [m for _, m in layers], x)):
        z = atom_outputs(layer, inp)
        assert z.shape[1] == layer.in_channels * 3
        y = coefficient_outputs(layer, z) + layer.bias.view(1, -1, 1, 1)
        assert torch.allclose(y, layer(inp), atol=1e-5)


def test_analyze_model_respects_the_bounds():
    report = analyze_model(tiny_acdc_conv4(), torch.randn(40, 1, 16, 16), keep=0.99, max_samples=3000)
    assert [(p["i"], p["j"]) for p in report["pairs"]] == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    for p in report["pairs"]:
        assert 1.0 <= p["a_i"] <= p["a_max"] + 1e-6
        assert 1.0 <= p["concat"] <= p["concat_max"] + 1e-6
        assert p["samples"] == min(3000, 40 * p["grid"][0] * p["grid"][1])
    assert report["pairs"][0]["z_dims"] == [3, 12]
    assert report["summary"]["all_pairs"]["pairs"] == 6 and report["summary"]["without_layer_1"]["pairs"] == 3


# ------------------------------------------------------------------------------------------ Grad-CAM
def blob_network() -> nn.Module:
    """conv (identity 3x3 kernel) -> ReLU -> global average pool -> linear: class 0 = bright, class 1 = dark."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
        head = nn.Linear(1, 2)
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def test_grad_cam_peaks_at_the_blob():
    image = torch.zeros(1, 1, 12, 12)
    image[0, 0, 7, 3] = 1.0
    image[0, 0, 6:9, 2:5] += 0.5
    cams = grad_cam(blob_network(), image)
    assert cams.layers == ["0"] and cams.classes.tolist() == [0]
    cam = cams.maps[0, 0]
    assert divmod(int(cam.argmax()), 12) == (7, 3)
    assert float(cam.max()) == pytest.approx(1.0)
    assert float(cam[0, 11]) == 0.0
    assert torch.allclose(cam, image[0, 0] / 1.5)  # the map is the (normalized) feature map itself


def test_grad_cam_of_the_map_before_global_pooling_is_cam():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    x = torch.randn(2, 1, 10, 10)
    cams = grad_cam(net, x)
    assert cams.layers == ["0", "2"] and cams.maps.shape == (2, 2, 10, 10)
    features = net[:3](x)
    weights = net[5].weight[cams.classes]  # Zhou et al.: sum_k w_ck F_k
    cam = torch.relu((weights[:, :, None, None] * features).sum(1)).detach()
    cam = cam / cam.flatten(1).amax(1).view(-1, 1, 1)
    assert torch.allclose(cams.maps[:, 1], cam, atol=1e-5)
    assert agreement_with_last(cams.maps)[1] == pytest.approx(1.0)


def test_conv_layers_skip_1x1():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 3))
    assert [n for n, _ in conv_layers(net)] == ["0", "2"]


# --------------------------------------------------------------------------------------- command line
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["subspace", "--width", "0"], "--width must be >= 1, got 0"),
        (["subspace", "--keep-variance", "1.5"], "--keep-variance must be a finite number > 0 and < 1"),
        (["subspace", "--dataset", "nope"], "argument --dataset: invalid choice: 'nope' (choose from"),
        (["subspace", "--checkpoint", "missing.pt"], "--checkpoint missing.pt does not exist"),
        (["cam"], "the following arguments are required: --checkpoint"),
        (["cam", "--checkpoint", "missing.pt"], "--checkpoint missing.pt does not exist"),
        (["cam", "--checkpoint", "a", "--checkpoint", "b", "--checkpoint", "c"], "--checkpoint: give one or two"),
        (["cam", "--checkpoint", "a", "--out", "x.jpg"], "--out x.jpg must name a .png file"),
        (["bogus"], "invalid choice: 'bogus' (choose from 'subspace', 'cam')"),
    ],
)
def test_cli_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err


def test_subspace_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folder goes under runs/ here
    out = tmp_path / "res" / "sub"
    argv = ["subspace", "--width", "4", "--atoms", "3", "--epochs", "1", "--train-seconds", "1", "--images", "30"]
    report = main([*argv, "--max-samples", "2000", "--out", str(out)])
    for suffix in (".json", ".md", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 100
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["pairs"]) == 6 and saved["config"]["width"] == 4 and saved["config"]["images"] == 30
    assert saved["summary"]["all_pairs"]["a_i"] == pytest.approx(report["summary"]["all_pairs"]["a_i"])
    assert "| 1-2 | 3, 12 |" in out.with_suffix(".md").read_text()
    checkpoint = tmp_path / "runs/analysis/subspace_glyphs_w4_m3_s0/last.pt"
    again = main(
        ["subspace", "--checkpoint", str(checkpoint), "--images", "30", "--max-samples", "2000", "--out", str(out)]
    )
    assert again["summary"]["all_pairs"]["a_i"] == pytest.approx(report["summary"]["all_pairs"]["a_i"], rel=1e-6)


def test_cam_end_to_end(tmp_path):
    paths = []
    for acdc in (None, "net"):
        spec = ModelSpec("conv4", acdc, 4, None, 377, {"image_size": 28, "in_channels": 1, "width": 4}).normalized()
        model = create_backbone("conv4", acdc=acdc, atoms=4, num_classes=377, image_size=28, in_channels=1, width=4)
        paths.append(save_checkpoint(tmp_path / f"{acdc}.pt", model=model, meta=spec))
    out = tmp_path / "cam.png"
    record = main(
        ["cam", "--checkpoint", str(paths[0]), "--checkpoint", str(paths[1]), "--images", "3", "--out", str(out)]
    )
    assert out.stat().st_size > 1000 and out.with_suffix(".json").is_file()
    assert [n["label"] for n in record["networks"]] == ["dense", "ACDC-net m4"]
    assert record["networks"][1]["layers"] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert record["networks"][0]["agreement_with_last_layer"][-1] == pytest.approx(1.0)
    assert record["indices"] == [0, 1, 2]
