"""MAML: meta-gradients against `higher` and finite differences, adapt choices, BatchNorm modes."""

from __future__ import annotations

import copy

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.acdc import GROUPED_SCOPES, SCOPES
from fewshot.acdc.layer import CoefficientCorners
from fewshot.data.episode import Episode
from fewshot.learners.maml import MAML
from tests.helpers import TinyNet, make_episode


def make_learner(backbone: nn.Module, **kw) -> MAML:
    torch.manual_seed(0)
    learner = MAML(backbone, ways=3, inner_steps=3, inner_lr=0.1, **kw).double()
    with torch.no_grad():  # a non-zero head so that every parameter gets a gradient
        learner.head.weight.normal_(0, 0.3)
        learner.head.bias.normal_(0, 0.1)
    return learner


def meta_gradients(learner: MAML, episodes: list[Episode]) -> dict[str, torch.Tensor]:
    learner.zero_grad()
    loss, _ = learner.batch_loss(episodes)
    loss.backward()
    return {n: p.grad.clone() for n, p in learner.named_parameters()}


def higher_meta_gradients(learner: MAML, episodes: list[Episode], first_order: bool) -> dict[str, torch.Tensor]:
    """The same meta-step written with higher.innerloop_ctx (the reference)."""
    model = copy.deepcopy(learner)
    params = list(model.parameters())
    inner_opt = torch.optim.SGD(params, lr=learner.inner_lr)
    total = None
    for ep in episodes:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order) as (
            fmodel,
            diffopt,
        ):
            for _ in range(learner.inner_steps):
                diffopt.step(F.cross_entropy(fmodel(ep.support_images), ep.support_labels))
            query_loss = F.cross_entropy(fmodel(ep.query_images), ep.query_labels)
            if first_order:  # higher detaches the adapted weights: take d(query)/d(fast) explicitly
                grads = torch.autograd.grad(query_loss, list(fmodel.parameters()))
            else:
                grads = torch.autograd.grad(query_loss, params)
        total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, total))


def assert_meta_gradients_match_higher(learner: MAML) -> None:
    """Our meta-gradients of two episodes equal higher's to 1e-10 (float64), parameter by parameter."""
    episodes = [make_episode(seed=s) for s in range(2)]
    ours = meta_gradients(learner, episodes)
    ref = higher_meta_gradients(learner, episodes, learner.first_order)
    assert ours.keys() == ref.keys()
    for name in ours:
        assert (ours[name] - ref[name]).abs().max().item() <= 1e-10, name


@pytest.mark.parametrize("vectorize", ["off", "all"])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_higher(first_order: bool, vectorize: str) -> None:
    assert_meta_gradients_match_higher(make_learner(TinyNet(), first_order=first_order, vectorize=vectorize))


def test_first_order_differs_from_second_order() -> None:
    episodes = [make_episode(seed=3)]
    second = meta_gradients(make_learner(TinyNet()), episodes)
    first = meta_gradients(make_learner(TinyNet(), first_order=True), episodes)
    diff = max((second[n] - first[n]).abs().max().item() for n in second)
    scale = max(second[n].abs().max().item() for n in second)
    assert diff > 1e-3 * scale


def test_second_order_matches_finite_difference() -> None:
    learner = make_learner(TinyNet(smooth=True))
    episodes = [make_episode(seed=5)]
    grads = meta_gradients(learner, episodes)
    g = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in learner.named_parameters()}
    analytic = sum((grads[n] * direction[n]).sum() for n in grads).item()
    eps = 1e-6
    params = dict(learner.named_parameters())

    def loss_at(sign: float) -> float:
        with torch.no_grad():
            for n, p in params.items():
                p.add_(sign * eps * direction[n])
        value = learner.batch_loss(episodes)[0].item()
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(sign * eps * direction[n])
        return value

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
    assert abs(numeric - analytic) <= 1e-4 * abs(analytic)


