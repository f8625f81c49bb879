"""MAML (Finn et al. 2017) with a functional inner loop on ``torch.func.functional_call``.

The backbone and the linear head are never copied or patched: the inner loop keeps a dictionary of
"fast" tensors and runs the model through ``functional_call``. A shared ACDC coefficient tensor is one
entry of that dictionary (``named_parameters`` lists it once and ``functional_call`` ties it), so the
inner loop adapts it as one tensor that every layer then uses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from fewshot.acdc.layer import hold_atom_masks
from fewshot.data.episode import Episode
from fewshot.learners.base import Learner, register_learner
from fewshot.modes import eval_mode

ADAPT_CHOICES = ("all", "atoms", "coefficients", "head")
BN_MODES = ("transductive", "support")
ATOM_DROP_MODES = ("step", "task", "query")
VECTORIZE_MODES = ("off", "eval", "all")


def select_adapted(names: Sequence[str], adapt: str) -> list[str]:
    """The parameter names the inner loop updates for an ``adapt`` choice.

    ``all``: every parameter; ``atoms`` / ``coefficients``: the ACDC tensors of that kind;
    ``head``: the linear head; anything else is a regular expression searched in each name.
    """
    if adapt == "all":
        chosen = list(names)
    elif adapt == "atoms":
        chosen = [n for n in names if n.endswith(".atoms")]
    elif adapt == "coefficients":
        chosen = [n for n in names if n.endswith(".coefficients")]
    elif adapt == "head":
        chosen = [n for n in names if n.startswith("head.")]
    else:
        try:
            pattern = re.compile(adapt)
        except re.error as err:
            raise ValueError(
                f"adapt={adapt!r} is neither one of {', '.join(ADAPT_CHOICES)} nor a valid regular expression ({err})"
            ) from None
        chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise ValueError(
            f"adapt={adapt!r} selects no parameter of this model; choose one of "
            f"{', '.join(ADAPT_CHOICES)} or a pattern matching names such as {names[0]!r}"
        )
    return chosen


class _CompositeBatchNorm(TorchFunctionMode):
    """Within this context, BatchNorm without running-statistics updates is computed from elementary ops.

    Two reasons: ``vmap`` of the fused batch-norm kernel gives wrong second derivatives (torch 2.14:
    meta-gradients off by ~1e-2 against ``higher``), and the fused kernel cannot differentiate through
    given statistics (``bn_mode="support"`` normalizes the query with the support set's statistics,
    which depend on the fast weights). The elementary form is exact to any order.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    use_batch = running_mean is None and running_var is None
    if training and not use_batch:  # updates running statistics: leave it to the fused kernel
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if use_batch:
        var, mean = torch.var_mean(input, [0, *range(2, input.dim())], unbiased=False, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.view(shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.view(shape)
    return input * scale + shift  # two passes over the activations


@register_learner("maml")
class MAML(Learner):
    """Model-agnostic meta-learning over any backbone, second order by default.

    Args:
        backbone: feature extractor exposing ``out_features``.
        ways: classes per episode (size of the linear head).
        inner_steps / inner_lr: SGD steps and step size on the support set during meta-training.
        test_inner_steps / test_inner_lr: the same at evaluation (``predict``).
        first_order: drop the second-order terms (FOMAML).
        adapt: what the inner loop updates (see :func:`select_adapted`).
        learn_inner_lr: learn one inner step size per adapted tensor and training step (Meta-SGD /
            MAML++). Test steps beyond ``inner_steps`` were never trained: they use the step size
            learned for the last training step.
        bn_mode: ``transductive`` (BatchNorm uses the statistics of the batch it sees, as Chen et al.)
            or ``support`` (query images are normalized with the adapted support set's statistics).
        inner_atom_drop: how ACDC atom-drop acts in meta-training: ``step`` (a new mask at every
            forward: each inner step and the query pass), ``task`` (one mask per layer and task, used
            by all of them) or ``query`` (no atom-drop on the support steps, a new mask at the query
            pass). Evaluation never drops atoms (layers in eval mode).
        vectorize: which episodes run as one batch through ``torch.func.vmap`` instead of one after
            the other (the same results up to float rounding): ``off`` (none), ``eval`` (the episodes
            predicted together, ``predict_batch``: validation and test) or ``all`` (also the tasks of
            a meta-batch in training). On a 2-core CPU ``eval`` pays for the narrow ACDC Conv4 of the
            main job (per-op overhead dominates; its training steps run faster task by task) and both
            cost for Chen et al.'s full-width ResNets (vmapped convs become grouped convs): see
            benchmarks/README.md.
    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        *,
        inner_steps: int = 5,
        inner_lr: float = 0.01,
        test_inner_steps: int = 5,
        test_inner_lr: float = 0.01,
        first_order: bool = False,
        adapt: str = "all",
        learn_inner_lr: bool = False,
        bn_mode: str = "transductive",
        vectorize: str = "off",
        inner_atom_drop: str = "step",
    ) -> None:
        super().__init__(backbone, ways)
        for flag, value in (("inner_steps", inner_steps), ("test_inner_steps", test_inner_steps)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if inner_atom_drop not in ATOM_DROP_MODES:
            raise ValueError(
                f"unknown inner_atom_drop {inner_atom_drop!r}; choose one of: {', '.join(ATOM_DROP_MODES)}"
            )
        if learn_inner_lr and inner_steps < 1:
            raise ValueError("learn_inner_lr needs inner_steps >= 1 (the step sizes are learned in training)")
        if vectorize not in VECTORIZE_MODES:
            raise ValueError(f"unknown vectorize {vectorize!r}; choose one of: {', '.join(VECTORIZE_MODES)}")
        if bn_mode not in BN_MODES:
            raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of: {', '.join(BN_MODES)}")
        features = getattr(backbone, "out_features", None)
        if not isinstance(features, int):
            raise ValueError("the backbone must expose an integer `out_features` (its feature size)")
        self.head = nn.Linear(features, ways)
        nn.init.zeros_(self.head.bias)
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.test_inner_steps = test_inner_steps
        self.test_inner_lr = test_inner_lr
        self.first_order = first_order
        self.bn_mode = bn_mode
        self.adapt = adapt
        self.vectorize = vectorize
        self.inner_atom_drop = inner_atom_drop
        self.adapted_names = select_adapted(list(self.model_parameters()), adapt)
        self._no_running_stats: dict[str, None] = {
            f"{name}.{buffer}": None
            for name, m in self.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for buffer in ("running_mean", "running_var", "num_batches_tracked")
            if getattr(m, buffer, None) is not None
        }
        self.inner_lrs: nn.ParameterDict | None = None
        if learn_inner_lr:
            self.inner_lrs = nn.ParameterDict(
                {_lr_key(n): nn.Parameter(torch.full((inner_steps,), float(inner_lr))) for n in self.adapted_names}
            )

    # ----------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Logits of the unadapted model: backbone features, then the linear head."""
        return self.head(self.backbone(images).flatten(1))

    def model_parameters(self) -> dict[str, Tensor]:
        """The backbone's and the head's parameters by name (the learned inner step sizes excluded)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("inner_lrs.")}

    def _forward(self, params: dict[str, Tensor | None], images: Tensor) -> Tensor:
        # BatchNorm running statistics are replaced by None: every forward normalizes with the
        # statistics of its own batch, in train and eval mode alike, and no buffer is updated.
        # A shared ACDC coefficient tensor is a tied Parameter: tie_weights (the default) swaps it in
        # every conv that uses it.
        return functional_call(self, {**self._no_running_stats, **params}, (images,))

    def _learned_step_sizes(self, detach: bool) -> dict[str, Tensor] | None:
        """The learned inner step sizes (None without ``learn_inner_lr``); detached for evaluation."""
        if self.inner_lrs is None:
            return None
        return {n: (lr.detach() if detach else lr) for n, lr in self.inner_lrs.items()}

    def adapt_to_support(
        self,
        params: dict[str, Tensor],
        support_images: Tensor,
        support_labels: Tensor,
        steps: int,
        lr: float,
        first_order: bool,
        learned_lrs: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Run ``steps`` SGD steps on the support loss; returns the full parameter dictionary.

        Gradients come from ``torch.func.grad`` inside a ``torch.func`` transform, so the function also runs
        under ``torch.func.vmap`` (one task per batch entry), and from plain autograd outside one, with the
        same values (:func:`_inner_gradient`). Second order by default: the result stays differentiable to
        ``params``; with ``first_order`` the inner gradients are constants (FOMAML).
        ``learned_lrs`` (keyed like ``inner_lrs``) replace ``lr`` with a step size per tensor and step;
        steps beyond the learned ones use the last learned step size.
        """
        fast = {n: params[n] for n in self.adapted_names}
        frozen = {n: t for n, t in params.items() if n not in fast}

        def support_loss(weights: dict[str, Tensor]) -> Tensor:
            logits = self._forward({**frozen, **weights}, support_images)
            return F.cross_entropy(logits, support_labels)

        if first_order:
            return {**frozen, **self._first_order_steps(support_loss, fast, steps, lr, learned_lrs)}
        for step in range(steps):
            grads = _inner_gradient(support_loss, fast, differentiable=True)
            fast = {
                n: w - (lr if learned_lrs is None else _learned_rate(learned_lrs, n, step)) * grads[n]
                for n, w in fast.items()
            }
        return {**frozen, **fast}

    @staticmethod
    def _first_order_steps(
        support_loss, fast: dict[str, Tensor], steps: int, lr: float, learned_lrs: dict[str, Tensor] | None
    ) -> dict[str, Tensor]:
        """First-order inner loop: the support passes record no graph to the meta-parameters.

        The returned weights have the values of the SGD iterates and the first-order derivatives:
        the identity to the initial weights, ``-g_t`` to the learned step size of step ``t``.
        """
        if steps == 0:
            return dict(fast)
        current = fast
        learned_terms: dict[str, list[Tensor]] = {n: [] for n in fast}
        for step in range(steps):
            with torch.no_grad():  # (the gradient is taken inside, with grad mode on)
                grads = _inner_gradient(support_loss, current, differentiable=False)
                step_sizes = {n: lr if learned_lrs is None else _learned_rate(learned_lrs, n, step) for n in current}
                current = {n: w - step_sizes[n] * grads[n] for n, w in current.items()}
            if learned_lrs is not None:
                for n, g in grads.items():
                    rate = _learned_rate(learned_lrs, n, step)
                    learned_terms[n].append((rate.detach() - rate) * g)  # value 0, derivative -g
        if not torch.is_grad_enabled():  # evaluation: no derivative is wanted
            return current
        result = {}
        for n, w in current.items():
            through = fast[n] - fast[n].detach()  # value 0, derivative 1 to the initial weights
            result[n] = w + sum(learned_terms[n], through)
        return result

    def _query_logits(self, params: dict[str, Tensor], support_images: Tensor, query_images: Tensor) -> Tensor:
        if self.bn_mode == "transductive":
            return self._forward(params, query_images)
        return self._forward_with_support_statistics(params, support_images, query_images)

    def _forward_with_support_statistics(
        self, params: dict[str, Tensor], support_images: Tensor, query_images: Tensor
    ) -> Tensor:
        """Normalize the query batch with the batch statistics each BatchNorm saw on the support set."""
        norms = {name: m for name, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        statistics: dict[str, Tensor] = {}

        def record(name: str):
            def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
                x = inputs[0].transpose(0, 1).flatten(1)
                statistics[f"{name}.running_mean"] = x.mean(1)
                statistics[f"{name}.running_var"] = x.var(1, unbiased=False)

            return hook

        handles = [m.register_forward_pre_hook(record(n)) for n, m in norms.items()]
        try:  # with gradients in training: the query's normalization depends on the fast weights
            self._forward(params, support_images)
        finally:
            for h in handles:
                h.remove()
        with eval_mode(self, only=nn.modules.batchnorm._BatchNorm), _CompositeBatchNorm():
            return self._forward({**params, **statistics}, query_images)

    # ----------------------------------------------------------------------------------------
    def _task(
        self, params: dict[str, Tensor], episode_tensors: tuple[Tensor, Tensor, Tensor], training: bool
    ) -> Tensor:
        """Query logits of one task after its inner loop (the unit that ``vmap`` batches)."""
        support_images, support_labels, query_images = episode_tensors
        if training:
            steps, lr, first_order = self.inner_steps, self.inner_lr, self.first_order
        else:
            steps, lr, first_order = self.test_inner_steps, self.test_inner_lr, True
        learned = self._learned_step_sizes(detach=not training)
        mode = self.inner_atom_drop if training else "step"  # evaluation: layers in eval mode, no drop
        with hold_atom_masks(self) if mode == "task" else nullcontext():
            with hold_atom_masks(self, drop=False) if mode == "query" else nullcontext():
                fast = self.adapt_to_support(params, support_images, support_labels, steps, lr, first_order, learned)
            return self._query_logits(fast, support_images, query_images)

    def loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Query cross-entropy after adapting to the support set; differentiable to the meta-parameters."""
        tensors = (episode.support_images, episode.support_labels, episode.query_images)
        logits = self._task(self.model_parameters(), tensors, training=True)
        return F.cross_entropy(logits, episode.query_labels), logits

    def predict(self, episode: Episode) -> Tensor:
        """Query logits after the test-time inner loop; builds no graph to the meta-parameters."""
        params = {n: p.detach() for n, p in self.model_parameters().items()}
        tensors = (episode.support_images, episode.support_labels, episode.query_images)
        with torch.no_grad():  # the inner loop still takes its gradients inside, with grad mode on
            return self._task(params, tensors, training=False)

    def batch_loss(self, episodes: Sequence[Episode]) -> tuple[Tensor, list[Tensor]]:
        """Summed query loss of a meta-batch; its tasks run through one ``vmap`` when they can."""
        if not self._can_vectorize(episodes, training=True):
            return super().batch_loss(episodes)
        params = self.model_parameters()
        logits = self._vmapped_tasks(params, episodes, training=True)
        labels = torch.stack([e.query_labels for e in episodes])
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return losses.view(len(episodes), -1).mean(1).sum(), list(logits.unbind(0))

    def backward_batch(self, episodes: Sequence[Episode]) -> tuple[Tensor, list[Tensor]]:
        """Meta-gradient of a meta-batch into ``.grad``: one ``vmap`` and one backward when the tasks are
        vectorized, else task by task (one task's graph alive at a time)."""
        if not self._can_vectorize(episodes, training=True):
            return super().backward_batch(episodes)
        loss, logits = self.batch_loss(episodes)
        loss.backward()
        return loss.detach(), [lg.detach() for lg in logits]

    def predict_batch(self, episodes: Sequence[Episode]) -> list[Tensor]:
        """``predict`` of several episodes at once (one ``vmap`` when they have the same shapes)."""
        if not self._can_vectorize(episodes, training=False):
            return super().predict_batch(episodes)
        params = {n: p.detach() for n, p in self.model_parameters().items()}
        with torch.no_grad():
            return list(self._vmapped_tasks(params, episodes, training=False).unbind(0))

    def _can_vectorize(self, episodes: Sequence[Episode], training: bool) -> bool:
        """Whether ``episodes`` go through one ``vmap``: the mode says so (``all``; ``eval`` when not
        ``training``), there are two or more, and their shapes agree."""
        wanted = self.vectorize == "all" or (self.vectorize == "eval" and not training)
        if not wanted or len(episodes) < 2:
            return False
        first = episodes[0]
        return all(
            e.support_images.shape == first.support_images.shape and e.query_images.shape == first.query_images.shape
            for e in episodes
        )

    def _vmapped_tasks(self, params: dict[str, Tensor], episodes: Sequence[Episode], training: bool) -> Tensor:
        stacked = tuple(
            torch.stack([getattr(e, f) for e in episodes]) for f in ("support_images", "support_labels", "query_images")
        )

        def task(weights: dict[str, Tensor], *tensors: Tensor) -> Tensor:
            return self._task(weights, tensors, training)

        # randomness="different": each task draws its own atom-drop masks, as in a loop. The fused
        # batch norm is exact to first order under vmap; second order needs the elementary form.
        second_order = training and not self.first_order
        with _CompositeBatchNorm() if second_order else nullcontext():
            return torch.func.vmap(task, in_dims=(None, 0, 0, 0), randomness="different")(params, *stacked)


def _inner_gradient(loss_of, weights: dict[str, Tensor], *, differentiable: bool) -> dict[str, Tensor]:
    """The gradient of ``loss_of(weights)``: differentiable to ``weights`` (second-order steps) or as
    constants with no graph to them (first-order steps).

    Inside a ``torch.func`` transform (``vmap`` of tasks) by ``torch.func.grad``; outside, the same
    values by plain autograd (on detached copies for constants), whose gradients are ordinary tensors: ACDC
    layers then sum their shared coefficients' gradient in place (``fewshot/acdc/layer.py``,
    ``_CornerProduct``), which they cannot do with ``torch.func``'s wrapped ones, and the inner loop
    leaves less behind (``benchmarks/maml_step.py``). A differentiable gradient also takes
    ``torch.func.grad`` where some weight is outside autograd (grad mode off, or not requiring grad)."""
    if torch._C._functorch.peek_interpreter_stack() is not None or (
        differentiable and not (torch.is_grad_enabled() and all(w.requires_grad for w in weights.values()))
    ):
        return torch.func.grad(loss_of)(weights)
    leaves = weights if differentiable else {n: w.detach().requires_grad_() for n, w in weights.items()}
    with torch.enable_grad():
        loss = loss_of(leaves)
    grads = torch.autograd.grad(
        loss, list(leaves.values()), create_graph=differentiable, allow_unused=True, materialize_grads=True
    )
    return dict(zip(leaves, grads))


def _learned_rate(learned_lrs: dict[str, Tensor], name: str, step: int) -> Tensor:
    """The learned step size of ``name`` at inner step ``step`` (the last learned one beyond them)."""
    rates = learned_lrs[_lr_key(name)]
    return rates[min(step, rates.shape[0] - 1)]


def _lr_key(name: str) -> str:
    # ParameterDict keys cannot contain dots.
    return name.replace(".", "-")
