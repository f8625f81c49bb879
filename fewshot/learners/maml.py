"""MAML (Finn et al. 2017) with a functional inner loop on ``torch.func.functional_call``.

The backbone and the linear head are never copied or patched: the inner loop keeps a dictionary of
"fast" tensors and runs the model through ``functional_call``. A shared ACDC coefficient tensor is one
entry of that dictionary (``named_parameters`` lists it once and ``functional_call`` ties it), so the
inner loop adapts it as one tensor that every layer then uses.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fewshot.data.episode import Episode
from fewshot.learners.base import Learner, register_learner

ADAPT_CHOICES = ("all", "atoms", "coefficients", "head")
BN_MODES = ("transductive", "support")


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
                f"adapt={adapt!r} is neither one of {', '.join(ADAPT_CHOICES)} nor a valid "
                f"regular expression ({err})"
            ) from None
        chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise ValueError(
            f"adapt={adapt!r} selects no parameter of this model; choose one of "
            f"{', '.join(ADAPT_CHOICES)} or a pattern matching names such as {names[0]!r}"
        )
    return chosen


@contextmanager
def _batchnorm_in_eval(model: nn.Module) -> Iterator[None]:
    """Temporarily put every BatchNorm layer (only those) in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    try:
        for m in norms:
            m.training = False
        yield
    finally:
        for m, mode in zip(norms, modes):
            m.training = mode


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
        learn_inner_lr: learn one inner step size per adapted tensor and step (Meta-SGD / MAML++).
        bn_mode: ``transductive`` (BatchNorm uses the statistics of the batch it sees, as Chen et al.)
            or ``support`` (query images are normalized with the adapted support set's statistics).
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
    ) -> None:
        super().__init__(backbone, ways)
        for flag, value in (("inner_steps", inner_steps), ("test_inner_steps", test_inner_steps)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
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
            steps = max(inner_steps, test_inner_steps)
            self.inner_lrs = nn.ParameterDict(
                {
                    _lr_key(n): nn.Parameter(torch.full((steps,), float(inner_lr)))
                    for n in self.adapted_names
                }
            )

    # ----------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Logits of the unadapted model: backbone features, then the linear head."""
        return self.head(self.backbone(images).flatten(1))

    def model_parameters(self) -> dict[str, Tensor]:
        """The backbone's and the head's parameters by name (the learned inner step sizes excluded)."""
        return {
            n: p for n, p in self.named_parameters() if not n.startswith("inner_lrs.")
        }

    def _forward(self, params: dict[str, Tensor | None], images: Tensor) -> Tensor:
        # BatchNorm running statistics are replaced by None: every forward normalizes with the
        # statistics of its own batch, in train and eval mode alike, and no buffer is updated.
        # tie_weights=False: a shared ACDC coefficient module is registered under every conv that uses
        # it; swapping it once (under its first name) reaches them all, whereas torch's tie_weights=True
        # swaps it under each name and fails to restore the original Parameter afterwards.
        return functional_call(self, {**self._no_running_stats, **params}, (images,), tie_weights=False)

    def _step_size(self, name: str, step: int, default: float) -> Tensor | float:
        if self.inner_lrs is None:
            return default
        return self.inner_lrs[_lr_key(name)][step]

    def adapt_to_support(
        self,
        params: dict[str, Tensor],
        support_images: Tensor,
        support_labels: Tensor,
        steps: int,
        lr: float,
        create_graph: bool,
    ) -> dict[str, Tensor]:
        """Run ``steps`` SGD steps on the support loss; returns the full parameter dictionary.

        ``create_graph=True`` keeps the graph of every step (second-order meta-gradient); with
        ``False`` the inner gradients are constants (first order, or evaluation).
        """
        params = dict(params)
        for step in range(steps):
            logits = self._forward(params, support_images)
            loss = F.cross_entropy(logits, support_labels)
            adapted = [params[n] for n in self.adapted_names]
            grads = torch.autograd.grad(loss, adapted, create_graph=create_graph)
            for name, weight, grad in zip(self.adapted_names, adapted, grads):
                params[name] = weight - self._step_size(name, step, lr) * grad
        return params

    def _query_logits(
        self, params: dict[str, Tensor], support_images: Tensor, query_images: Tensor
    ) -> Tensor:
        if self.bn_mode == "transductive":
            return self._forward(params, query_images)
        return self._forward_with_support_statistics(params, support_images, query_images)

    def _forward_with_support_statistics(
        self, params: dict[str, Tensor], support_images: Tensor, query_images: Tensor
    ) -> Tensor:
        """Normalize the query batch with the batch statistics each BatchNorm saw on the support set."""
        norms = {
            name: m
            for name, m in self.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }
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
        with _batchnorm_in_eval(self):
            return self._forward({**params, **statistics}, query_images)

    # ----------------------------------------------------------------------------------------
    def loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Query cross-entropy after adapting to the support set; differentiable to the meta-parameters."""
        params = self.model_parameters()
        fast = self.adapt_to_support(
            params,
            episode.support_images,
            episode.support_labels,
            self.inner_steps,
            self.inner_lr,
            create_graph=not self.first_order,
        )
        logits = self._query_logits(fast, episode.support_images, episode.query_images)
        return F.cross_entropy(logits, episode.query_labels), logits

    def predict(self, episode: Episode) -> Tensor:
        """Query logits after the test-time inner loop; builds no graph to the meta-parameters."""
        params = {n: p.detach() for n, p in self.model_parameters().items()}
        for name in self.adapted_names:
            params[name] = params[name].requires_grad_()
        with torch.enable_grad():
            fast = self.adapt_to_support(
                params,
                episode.support_images,
                episode.support_labels,
                self.test_inner_steps,
                self.test_inner_lr,
                create_graph=False,
            )
        with torch.no_grad():
            fast = {n: t.detach() for n, t in fast.items()}
            return self._query_logits(fast, episode.support_images, episode.query_images)


def _lr_key(name: str) -> str:
    # ParameterDict keys cannot contain dots.
    return name.replace(".", "-")
