"""Prototypical Networks (Snell et al. 2017) as evaluated by Chen et al. 2019."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.data.episode import Episode
from fewshot.learners.base import Learner, register_learner
from fewshot.learners.heads import check_episode, class_means, embed_episode, reject_unknown_options
from fewshot.modes import eval_mode


def prototype_logits(support: Tensor, support_labels: Tensor, query: Tensor, ways: int) -> Tensor:
    """Negative squared Euclidean distance from each query to each class mean: (queries, ways)."""
    prototypes = class_means(support, support_labels, ways)
    return -(query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(dim=2)


@register_learner("protonet")
class ProtoNet(Learner):
    """logits = -||f(query) - mean_k f(support_k)||^2; trained episodically with cross entropy.

    Takes no options. Works with episodes of any number of ways.
    """

    def __init__(self, backbone: nn.Module, ways: int, **unknown) -> None:
        reject_unknown_options("protonet", unknown, ProtoNet.__init__)
        super().__init__(backbone, ways)

    def _logits(self, episode: Episode) -> Tensor:
        ways = check_episode(episode)
        support, query = embed_episode(self.backbone, episode)
        return prototype_logits(support, episode.support_labels, query, ways)

    def loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        logits = self._logits(episode)
        return F.cross_entropy(logits, episode.query_labels), logits

    @torch.no_grad()
    def predict(self, episode: Episode) -> Tensor:
        """Query logits with the whole learner in eval mode (Chen et al.), modes restored after."""
        with eval_mode(self):
            return self._logits(episode)
