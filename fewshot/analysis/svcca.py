"""SVCCA (Raghu et al., 2017): reduce each view to its top singular directions, then CCA between them.

Views are ``(n, p)`` matrices: one row per sample (here: an image position), one column per neuron. Each is
centered; :func:`svd_reduce` keeps the fewest top principal directions that explain ``keep`` of its
variance (``keep=1``: every direction above numerical noise); :func:`svcca` whitens the two reduced views
and takes the SVD of their cross-covariance. The result holds the linear maps ``P_x`` (``r x p``) and
``P_y`` (``r x q``), ``r = min`` of the two reduced dimensions, whose outputs ``P_x x`` and ``P_y y`` are the
canonical variates: unit variance, uncorrelated within each view, and pairwise correlated by
``correlations`` (descending, in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SVCCA", "svd_reduce", "svcca"]

NOISE = 1e-10  # eigenvalues below NOISE x the largest are numerical zeros (never kept)


@dataclass
class SVCCA:
    """Canonical transforms of two views: ``transform_x`` (``r x p``), ``transform_y`` (``r x q``), the
    canonical ``correlations`` (``r``) and the means the views were centered with."""

    transform_x: Tensor
    transform_y: Tensor
    correlations: Tensor
    mean_x: Tensor
    mean_y: Tensor

    @property
    def mean_correlation(self) -> float:
        """SVCCA's similarity: the mean canonical correlation."""
        return float(self.correlations.mean())


def svd_reduce(x: Tensor, keep: float = 0.99) -> tuple[Tensor, Tensor]:
    """Top principal directions of the centered ``(n, p)`` view ``x``: ``(basis (p x k), variances (k))``.

    ``k`` is the fewest directions explaining at least ``keep`` (in (0, 1]) of the total variance; directions
    with a variance below ``1e-10`` of the largest are dropped in any case.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    cov = x.T @ x / x.shape[0]
    variances, basis = torch.linalg.eigh(cov)
    variances, basis = variances.flip(0), basis.flip(1)
    variances = variances.clamp_min(0)
    usable = int((variances > NOISE * variances[0]).sum()) if variances[0] > 0 else 0
    if usable == 0:
        raise ValueError("a view has no variance (all its samples are equal)")
    explained = variances[:usable].cumsum(0) / variances.sum()
    k = min(usable, int((explained < keep - 1e-12).sum()) + 1)
    return basis[:, :k], variances[:k]


def svcca(x: Tensor, y: Tensor, keep_x: float = 0.99, keep_y: float = 0.99) -> SVCCA:
    """SVCCA between the views ``x`` (``n x p``) and ``y`` (``n x q``), computed in float64."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"svcca needs two (n, features) views with the same n, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    x, y = x - mean_x, y - mean_y
    ux, vx = svd_reduce(x, keep_x)
    uy, vy = svd_reduce(y, keep_y)
    whiten_x = ux / vx.sqrt()  # p x kx: x @ whiten_x has identity covariance
    whiten_y = uy / vy.sqrt()
    cross = (x @ whiten_x).T @ (y @ whiten_y) / x.shape[0]  # kx x ky
    u, s, vh = torch.linalg.svd(cross, full_matrices=False)
    r = s.shape[0]
    return SVCCA(
        transform_x=(whiten_x @ u[:, :r]).T,
        transform_y=(whiten_y @ vh[:r].T).T,
        correlations=s.clamp(0.0, 1.0),
        mean_x=mean_x,
        mean_y=mean_y,
    )
