"""Pieces shared by the baseline learners of Chen et al. 2019.

* ``CosineClassifier``: the Baseline++ head (cosine similarity times a scale, with optional
  weight-normalised per-class gains as in Chen et al.'s code).
* ``embed_episode`` / ``check_episode`` / ``class_means``: per-episode feature extraction and the
  class prototypes of ProtoNet (RelationNet compares feature maps instead: relationnet.py).
* ``eval_mode`` (from ``fewshot.modes``): Chen et al. evaluate every learner but MAML on features computed
  after ``model.eval()`` (BatchNorm on running statistics), so ``predict`` of these learners runs inside it.
* ``reject_unknown_options``: the uniform error for misspelt learner options.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from fewshot.data.episode import Episode

# Chen et al. (CloserLookFewShot, ``backbone.distLinear``): scale 2 for heads with at most 200
# classes (miniImageNet's 64 base classes, CUB's 100, every 5-way test head) and 10 above (Omniglot's
# >1000 classes, where a scale of 2 cannot make the softmax confident).
COSINE_SCALE_SMALL = 2.0
COSINE_SCALE_LARGE = 10.0
COSINE_SCALE_CLASS_LIMIT = 200


def default_cosine_scale(num_classes: int) -> float:
    """Chen et al.'s cosine-head scale: 2 for at most 200 classes, 10 above."""
    return COSINE_SCALE_SMALL if num_classes <= COSINE_SCALE_CLASS_LIMIT else COSINE_SCALE_LARGE


class CosineClassifier(nn.Module):
    """Logits ``scale * g_c * cos(x, w_c)`` (Baseline++).

    With ``learnable_norm=True`` (Chen et al.'s code, ``WeightNorm`` on the class weights) each class
    has a learnable gain ``g_c`` (initialised to the norm of its initial weight row), so logits are
    bounded by ``scale * |g_c|``; with ``learnable_norm=False`` the weights are plainly normalised and
    ``|logit| <= scale``. ``scale=None`` picks :func:`default_cosine_scale`.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        scale: float | None = None,
        learnable_norm: bool = True,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(
                f"CosineClassifier needs in_features >= 1 and num_classes >= 1, "
                f"got in_features={in_features}, num_classes={num_classes}"
            )
        scale = default_cosine_scale(num_classes) if scale is None else float(scale)
        if not scale > 0:
            raise ValueError(f"cosine scale must be > 0, got {scale}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.scale = scale
        self.learnable_norm = learnable_norm
        self.eps = eps
        linear = nn.Linear(in_features, num_classes, bias=False)
        self.linear = weight_norm(linear, name="weight", dim=0) if learnable_norm else linear

    def forward(self, x: Tensor) -> Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        weight = self.linear.weight
        if not self.learnable_norm:
            weight = weight / (weight.norm(dim=1, keepdim=True) + self.eps)
        return self.scale * F.linear(x, weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"scale={self.scale}, learnable_norm={self.learnable_norm}"
        )


def reject_unknown_options(learner: str, unknown: dict[str, Any], init: Any) -> None:
    """Raise ``TypeError`` naming the unknown options of ``learner`` and listing the valid ones.

    ``init`` is the learner's ``__init__``; its keyword-only parameters are the valid options.
    """
    if not unknown:
        return
    valid = [p.name for p in inspect.signature(init).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    valid_text = ", ".join(valid) if valid else "(none)"
    raise TypeError(
        f"unknown option(s) for learner {learner!r}: {', '.join(sorted(unknown))}; valid options: {valid_text}"
    )


def check_episode(episode: Episode) -> int:
    """Validate an episode's labels and sizes; returns its number of ways.

    Metric learners work with any number of ways, so the episode's (not the constructor's) is used.
    """
    ways = episode.ways
    if ways < 2:
        raise ValueError(f"an episode needs at least 2 ways, got {ways}")
    for part in ("support", "query"):
        images = getattr(episode, f"{part}_images")
        labels = getattr(episode, f"{part}_labels")
        if labels.dim() != 1 or labels.numel() != images.shape[0]:
            raise ValueError(
                f"{part}_labels must have shape ({images.shape[0]},) to match {part}_images, got {tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= ways):
            raise ValueError(
                f"{part}_labels must lie in 0..{ways - 1} for a {ways}-way episode, "
                f"got values {int(labels.min())}..{int(labels.max())}"
            )
    counts = torch.bincount(episode.support_labels, minlength=ways)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"every class needs a support example; classes {missing} have none")
    return ways


def _check_features(features: Tensor, images: Tensor) -> Tensor:
    if features.dim() != 2 or features.shape[0] != images.shape[0]:
        raise ValueError(
            f"the backbone must return feature vectors of shape (N, out_features); for {images.shape[0]} "
            f"images it returned shape {tuple(features.shape)}"
        )
    return features


def embed_episode(backbone: nn.Module, episode: Episode) -> tuple[Tensor, Tensor]:
    """Support and query features from ONE backbone pass over support+query (as Chen et al.).

    In train mode BatchNorm therefore uses the statistics of the whole episode.
    """
    n_support = episode.support_images.shape[0]
    images = torch.cat([episode.support_images, episode.query_images])
    features = _check_features(backbone(images), images)
    return features[:n_support], features[n_support:]


def embed(backbone: nn.Module, images: Tensor) -> Tensor:
    """Backbone features of ``images``, checked to be (N, out_features) vectors."""
    return _check_features(backbone(images), images)


def class_means(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Per-class mean of ``features`` (N, d) for labels in 0..ways-1: shape (ways, d)."""
    one_hot = F.one_hot(labels, ways).to(features.dtype)  # (N, ways)
    return (one_hot.t() @ features) / one_hot.sum(0).unsqueeze(1)


def backbone_features(backbone: nn.Module, learner: str) -> int:
    """The backbone's ``out_features``, with a clear error when it has none."""
    dim = getattr(backbone, "out_features", None)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(
            f"learner {learner!r} needs a backbone exposing a positive int `out_features`; "
            f"{type(backbone).__name__} has out_features={dim!r}"
        )
    return dim
