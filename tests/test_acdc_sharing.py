"""The shared coefficient tensor stays one tensor through naming, state_dict, deepcopy, .to(),
torch.func.functional_call and higher."""

import copy
import io

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.acdc import acdc_convs, acdc_named_parameters, acdc_parameters, convert, count_parameters


def small_net(dtype=torch.float64) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, dtype=dtype),
        nn.Flatten(),
        nn.LazyLinear(3, dtype=dtype),
    )


def converted(scope="net", seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    example = torch.zeros(1, 3, 6, 6, dtype=torch.float64)
    model = convert(small_net(), scope, atoms=kw.pop("atoms", 3), example_input=example, **kw)
    model(torch.zeros(1, 3, 6, 6, dtype=torch.float64))  # materialize the lazy head
    return model.eval()


def coefficient_objects(model):
    return {id(c.shared.coefficients) for _, c in acdc_convs(model)}


def test_names_list_shared_tensor_once():
    model = converted("net")
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if n.endswith(".coefficients")] == ["0.shared.coefficients"]
    assert [n for n in names if n.endswith(".atoms")] == ["0.atoms", "2.atoms", "4.atoms"]
    assert [n for n, _ in acdc_named_parameters(model, "coefficients")] == ["0.shared.coefficients"]
    assert [n for n, _ in acdc_named_parameters(model, "atoms")] == ["0.atoms", "2.atoms", "4.atoms"]
    assert len(acdc_parameters(model)) == 4
    # 8x8x3 coefficients + atoms 3 x (3*9) + biases 4+8+8 + head (8*3*3)*3+3
    assert count_parameters(model) == 8 * 8 * 3 + 3 * 27 + 20 + 72 * 3 + 3
    with pytest.raises(ValueError, match="which must be one of atoms, coefficients, all; got 'bias'"):
        acdc_parameters(model, "bias")


def test_state_dict_round_trip_into_fresh_model_keeps_sharing():
    model = converted("block", seed=0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = converted("block", seed=1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert not torch.allclose(fresh(x), model(x))
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), model(x))
    assert fresh[2].shared.coefficients is fresh[4].shared.coefficients
    assert fresh[0].shared.coefficients is not fresh[2].shared.coefficients
    with torch.no_grad():
        fresh[2].shared.coefficients.add_(1.0)
    assert torch.equal(fresh[4].shared.coefficients, fresh[2].shared.coefficients)


def test_deepcopy_and_to_keep_sharing():
    model = converted("net").float()
    assert len(coefficient_objects(model)) == 1
    twin = copy.deepcopy(model)
    assert len(coefficient_objects(twin)) == 1 and coefficient_objects(twin) != coefficient_objects(model)
    assert twin[0].shared.coefficients is twin[2].shared.coefficients is twin[4].shared.coefficients
    model.to(torch.float64)
    assert len(coefficient_objects(model)) == 1
    assert model[0].shared.coefficients.dtype == torch.float64 and model[4].atoms.dtype == torch.float64
    assert len(list(model.parameters())) == len(list(twin.parameters()))


def _load(model, coefficients):
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].shared.coefficients.copy_(coefficients)
    return twin


def test_functional_call_replacing_coefficients_reaches_every_layer():
    model = converted("net")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    new = torch.randn_like(model[0].shared.coefficients).requires_grad_()
    out = torch.func.functional_call(model, {"0.shared.coefficients": new}, (x,), tie_weights=True)
    out.square().sum().backward()
    reference = _load(model, new.detach())  # a real model holding the new values in every layer
    ref_out = reference(x)
    ref_out.square().sum().backward()
    assert torch.equal(out, ref_out)
    assert (new.grad - reference[0].shared.coefficients.grad).abs().max() <= 1e-12
    # the model is left as it was: its own Parameter, still tied, and untouched by the backward pass
    original = model[0].shared.coefficients
    assert isinstance(original, nn.Parameter) and original is not new and original.grad is None
    assert model[2].shared.coefficients is original and model[4].shared.coefficients is original
    # a model where the replacement does not reach every layer computes something else
    only_first = copy.deepcopy(model)
    only_first[2].shared = copy.deepcopy(model[2].shared)  # untie layer 2: it keeps the old A
    out_first = torch.func.functional_call(only_first, {"0.shared.coefficients": new.detach()}, (x,))
    assert not torch.allclose(out_first, out)


def test_higher_inner_loop_uses_one_fast_coefficient_tensor():
    model = converted("net")
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    target = torch.randn(4, 3, dtype=torch.float64)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x), target))
        fast = fmodel.fast_params
        assert len(fast) == len(params)
        index = [i for i, p in enumerate(params) if p is model[0].shared.coefficients][0]
        fast_a = fast[index]
        # the patched model's output equals the model run with the fast weights in every layer
        expected = torch.func.functional_call(
            model, {n: fast[i] for i, (n, _) in enumerate(model.named_parameters())}, (x,)
        )
        query = fmodel(x)
        assert (query - expected).abs().max() <= 1e-12
        meta = F.mse_loss(query, target)
        meta.backward()
    assert model[0].shared.coefficients.grad is not None
    assert model[0].shared.coefficients.grad.abs().sum() > 0
    assert not torch.equal(fast_a.detach(), model[0].shared.coefficients.detach())
