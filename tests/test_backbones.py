"""Backbones: names, Chen et al.'s parameter counts, feature shapes, heads, torchvision equivalence, ACDC
conversion (scopes, block structure) and every error message."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn
from torch.func import functional_call

import fewshot
from fewshot.backbones import backbone_options, create_backbone, list_backbones, register_backbone

NAMES = [
    "conv4",
    "conv4_nopool",
    "resnet10",
    "resnet18",
    "resnet18_cifar",
    "resnet18_imagenet",
    "resnet34",
    "resnet34_imagenet",
    "resnet50_imagenet",
    "vgg16_cifar",
    "wrn",
    "wrn28_10",
    "wrn40_1",
    "wrn40_4",
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta(name: str, **kw) -> nn.Module:
    """Build on the meta device: exact shapes and counts without memory or init cost."""
    with torch.device("meta"):
        return create_backbone(name, **kw)


def test_registry_lists_every_backbone_and_fewshot_exports_it():
    assert list_backbones() == NAMES
    assert fewshot.create_backbone is create_backbone and fewshot.list_backbones is list_backbones


@pytest.mark.parametrize(
    "name, count",
    [
        ("conv4", 113_088),
        ("conv4_nopool", 113_088),
        ("resnet10", 4_905_792),
        ("resnet18", 11_176_512),
        ("resnet34", 21_284_672),
    ],
)
def test_chen_et_al_feature_extractor_parameter_counts(name, count):
    assert n_params(meta(name)) == count


@pytest.mark.parametrize(
    "name, kw, count",
    [
        ("resnet18_cifar", dict(num_classes=10), 11_173_962),
        ("vgg16_cifar", dict(num_classes=10), 14_724_042),  # convs without bias (BatchNorm follows)
        ("wrn40_4", dict(num_classes=10), 8_949_210),
        ("wrn28_10", dict(num_classes=10), 36_479_194),
        ("wrn40_1", dict(num_classes=10), 563_930),
        ("resnet34_imagenet", {}, 21_284_672),
        ("resnet50_imagenet", {}, 23_508_032),
    ],
)
def test_classification_stack_parameter_counts(name, kw, count):
    assert n_params(meta(name, **kw)) == count


@pytest.mark.parametrize("name", ["resnet10", "resnet18", "resnet34"])
@pytest.mark.parametrize(
    "stem, size, spatial",
    [
        ("imagenet", 84, 3),
        ("imagenet", 224, 7),
        ("small", 84, 11),
        ("small", 224, 28),
    ],
)
def test_fewshot_resnet_features_at_84_and_224_with_both_stems(name, stem, size, spatial):
    model = meta(name, stem=stem)
    x = torch.zeros(2, 3, size, size, device="meta")
    assert model.out_features == 512
    assert model.forward_features(x).shape == (2, 512)
    body = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.conv1(x))))))
    assert body.shape == (2, 512, spatial, spatial)


def test_fewshot_resnet_real_forward_small_stem_and_default_stem():
    torch.manual_seed(0)
    small = create_backbone("resnet10", stem="small").eval()
    assert isinstance(small.maxpool, nn.Identity) and small.conv1.kernel_size == (3, 3)
    assert small(torch.randn(2, 3, 84, 84)).shape == (2, 512)
    default = create_backbone("resnet10")
    assert default.stem == "imagenet" and default.conv1.kernel_size == (7, 7) and default.conv1.stride == (2, 2)


@pytest.mark.parametrize("size, in_channels, features", [(84, 3, 1600), (28, 1, 64), (28, 3, 64)])
def test_conv4_flattens_like_chen_et_al(size, in_channels, features):
    torch.manual_seed(0)
    model = create_backbone("conv4", image_size=size, in_channels=in_channels).eval()
    assert model.out_features == features
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, features)


# ------------------------------------------------------------------------------------------------
# forward_map: the last feature map, from which forward_features is pooled / flattened
@pytest.mark.parametrize(
    "name, kw, size, shape",
    [
        ("conv4", dict(image_size=28, width=8, in_channels=1), 28, (8, 1, 1)),
        ("conv4", dict(image_size=84, width=8), 84, (8, 5, 5)),
        ("conv4", dict(image_size=40, width=4), 40, (4, 2, 2)),
        ("conv4_nopool", dict(image_size=84, width=8), 84, (8, 19, 19)),  # Chen et al.'s 64x19x19 at width 64
        ("conv4_nopool", dict(image_size=28, width=8, in_channels=1), 28, (8, 5, 5)),
        ("conv4_nopool", dict(image_size=10, width=2), 10, (2, 1, 1)),
        ("resnet10", dict(stem="small", width=4, in_channels=1), 28, (32, 4, 4)),
        ("resnet10", dict(stem="imagenet", width=4), 84, (32, 3, 3)),
        ("resnet10", dict(stem="imagenet", width=2), 224, (16, 7, 7)),
        ("resnet18", dict(stem="small", width=2), 21, (16, 3, 3)),
        ("vgg16_cifar", {}, 32, (512, 1, 1)),
        ("vgg16_cifar", {}, 70, (512, 2, 2)),
        ("wrn", dict(depth=10, widen_factor=1), 30, (64, 8, 8)),
    ],
)
def test_feature_map_shape_is_the_shape_forward_map_returns(name, kw, size, shape):
    model = meta(name, **kw)
    assert model.feature_map_shape(size) == shape
    x = torch.zeros(2, kw.get("in_channels", 3), size, size, device="meta")
    assert model.forward_map(x).shape == (2, *shape)


@pytest.mark.parametrize("acdc", [None, "net"])
@pytest.mark.parametrize(
    "name, kw, size, reduce",
    [
        ("conv4", dict(image_size=84, width=8), 84, "flatten"),
        ("conv4", dict(image_size=28, width=8, in_channels=1), 28, "flatten"),
        ("conv4_nopool", dict(image_size=28, width=8, in_channels=1), 28, "flatten"),
        ("resnet10", dict(stem="small", width=4, in_channels=1), 28, "mean"),
        ("resnet10", dict(stem="imagenet", width=4), 84, "mean"),
        ("vgg16_cifar", {}, 64, "mean"),
        ("wrn", dict(depth=10, widen_factor=1), 16, "mean"),
    ],
)
def test_forward_map_pooled_or_flattened_is_forward(name, kw, size, reduce, acdc):
    torch.manual_seed(0)
    model = create_backbone(name, acdc=acdc, **kw).eval()
    x = torch.randn(3, kw.get("in_channels", 3), size, size)
    maps = model.forward_map(x)
    assert (
        maps.dim() == 4
        and maps.shape[1] * (maps.shape[2] * maps.shape[3] if reduce == "flatten" else 1) == model.out_features
    )
    pooled = maps.flatten(1) if reduce == "flatten" else maps.mean(dim=(2, 3))
    torch.testing.assert_close(pooled, model(x))
    assert maps.abs().sum() > 0  # not a degenerate all-zero map that would match trivially


def test_feature_map_shape_errors():
    with pytest.raises(ValueError, match=r"conv4 was built for 28x28 images, not image_size=84"):
        create_backbone("conv4", image_size=28, width=4).feature_map_shape(84)
    with pytest.raises(ValueError, match=r"resnet: image_size must be an integer >= 1, got 0"):
        meta("resnet10").feature_map_shape(0)
    with pytest.raises(ValueError, match=r"vgg: image_size \(5 2x2 max-pools\) must be an integer >= 32, got 31"):
        meta("vgg16_cifar").feature_map_shape(31)


def test_backbone_base_class_without_a_map_says_so():
    class Vectors(fewshot.backbones.Backbone):
        out_features = 4

    with pytest.raises(NotImplementedError, match="Vectors does not expose its last feature map"):
        Vectors().feature_map_shape(28)
    with pytest.raises(NotImplementedError, match=r"Vectors does not expose its last feature map \(forward_map\)"):
        Vectors().forward_map(torch.zeros(1, 3, 28, 28))


def test_conv4_nopool_pools_in_the_first_two_blocks_with_unpadded_convs():
    """Chen et al.'s ConvNetNopool: [conv pad 0, BN, ReLU, pool] x 2, then [conv pad 1, BN, ReLU] x 2."""
    model = create_backbone("conv4_nopool")
    kinds = [[type(m).__name__ for m in getattr(model, f"layer{i}")] for i in range(1, 5)]
    assert kinds == [["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]] * 2 + [["Conv2d", "BatchNorm2d", "ReLU"]] * 2
    assert [getattr(model, f"layer{i}")[0].padding for i in range(1, 5)] == [(0, 0), (0, 0), (1, 1), (1, 1)]
    assert n_params(model) == n_params(create_backbone("conv4")) == 113_088
    with error("conv4_nopool: image_size (two unpadded convs and 2x2 max-pools) must be an integer >= 10, got 9"):
        create_backbone("conv4_nopool", image_size=9)
    with error("conv4_nopool was built for 28x28 images (1600 features) but got 84x84; create it with image_size=84"):
        create_backbone("conv4_nopool", image_size=28)(torch.zeros(1, 3, 84, 84))


def test_conv4_blocks_are_conv_with_bias_bn_relu_maxpool():
    model = create_backbone("conv4")
    for i in range(1, 5):
        conv, bn, relu, pool = getattr(model, f"layer{i}")
        assert conv.bias is not None and conv.kernel_size == (3, 3) and conv.out_channels == 64
        assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU) and isinstance(pool, nn.MaxPool2d)


@pytest.mark.parametrize(
    "name, features",
    [
        ("resnet18_cifar", 512),
        ("vgg16_cifar", 512),
        ("wrn40_4", 256),
        ("wrn28_10", 640),
        ("wrn40_1", 64),
    ],
)
def test_cifar_networks_at_32px(name, features):
    model = meta(name, num_classes=10)
    x = torch.zeros(2, 3, 32, 32, device="meta")
    assert model.out_features == features
    assert model.forward_features(x).shape == (2, features)
    assert model(x).shape == (2, 10)


def test_wrn40_1_real_forward_and_any_depth_width():
    torch.manual_seed(0)
    model = create_backbone("wrn40_1", num_classes=10).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    custom = meta("wrn", depth=16, widen_factor=2)
    assert custom.out_features == 128 and [len(getattr(custom, f"block{i}")) for i in (1, 2, 3)] == [2, 2, 2]
    assert n_params(meta("wrn", depth=40, widen_factor=4, num_classes=10)) == n_params(meta("wrn40_4", num_classes=10))
    assert n_params(meta("wrn", num_classes=10)) == 36_479_194  # default: WRN-28-10


@pytest.mark.parametrize("name, tv_name", [("resnet18_imagenet", "resnet18"), ("resnet50_imagenet", "resnet50")])
def test_imagenet_resnets_match_torchvision_exactly(name, tv_name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, tv_name)(num_classes=7).eval()
    ours = meta(name, num_classes=7).eval()
    ours.load_state_dict(reference.state_dict(), assign=True)  # strict: same names and shapes
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(ours(x), reference(x))


def test_num_classes_adds_a_linear_head_and_zero_returns_features():
    torch.manual_seed(0)
    model = create_backbone("conv4", image_size=28, num_classes=5).eval()
    assert isinstance(model.fc, nn.Linear) and (model.fc.in_features, model.fc.out_features) == (64, 5)
    x = torch.randn(3, 3, 28, 28)
    torch.testing.assert_close(model(x), model.fc(model.forward_features(x)))
    assert model(x).shape == (3, 5)
    plain = create_backbone("conv4", image_size=28)
    assert isinstance(plain.fc, nn.Identity) and plain.num_classes == 0
    assert n_params(model) - n_params(plain) == 64 * 5 + 5


def test_options_are_the_builders_keyword_arguments():
    assert backbone_options("conv4") == ["image_size", "width", "in_channels"]
    assert backbone_options("resnet18") == ["stem", "in_channels", "width"]
    assert backbone_options("wrn") == ["depth", "widen_factor", "dropout", "in_channels"]
    assert backbone_options("vgg16_cifar") == ["in_channels"]


# ---- errors ------------------------------------------------------------------------------------------


def error(match: str):
    return pytest.raises(ValueError, match="^" + re.escape(match) + "$")


def test_unknown_backbone_lists_the_valid_names():
    with error(f"unknown backbone 'resnet19'; valid: {', '.join(NAMES)}"):
        create_backbone("resnet19")


def test_unknown_option_lists_the_valid_options():
    with error("backbone 'vgg16_cifar' got unknown option(s) stem; valid options: in_channels"):
        create_backbone("vgg16_cifar", stem="small")
    with error("backbone 'wrn40_4' got unknown option(s) depth, widen; valid options: dropout, in_channels"):
        create_backbone("wrn40_4", depth=16, widen=2)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(num_classes=-1), "num_classes must be an integer >= 0, got -1"),
        (dict(num_classes=2.0), "num_classes must be an integer >= 0, got 2.0"),
        (dict(atoms=0), "atoms must be an integer >= 1, got 0"),
        (dict(atoms="8"), "atoms must be an integer >= 1, got '8'"),
        (dict(atom_drop=1.0), "atom_drop must be a number in [0, 1), got 1.0"),
        (
            dict(group_size=16),
            "group_size=16 applies only to the grouped scopes g-net, g-block, g-layer, not acdc=None",
        ),
        (dict(decompose_stem=True), "decompose_stem needs an ACDC scope; got acdc=None"),
        (dict(stem="cifar"), "unknown ResNet stem 'cifar'; valid: imagenet, small"),
        (dict(in_channels=0), "in_channels must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kw, message):
    with error(message):
        create_backbone("resnet10", **kw)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(depth=41), "wrn: depth must be 6n+4 (10, 16, 22, 28, 34, 40, ...), got 41"),
        (dict(depth=4), "wrn: depth must be an integer >= 10, got 4"),
        (dict(widen_factor=0), "wrn: widen_factor must be an integer >= 1, got 0"),
        (dict(dropout=1.5), "wrn: dropout must be in [0, 1), got 1.5"),
    ],
)
def test_bad_wrn_shapes(kw, message):
    with error(message):
        create_backbone("wrn", **kw)