def test_predict_equals_loss_logits_and_keeps_no_graph() -> None:
    learner = make_learner(TinyNet(), first_order=True)
    learner.test_inner_steps, learner.test_inner_lr = learner.inner_steps, learner.inner_lr
    episode = make_episode(seed=2)
    _, train_logits = learner.loss(episode)
    logits = learner.predict(episode)
    assert not logits.requires_grad
    assert torch.allclose(logits, train_logits.detach(), atol=1e-12, rtol=0)


def test_adapt_head_changes_only_head_and_zero_steps_is_identity() -> None:
    learner = make_learner(TinyNet(), adapt="head")
    assert learner.adapted_names == ["head.weight", "head.bias"]
    episode = make_episode(seed=4)
    params = learner.model_parameters()
    fast = learner.adapt_to_support(params, episode.support_images, episode.support_labels, 2, 0.1, True)
    for name, tensor in fast.items():
        changed = not torch.equal(tensor, params[name])
        assert changed == name.startswith("head."), name
    same = learner.adapt_to_support(params, episode.support_images, episode.support_labels, 0, 0.1, True)
    assert all(same[n] is params[n] for n in params)


def test_adapt_pattern_and_errors() -> None:
    learner = make_learner(TinyNet(), adapt=r"body\.1\.")  # the first BatchNorm's affine parameters
    assert learner.adapted_names == ["backbone.body.1.weight", "backbone.body.1.bias"]
    with pytest.raises(ValueError, match=r"adapt='atoms' selects no parameter"):
        MAML(TinyNet(), ways=3, adapt="atoms")
    with pytest.raises(ValueError, match=r"adapt='\(' is neither one of all, atoms, coefficients, head"):
        MAML(TinyNet(), ways=3, adapt="(")
    with pytest.raises(ValueError, match="unknown bn_mode 'x'; choose one of: transductive, support"):
        MAML(TinyNet(), ways=3, bn_mode="x")
    with pytest.raises(ValueError, match="ways must be >= 2, got 1"):
        MAML(TinyNet(), ways=1)


def test_support_statistics_mode_normalizes_query_with_support_batch() -> None:
    learner = make_learner(TinyNet(), bn_mode="support")
    episode = make_episode(seed=6)
    logits = learner.predict(episode)
    # Predicting each query image alone gives the same logits: no query statistics are used.
    single = [
        learner.predict(
            Episode(
                episode.support_images,
                episode.support_labels,
                episode.query_images[i : i + 1],
                episode.query_labels[i : i + 1],
                episode.classes,
            )
        )
        for i in range(len(episode.query_labels))
    ]
    assert torch.allclose(torch.cat(single), logits, atol=1e-10, rtol=0)
    transductive = make_learner(TinyNet())
    assert not torch.allclose(transductive.predict(episode), logits, atol=1e-6)


def test_learned_inner_lr_receives_gradient() -> None:
    learner = make_learner(TinyNet(), learn_inner_lr=True)
    assert len(learner.inner_lrs) == len(learner.adapted_names)
    grads = meta_gradients(learner, [make_episode(seed=7)])
    lr_grads = [g for n, g in grads.items() if n.startswith("inner_lrs.")]
    assert len(lr_grads) == len(learner.adapted_names)
    assert all(g.shape == (3,) for g in lr_grads)  # trained steps only (inner_steps=3)
    assert sum(g.abs().sum().item() for g in lr_grads) > 0


def test_first_order_with_learned_step_sizes_equals_detached_gradient_reference() -> None:
    learner = make_learner(TinyNet(), learn_inner_lr=True, first_order=True)
    with torch.no_grad():
        for rates in learner.inner_lrs.values():
            rates.uniform_(0.05, 0.15)
    episode = make_episode(seed=3)
    ours = meta_gradients(learner, [episode])

    # Reference: plain autograd through the inner loop, each inner gradient detached (FOMAML).
    learner.zero_grad()
    fast = learner.model_parameters()
    for step in range(learner.inner_steps):
        loss = F.cross_entropy(learner._forward(fast, episode.support_images), episode.support_labels)
        grads = torch.autograd.grad(loss, [fast[n] for n in learner.adapted_names])
        fast = {
            **fast,
            **{
                n: fast[n] - learner.inner_lrs[n.replace(".", "-")][step] * g.detach()
                for n, g in zip(learner.adapted_names, grads)
            },
        }
    F.cross_entropy(learner._forward(fast, episode.query_images), episode.query_labels).backward()
    for name, p in learner.named_parameters():
        assert (ours[name] - p.grad).abs().max().item() <= 1e-12, name
    used_rates = [g[: learner.inner_steps] for n, g in ours.items() if n.startswith("inner_lrs.")]
    assert all(g.abs().min().item() > 0 for g in used_rates)  # d/d(rate of step t) = -<g_t, dL/dfast>


