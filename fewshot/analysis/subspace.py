"""The joint-subspace measurement of the paper's Sec. 3.2, on a network with per-layer ACDC convs.

What is computed, for every pair of decomposed layers ``i < j`` (the paper: 6 pairs of a 4-layer CNN):

1. Sub-layer outputs on ``d`` held-out images (model in eval mode, no atom-drop): the atom outputs
   ``Z = D * X`` (``c_in * m`` channels) and the coefficient outputs ``Y = A Z`` (``c`` channels, bias
   excluded, so ``Y`` is exactly linear in ``Z``), see :mod:`fewshot.analysis.sublayers`.
2. Common samples: a sample is one (image, position) of the finer of the two layers' maps (all of them,
   or a seeded random ``max_samples`` (50,000) of them); the coarser layer gives the value at the position
   covering it (nearest-neighbour upsampling, which keeps every value of the finer map and, being per-pixel,
   keeps ``Y = A Z`` exact). Views: ``Z_i`` (``samples x c_in m``) and ``Y_i`` (``samples x c``).
3. Alignment, as Raghu et al.'s SVCCA: ``P_i, P_j`` = canonical transforms between ``Z_i`` and ``Z_j`` after
   reducing each to the top principal directions explaining ``keep`` (0.99) of its variance; ``Q_i, Q_j`` =
   canonical transforms between ``Y_i`` and ``Y_j`` with no reduction (the paper's ``Q`` is ``c x c`` and
   invertible; only numerically null directions are dropped). The canonical variates ``P_i Z_i`` and
   ``P_j Z_j`` have identity covariance and correlate coordinate by coordinate (``rho_z``; likewise
   ``rho_y``), so coordinate ``k`` means the same in both layers.
4. Aligned coefficients, the paper's eq. (2): ``Â_i = Q_i A_i P_i^+`` (``P^+``: the Moore-Penrose inverse,
   which is ``P^-1`` when nothing is reduced), an ``r_y x r_z`` matrix mapping aligned atom outputs to
   aligned coefficient outputs: ``Q_i Y_i ≈ Â_i P_i Z_i`` (exact when ``keep = 1``).
5. Ranks, Roy & Vetterli's effective rank (:mod:`fewshot.analysis.rank`): ``erank(Â_i)``, ``erank(Â_j)``,
   and ``erank([Â_i; Â_j])`` of the two filter sets stacked (``2 r_y x r_z``): the paper's ``[Â_i, Â_j]``,
   whose "possible 64" (2 x 32 filters) only a stack of filters can reach. If both layers' aligned filters
   span one subspace this stays near ``erank(Â_i)``; for independent subspaces it approaches
   ``min(2 r_y, r_z)``, reported per pair as ``concat_max``. As a chance level, ``concat_chance`` is the
   erank of ``Â_i`` stacked on a matrix with ``Â_j``'s singular values but a random row space.

Note: with full whitening ``Â_i Â_i^T = Q_i Cov(Y_i) Q_i^T = I``, so ``erank(Â_i)`` is ``c`` up to the
variance that the reduction drops: the paper's 31.98 of 32. What the measurement says is in the stack: its
singular values are ``sqrt(1 ± cos θ_k)`` over the principal angles between the two row spaces. A first
layer on a 1-channel input has ``c_in m = m`` atom outputs, so its pairs are bounded by ``m``; the summary
also averages the pairs among the other layers (the paper's bound of 32 / 64 applies there).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import torch
from torch import Tensor, nn

from fewshot.analysis.rank import effective_rank
from fewshot.analysis.sublayers import acdc_layers, atom_outputs, coefficient_matrix, coefficient_outputs, layer_inputs
from fewshot.analysis.svcca import svcca

__all__ = ["aligned_coefficients", "analyze_pair", "analyze_model", "summarize"]


def sample_positions(n: int, fine: tuple[int, int], max_samples: int, seed: int = 0) -> Tensor:
    """``(k, 3)`` rows ``(image, row, col)`` of the finer map: all ``n * h * w`` if at most ``max_samples``,
    else a seeded random subset of ``max_samples`` of them (sorted)."""
    total = n * fine[0] * fine[1]
    flat = torch.arange(total)
    if total > max_samples:
        generator = torch.Generator().manual_seed(seed)
        flat = torch.randperm(total, generator=generator)[:max_samples].sort().values
    area = fine[0] * fine[1]
    within = flat % area
    return torch.stack([flat // area, within // fine[1], within % fine[1]], 1)


def gather_samples(maps: Tensor, positions: Tensor, fine: tuple[int, int]) -> Tensor:
    """``(k, C)`` values of ``maps`` (``N x C x h x w``) at ``positions`` of the finer ``fine`` grid, read
    by nearest-neighbour upsampling (``F.interpolate``'s ``floor(r * h / H)``) where ``maps`` is coarser."""
    h, w = maps.shape[-2:]
    rows = torch.div(positions[:, 1] * h, fine[0], rounding_mode="floor")
    cols = torch.div(positions[:, 2] * w, fine[1], rounding_mode="floor")
    return maps[positions[:, 0], :, rows, cols]


def aligned_coefficients(a: Tensor, q: Tensor, p: Tensor) -> Tensor:
    """``Â = Q A P^+`` (float64): ``a`` is ``c x c_in m``, ``q`` is ``r_y x c``, ``p`` is ``r_z x c_in m``."""
    return q.double() @ a.double() @ torch.linalg.pinv(p.double())


def chance_stack_rank(hat_i: Tensor, hat_j: Tensor, seed: int = 0) -> float:
    """``erank([Â_i; R])`` where ``R`` has ``Â_j``'s singular values but a random row space: the value a pair
    of unrelated subspaces of these spectra gives (the chance level of the stack)."""
    u, s, _ = torch.linalg.svd(hat_j, full_matrices=False)
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(hat_j.shape[1], s.shape[0], generator=generator, dtype=hat_j.dtype)
    rows = torch.linalg.qr(random).Q.T  # orthonormal rows, uniformly random
    return effective_rank(torch.cat([hat_i, u @ torch.diag(s) @ rows]))


def analyze_pair(
    layer_i: nn.Module, x_i: Tensor, layer_j: nn.Module, x_j: Tensor, keep: float = 0.99, max_samples: int = 50_000
) -> dict[str, Any]:
    """Steps 1-5 of the module docstring for two ACDC convs and their inputs ``x_i``, ``x_j``."""
    z_i, z_j = atom_outputs(layer_i, x_i), atom_outputs(layer_j, x_j)
    y_i, y_j = coefficient_outputs(layer_i, z_i), coefficient_outputs(layer_j, z_j)
    fine = max(tuple(z_i.shape[-2:]), tuple(z_j.shape[-2:]))
    positions = sample_positions(z_i.shape[0], fine, max_samples)
    zi, zj, yi, yj = (gather_samples(t, positions, fine) for t in (z_i, z_j, y_i, y_j))
    cca_z = svcca(zi, zj, keep, keep)
    cca_y = svcca(yi, yj, 1.0, 1.0)
    hat_i = aligned_coefficients(coefficient_matrix(layer_i), cca_y.transform_x, cca_z.transform_x)
    hat_j = aligned_coefficients(coefficient_matrix(layer_j), cca_y.transform_y, cca_z.transform_y)
    r_y, r_z = hat_i.shape
    return {
        "samples": zi.shape[0],
        "grid": list(fine),
        "z_dims": [zi.shape[1], zj.shape[1]],
        "r_z": r_z,
        "r_y": r_y,
        "rho_z": cca_z.mean_correlation,
        "rho_y": cca_y.mean_correlation,
        "a_i": effective_rank(hat_i),
        "a_j": effective_rank(hat_j),
        "concat": effective_rank(torch.cat([hat_i, hat_j])),
        "concat_chance": chance_stack_rank(hat_i, hat_j),
        "a_max": min(r_y, r_z),
        "concat_max": min(2 * r_y, r_z),
    }


def analyze_model(model: nn.Module, images: Tensor, keep: float = 0.99, max_samples: int = 50_000) -> dict[str, Any]:
    """Every pair of the model's ACDC convs (:func:`analyze_pair`) on normalized ``images``, and a summary."""
    layers = acdc_layers(model)
    inputs = layer_inputs(model, [m for _, m in layers], images)
    pairs = []
    for i, j in combinations(range(len(layers)), 2):
        result = analyze_pair(layers[i][1], inputs[i], layers[j][1], inputs[j], keep, max_samples)
        pairs.append({"i": i + 1, "j": j + 1, "layer_i": layers[i][0], "layer_j": layers[j][0], **result})
    per_layer = [
        {"layer": name, "shape": list(coefficient_matrix(m).shape), "erank_A": effective_rank(coefficient_matrix(m))}
        for name, m in layers
    ]
    return {"layers": per_layer, "pairs": pairs, "summary": summarize(pairs)}


def summarize(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of ``a_i`` and ``concat`` over all pairs, and over the pairs that leave out layer 1."""

    def means(rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            return {"pairs": 0}
        n = len(rows)
        return {
            "pairs": n,
            "a_i": sum(r["a_i"] for r in rows) / n,
            "concat": sum(r["concat"] for r in rows) / n,
            "concat_chance": sum(r["concat_chance"] for r in rows) / n,
            "a_max": sum(r["a_max"] for r in rows) / n,
            "concat_max": sum(r["concat_max"] for r in rows) / n,
        }

    return {"all_pairs": means(pairs), "without_layer_1": means([r for r in pairs if r["i"] != 1])}
