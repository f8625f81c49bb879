"""Shared coefficients cut once per forward pass (CoefficientCorners): the values and derivatives of plain
slicing, one cut per pass, cut again when the tensor changes, and the same under vmap, deepcopy, pickling."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.acdc import ACDCConv2d, SharedCoefficients
from fewshot.acdc.layer import CoefficientCorners


class PlainSlices(CoefficientCorners):
    """The reference: every conv slices ``a[:rows, :cols]`` itself (and multiplies it by plain autograd)."""

    def _take(self, a: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, None]:
        return a[:rows, :cols], None


class Stack(nn.Module):
    """Convs of several corner shapes on one shared A: nested ones, two incomparable ones, the full one."""

    def __init__(self, evaluation: str) -> None:
        super().__init__()
        shared = SharedCoefficients(6, 6, 3, dtype=torch.float64)
        shapes = [(3, 4), (4, 4), (4, 6), (6, 4), (4, 6), (6, 6), (6, 6)]  # (c_in, c_out) per conv
        self.convs = nn.ModuleList(
            ACDCConv2d(c_in, c_out, 3, shared=shared, padding=1, atom_drop=0.0, dtype=torch.float64)
            for c_in, c_out in shapes
        )
        self.skip = ACDCConv2d(4, 6, 1, shared=shared, atom_drop=0.0, dtype=torch.float64)  # (6, 4) read twice per pass
        for conv in [*self.convs, self.skip]:
            conv.evaluation = evaluation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, conv in enumerate(self.convs):
            h = torch.tanh(conv(h))
            if i == 1:
                h4 = h
        return h + self.skip(h4)


def stack(evaluation: str = "kernel", plain: bool = False) -> Stack:
    torch.manual_seed(0)
    model = Stack(evaluation)
    if plain:
        for holder in model.modules():
            if isinstance(holder, SharedCoefficients):
                holder.corners = PlainSlices()
    return model


def cut_nodes(output: torch.Tensor) -> int:
    """How many corner-cutting autograd nodes the graph of ``output`` holds."""
    seen, todo, count = set(), [output.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += "_CutCorners" in type(node).__name__
        todo.extend(next_node for next_node, _ in node.next_functions)
    return count


def coefficients(model: nn.Module) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if n.endswith("coefficients"))


X = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
DEFAULT_MIN_ELEMENTS = CoefficientCorners.min_elements


@pytest.fixture(autouse=True)
def cut_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' tensors are tiny: cut them as if they were large enough to gain from it."""
    monkeypatch.setattr(CoefficientCorners, "min_elements", 0)