def test_conv4_image_size_errors():
    with error("conv4: image_size (four 2x2 max-pools) must be an integer >= 16, got 8"):
        create_backbone("conv4", image_size=8)
    model = create_backbone("conv4", image_size=28)
    with error("conv4 was built for 28x28 images (64 features) but got 84x84; create it with image_size=84"):
        model(torch.zeros(1, 3, 84, 84))


def test_registering_a_name_twice_is_an_error():
    with error("backbone 'conv4' is registered twice"):
        register_backbone("conv4")(lambda num_classes=0: None)


# ---- ACDC conversion ---------------------------------------------------------------------------------

from fewshot.acdc import SCOPES, ACDCConv2d, SharedCoefficients, infer_blocks  # noqa: E402


def owners(model: nn.Module) -> list[nn.Parameter]:
    """The distinct coefficient tensors, in registration order."""
    seen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, SharedCoefficients):
            seen.setdefault(id(m.coefficients), m.coefficients)
    return list(seen.values())


@pytest.mark.parametrize(
    "scope, group_size, n_owners",
    [
        ("net", None, 1),
        ("block", None, 4),
        ("layer", None, 9),
        ("g-net", 32, 1),
        ("g-block", 32, 4),
        ("g-layer", 32, 9),
    ],
)
def test_every_acdc_scope_builds_resnet10_and_forwards(scope, group_size, n_owners):
    assert SCOPES == ("net", "block", "layer", "g-net", "g-block", "g-layer")
    torch.manual_seed(0)
    model = create_backbone("resnet10", acdc=scope, atoms=4, group_size=group_size, stem="small", num_classes=5)
    convs = [m for m in model.modules() if isinstance(m, ACDCConv2d)]
    assert len(convs) == 9  # the 3x3 stem and 2 convs per block; 1x1 shortcuts stay dense
    assert all(c.num_atoms == 4 and c.scope == scope and c.group_size == group_size for c in convs)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules()) == 3
    assert len(owners(model)) == n_owners
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, kw, shapes",
    [
        ("resnet18_cifar", {}, [(64, 64), (128, 128), (256, 256), (512, 512)]),  # one per stage
        ("resnet50_imagenet", {}, [(64, 64), (128, 128), (256, 256), (512, 512)]),  # bottleneck 3x3s only
        ("vgg16_cifar", {}, [(64, 64), (128, 128), (256, 256), (512, 512), (512, 512)]),  # VGG16: 5
        ("wrn40_4", {}, [(64, 64), (128, 128), (256, 256)]),  # WRN: 3 (the 3->16 stem joins group 1)
        ("conv4", {}, [(64, 3), (64, 64), (64, 64), (64, 64)]),  # the map halves after every conv: block = layer
    ],
)
def test_block_scope_has_the_papers_block_structure(name, kw, shapes):
    model = meta(name, acdc="block", atoms=8, **kw)
    assert [tuple(o.shape) for o in owners(model)] == [s + (8,) for s in shapes]


