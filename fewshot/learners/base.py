"""The one interface every few-shot learner implements, and the registry of learners by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fewshot.data.episode import Episode

_LEARNERS: dict[str, type[Learner]] = {}


class Learner(nn.Module):
    """A few-shot learner wrapping a feature backbone.

    Subclasses implement ``loss`` (training on one episode) and ``predict`` (query logits at test).
    ``backward_batch`` is what the episodic training loop calls on a meta-batch (by default: each
    episode's loss, backpropagated in turn); ``batch_loss`` gives the summed loss as one differentiable
    tensor. Learners that can batch tasks override both.
    """

    name: str = ""
    #: "episodic" learners train on meta-batches of episodes; "supervised" ones pretrain on base classes.
    training_mode: str = "episodic"

    def __init__(self, backbone: nn.Module, ways: int) -> None:
        super().__init__()
        if ways < 2:
            raise ValueError(f"ways must be >= 2, got {ways}")
        self.backbone = backbone
        self.ways = ways

    def loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Query loss (differentiable w.r.t. the learner's parameters) and query logits."""
        raise NotImplementedError

    def predict(self, episode: Episode) -> Tensor:
        """Query logits, shape (ways*queries, ways)."""
        raise NotImplementedError

    def predict_batch(self, episodes: Sequence[Episode]) -> list[Tensor]:
        """Query logits of several episodes (learners that can batch episodes override this)."""
        return [self.predict(e) for e in episodes]

    def batch_loss(self, episodes: Sequence[Episode]) -> tuple[Tensor, list[Tensor]]:
        """Summed query loss over a meta-batch and each episode's query logits."""
        losses, logits = zip(*(self.loss(e) for e in episodes))
        return torch.stack(list(losses)).sum(), list(logits)

    def backward_batch(self, episodes: Sequence[Episode]) -> tuple[Tensor, list[Tensor]]:
        """Add the gradient of the meta-batch's summed query loss to the parameters' ``.grad``.

        The same gradients as ``batch_loss(episodes)[0].backward()``, but one episode at a time, so only
        one episode's graph is alive at once (the training loop's memory peak is one task's, not the
        meta-batch's). Returns the summed loss and the query logits, detached.
        """
        total: Tensor | None = None
        outputs: list[Tensor] = []
        for episode in episodes:
            loss, logits = self.loss(episode)
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
            outputs.append(logits.detach())
        if total is None:
            raise ValueError("backward_batch needs at least one episode")
        return total, outputs


def register_learner(name: str) -> Callable[[type[Learner]], type[Learner]]:
    """Class decorator adding a learner to the registry under ``name``."""

    def add(cls: type[Learner]) -> type[Learner]:
        if name in _LEARNERS:
            raise ValueError(f"learner {name!r} is registered twice")
        cls.name = name
        _LEARNERS[name] = cls
        return cls

    return add


def list_learners() -> list[str]:
    """Names of the registered learners, sorted."""
    return sorted(_LEARNERS)


def learner_class(name: str) -> type[Learner]:
    """The class registered as ``name`` (its ``training_mode`` says how it is trained)."""
    if name not in _LEARNERS:
        raise ValueError(f"unknown learner {name!r}; choose one of: {', '.join(list_learners())}")
    return _LEARNERS[name]


def create_learner(name: str, backbone: nn.Module, ways: int, **options) -> Learner:
    """Build the learner registered as ``name`` around ``backbone``."""
    return learner_class(name)(backbone, ways, **options)
