"""Baseline and Baseline++ (Chen et al. 2019): supervised pretraining, then a new head per episode.

Training is NOT episodic (``training_mode = "supervised"``): the supervised loop trains
``learner.pretrain_model(num_classes)`` (the learner's own backbone + a fresh head over the base
classes; Chen et al.: Adam 1e-3, batch 16) with cross entropy. That model shares the learner's
backbone, so the learner's ``predict`` uses the pretrained weights; the pretraining head is not part
of the learner (checkpoint the returned model to resume pretraining).

At test, ``predict(episode)``:
1. freezes the backbone: support features and, separately, query features are computed once, under
   ``no_grad`` and with the backbone in eval mode (BatchNorm on running statistics, as Chen et al.
   extract features after ``model.eval()``); the backbone's previous train/eval modes are restored;
2. trains a NEW head (linear for ``baseline``, cosine for ``baseline_pp``) on the support features
   only (``fit_head``): SGD lr 0.01, momentum 0.9, dampening 0.9 (as in Chen et al.'s code),
   weight decay 1e-3, 100 epochs, batch 4, cross entropy, the support set reshuffled every epoch by
   a generator seeded with ``seed``; the head's initial weights are drawn from a forked RNG seeded
   with ``seed`` (the global RNG is untouched), so ``predict`` is reproducible;
3. returns the head's logits on the query features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.data.episode import Episode
from fewshot.learners.base import Learner, register_learner
from fewshot.learners.heads import (
    CosineClassifier,
    backbone_features,
    check_episode,
    embed,
    reject_unknown_options,
)
from fewshot.modes import eval_mode


class PretrainModel(nn.Module):
    """Backbone followed by a classification head; ``forward(images)`` gives class logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))


def _check_positive(learner: str, name: str, value: float, integer: bool = False, zero_ok: bool = False) -> None:
    ok_type = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    ok_value = ok_type and (value >= 0 if zero_ok else value > 0)
    if not ok_value:
        kind = "an int" if integer else "a number"
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{learner} option {name} must be {kind} {bound}, got {value!r}")


class _FinetuneLearner(Learner):
    """Shared code of Baseline and Baseline++ (subclasses define ``make_head``)."""

    training_mode = "supervised"

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        *,
        head_epochs: int = 100,
        head_batch_size: int = 4,
        head_lr: float = 0.01,
        head_momentum: float = 0.9,
        head_dampening: float = 0.9,
        head_weight_decay: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, ways)
        name = self.name
        _check_positive(name, "head_epochs", head_epochs, integer=True)
        _check_positive(name, "head_batch_size", head_batch_size, integer=True)
        _check_positive(name, "head_lr", head_lr)
        _check_positive(name, "head_weight_decay", head_weight_decay, zero_ok=True)
        for option, value in (("head_momentum", head_momentum), ("head_dampening", head_dampening)):
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} option {option} must be a number in [0, 1), got {value!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"{name} option seed must be an int, got {seed!r}")
        self.feature_dim = backbone_features(backbone, name)
        self.head_epochs = head_epochs
        self.head_batch_size = head_batch_size
        self.head_lr = float(head_lr)
        self.head_momentum = float(head_momentum)
        self.head_dampening = float(head_dampening)
        self.head_weight_decay = float(head_weight_decay)
        self.seed = seed

    def make_head(self, num_classes: int) -> nn.Module:
        """A fresh classifier over ``num_classes`` on top of the backbone features."""
        raise NotImplementedError

    def pretrain_model(self, num_classes: int) -> PretrainModel:
        """The learner's backbone + a new head over ``num_classes`` base classes, for supervised pretraining."""
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"pretrain_model needs num_classes >= 2, got {num_classes!r}")
        return PretrainModel(self.backbone, self.make_head(num_classes))

    def loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        raise RuntimeError(
            f"learner {self.name!r} trains by supervised pretraining on the base classes, not on "
            f"episodes (training_mode == 'supervised'): train learner.pretrain_model(num_classes) "
            f"with the supervised loop, then evaluate with learner.predict(episode)"
        )

    def _frozen_features(self, images: Tensor) -> Tensor:
        with eval_mode(self.backbone), torch.no_grad():
            return embed(self.backbone, images)

    def fit_head(self, support: Tensor, support_labels: Tensor, ways: int) -> nn.Module:
        """Train a new ``ways``-class head on the (frozen) support features only; returns it."""
        generator = torch.Generator().manual_seed(self.seed)
        # inference_mode(False) + clone: works even when predict is called under torch.inference_mode.
        with torch.inference_mode(False), torch.enable_grad():
            features = support.detach().clone()
            labels = support_labels.clone()
            with torch.random.fork_rng(devices=[]):  # seeded init, global RNG left untouched
                torch.manual_seed(self.seed)
                head = self.make_head(ways)
            head = head.to(device=features.device, dtype=features.dtype)
            optimizer = torch.optim.SGD(
                head.parameters(),
                lr=self.head_lr,
                momentum=self.head_momentum,
                dampening=self.head_dampening,
                weight_decay=self.head_weight_decay,
            )
            n = features.shape[0]
            for _ in range(self.head_epochs):
                order = torch.randperm(n, generator=generator).to(features.device)
                for start in range(0, n, self.head_batch_size):
                    batch = order[start : start + self.head_batch_size]
                    optimizer.zero_grad()
                    F.cross_entropy(head(features[batch]), labels[batch]).backward()
                    optimizer.step()
        return head

    def predict(self, episode: Episode) -> Tensor:
        ways = check_episode(episode)
        support = self._frozen_features(episode.support_images)
        head = self.fit_head(support, episode.support_labels, ways)
        query = self._frozen_features(episode.query_images)
        with torch.no_grad():
            return head(query)