@pytest.mark.parametrize("name", ["resnet18_cifar", "vgg16_cifar", "resnet34"])
def test_block_keys_agree_with_the_forward_trace_rule(name):
    """The backbones' own ``acdc_block_of`` partitions the convs as the shape-run rule does."""
    model = meta(name, **({"stem": "small"} if name == "resnet34" else {}))
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    traced = infer_blocks(model, convs)
    ours = infer_blocks(model, convs, block_of=model.acdc_block_of)

    def partition(keys):
        groups: dict = {}
        for conv_name, key in keys.items():
            groups.setdefault(key, []).append(conv_name)
        return sorted(groups.values())

    assert partition(ours) == partition(traced)


def test_imagenet_stem_stays_dense_unless_decompose_stem():
    model = meta("resnet18", acdc="block")
    assert type(model.conv1) is nn.Conv2d and model.conv1.kernel_size == (7, 7)
    model = meta("resnet18", acdc="block", decompose_stem=True)
    assert isinstance(model.conv1, ACDCConv2d)
    assert (
        model.conv1.shared.coefficients is model.layer1[0].conv1.shared.coefficients
    )  # the stem joins the first stage's block


def _conv4(acdc: str | None) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("conv4", image_size=28, acdc=acdc, atoms=6, num_classes=5).eval()