def acdc_tiny(scope: str = "net", **kw) -> nn.Module:
    from fewshot.acdc import convert

    torch.manual_seed(0)
    return convert(TinyNet(channels=8), scope, atoms=4, atom_drop=0.0, **kw)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("scope,kw", [("net", {}), ("g-net", {"group_size": 4})])
def test_acdc_meta_gradient_matches_higher(first_order: bool, scope: str, kw: dict) -> None:
    learner = make_learner(acdc_tiny(scope, **kw), first_order=first_order, vectorize="all")
    names = [n for n, _ in learner.named_parameters()]
    assert sum(n.endswith(".coefficients") for n in names) == 1  # shared across both convs: listed once
    episodes = [make_episode(seed=s) for s in range(2)]
    ours = meta_gradients(learner, episodes)
    ref = higher_meta_gradients(learner, episodes, first_order)
    for name in ours:
        assert (ours[name] - ref[name]).abs().max().item() <= 1e-10, name


@pytest.mark.parametrize("vectorize", ["off", "all"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("scope", SCOPES)
def test_acdc_meta_gradient_matches_higher_with_cut_corners(
    monkeypatch: pytest.MonkeyPatch, scope: str, first_order: bool, vectorize: str
) -> None:
    """Every scope with its coefficients cut into corners whatever their size (CoefficientCorners),
    including the full-size gradient summed into in place (first order, task by task)."""
    monkeypatch.setattr(CoefficientCorners, "min_elements", 0)
    kw = {"group_size": 4} if scope in GROUPED_SCOPES else {}
    assert_meta_gradients_match_higher(
        make_learner(acdc_tiny(scope, **kw), first_order=first_order, vectorize=vectorize)
    )


def test_adapt_atoms_changes_only_atoms_and_coefficients_still_learn() -> None:
    learner = make_learner(acdc_tiny(), adapt="atoms")
    assert learner.adapted_names and all(n.endswith(".atoms") for n in learner.adapted_names)
    episode = make_episode(seed=8)
    params = learner.model_parameters()
    fast = learner.adapt_to_support(params, episode.support_images, episode.support_labels, 2, 0.1, False)
    for name, tensor in fast.items():
        assert (not torch.equal(tensor, params[name])) == name.endswith(".atoms"), name
    grads = meta_gradients(learner, [episode])
    coefficient = next(n for n in grads if n.endswith(".coefficients"))
    assert grads[coefficient].abs().sum().item() > 0


def test_shared_coefficients_adapted_as_one_tensor() -> None:
    learner = make_learner(acdc_tiny(), adapt="coefficients")
    (name,) = learner.adapted_names
    episode = make_episode(seed=9)
    params = learner.model_parameters()
    fast = learner.adapt_to_support(params, episode.support_images, episode.support_labels, 1, 0.1, True)
    # Running with the adapted tensor changes both convs: replacing it by the original restores the output.
    from torch.func import functional_call

    x = episode.query_images
    adapted_out = functional_call(learner, fast, (x,))
    convs = [m for m in learner.modules() if hasattr(m, "shared")]
    assert len(convs) == 2 and convs[0].shared.coefficients is convs[1].shared.coefficients
    restored = functional_call(learner, {**fast, name: params[name]}, (x,))
    assert torch.allclose(restored, functional_call(learner, params, (x,)))
    assert not torch.allclose(adapted_out, restored)


def test_inner_loop_leaves_the_model_untouched() -> None:
    learner = make_learner(acdc_tiny())
    before = {n: p for n, p in learner.named_parameters()}
    copies = {n: p.detach().clone() for n, p in before.items()}
    buffers = {n: b.clone() for n, b in learner.named_buffers()}
    episode = make_episode(seed=10)
    learner.loss(episode)
    learner.predict(episode)
    after = dict(learner.named_parameters())
    assert all(after[n] is before[n] and after[n].is_leaf for n in before)
    assert all(torch.equal(after[n], copies[n]) for n in before)
    # BatchNorm running statistics are neither used nor updated.
    assert all(torch.equal(b, buffers[n]) for n, b in learner.named_buffers())


@pytest.mark.parametrize(
    "options",
    [
        {"first_order": False},
        {"first_order": True},
        {"bn_mode": "support"},
        {"learn_inner_lr": True},
    ],
)
@pytest.mark.parametrize("acdc", [False, True])
def test_vectorized_meta_batch_equals_task_loop(options: dict, acdc: bool) -> None:
    backbone = acdc_tiny("g-net", group_size=4) if acdc else TinyNet()
    batched = make_learner(backbone, vectorize="all", **options)
    looped = copy.deepcopy(batched)
    looped.vectorize = "off"
    episodes = [make_episode(seed=s) for s in range(3)]
    grads_batched = meta_gradients(batched, episodes)
    grads_looped = meta_gradients(looped, episodes)
    for name in grads_looped:
        assert (grads_batched[name] - grads_looped[name]).abs().max().item() <= 1e-10, name
    for logits, episode in zip(batched.predict_batch(episodes), episodes):
        assert (logits - looped.predict(episode)).abs().max().item() <= 1e-10


def test_vectorize_eval_batches_predictions_but_trains_task_by_task() -> None:
    learner = make_learner(acdc_tiny("net"), vectorize="eval")
    looped = copy.deepcopy(learner)
    looped.vectorize = "off"
    episodes = [make_episode(seed=s) for s in range(3)]
    vmapped = []
    real_vmapped_tasks = learner._vmapped_tasks
    learner._vmapped_tasks = lambda params, group, training: (
        vmapped.append(training) or real_vmapped_tasks(params, group, training)
    )
    grads = meta_gradients(learner, episodes)  # training: task by task
    assert vmapped == []
    for name, reference in meta_gradients(looped, episodes).items():
        assert torch.equal(grads[name], reference), name
    learner.eval()
    for logits, episode in zip(learner.predict_batch(episodes), episodes):  # evaluation: one vmap
        assert (logits - looped.eval().predict(episode)).abs().max().item() <= 1e-10
    assert vmapped == [False]


def test_unknown_vectorize_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown vectorize True; choose one of: off, eval, all"):
        make_learner(TinyNet(), vectorize=True)


@pytest.mark.parametrize("batch", [2, 3, 5])
def test_evaluation_does_not_depend_on_the_eval_batch(batch: int) -> None:
    """Issue 14, item 7: --eval-batch groups the test episodes of one vmap (a partial last group, a group of
    one that skips vmap); in float64 every episode's accuracy is the one of batch 1."""
    from fewshot.evaluation import evaluate

    learner = make_learner(acdc_tiny("net"), vectorize="all").eval()
    episodes = [make_episode(seed=20 + s) for s in range(7)]
    calls = []
    predict_batch = learner.predict_batch
    learner.predict_batch = lambda group: calls.append(len(group)) or predict_batch(group)
    one = evaluate(learner, episodes, progress=False, batch=1)
    grouped = evaluate(learner, episodes, progress=False, batch=batch)
    assert calls == [1] * 7 + [batch] * (7 // batch) + ([7 % batch] if 7 % batch else [])
    assert grouped.accuracies == one.accuracies and len(set(one.accuracies)) > 1  # not all equal by chance
    for logits, episode in zip(predict_batch(episodes[:batch]), episodes):
        assert (logits - learner.predict(episode)).abs().max().item() <= 1e-10


def test_atom_drop_under_vmap_draws_a_mask_per_task() -> None:
    from fewshot.acdc import convert

    torch.manual_seed(0)
    learner = make_learner(convert(TinyNet(channels=8), "net", atoms=4, atom_drop=0.5), vectorize="all")
    episode = make_episode(seed=11)
    torch.manual_seed(1)
    _, logits = learner.batch_loss([episode, episode])  # the same task twice in one vmap
    assert not torch.allclose(logits[0], logits[1])
    learner.eval()  # no atom-drop: the two copies agree
    _, logits = learner.batch_loss([episode, episode])
    assert torch.allclose(logits[0], logits[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("vectorize", ["off", "all"])
@pytest.mark.parametrize("first_order", [False, True])
def test_backward_batch_equals_backward_of_batch_loss(first_order: bool, vectorize: str) -> None:
    learner = make_learner(TinyNet(), first_order=first_order, vectorize=vectorize)
    episodes = [make_episode(seed=s) for s in range(3)]
    reference = meta_gradients(learner, episodes)
    expected_loss, expected_logits = learner.batch_loss(episodes)
    learner.zero_grad()
    loss, logits = learner.backward_batch(episodes)
    assert not loss.requires_grad and all(not lg.requires_grad for lg in logits)
    assert abs(loss.item() - expected_loss.item()) <= 1e-12
    assert all(torch.equal(a, b.detach()) for a, b in zip(logits, expected_logits))
    for name, p in learner.named_parameters():
        assert (p.grad - reference[name]).abs().max().item() <= 1e-12, name


@pytest.mark.parametrize("order", ["first", "second"])
def test_inner_gradients_outside_a_transform_equal_torch_func_grad_bit_for_bit(order: str) -> None:
    """Plain autograd outside torch.func (what lets ACDC sum in place): the values of torch.func.grad, and
    in second order its derivatives too; a weight the loss does not use gets zeros, as there."""
    from fewshot.learners.maml import _inner_gradient

    learner = make_learner(acdc_tiny())
    episode = make_episode(seed=4)
    weights = {**learner.model_parameters(), "unused": torch.ones(3, dtype=torch.float64, requires_grad=True)}

    def loss_of(w: dict[str, torch.Tensor]) -> torch.Tensor:
        used = {n: t for n, t in w.items() if n != "unused"}
        return F.cross_entropy(learner._forward(used, episode.support_images), episode.support_labels)

    reference = torch.func.grad(loss_of)(weights)
    if order == "first":
        with torch.no_grad():
            ours = _inner_gradient(loss_of, weights, differentiable=False)
        assert not any(g.requires_grad for g in ours.values())
    else:
        ours = _inner_gradient(loss_of, weights, differentiable=True)
        params = list(learner.model_parameters().values())
        second = torch.autograd.grad(sum(g.square().sum() for g in ours.values()), params)
        expected = torch.autograd.grad(sum(g.square().sum() for g in reference.values()), params)
        assert all(torch.equal(a, b) for a, b in zip(second, expected))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[n], reference[n]) for n in ours)
    assert torch.equal(ours["unused"], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize(("first_order", "copies"), [(True, 0), (False, 3)])
def test_first_order_inner_steps_sum_the_coefficient_gradient_without_copying_it(
    monkeypatch: pytest.MonkeyPatch, first_order: bool, copies: int
) -> None:
    """Task by task, a first-order inner step's gradient of the cut coefficients is an ordinary tensor
    that the full-size reader's product owns: summed into, not copied (second order: one copy a step)."""
    from tests.test_acdc_corners import FullSizeCopies

    monkeypatch.setattr(CoefficientCorners, "min_elements", 0)
    learner = make_learner(acdc_tiny(), first_order=first_order)
    episode = make_episode(seed=6)
    params = learner.model_parameters()
    (name,) = [n for n in params if n.endswith(".coefficients")]
    learner._forward(params, episode.support_images)  # registers every corner: the steps below cut
    with FullSizeCopies(params[name].shape) as counted:
        learner.adapt_to_support(params, episode.support_images, episode.support_labels, 3, 0.1, first_order)
    assert counted.count == copies