@register_learner("baseline")
class Baseline(_FinetuneLearner):
    """Baseline: linear head (zero bias when pretraining, as Chen et al.). Options: the ``head_*``
    fine-tuning hyper-parameters and ``seed`` (see the module docstring)."""

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        *,
        head_epochs: int = 100,
        head_batch_size: int = 4,
        head_lr: float = 0.01,
        head_momentum: float = 0.9,
        head_dampening: float = 0.9,
        head_weight_decay: float = 1e-3,
        seed: int = 0,
        **unknown,
    ) -> None:
        reject_unknown_options("baseline", unknown, Baseline.__init__)
        super().__init__(
            backbone,
            ways,
            head_epochs=head_epochs,
            head_batch_size=head_batch_size,
            head_lr=head_lr,
            head_momentum=head_momentum,
            head_dampening=head_dampening,
            head_weight_decay=head_weight_decay,
            seed=seed,
        )

    def make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.feature_dim, num_classes)

    def pretrain_model(self, num_classes: int) -> PretrainModel:
        model = super().pretrain_model(num_classes)
        nn.init.zeros_(model.head.bias)
        return model


@register_learner("baseline_pp")
class BaselinePP(_FinetuneLearner):
    """Baseline++: cosine head (:class:`CosineClassifier`). Options: the ``head_*`` fine-tuning
    hyper-parameters, ``seed``, ``scale`` (None = Chen et al.'s 2 for <= 200 classes, else 10; used
    for both the pretraining head and the test heads) and ``learnable_norm`` (default True: per-class
    weight-norm gains as in Chen et al.'s code; False: plain cosine, ``|logit| <= scale``)."""

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        *,
        scale: float | None = None,
        learnable_norm: bool = True,
        head_epochs: int = 100,
        head_batch_size: int = 4,
        head_lr: float = 0.01,
        head_momentum: float = 0.9,
        head_dampening: float = 0.9,
        head_weight_decay: float = 1e-3,
        seed: int = 0,
        **unknown,
    ) -> None:
        reject_unknown_options("baseline_pp", unknown, BaselinePP.__init__)
        super().__init__(
            backbone,
            ways,
            head_epochs=head_epochs,
            head_batch_size=head_batch_size,
            head_lr=head_lr,
            head_momentum=head_momentum,
            head_dampening=head_dampening,
            head_weight_decay=head_weight_decay,
            seed=seed,
        )
        if scale is not None and (not isinstance(scale, (int, float)) or not scale > 0):
            raise ValueError(f"baseline_pp option scale must be None or a number > 0, got {scale!r}")
        if not isinstance(learnable_norm, bool):
            raise ValueError(f"baseline_pp option learnable_norm must be True or False, got {learnable_norm!r}")
        self.scale = scale
        self.learnable_norm = learnable_norm

    def make_head(self, num_classes: int) -> nn.Module:
        return CosineClassifier(self.feature_dim, num_classes, scale=self.scale, learnable_norm=self.learnable_norm)