def _kernel_params(name: str) -> bool:
    """The tensors that scale all four conv kernels of conv4: dense weights, or the shared coefficients."""
    return name.endswith(".coefficients") or bool(re.fullmatch(r"layer\d\.0\.weight", name))


def test_acdc_backbone_shares_one_coefficient_tensor():
    model = _conv4("net")
    coefficient_names = [n for n, _ in model.named_parameters() if n.endswith(".coefficients")]
    assert coefficient_names == ["layer1.0.shared.coefficients"]  # one tensor, listed once
    assert len([n for n, _ in model.named_parameters() if n.endswith(".atoms")]) == 4
    assert all(owners(model)[0] is getattr(model, f"layer{i}")[0].shared.coefficients for i in (2, 3, 4))


@pytest.mark.parametrize("acdc", [None, "net"])
def test_backbone_works_with_functional_call(acdc):
    """With zero conv biases and fresh eval-mode BatchNorm, conv4 is positively homogeneous in each conv's
    kernel: doubling the dense kernels, or the one shared coefficient tensor, scales the features by 16.
    The module itself must be left untouched."""
    model = _conv4(acdc)
    x = torch.randn(3, 3, 28, 28)
    reference = model(x).detach()
    params = dict(model.named_parameters())
    torch.testing.assert_close(functional_call(model, params, (x,)), reference)
    doubled = {k: (2 * v if _kernel_params(k) else v) for k, v in params.items()}
    assert sum(map(_kernel_params, doubled)) == (4 if acdc is None else 1)
    bias = model.fc.bias.detach()
    torch.testing.assert_close(functional_call(model, doubled, (x,)) - bias, 16 * (reference - bias))
    assert all(type(p) is nn.Parameter for p in model.parameters())
    torch.testing.assert_close(model(x), reference)


