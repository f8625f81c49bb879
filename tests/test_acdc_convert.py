"""convert(): which convs are decomposed, sharing scopes, block inference, parameter counts, errors."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fewshot.acdc import (
    SCOPES,
    ACDCConv2d,
    acdc_convs,
    convert,
    count_parameters,
    reconstruct_kernel,
    two_sublayer_forward,
)


class TinyResNet(nn.Module):
    """3x3 stem 3->8, stage 8 (2 convs), stage 16 (2 convs, first with stride 2) with a 1x1 shortcut."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        kw = dict(dtype=dtype)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False, **kw)
        self.bn = nn.BatchNorm2d(8, **kw)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1, **kw)
        self.a2 = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), **kw)
        self.b1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, **kw)
        self.b2 = nn.Conv2d(16, 16, 3, padding=2, dilation=2, **kw)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2, bias=False, **kw)
        self.fc = nn.Linear(16, 5, **kw)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.a2(F.relu(self.a1(x))) + x)
        x = F.relu(self.b2(F.relu(self.b1(x))) + self.shortcut(x))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------- scopes
@pytest.mark.parametrize(
    "scope,group_size,owners",
    [
        ("net", None, 1),
        ("block", None, 2),
        ("layer", None, 5),
        ("g-net", 4, 1),
        ("g-block", 4, 2),
        ("g-layer", 4, 5),
    ],
)
def test_every_scope_is_equivalent_to_dense_and_two_sublayer(scope, group_size, owners):
    torch.manual_seed(0)
    model = convert(TinyResNet(torch.float64), scope, atoms=5, group_size=group_size).eval()
    convs = acdc_convs(model)
    assert [n for n, _ in convs] == ["stem", "a1", "a2", "b1", "b2"]
    assert len({id(c.shared.coefficients) for _, c in convs}) == owners
    assert all(c.scope == scope for _, c in convs)
    for name, conv in convs:
        x = torch.randn(2, conv.in_channels, 9, 8, dtype=torch.float64)
        y = conv(x)
        dense = F.conv2d(x, reconstruct_kernel(conv), conv.bias, conv.stride, conv.padding, conv.dilation)
        assert (y - dense).abs().max().item() <= 1e-10, name
        assert (y - two_sublayer_forward(conv, x)).abs().max().item() <= 1e-10, name
    assert model(torch.randn(2, 3, 12, 12, dtype=torch.float64)).shape == (2, 5)


def test_net_scope_shapes_and_corners():
    model = convert(TinyResNet(), "net", atoms=4)
    a = model.stem.shared.coefficients
    assert a.shape == (16, 16, 4)  # largest c_out x largest c_in among decomposed convs
    assert model.b1.coefficient_view().shape == (16, 8, 4)
    assert torch.equal(model.stem.coefficient_view(), a[:8, :3])  # leading corner (cut as a copy in grad mode)
    with torch.no_grad():
        assert model.stem.coefficient_view().data_ptr() == a.data_ptr()  # a view where there is no backward
    assert model.stem.coefficient_view().shape == (8, 3, 4)


def test_block_scope_follows_execution_order_channels_and_size():
    model = convert(TinyResNet(), "block", atoms=4)
    # stem + a1 + a2 (8 channels, full size) share; b1 + b2 (16 channels, half size) share
    assert model.stem.shared.coefficients is model.a1.shared.coefficients is model.a2.shared.coefficients
    assert model.b1.shared.coefficients is model.b2.shared.coefficients
    assert model.b1.shared.coefficients is not model.a1.shared.coefficients
    assert model.b1.shared.coefficients.shape == (16, 16, 4)
    assert model.b1.coefficient_view().shape == (16, 8, 4)  # first conv of a stage: A[:c, :c/2]
    assert model.a1.shared.coefficients.shape == (8, 8, 4)


