"""Matching Networks (Vinyals et al. 2016) with full-context embeddings, as in Chen et al. 2019.

* Support FCE: a bidirectional LSTM runs over the support features (in episode order);
  ``g_i = s_i + h_fwd_i + h_bwd_i``.
* Query FCE: an attention LSTM (an ``LSTMCell``) run for ``fce_steps`` processing steps over the
  support set: ``h_0 = f, c_0 = 0``; each step reads ``r = softmax(h g^T) g`` and updates
  ``h, c = LSTMCell([f, r], (h, c)); h = h + f``. Chen et al. use as many steps as support examples,
  which is the default (``fce_steps=None``).
* Attention: ``a = softmax(scale * relu(cos(F_q, g_i)))`` over the support set (Chen et al.'s
  ``scale=100`` sharpening of Vinyals et al.'s cosine softmax, negative cosines clamped to 0).
* Class probabilities ``p_c = sum_i a_i [y_i = c]``; loss = NLL of ``log p``.

Choice on ``log p``: Chen et al. compute ``log(p + 1e-6)``, which caps each query's loss at about
13.8 and zeroes its gradient once ``p`` underflows. Here ``log p_c`` is computed exactly and stably
as ``logsumexp_{i: y_i = c} s_i - logsumexp_i s_i`` (``s`` the attention scores), which equals the
log of the attention-weighted one-hot labels without an epsilon. The returned logits are ``log p``
(``softmax(logits) == p``).
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
    embed_episode,
    reject_unknown_options,
)
from fewshot.modes import eval_mode


class SupportEncoder(nn.Module):
    """Bidirectional LSTM over the support sequence with a residual: ``g = s + fwd + bwd``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)

    def forward(self, support: Tensor) -> Tensor:
        out, _ = self.lstm(support.unsqueeze(0))
        out = out.squeeze(0)
        return support + out[:, : self.dim] + out[:, self.dim :]


class QueryEncoder(nn.Module):
    """Attention LSTM: ``steps`` read-and-update steps of each query over the encoded support set."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(2 * dim, dim)

    def forward(self, query: Tensor, support: Tensor, steps: int) -> Tensor:
        h, c = query, torch.zeros_like(query)
        for _ in range(steps):
            read = torch.softmax(h @ support.t(), dim=1) @ support
            h, c = self.cell(torch.cat([query, read], dim=1), (h, c))
            h = h + query
        return h


@register_learner("matchingnet")
class MatchingNet(Learner):
    """Matching Networks; options:

    * ``fce`` (bool, default True): use full-context embeddings (both LSTMs).
    * ``fce_steps`` (int or None, default None = number of support examples): query-LSTM steps.
    * ``scale`` (float, default 100.0): multiplier of the (ReLU-clamped) cosine before the softmax.
    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        *,
        fce: bool = True,
        fce_steps: int | None = None,
        scale: float = 100.0,
        **unknown,
    ) -> None:
        reject_unknown_options("matchingnet", unknown, MatchingNet.__init__)
        super().__init__(backbone, ways)
        if not isinstance(fce, bool):
            raise ValueError(f"matchingnet option fce must be True or False, got {fce!r}")
        if fce_steps is not None and (not isinstance(fce_steps, int) or fce_steps < 1):
            raise ValueError(f"matchingnet option fce_steps must be None or an int >= 1, got {fce_steps!r}")
        if not float(scale) > 0:
            raise ValueError(f"matchingnet option scale must be > 0, got {scale!r}")
        self.fce = fce
        self.fce_steps = fce_steps
        self.scale = float(scale)
        if fce:
            dim = backbone_features(backbone, "matchingnet")
            self.support_encoder = SupportEncoder(dim)
            self.query_encoder = QueryEncoder(dim)

    def match(self, support: Tensor, support_labels: Tensor, query: Tensor, ways: int) -> tuple[Tensor, Tensor]:
        """Attention over the support set (queries, supports) and class log-probabilities (queries, ways)."""
        if self.fce:
            support = self.support_encoder(support)
            steps = self.fce_steps if self.fce_steps is not None else support.shape[0]
            query = self.query_encoder(query, support, steps)
        cosine = F.normalize(query, dim=1, eps=1e-5) @ F.normalize(support, dim=1, eps=1e-5).t()
        scores = self.scale * F.relu(cosine)
        attention = torch.softmax(scores, dim=1)
        # log p_c = logsumexp over the supports of class c minus logsumexp over all supports.
        same_class = F.one_hot(support_labels, ways).t().bool()  # (ways, supports)
        per_class = scores.unsqueeze(1).masked_fill(~same_class.unsqueeze(0), float("-inf"))
        log_probs = torch.logsumexp(per_class, dim=2) - torch.logsumexp(scores, dim=1, keepdim=True)
        return attention, log_probs

    def _logits(self, episode: Episode) -> Tensor:
        ways = check_episode(episode)
        support, query = embed_episode(self.backbone, episode)
        return self.match(support, episode.support_labels, query, ways)[1]

    def loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        log_probs = self._logits(episode)
        return F.nll_loss(log_probs, episode.query_labels), log_probs

    @torch.no_grad()
    def predict(self, episode: Episode) -> Tensor:
        """Query logits with the whole learner in eval mode (Chen et al.), modes restored after."""
        with eval_mode(self):
            return self._logits(episode)
