"""Effective rank of a matrix: Roy & Vetterli (2007), "The effective rank: a measure of effective dimensionality".

``erank(M) = exp(H(p))`` with ``p_k = sigma_k / sum_j sigma_j`` over the singular values ``sigma`` of ``M``
and ``H`` the Shannon entropy (natural log, ``0 log 0 = 0``). It is a real number between 1 and
``rank(M)``; it equals ``r`` exactly when ``M`` has ``r`` equal non-zero singular values, and a spectrum that
decays gives less than the number of non-zero singular values (no threshold to choose).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["effective_rank", "spectrum_effective_rank"]


def spectrum_effective_rank(singular_values: Tensor) -> float:
    """Roy & Vetterli's effective rank of a matrix with these singular values (0 for the zero matrix)."""
    s = singular_values.detach().double().abs()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(matrix: Tensor) -> float:
    """Roy & Vetterli's effective rank of a 2-D ``matrix`` (computed in float64)."""
    if matrix.dim() != 2:
        raise ValueError(f"effective_rank needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    return spectrum_effective_rank(torch.linalg.svdvals(matrix.detach().double()))
