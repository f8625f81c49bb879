"""ACDCConv2d: equivalence with the dense kernel and the two-sub-layer form, init, atom-drop, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot.acdc import ACDCConv2d, SharedCoefficients, reconstruct_kernel, two_sublayer_forward

TOL = 1e-10


def dense_reference(conv: ACDCConv2d, x: torch.Tensor) -> torch.Tensor:
    """F.conv2d with the reconstructed dense kernel, padding handled like nn.Conv2d."""
    k = reconstruct_kernel(conv)
    if conv.padding_mode == "zeros":
        return F.conv2d(x, k, conv.bias, conv.stride, conv.padding, conv.dilation)
    ref = torch.nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        dtype=torch.float64,
    )
    with torch.no_grad():
        ref.weight.copy_(k)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    return ref(x)


def force_path(conv: ACDCConv2d, path: str) -> None:
    """Make a plain layer always build its kernel ("kernel") or always run two-stage ("two-stage")."""
    if not conv.grouped:
        conv.evaluation = path


LAYOUTS = [
    # (c_in, c_out, kernel, kwargs)
    (3, 5, 3, {}),
    (4, 6, (3, 5), dict(stride=2, padding=(1, 2))),
    (6, 4, (2, 3), dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1), bias=False)),
    (5, 5, 3, dict(padding="same", dilation=2)),
    (5, 3, (4, 2), dict(padding="same")),
    (4, 4, 3, dict(padding="valid", stride=3)),
    (4, 6, 3, dict(padding=1, padding_mode="reflect")),
    (4, 6, (3, 5), dict(padding=(1, 2), padding_mode="circular", stride=2)),
    (3, 4, 3, dict(padding="same", padding_mode="replicate")),
    # grouped: c_in < s, same width, widening, c_out < s
    (3, 8, 3, dict(group_size=4, padding=1)),
    (8, 8, 3, dict(group_size=4, padding=1, stride=2)),
    (4, 12, (3, 2), dict(group_size=4, padding=(1, 0), dilation=(1, 2))),
    (4, 16, 3, dict(group_size=2, padding="same", padding_mode="reflect")),
    (3, 2, 3, dict(group_size=4, padding=1)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("c_in,c_out,kernel,kwargs", LAYOUTS)
@pytest.mark.parametrize("shared_extra", [0, 3])  # 3: A larger than the corner the layer reads (net-style)
@pytest.mark.parametrize("path", ["auto", "kernel", "two-stage"])
def test_forward_equals_dense_kernel_and_two_sublayer_form(c_in, c_out, kernel, kwargs, shared_extra, path):
    torch.manual_seed(0)
    s = kwargs.get("group_size")
    rows, cols = (c_out, c_in) if s is None else (min(s, c_out), min(s, c_in))
    shared = SharedCoefficients(rows + shared_extra, cols + shared_extra, 5, dtype=torch.float64)
    conv = ACDCConv2d(c_in, c_out, kernel, shared=shared, dtype=torch.float64, **kwargs).eval()
    force_path(conv, path)
    if conv.bias is not None:
        torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, c_in, 9, 11, dtype=torch.float64)
    y = conv(x)
    assert (y - dense_reference(conv, x)).abs().max().item() <= TOL
    assert (y - two_sublayer_forward(conv, x)).abs().max().item() <= TOL
    assert y.abs().max().item() > 1e-3  # not trivially zero


def test_grouped_layout_uses_blocks_and_shuffle():
    """Widening grouped layer: input group i feeds output groups 2i, 2i+1; shuffle interleaves groups."""
    torch.manual_seed(0)
    conv = ACDCConv2d(4, 8, 3, atoms=3, group_size=2, padding=1, bias=False, dtype=torch.float64)
    assert conv.num_groups == 4 and conv.conv_groups == 2 and conv.atoms.shape == (4, 3, 3, 3)
    assert conv.shared.coefficients.shape == (2, 2, 3)
    k = reconstruct_kernel(conv)  # rows: shuffled output channel t*g + j of group j
    for j in range(4):
        i = j // 2  # input group feeding output group j
        for t in range(2):
            row = k[t * 4 + j]
            assert row[2 * i : 2 * i + 2].abs().sum() > 0
            others = torch.cat([row[: 2 * i], row[2 * i + 2 :]])
            assert others.abs().sum() == 0
            expected = torch.einsum("ik,khw->ihw", conv.shared.coefficients[t], conv.atoms[j])
            assert torch.allclose(row[2 * i : 2 * i + 2], expected, atol=1e-14)


def test_atoms_orthogonal_and_coefficients_kaiming():
    torch.manual_seed(0)
    few = ACDCConv2d(8, 8, 3, atoms=6, dtype=torch.float64)  # m < l^2: orthonormal rows
    d = few.atoms.reshape(6, 9)
    assert torch.allclose(d @ d.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    many = ACDCConv2d(8, 8, 3, atoms=16, group_size=4, dtype=torch.float64)  # m > l^2: orthonormal columns
    for group in many.atoms:
        d = group.reshape(16, 9)
        assert torch.allclose(d.T @ d, torch.eye(9, dtype=torch.float64), atol=1e-12)
    big = SharedCoefficients(256, 128, 8, dtype=torch.float64)
    expected_std = math.sqrt(2.0 / (128 * 8))  # fan_in = cols * atoms
    assert abs(big.coefficients.std().item() / expected_std - 1) < 0.02
    assert abs(big.coefficients.mean().item()) < 0.05 * expected_std


def test_shared_coefficient_gradient_is_sum_of_layer_contributions():
    torch.manual_seed(0)
    shared = SharedCoefficients(6, 6, 4, dtype=torch.float64)
    convs = [
        ACDCConv2d(3, 6, 3, shared=shared, padding=1, dtype=torch.float64).eval(),
        ACDCConv2d(6, 6, (3, 1), shared=shared, padding=(1, 0), dtype=torch.float64).eval(),
        ACDCConv2d(6, 4, 3, shared=shared, stride=2, dtype=torch.float64).eval(),
    ]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def loss_fn(layers_and_coefs):
        h = x
        for conv, a in layers_and_coefs:
            rows, cols = conv.coefficient_shape
            w = torch.einsum("oik,khw->oihw", a[:rows, :cols], conv.atoms)
            h = torch.tanh(F.conv2d(h, w, conv.bias, conv.stride, conv.padding))
        return (h**2).sum()

    h = x
    for conv in convs:
        h = torch.tanh(conv(h))
    (h**2).sum().backward()
    # manual: every layer gets its own leaf copy of A; the shared gradient must be the sum of theirs
    copies = [shared.coefficients.detach().clone().requires_grad_() for _ in convs]
    loss_fn(list(zip(convs, copies))).backward()
    manual = sum(c.grad for c in copies)
    assert all(c.grad.abs().sum() > 0 for c in copies)
    assert (shared.coefficients.grad - manual).abs().max().item() <= 1e-12
    assert [n for n, _ in torch.nn.ModuleList(convs).named_parameters()].count("0.shared.coefficients") == 1


def test_atom_drop_off_in_eval_and_equal_to_no_drop():
    torch.manual_seed(0)
    conv = ACDCConv2d(4, 6, 3, atoms=8, padding=1, atom_drop=0.5, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    conv.eval()
    y1, y2 = conv(x), conv(x)
    conv.atom_drop = 0.0
    conv.train()
    y0 = conv(x)
    assert torch.equal(y1, y2) and torch.equal(y1, y0)


@pytest.mark.parametrize("group_size", [None, 2])
def test_atom_drop_training_kernels_are_unbiased(group_size):
    torch.manual_seed(0)
    p, draws = 0.1, 4000
    conv = ACDCConv2d(4, 4, 3, atoms=8, atom_drop=p, group_size=group_size, dtype=torch.float64).train()
    clean = conv.kernel()
    masks = torch.stack([conv.sample_atom_mask() for _ in range(draws)])
    assert masks.shape[1:] == conv.atoms.shape[:-2]
    assert set(torch.unique(masks).tolist()) == {0.0, 1.0 / (1 - p)}
    with torch.no_grad():
        kernels = torch.func.vmap(conv.kernel)(masks)
    assert not torch.allclose(kernels[0], clean)  # something was dropped in some draw
    assert (kernels != clean).any(dim=tuple(range(1, kernels.dim()))).float().mean() > 0.3
    # per element, K_drop = sum_k b_k/(1-p) A_k D_k with Var(b_k/(1-p)) = p/(1-p): bound the mean by 5 sigma
    a = conv.coefficient_view()
    if group_size is None:
        terms = torch.einsum("oik,khw->koihw", a, conv.atoms)
    else:
        terms = torch.einsum("oik,gkhw->kgoihw", a, conv.atoms).reshape(8, *clean.shape)
    sigma = (p / (1 - p) * (terms**2).sum(0) / draws).sqrt()
    err = (kernels.mean(0) - clean).abs()
    assert (err <= 5 * sigma + 1e-12).all()
    # an unscaled (biased) drop would be off by p * K: far outside the bound
    assert ((kernels.mean(0) * (1 - p) - clean).abs() > 5 * sigma).any()


def test_atom_drop_masks_differ_between_layers_and_passes():
    torch.manual_seed(0)
    shared = SharedCoefficients(4, 4, 16, dtype=torch.float64)
    a = ACDCConv2d(4, 4, 3, shared=shared, atom_drop=0.5, padding=1, bias=False, dtype=torch.float64)
    b = ACDCConv2d(4, 4, 3, shared=shared, atom_drop=0.5, padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        b.atoms.copy_(a.atoms)  # identical layers: outputs differ only through their masks
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    assert torch.equal(a.eval()(x), b.eval()(x))
    a.train(), b.train()
    ya, yb, ya2 = a(x), b(x), a(x)
    assert not torch.allclose(ya, yb)
    assert not torch.allclose(ya, ya2)


def test_atom_mask_reference_matches_forward():
    torch.manual_seed(0)
    conv = ACDCConv2d(4, 8, 3, atoms=5, group_size=4, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    mask = (torch.rand(2, 5, dtype=torch.float64) > 0.5).double() / 0.5
    y = F.channel_shuffle(F.conv2d(x, conv.kernel(mask), None, 1, 1, 1, conv.conv_groups), 2)
    y = y + conv.bias.view(1, -1, 1, 1)
    assert (y - two_sublayer_forward(conv, x, mask)).abs().max() <= TOL
    assert (y - F.conv2d(x, reconstruct_kernel(conv, mask), conv.bias, 1, 1)).abs().max() <= TOL


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(atom_drop=1.0), "atom_drop must be a number in [0, 1), got 1.0"),
        (dict(atom_drop=-0.1), "atom_drop must be a number in [0, 1), got -0.1"),
        (dict(padding="full"), "padding must be 'same', 'valid', an int or a pair of ints, got 'full'"),
        (dict(padding="same", stride=2), "padding='same' needs stride 1, got stride=(2, 2)"),
        (dict(padding_mode="mirror"), "padding_mode must be one of zeros, reflect, replicate, circular; got 'mirror'"),
        (dict(atoms=0), "atoms must be an integer >= 1, got 0"),
        (dict(atoms=None), "ACDCConv2d needs atoms=<m> when no shared coefficients are given"),
        (dict(group_size=3), "ACDCConv2d(4, 8): out_channels=8 is not divisible by group_size=3"),
        (dict(group_size=8, in_channels=12, out_channels=16), "in_channels=12 is not divisible by group_size=8"),
        (
            dict(group_size=4, in_channels=8, out_channels=4),
            "out_channels=4 is not a multiple of in_channels=8; grouped ACDC supports layers that keep or multiply",
        ),
    ],
)
def test_bad_layer_arguments(kwargs, message):
    args = dict(in_channels=4, out_channels=8, kernel_size=3, atoms=4)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        ACDCConv2d(**args)
    assert message in str(info.value)


def test_shared_too_small_and_atom_mismatch():
    shared = SharedCoefficients(4, 4, 3)
    with pytest.raises(
        ValueError,
        match=r"shared coefficients of shape \(4, 4, 3\) are too small for a layer "
        r"that uses A\[:8, :4\]",
    ):
        ACDCConv2d(4, 8, 3, shared=shared)
    with pytest.raises(ValueError, match="atoms=5 but the shared coefficients hold 3 atoms"):
        ACDCConv2d(4, 4, 3, atoms=5, shared=shared)


PLAIN_LAYOUTS = [layout for layout in LAYOUTS if "group_size" not in layout[3]]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("c_in,c_out,kernel,kwargs", PLAIN_LAYOUTS)
def test_two_stage_gradients_equal_kernel_path_to_second_order(c_in, c_out, kernel, kwargs):
    torch.manual_seed(1)
    shared = SharedCoefficients(c_out + 2, c_in + 2, 4, dtype=torch.float64)
    conv = ACDCConv2d(c_in, c_out, kernel, shared=shared, atom_drop=0.0, dtype=torch.float64, **kwargs)
    x = torch.randn(3, c_in, 8, 9, dtype=torch.float64, requires_grad=True)
    inputs = [x, *conv.parameters()]

    def derivatives(path: str) -> list[torch.Tensor]:
        force_path(conv, path)
        first = torch.autograd.grad(conv(x).sin().sum(), inputs, create_graph=True)
        penalty = sum((g**2).sum() for g in first)  # a second-order quantity, as in MAML
        return [*first, *torch.autograd.grad(penalty, inputs)]

    for a, b in zip(derivatives("kernel"), derivatives("two-stage")):
        assert (a - b).abs().max().item() <= 1e-9 * max(1.0, b.abs().max().item())


def test_two_stage_chosen_for_small_batches_of_deep_layers():
    conv = ACDCConv2d(512, 512, 3, atoms=8, padding=1, bias=False)
    small, large = torch.zeros(5, 512, 3, 3), torch.zeros(80, 512, 3, 3)
    assert conv.prefers_two_stage(small, conv.padding)  # 2 * 45 * 8 = 720 <= 512 * 9
    assert not conv.prefers_two_stage(large, conv.padding)  # 2 * 720 * 8 = 11520 > 4608
    assert conv.prefers_two_stage(torch.zeros(25, 512, 3, 3), conv.padding)  # 2 * 225 * 8 = 3600 <= 4608
    early = ACDCConv2d(64, 64, 3, atoms=8, padding=1, bias=False)
    assert not early.prefers_two_stage(torch.zeros(5, 64, 21, 21), early.padding)  # 2 * 2205 * 8 > 576
    middle = ACDCConv2d(256, 256, 3, atoms=8, padding=1, bias=False)
    assert not middle.prefers_two_stage(torch.zeros(5, 256, 6, 6), middle.padding)  # 2 * 180 * 8 = 2880 > 2304
    strided = ACDCConv2d(256, 512, 3, atoms=8, padding=1, stride=2)
    assert strided.prefers_two_stage(torch.zeros(5, 256, 6, 6), strided.padding)  # 3x3 outputs: 2 * 45 * 8
    grouped = ACDCConv2d(8, 8, 3, atoms=2, group_size=4, padding=1)
    assert not grouped.prefers_two_stage(torch.zeros(1, 8, 1, 1), grouped.padding)


def test_two_stage_under_vmap_equals_per_example_calls():
    torch.manual_seed(2)
    conv = ACDCConv2d(6, 8, 3, atoms=3, padding=1, atom_drop=0.0, dtype=torch.float64)
    force_path(conv, "two-stage")
    params = {n: p.detach() for n, p in conv.named_parameters()}
    batched = {n: torch.stack([p + 0.1 * k for k in range(3)]) for n, p in params.items()}
    x = torch.randn(3, 2, 6, 5, 5, dtype=torch.float64)
    run = lambda p, xi: torch.func.functional_call(conv, p, (xi,))  # noqa: E731
    together = torch.func.vmap(run)(batched, x)
    for k in range(3):
        alone = run({n: t[k] for n, t in batched.items()}, x[k])
        assert (together[k] - alone).abs().max().item() <= 1e-12


def test_evaluation_setting_is_checked():
    conv = ACDCConv2d(4, 4, 3, atoms=2)
    assert conv.evaluation == "auto"
    with pytest.raises(ValueError, match="evaluation must be one of auto, kernel, two-stage; got 'fast'"):
        conv.evaluation = "fast"


def test_auto_builds_the_kernel_under_vmap():
    conv = ACDCConv2d(16, 16, 3, atoms=2, padding=1, atom_drop=0.0)
    x = torch.zeros(1, 16, 2, 2)  # 2 * 4 * 2 <= 16 * 9: two-stage when called directly
    assert conv.prefers_two_stage(x, conv.padding)
    choices: list[bool] = []

    def record(xi: torch.Tensor) -> torch.Tensor:
        choices.append(conv.prefers_two_stage(xi, conv.padding))
        return conv(xi)

    torch.func.vmap(record)(x.expand(3, -1, -1, -1)[:, None])
    assert choices == [False]


@pytest.mark.parametrize("evaluation", ["kernel", "two-stage"])
@pytest.mark.parametrize("scope", ["net", "block", "layer", "g-net", "g-block", "g-layer"])
@pytest.mark.parametrize("backbone", ["conv4", "resnet10"])
def test_parameter_gradients_are_contiguous(backbone: str, scope: str, evaluation: str) -> None:
    """Meta-learners written for dense nets (learn2learn's GBML) call .view on parameter gradients."""
    from fewshot.backbones import create_backbone

    options = {"image_size": 16} if backbone == "conv4" else {"width": 4, "stem": "small"}
    if scope.startswith("g-"):
        options["group_size"] = 4
    torch.manual_seed(0)
    model = create_backbone(backbone, acdc=scope, atoms=3, **options)
    for layer in model.modules():
        if isinstance(layer, ACDCConv2d):
            layer.evaluation = evaluation
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(model(torch.randn(2, 3, 16, 16)).square().sum(), list(params.values()))
    assert len(grads) == len(params) and any(n.endswith(".atoms") for n in params)
    noncontiguous = [n for n, g in zip(params, grads) if not g.is_contiguous()]
    assert noncontiguous == []
