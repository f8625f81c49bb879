"""expand(): relaxing the sharing scope and adding atoms keeps the function and inherits the tensors."""

import pytest
import torch
from torch import nn

from fewshot.acdc import acdc_convs, convert, count_parameters, expand


class Tiny(nn.Module):
    """stem 3->8, two 8->8 convs, then a widening stage 8->16, 16->16 (a 1x1 shortcut stays dense)."""

    def __init__(self):
        super().__init__()
        kw = dict(dtype=torch.float64)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, **kw)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1, bias=False, **kw)
        self.a2 = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), **kw)
        self.b1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, **kw)
        self.b2 = nn.Conv2d(16, 16, 3, padding=1, **kw)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2, **kw)

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        x = torch.tanh(self.a2(torch.tanh(self.a1(x))) + x)
        return self.b2(torch.tanh(self.b1(x))) + self.shortcut(x)


def trained(scope, atoms=4, group_size=None):
    """A converted model whose parameters are moved away from their init (as if trained)."""
    torch.manual_seed(0)
    model = convert(Tiny(), scope, atoms=atoms, group_size=group_size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def owners(model):
    """Sorted shapes of the distinct coefficient tensors and the partition of convs among them."""
    by_tensor = {}
    for name, conv in acdc_convs(model):
        a = conv.shared.coefficients
        by_tensor.setdefault(id(a), (tuple(a.shape), []))[1].append(name)
    return sorted((shape, tuple(names)) for shape, names in by_tensor.values())


STEPS = [
    # (from scope, to scope, atoms before, atoms after, group size)
    ("net", "block", 4, None, None),
    ("block", "layer", 4, None, None),
    ("net", "layer", 4, None, None),
    ("net", None, 4, 8, None),
    ("block", "block", 4, 8, None),
    ("net", "block", 4, 6, None),
    ("g-net", "g-block", 3, None, 4),
    ("g-block", "g-layer", 3, None, 4),
    ("g-net", None, 3, 7, 4),
    ("g-net", "g-layer", 3, 5, 4),
]


@pytest.mark.parametrize("old,new,m,m_new,s", STEPS)
def test_expand_keeps_the_function(old, new, m, m_new, s):
    model = trained(old, m, s)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    before = model(x)
    expand(model, scope=new, atoms=m_new)
    after = model(x)
    assert (after - before).abs().max().item() <= 1e-12 * max(1.0, before.abs().max().item())
    target, target_m = new or old, m_new or m
    assert all(c.scope == target and c.num_atoms == target_m for _, c in acdc_convs(model))
    torch.manual_seed(1)
    reference = convert(Tiny(), target, atoms=target_m, group_size=s)
    assert owners(model) == owners(reference)  # same sharing structure as a fresh conversion
    assert count_parameters(model) == count_parameters(reference)


def test_expand_inherits_values_and_new_atoms_start_silent():
    model = trained("net", atoms=4)
    old_a = model.b1.shared.coefficients.detach().clone()
    old_atoms = model.a1.atoms.detach().clone()
    expand(model, scope="block", atoms=6)
    a_stage2 = model.b1.shared.coefficients
    assert a_stage2.shape == (16, 16, 6) and model.stem.shared.coefficients.shape == (8, 8, 6)
    assert torch.equal(a_stage2[:, :, :4], old_a[:16, :16])
    assert torch.equal(model.stem.shared.coefficients[:, :, :4], old_a[:8, :8])
    assert torch.equal(a_stage2[:, :, 4:], torch.zeros(16, 16, 2, dtype=torch.float64))
    assert torch.equal(model.a1.atoms[:4], old_atoms)
    new_atoms = model.a1.atoms[4:].reshape(2, 9)
    assert torch.allclose(new_atoms @ new_atoms.T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    # the new coefficients receive gradient, so training can use the new atoms
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).square().sum().backward()
    assert a_stage2.grad[:, :, 4:].abs().sum() > 0
    # the relaxed owners are independent tensors now
    assert model.stem.shared.coefficients is not a_stage2
    assert model.b1.shared.coefficients is model.b2.shared.coefficients


def test_expand_grouped_atoms_per_group():
    model = trained("g-layer", atoms=3, group_size=4)
    expand(model, atoms=5)
    assert model.b2.atoms.shape == (4, 5, 3, 3) and model.stem.shared.coefficients.shape == (4, 3, 5)
    assert model.b2.shared.coefficients.shape == (4, 4, 5)


def test_expand_without_change_returns_model_untouched():
    model = trained("block")
    params = list(model.parameters())
    assert expand(model) is model and list(model.parameters()) == params


@pytest.mark.parametrize(
    "old,kwargs,message",
    [
        (
            "layer",
            dict(scope="net"),
            "cannot tighten sharing from 'layer' to 'net'; expand() only relaxes it: net -> block -> layer",
        ),
        ("block", dict(scope="net"), "cannot tighten sharing from 'block' to 'net'"),
        (
            "g-layer",
            dict(scope="g-block"),
            "cannot tighten sharing from 'g-layer' to 'g-block'; expand() only relaxes it: g-net -> g-block -> g-layer",
        ),
        (
            "net",
            dict(scope="g-net"),
            "cannot expand scope 'net' to 'g-net': grouped (g-*) and plain scopes do not turn into each other",
        ),
        ("net", dict(atoms=3), "cannot reduce atoms from 4 to 3; expand() only adds atoms"),
        ("net", dict(atoms=0), "atoms must be an integer >= 1, got 0"),
        (
            "net",
            dict(scope="stage"),
            "unknown ACDC scope 'stage'; valid scopes: net, block, layer, g-net, g-block, g-layer",
        ),
    ],
)
def test_expand_errors(old, kwargs, message):
    model = trained(old, 4, 4 if old.startswith("g-") else None)
    with pytest.raises(ValueError) as info:
        expand(model, **kwargs)
    assert str(info.value).startswith(message)


def test_expand_needs_acdc_convs():
    with pytest.raises(ValueError, match=r"the model has no ACDC convs; call fewshot.acdc.convert\(\) first"):
        expand(nn.Sequential(nn.Conv2d(3, 4, 3)), scope="block")