@pytest.mark.parametrize(("rows", "cut"), [(64, False), (128, True)])
def test_only_a_coefficient_tensor_of_min_elements_or_more_is_cut(
    monkeypatch: pytest.MonkeyPatch, rows: int, cut: bool
) -> None:
    monkeypatch.setattr(CoefficientCorners, "min_elements", DEFAULT_MIN_ELEMENTS)
    assert DEFAULT_MIN_ELEMENTS == 1 << 18 == 128 * 128 * 16  # 64 x 64 x 16 is a quarter of it
    torch.manual_seed(0)
    shared = SharedCoefficients(rows, rows, 16)
    half = ACDCConv2d(rows // 2, rows, 1, shared=shared, atom_drop=0.0)
    whole = ACDCConv2d(rows, rows, 1, shared=shared, atom_drop=0.0)
    x = torch.randn(1, rows // 2, 2, 2)
    out = whole(torch.relu(half(x))).square().sum()
    assert cut_nodes(out) == int(cut)
    out.backward()
    grad = shared.coefficients.grad.clone()
    half.shared.corners = whole.shared.corners = PlainSlices()
    shared.coefficients.grad = None
    whole(torch.relu(half(x))).square().sum().backward()
    assert torch.allclose(shared.coefficients.grad, grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("evaluation", ["kernel", "two-stage"])
def test_cut_corners_give_the_derivatives_of_plain_slicing_to_second_order(evaluation: str) -> None:
    def derivatives(model: Stack) -> list[torch.Tensor]:
        params = list(model.parameters())
        loss = model(X).square().sum()
        first = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        return [*first, *torch.autograd.grad(penalty, params)]

    cut, plain = derivatives(stack(evaluation)), derivatives(stack(evaluation, plain=True))
    assert len(cut) == len(plain) == 2 * len(list(stack().parameters()))
    for a, b in zip(cut, plain):
        assert (a - b).abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item())


def test_one_cut_per_forward_pass_with_an_alias_per_full_size_reader() -> None:
    model = stack()
    holder = model.convs[0].shared
    assert all(conv.shared.corners is holder.corners for conv in [*model.convs, model.skip])
    assert holder.corners._readers == {(4, 3): 1, (4, 4): 1, (6, 4): 3, (4, 6): 1, (6, 6): 2}  # registered
    expected = model(X)
    assert cut_nodes(expected) == 1  # from the first pass on
    (cut,) = holder.corners._cut.values()
    # corners taken in the order of the pass; each 6x6 conv got its own full-size alias
    assert [shape for shape, _ in cut.taken] == [(4, 3), (4, 4), (6, 4), (4, 6), (6, 6), (6, 6)]
    assert not any(cut.waiting.values())
    del expected  # its graph, and with it the corners it took: the next pass cuts anew
    again = model(X)
    assert cut_nodes(again) == 1 and next(iter(holder.corners._cut.values())) is not cut


def test_a_conv_tied_without_registering_is_learnt_on_its_first_pass() -> None:
    torch.manual_seed(0)
    whole = ACDCConv2d(3, 6, 3, atoms=3, padding=1, atom_drop=0.0, dtype=torch.float64)  # A is 6 x 3
    late = ACDCConv2d(6, 2, 1, atoms=3, dtype=torch.float64, atom_drop=0.0)
    late.in_channels = 3  # reads A[:2, :3] of whole's coefficients, tied by hand: not registered
    late.shared = whole.shared.tie()
    corners = whole.shared.corners
    assert corners.shapes == {(6, 3)}
    first = late(whole(X)[:, :3])
    assert corners.shapes == {(6, 3), (2, 3)} and cut_nodes(first) == 0  # it sliced for itself
    second = late(whole(X)[:, :3])
    assert cut_nodes(second) == 1 and torch.equal(first, second)


def test_corners_are_reused_while_the_graph_lives_and_cut_again_after_a_change() -> None:
    model = stack()
    model(X)
    one, two = model(X), model(X)  # two passes before one backward share one cut
    assert cut_nodes(one + two) == 1
    (one + two).sum().backward()
    with torch.no_grad():  # an optimizer step: in place, so the version counter moves
        coefficients(model).mul_(0.5)
    after = model(X)
    assert cut_nodes(after) == 1
    reference = stack(plain=True)
    reference.load_state_dict(model.state_dict())
    assert torch.equal(after, reference(X))


def test_no_cut_without_a_backward() -> None:
    model = stack()
    model(X)
    a = coefficients(model)
    conv = model.convs[2]  # reads A[:6, :4]
    cuts = list(conv.shared.corners._cut.values())
    with torch.no_grad():
        view = conv.coefficient_view()
        model(X)
    assert view.data_ptr() == a.data_ptr() and view.shape == (6, 4, 3) and view.grad_fn is None  # a plain view
    with torch.inference_mode():
        model(X)
    a.requires_grad_(False)
    assert cut_nodes(model(X)) == 0
    assert list(conv.shared.corners._cut.values()) == cuts  # nothing was cut for these passes


def test_cut_corners_under_vmap_equal_one_task_at_a_time() -> None:
    model = stack()
    model(X)
    params = {n: p.detach() for n, p in model.named_parameters()}
    batched = {n: torch.stack([p * (1 + 0.1 * k) for k in range(3)]) for n, p in params.items()}
    xs = torch.stack([X * (k + 1) for k in range(3)])

    def loss(p: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (x,)).square().sum()

    together = torch.func.vmap(torch.func.grad(loss))(batched, xs)
    shared_params = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for k in range(3):
        alone = torch.func.grad(loss)({n: t[k] for n, t in batched.items()}, xs[k])
        alone_shared = torch.func.grad(loss)(params, xs[k])
        for name in params:
            assert (together[name][k] - alone[name]).abs().max().item() <= 1e-10 * alone[name].abs().max().item()
            assert (shared_params[name][k] - alone_shared[name]).abs().max().item() <= 1e-10 * max(
                1.0, alone_shared[name].abs().max().item()
            )


def test_copies_keep_the_shapes_and_drop_the_cut_corners() -> None:
    model = stack()
    out = model(X)
    corners = model.convs[0].shared.corners
    assert len(corners._cut) == 1
    twin = copy.deepcopy(model)
    twin_corners = twin.convs[0].shared.corners
    assert twin_corners is not corners and twin_corners._readers == corners._readers and not twin_corners._cut
    assert all(conv.shared.corners is twin_corners for conv in twin.convs)  # still one per scope
    assert cut_nodes(twin(X)) == 1 and torch.equal(twin(X), out)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.convs[3].shared.corners._readers == corners._readers
    assert loaded.convs[3].shared.corners is loaded.convs[0].shared.corners
    assert torch.equal(loaded(X), out)


@pytest.mark.parametrize("c_in,c_out", [(3, 5), (4, 6)])  # 15 rows: one at a time; 24 rows: in pairs
def test_kernel_reconstruction_equals_the_atom_sum(c_in: int, c_out: int) -> None:
    torch.manual_seed(0)
    conv = ACDCConv2d(c_in, c_out, (3, 2), atoms=4, atom_drop=0.0, dtype=torch.float64)
    kernel = conv.kernel()
    reference = torch.einsum("oik,khw->oihw", conv.coefficient_view(), conv.atoms)
    assert kernel.shape == (c_out, c_in, 3, 2) and kernel.is_contiguous()
    assert (kernel - reference).abs().max().item() <= 1e-14
    g = torch.randn_like(kernel)
    got = torch.autograd.grad(kernel, [conv.shared.coefficients, conv.atoms], g)
    want = torch.autograd.grad(reference, [conv.shared.coefficients, conv.atoms], g)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-13


def test_kernel_macs_count_the_reconstruction_once() -> None:
    assert ACDCConv2d(16, 32, 3, atoms=6).kernel_macs == 32 * 16 * 6 * 9
    grouped = ACDCConv2d(8, 16, 3, atoms=2, group_size=4)  # 4 groups, each A[:4, :4] against its atoms
    assert grouped.kernel_macs == 4 * 4 * 4 * 2 * 9
    x = torch.randn(1, 8, 5, 5)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        F.conv2d(x, grouped.kernel(), None, 1, 0, 1, grouped.conv_groups)
    assert counter.get_total_flops() == 2 * grouped.kernel_macs + 2 * 16 * 4 * 9 * 9


def test_expand_registers_every_conv_with_its_new_owner() -> None:
    from fewshot.acdc import acdc_convs, expand
    from fewshot.backbones import create_backbone

    torch.manual_seed(0)
    model = create_backbone("resnet10", acdc="net", atoms=2, width=4, stem="small")
    expand(model, "block")
    owners: dict[int, list[ACDCConv2d]] = {}
    for _, conv in acdc_convs(model):
        owners.setdefault(id(conv.shared.corners), []).append(conv)
    assert len(owners) > 1
    for convs in owners.values():
        readers = convs[0].shared.corners._readers
        assert sum(readers.values()) == len(convs)
        assert sorted(readers) == sorted({conv.coefficient_shape for conv in convs})
    out = model(torch.randn(2, 3, 16, 16))
    with_corners = sum(1 for convs in owners.values() if len(convs[0].shared.corners.shapes) > 1)
    assert cut_nodes(out) == with_corners  # registered: cut from the first pass on


class FullSizeCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the copies (clone, copy_) of tensors of a given shape that run inside the mode."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default) and args[0].shape == self.shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("used", [False, True])
def test_a_full_size_corner_handed_out_is_never_summed_into(used: bool) -> None:
    """corner() asked again within a pass hands out the full-size corner a conv took: as a view of it, so
    that what the caller does with it (a hook that keeps its gradient; an expression whose gradient is
    also w's) never holds the tensor that the cut sums into in place."""
    torch.manual_seed(2)
    w = torch.randn(6, 6, 3, dtype=torch.float64, requires_grad=True)

    def run(model: Stack) -> tuple[torch.Tensor, ...]:
        model(X)
        out = model(X)
        handed = model.convs[6].coefficient_view()  # all of A, as convs[6] took it in this pass
        kept = []
        handed.register_hook(lambda g: kept.append((g, g.clone())))
        loss = out.square().sum() + ((handed + w).square().sum() if used else 0.0)
        loss.backward()
        assert len(kept) == int(used)  # the hook runs where the caller's tensor has a gradient
        for held, at_hook in kept:
            assert torch.equal(held, at_hook)  # what the hook kept was not changed afterwards
        grads = coefficients(model).grad.clone(), w.grad.clone() if used else w
        w.grad = None
        return *grads, *(held for held, _ in kept)

    a_grad, w_grad, *held = run(stack())
    a_ref, w_ref, *held_ref = run(stack(plain=True))
    assert all((x - y).abs().max().item() <= 1e-12 for x, y in zip(held, held_ref))
    assert (a_grad - a_ref).abs().max().item() <= 1e-12 and (w_grad - w_ref).abs().max().item() <= 1e-12


def test_a_gradient_with_a_graph_is_copied_not_summed_into() -> None:
    """create_graph (second-order MAML): the full-size gradient is part of a graph, so the sum is a copy."""
    model = stack()
    params = list(model.parameters())
    model(X)
    loss = model(X).square().sum()
    with FullSizeCopies(coefficients(model).shape) as copies:
        torch.autograd.grad(loss, params, create_graph=True)
    assert copies.count == 1


class FreshFullSize(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that return a new tensor (storage none of their inputs has) of ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        if (
            isinstance(out, torch.Tensor)
            and out.numel() == self.numel
            and out.untyped_storage().data_ptr() not in inputs
        ):
            self.count += 1
        return out


@pytest.mark.parametrize("evaluation", ["kernel", "two-stage"])
def test_the_products_add_their_gradients_into_one_full_size_sum(evaluation: str) -> None:
    """Two convs read all of A and four a corner as a matrix view of it: their products' backward writes
    one full-size tensor, the sum (before: one per full-size reader, and a corner-size one per reader),
    and copies none (no copy of a gradient into the sum, no self-copy of an in-place sum)."""
    model, reference = stack(evaluation), stack(evaluation, plain=True)
    a = coefficients(model)
    model(X)  # registers every reader: the pass below cuts
    out = model(X).square().sum()
    with FullSizeCopies(a.shape) as copies, FreshFullSize(a.numel()) as fresh:
        out.backward()
    assert copies.count == 0
    assert fresh.count == 1
    reference(X).square().sum().backward()
    assert (a.grad - coefficients(reference).grad).abs().max().item() <= 1e-12
    (cut,) = model.convs[0].shared.corners._cut.values()
    assert cut.sums == {}  # handed to A's gradient, not kept


def test_a_backward_that_skips_the_coefficients_leaves_no_partial_sum() -> None:
    """A backward to the input only runs the products but not the cut: nothing is added to a sum that a
    later backward through the same graph would find; that one and a second (retain_graph) each get the
    whole gradient; a hook on A sees it."""
    model, reference = stack(), stack(plain=True)
    model(X)
    x = X.clone().requires_grad_()
    out = model(x).square().sum()
    (cut,) = model.convs[0].shared.corners._cut.values()
    torch.autograd.grad(out, [x], retain_graph=True)
    assert cut.sums == {}
    seen = []
    coefficients(model).register_hook(lambda g: seen.append(g.clone()))
    out.backward(retain_graph=True)
    out.backward()
    reference(X).square().sum().backward()
    want = coefficients(reference).grad
    assert len(seen) == 2 and all((g - want).abs().max().item() <= 1e-12 for g in seen)
    assert (coefficients(model).grad - 2 * want).abs().max().item() <= 1e-12
    assert cut.sums == {}


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("evaluation", ["kernel", "two-stage"])
def test_checkpointed_convs_add_into_the_sum_of_their_own_backward(evaluation: str, reentrant: bool) -> None:
    """torch.utils.checkpoint reruns two convs within the backward (the reentrant kind in a backward of its
    own): their products' gradients reach A all the same, and no sum is left behind."""
    from torch.utils.checkpoint import checkpoint

    def forward(model: Stack) -> torch.Tensor:
        h = X
        for i, conv in enumerate(model.convs):
            h = torch.tanh(checkpoint(conv, h, use_reentrant=reentrant) if i in (2, 5) else conv(h))
        return h.square().sum()

    model, reference = stack(evaluation), stack(evaluation, plain=True)
    model(X)
    forward(model).backward()
    forward(reference).backward()
    assert (coefficients(model).grad - coefficients(reference).grad).abs().max().item() <= 1e-12
    assert all(cut.sums == {} for cut in model.convs[0].shared.corners._cut.values())
