"""Relation Networks (Sung et al. 2018) as evaluated by Chen et al. 2019: a learned comparison of feature MAPS.

The backbone's last feature map (``Backbone.forward_map``: ``C x H x W``, not pooled or flattened) of every
image is computed in one pass over support + query. The support maps of each class are combined into one
class map (``class_map="mean"``, the default, as Chen et al.'s code; ``"sum"`` as Sung et al.'s code).
Every (class map, query map) pair is concatenated along channels (``2C x H x W``) and scored by the
relation module (:class:`RelationModule`): two conv blocks ``2C -> C -> C`` [conv3x3, BatchNorm, ReLU,
max-pool 2], flatten, ``fc -> hidden`` (8), ReLU, ``fc -> 1``.

``loss="mse"`` (Sung et al., Chen et al.'s default): relation scores are ``sigmoid(module output)`` in
(0, 1) and the loss is the mean squared error against the one-hot labels over all (query, class) pairs.
``loss="softmax"``: the raw module outputs are logits and the loss is cross entropy. Either way the
returned "logits" are the relation scores (argmax = prediction).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.backbones.base import init_weights
from fewshot.data.episode import Episode
from fewshot.learners.base import Learner, register_learner
from fewshot.learners.heads import check_episode, reject_unknown_options
from fewshot.modes import eval_mode

RELATION_LOSSES = ("mse", "softmax")
CLASS_MAPS = ("sum", "mean")
# Chen et al.'s rule: maps smaller than this (ResNet 7x7, Conv4 5x5) get padding 1 in the relation convs.
PAD_BELOW = 10
RELATION_BLOCKS = 2


class BlockPlan(NamedTuple):
    """One relation conv block: its conv padding, whether it max-pools, and its output map size."""

    padding: int
    pool: bool
    out_size: tuple[int, int]


def plan_relation_blocks(height: int, width: int) -> list[BlockPlan]:
    """Padding and pooling of the relation conv blocks for an ``height x width`` input map.

    The rule (valid for any map size, nothing shrinks below 1x1):

    * padding 1 in every block if the map is smaller than 10 on a side (Chen et al.'s rule for the
      7x7 ResNet and 5x5 Conv4 maps), else padding 0 (a 3x3 conv then takes 2 off each side);
    * a block max-pools (2x2, floor) only if its conv output is at least 2x2; smaller maps pass unpooled.

    E.g. 1x1 -> 1x1 -> 1x1 (no pooling), 3x3 -> 1x1 -> 1x1, 4x4 -> 2x2 -> 1x1, 5x5 -> 2x2 -> 1x1,
    7x7 -> 3x3 -> 1x1, 11x11 -> 4x4 -> 1x1, 19x19 -> 8x8 -> 3x3.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"relation module: the feature map {name} must be an int >= 1, got {value!r}")
    padding = 1 if min(height, width) < PAD_BELOW else 0
    plans = []
    size = (height, width)
    for _ in range(RELATION_BLOCKS):
        size = (size[0] + 2 * padding - 2, size[1] + 2 * padding - 2)
        pool = min(size) >= 2
        if pool:
            size = (size[0] // 2, size[1] // 2)
        plans.append(BlockPlan(padding, pool, size))
    return plans


class RelationModule(nn.Module):
    """Scores ``(pairs, 2C, H, W)`` concatenated map pairs with one raw relation value each: ``(pairs,)``.

    Two blocks [conv3x3 (``2C -> C``, then ``C -> C``), BatchNorm, ReLU, optional max-pool 2] laid out by
    :func:`plan_relation_blocks` for the ``H x W`` map, then flatten, ``fc -> hidden``, ReLU, ``fc -> 1``.
    The fc input size is ``C * h * w`` with ``h x w`` the plan's final map size.
    """

    def __init__(self, map_shape: tuple[int, int, int], hidden: int = 8) -> None:
        super().__init__()
        channels, height, width = map_shape
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"relation module: the feature map channels must be an int >= 1, got {channels!r}")
        self.map_shape = (channels, height, width)
        self.plan = plan_relation_blocks(height, width)
        blocks = []
        c_in = 2 * channels
        for step in self.plan:
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, channels, 3, padding=step.padding, bias=False),  # BatchNorm follows
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            if step.pool:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            c_in = channels
        self.blocks = nn.Sequential(*blocks)
        out_h, out_w = self.plan[-1].out_size
        self.fc1 = nn.Linear(channels * out_h * out_w, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        init_weights(self.blocks)

    def forward(self, pairs: Tensor) -> Tensor:
        expected = (2 * self.map_shape[0], *self.map_shape[1:])
        if pairs.dim() != 4 or tuple(pairs.shape[1:]) != expected:
            raise ValueError(
                f"the relation module takes map pairs of shape (pairs, {expected[0]}, {expected[1]}, "
                f"{expected[2]}); got {tuple(pairs.shape)}"
            )
        out = self.blocks(pairs).flatten(1)
        return self.fc2(F.relu(self.fc1(out))).squeeze(1)


def class_maps(maps: Tensor, labels: Tensor, ways: int, reduce: str = "sum") -> Tensor:
    """Per-class sum (or mean) of the support ``maps`` (N, C, H, W): shape (ways, C, H, W)."""
    if reduce not in CLASS_MAPS:
        raise ValueError(f"class maps reduce must be one of {', '.join(CLASS_MAPS)}; got {reduce!r}")
    one_hot = F.one_hot(labels, ways).to(maps.dtype)  # (N, ways)
    summed = torch.einsum("nk,nchw->kchw", one_hot, maps)
    if reduce == "mean":
        summed = summed / one_hot.sum(0).view(ways, 1, 1, 1)
    return summed


def pair_maps(class_map: Tensor, query: Tensor) -> Tensor:
    """Every (query, class) pair ``[class map, query map]`` along channels: (queries * ways, 2C, H, W),
    query-major (row ``q * ways + k`` pairs query ``q`` with class ``k``)."""
    ways, n_query = class_map.shape[0], query.shape[0]
    shape = (n_query, ways, *query.shape[1:])
    pairs = torch.cat([class_map.unsqueeze(0).expand(shape), query.unsqueeze(1).expand(shape)], dim=2)
    return pairs.reshape(n_query * ways, *pairs.shape[2:])


def backbone_map_shape(backbone: nn.Module, image_size: int | None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the backbone's ``forward_map`` at ``image_size`` (default: the backbone's own
    ``image_size``, e.g. Conv4's), with clear errors for backbones without feature maps."""
    if not callable(getattr(backbone, "forward_map", None)) or not callable(
        getattr(backbone, "feature_map_shape", None)
    ):
        raise ValueError(
            f"learner 'relationnet' scores feature maps: the backbone needs forward_map(x) and "
            f"feature_map_shape(image_size); {type(backbone).__name__} has not both"
        )
    if image_size is None:
        image_size = getattr(backbone, "image_size", None)
        if image_size is None:
            raise ValueError(
                f"relationnet option image_size is needed to size the relation module for "
                f"{type(backbone).__name__} (its feature map depends on the input size)"
            )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"relationnet option image_size must be an int >= 1, got {image_size!r}")
    try:
        return tuple(backbone.feature_map_shape(image_size))  # type: ignore[return-value]
    except NotImplementedError as err:
        raise ValueError(f"learner 'relationnet' scores feature maps: {err}") from None


@register_learner("relationnet")
class RelationNet(Learner):
    """Relation Networks on feature maps; options:

    * ``loss`` ("mse" or "softmax", default "mse"): see the module docstring.
    * ``hidden`` (int, default 8): width of the relation module's hidden fc layer.
    * ``image_size`` (int, default: the backbone's ``image_size`` attribute): the input size, which
      fixes the backbone's feature-map size and so the relation module's layout.
    * ``class_map`` ("mean" or "sum", default "mean" as Chen et al.): how a class's support maps are combined.
    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        *,
        loss: str = "mse",
        hidden: int = 8,
        image_size: int | None = None,
        class_map: str = "mean",
        **unknown,
    ) -> None:
        reject_unknown_options("relationnet", unknown, RelationNet.__init__)
        super().__init__(backbone, ways)
        if loss not in RELATION_LOSSES:
            raise ValueError(f"relationnet option loss must be one of {', '.join(RELATION_LOSSES)}; got {loss!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"relationnet option hidden must be an int >= 1, got {hidden!r}")
        if class_map not in CLASS_MAPS:
            raise ValueError(f"relationnet option class_map must be one of {', '.join(CLASS_MAPS)}; got {class_map!r}")
        self.loss_type = loss
        self.class_map = class_map
        self.map_shape = backbone_map_shape(backbone, image_size)
        self.relation = RelationModule(self.map_shape, hidden)

    def embed_maps(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Support and query feature maps from ONE backbone pass (train-mode BatchNorm sees the episode)."""
        n_support = episode.support_images.shape[0]
        images = torch.cat([episode.support_images, episode.query_images])
        maps = self.backbone.forward_map(images)
        if maps.dim() != 4 or tuple(maps.shape[1:]) != self.map_shape or maps.shape[0] != images.shape[0]:
            raise ValueError(
                f"relationnet was built for feature maps of shape (N, {', '.join(map(str, self.map_shape))}); "
                f"for {images.shape[0]} images of {tuple(images.shape[1:])} the backbone returned "
                f"{tuple(maps.shape)} (wrong image_size?)"
            )
        return maps[:n_support], maps[n_support:]

    def relation_scores(self, support: Tensor, support_labels: Tensor, query: Tensor, ways: int) -> Tensor:
        """Relation score of every (query, class) pair from the maps: (queries, ways).

        Sigmoid-squashed for ``loss="mse"``, raw logits for ``loss="softmax"``.
        """
        pairs = pair_maps(class_maps(support, support_labels, ways, self.class_map), query)
        raw = self.relation(pairs).view(query.shape[0], ways)
        return torch.sigmoid(raw) if self.loss_type == "mse" else raw

    def _scores(self, episode: Episode) -> tuple[Tensor, int]:
        ways = check_episode(episode)
        support, query = self.embed_maps(episode)
        return self.relation_scores(support, episode.support_labels, query, ways), ways

    def loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        scores, ways = self._scores(episode)
        if self.loss_type == "mse":
            target = F.one_hot(episode.query_labels, ways).to(scores.dtype)
            return F.mse_loss(scores, target), scores
        return F.cross_entropy(scores, episode.query_labels), scores

    @torch.no_grad()
    def predict(self, episode: Episode) -> Tensor:
        """Query scores with the whole learner in eval mode (Chen et al.), modes restored after."""
        with eval_mode(self):
            return self._scores(episode)[0]