@pytest.mark.parametrize("acdc", [None, "net"])
def test_backbone_works_with_higher(acdc):
    import higher

    model = _conv4(acdc)
    x = torch.randn(3, 3, 28, 28)
    reference = model(x).detach()
    fmodel = higher.monkeypatch(model, copy_initial_weights=True)
    doubled = [2 * p if _kernel_params(n) else p for n, p in model.named_parameters()]
    bias = model.fc.bias.detach()
    torch.testing.assert_close(fmodel(x, params=doubled) - bias, 16 * (reference - bias))
    torch.testing.assert_close(model(x), reference)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(acdc="stage"), "unknown acdc 'stage'; valid: none, net, block, layer, g-net, g-block, g-layer"),
        (
            dict(acdc="net", group_size=32),
            "group_size=32 applies only to the grouped scopes g-net, g-block, g-layer, not acdc='net'",
        ),
        (dict(acdc="g-net"), "acdc='g-net' needs group_size (channels per filter group, e.g. 32)"),
        (dict(acdc="g-net", group_size=0), "group_size must be an integer >= 1, got 0"),
        (dict(acdc="net", atoms=0), "atoms must be an integer >= 1, got 0"),
        (dict(acdc="net", atom_drop=-0.1), "atom_drop must be a number in [0, 1), got -0.1"),
    ],
)
def test_bad_acdc_arguments_raise_one_clear_error(kw, message):
    with error(message):
        create_backbone("resnet10", **kw)


