"""Relation Networks (Sung et al. 2018) as evaluated by Chen et al. 2019, on feature vectors.

Chen et al. feed un-pooled feature maps to a convolutional relation module (two conv blocks
``2C -> C -> C`` with pooling, then ``fc -> 8 -> 1``). Every backbone of this toolkit returns pooled
vectors ``(N, out_features)`` (the Learner contract), so this relation module is the vector analogue:
an MLP on the concatenation ``[query, class prototype]``: ``2d -> d -> hidden -> 1`` with ReLUs
(``hidden=8`` as Chen et al.'s ``fc1``). It therefore works with any backbone, at the price of not
comparing spatial positions. Prototypes are the class means of the support features (as Chen et al.).

``loss="mse"`` (Sung et al.): relation scores are ``sigmoid(module output)`` in (0, 1) and the loss is
the mean squared error against the one-hot labels over all (query, class) pairs. ``loss="softmax"``:
the raw module outputs are logits and the loss is cross entropy. Either way the returned "logits" are
the relation scores (argmax = prediction).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.data.episode import Episode
from fewshot.learners.base import Learner, register_learner
from fewshot.learners.heads import (
    backbone_features,
    check_episode,
    class_means,
    embed_episode,
    eval_mode,
    reject_unknown_options,
)

RELATION_LOSSES = ("mse", "softmax")


class RelationModule(nn.Module):
    """MLP scoring a concatenated pair ``[query, prototype]`` (2d) with one raw relation value."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(2 * dim, dim),
            nn.ReLU(),
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, pairs: Tensor) -> Tensor:
        return self.layers(pairs).squeeze(-1)


@register_learner("relationnet")
class RelationNet(Learner):
    """Relation Networks; options:

    * ``loss`` ("mse" or "softmax", default "mse"): see the module docstring.
    * ``hidden`` (int, default 8): width of the relation MLP's last hidden layer.
    """


    def __init__(
        self, backbone: nn.Module, ways: int, *, loss: str = "mse", hidden: int = 8, **unknown
    ) -> None:
        reject_unknown_options("relationnet", unknown, RelationNet.__init__)
        super().__init__(backbone, ways)
        if loss not in RELATION_LOSSES:
            raise ValueError(
                f"relationnet option loss must be one of {', '.join(RELATION_LOSSES)}; got {loss!r}"
            )
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"relationnet option hidden must be an int >= 1, got {hidden!r}")
        self.loss_type = loss
        self.relation = RelationModule(backbone_features(backbone, "relationnet"), hidden)

    def relation_scores(
        self, support: Tensor, support_labels: Tensor, query: Tensor, ways: int
    ) -> Tensor:
        """Relation score of every (query, class) pair: (queries, ways).

        Sigmoid-squashed for ``loss="mse"``, raw logits for ``loss="softmax"``.
        """
        prototypes = class_means(support, support_labels, ways)
        n_query, dim = query.shape
        pairs = torch.cat(
            [query.unsqueeze(1).expand(n_query, ways, dim), prototypes.unsqueeze(0).expand(n_query, ways, dim)],
            dim=2,
        )
        raw = self.relation(pairs)
        return torch.sigmoid(raw) if self.loss_type == "mse" else raw

    def _scores(self, episode: Episode) -> tuple[Tensor, int]:
        ways = check_episode(episode)
        support, query = embed_episode(self.backbone, episode)
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