def test_block_boundary_on_spatial_size_only():
    """Same width, different feature-map size -> different blocks (VGG: 512 at 2x2 and at 1x1)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
    )
    convert(model, "g-block", atoms=2, group_size=4)
    assert model[0].shared.coefficients is model[1].shared.coefficients
    assert model[3].shared.coefficients is model[4].shared.coefficients
    assert model[3].shared.coefficients is not model[1].shared.coefficients
    assert model[0].shared.coefficients.shape == (4, 4, 2)


def test_block_of_overrides_trace():
    model = convert(TinyResNet(), "block", atoms=3, block_of=lambda name, conv: name in ("stem", "b2"))
    assert model.stem.shared.coefficients is model.b2.shared.coefficients
    assert model.a1.shared.coefficients is model.a2.shared.coefficients is model.b1.shared.coefficients
    assert model.stem.shared.coefficients is not model.a1.shared.coefficients
    assert model.stem.shared.coefficients.shape == (16, 16, 3)


def test_trace_leaves_state_alone_and_stops_after_last_conv():
    class FixedHead(TinyResNet):
        """The head only accepts 12x12 inputs: the default 64x64 trace must stop before it."""

        def forward(self, x):
            x = F.relu(self.bn(self.stem(x)))
            x = F.relu(self.a2(F.relu(self.a1(x))) + x)
            x = F.relu(self.b2(F.relu(self.b1(x))) + self.shortcut(x))
            return nn.functional.linear(x.flatten(1), torch.zeros(5, 16 * 6 * 6))

    model = FixedHead().train()
    model.bn.eval()  # a mixed state must come back as it was
    model.bn.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    convert(model, "block", atoms=2)
    assert model.training and not model.bn.training and model.a1.training
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.stem.shared.coefficients is model.a1.shared.coefficients
    assert model.b1.shared.coefficients is not model.a1.shared.coefficients


def test_trace_failure_says_what_to_pass():
    class NeedsTwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, y):
            return self.conv(x + y)

    with pytest.raises(ValueError) as info:
        convert(NeedsTwoInputs(), "block", atoms=2)
    msg = str(info.value)
    assert msg.startswith("could not infer ACDC blocks by running the model on an input of shape (2, 3, 64, 64)")
    assert "pass example_input=<a batch the model accepts> or block_of=<function (name, conv) -> block key>" in msg
    model = convert(NeedsTwoInputs(), "block", atoms=2, example_input=(torch.zeros(1, 3, 5, 5),) * 2)
    assert isinstance(model.conv, ACDCConv2d)


def test_unreached_conv_is_reported():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(3, 4, 3)
            self.spare = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"never ran conv\(s\) 'spare', so their block is unknown; pass block_of="):
        convert(Unused(), "block", atoms=2)


# ---------------------------------------------------------------------------------------------- details
def test_conv_settings_bias_dtype_and_aliases_are_kept():
    torch.manual_seed(0)
    shared_conv = nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect", dtype=torch.float64)
    model = nn.Sequential(
        nn.Conv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2), dtype=torch.float64), shared_conv, nn.ReLU(), shared_conv
    )  # the same conv registered twice
    bias = model[0].bias.detach().clone()
    convert(model, "layer", atoms=3)
    c = model[0]
    assert (c.kernel_size, c.stride, c.padding, c.dilation) == ((3, 5), (2, 1), (1, 2), (1, 1))
    assert torch.equal(c.bias, bias) and c.atoms.dtype == torch.float64
    assert c.shared.coefficients.dtype == torch.float64
    assert model[1] is model[3] and isinstance(model[3], ACDCConv2d)
    assert model[1].padding == "same" and model[1].padding_mode == "reflect"
    assert model(torch.randn(1, 3, 8, 8, dtype=torch.float64)).shape == (1, 4, 4, 8)


def test_first_7x7_stem_stays_dense_unless_asked():
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.Conv2d(8, 8, 7, padding=3), nn.Conv2d(8, 8, 1))

    model = convert(net(), "net", atoms=2)
    assert type(model[0]) is nn.Conv2d and isinstance(model[1], ACDCConv2d) and type(model[2]) is nn.Conv2d
    model = convert(net(), "net", atoms=2, decompose_stem=True)
    assert isinstance(model[0], ACDCConv2d) and isinstance(model[1], ACDCConv2d)
    # a wide-input 7x7 first conv is not an image stem: decomposed
    model = convert(nn.Sequential(nn.Conv2d(8, 8, 7)), "net", atoms=2)
    assert isinstance(model[0], ACDCConv2d)


def _resnet18_dense_rest() -> int:
    """torchvision resnet18 parameters that stay dense: 7x7 stem, 1x1 downsamples, BatchNorms, FC."""
    stem = 64 * 3 * 7 * 7
    downsample = 64 * 128 + 128 * 256 + 256 * 512
    bn_channels = 64 + 4 * 64 + (4 * 128 + 128) + (4 * 256 + 256) + (4 * 512 + 512)
    fc = 512 * 1000 + 1000
    return stem + downsample + 2 * bn_channels + fc


@pytest.mark.parametrize(
    "scope,m,s,decomposed_part",
    [
        ("net", 8, None, 512 * 512 * 8 + 16 * 8 * 9),
        ("block", 4, None, (64 * 64 + 128 * 128 + 256 * 256 + 512 * 512) * 4 + 16 * 4 * 9),
        ("g-net", 16, 64, 64 * 64 * 16 + (4 * 1 + 4 * 2 + 4 * 4 + 4 * 8) * 16 * 9),
    ],
)
def test_torchvision_resnet18(scope, m, s, decomposed_part):
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    stem = model.conv1
    downsample = [model.layer2[0].downsample[0], model.layer3[0].downsample[0], model.layer4[0].downsample[0]]
    convert(model, scope, atoms=m, group_size=s)
    assert model.conv1 is stem
    assert [model.layer2[0].downsample[0], model.layer3[0].downsample[0], model.layer4[0].downsample[0]] == downsample
    names = [n for n, _ in acdc_convs(model)]
    assert len(names) == 16 and all(n.endswith(("conv1", "conv2")) and n.startswith("layer") for n in names)
    assert not any(type(mod) is nn.Conv2d and mod.kernel_size != (1, 1) and mod is not stem for mod in model.modules())
    assert count_parameters(model) == _resnet18_dense_rest() + decomposed_part
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_torchvision_resnet18_decomposed_stem_counts():
    model = convert(torchvision.models.resnet18(), "net", atoms=8, decompose_stem=True)
    assert isinstance(model.conv1, ACDCConv2d) and model.conv1.kernel_size == (7, 7)
    expected = _resnet18_dense_rest() - 64 * 3 * 49 + 512 * 512 * 8 + 16 * 8 * 9 + 8 * 49
    assert count_parameters(model) == expected


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(scope="stage"), "unknown scope 'stage'; valid: none, net, block, layer, g-net, g-block, g-layer"),
        (dict(scope="net", atoms=0), "atoms must be an integer >= 1, got 0"),
        (dict(scope="net", atoms=2.5), "atoms must be an integer >= 1, got 2.5"),
        (dict(scope="g-net"), "scope='g-net' needs group_size (channels per filter group, e.g. 32)"),
        (
            dict(scope="block", group_size=4),
            "group_size=4 applies only to the grouped scopes g-net, g-block, g-layer, not scope='block'",
        ),
        (dict(scope="g-layer", group_size=0), "group_size must be an integer >= 1, got 0"),
        (dict(scope="net", atom_drop=1.0), "atom_drop must be a number in [0, 1), got 1.0"),
        (
            dict(scope="g-net", group_size=3),
            "layer 'stem' (3 -> 8 channels) cannot use scope 'g-net': out_channels=8 is not divisible by group_size=3",
        ),
        (
            dict(scope="g-block", group_size=6),
            "layer 'stem' (3 -> 8 channels) cannot use scope 'g-block': "
            "out_channels=8 is not divisible by group_size=6",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        convert(TinyResNet(), **kwargs)
    assert str(info.value).startswith(message)


def test_scopes_constant():
    assert SCOPES == ("net", "block", "layer", "g-net", "g-block", "g-layer")


def test_unsupported_models_are_refused_by_name():
    depthwise = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(
        ValueError,
        match=r"layer '1' is a grouped conv \(groups=8, kernel \(3, 3\)\); ACDC "
        r"decomposes only convs with groups=1",
    ):
        convert(depthwise, "net")
    convert(nn.Sequential(nn.Conv2d(8, 8, 1, groups=4), nn.Conv2d(8, 8, 3)), "net")  # grouped 1x1 stays dense

    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(ValueError, match=r"layer '0' is a MyConv \(a subclass of nn.Conv2d"):
        convert(nn.Sequential(MyConv(3, 4, 3)), "net")
    with pytest.raises(ValueError, match="the model has no conv with a kernel larger than 1x1 to decompose"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 1)), "net")
    model = convert(TinyResNet(), "net")
    with pytest.raises(ValueError, match=r"already contains ACDC convs \(e.g. 'stem'\); use fewshot.acdc.expand"):
        convert(model, "block")