def test_dense_is_none_or_the_string_none():
    assert n_params(meta("resnet10", acdc="none")) == n_params(meta("resnet10", acdc=None)) == 4_905_792


def test_fewshot_resnet_width_scales_every_stage():
    model = create_backbone("resnet10", width=16)
    assert model.out_features == 128
    assert [model.layer1[0].conv1.out_channels, model.layer4[0].conv1.out_channels] == [16, 128]
    w, stages = 16, [16, 32, 64, 128]
    expected = 49 * 3 * w + 2 * w  # 7x7 stem + BatchNorm
    for c_in, c in zip([w] + stages[:-1], stages):
        expected += 9 * c_in * c + 9 * c * c + 2 * 2 * c  # two 3x3 convs + two BatchNorms
        if c_in != c:
            expected += c_in * c + 2 * c  # 1x1 shortcut + BatchNorm
    assert sum(p.numel() for p in model.parameters()) == expected == 309_456
    with pytest.raises(ValueError, match="width must be an integer >= 1, got 0"):
        create_backbone("resnet18", width=0)


def test_the_few_shot_backbones_come_from_the_registry():
    from fewshot.cli.fewshot import FEWSHOT_BACKBONES

    assert (
        list(FEWSHOT_BACKBONES)
        == list_backbones(fewshot=True)
        == [
            "conv4",
            "conv4_nopool",
            "resnet10",
            "resnet18",
            "resnet34",
        ]
    )
    assert set(list_backbones(fewshot=True)) < set(list_backbones())
    for name in FEWSHOT_BACKBONES:  # what the few-shot command line relies on
        assert "width" in backbone_options(name)
        assert hasattr(create_backbone(name, width=4), "forward_map")
