"""Held-out images of a registry dataset for the analyses: the validation images of
:func:`fewshot.data.classification.load_classification_data` (for the few-shot datasets: held-out images of
the base classes, which the classifier knows), with the evaluation transform and the training normalization."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fewshot.data.classification import AugmentedDataset, ClassificationData, Normalizer

__all__ = ["AnalysisImages", "held_out_images"]


@dataclass
class AnalysisImages:
    """``pixels`` (uint8 ``N x C x H x W``, for display), ``inputs`` (normalized float, for the model),
    ``targets`` and the dataset ``indices`` they came from."""

    pixels: Tensor
    inputs: Tensor
    targets: list[int]
    indices: list[int]


def held_out_images(
    data: ClassificationData, count: int | None = None, indices: Sequence[int] | None = None
) -> AnalysisImages:
    """The first ``count`` validation images of ``data`` (all if None), or those at ``indices``."""
    if data.val is None or len(data.val) == 0:
        raise ValueError(f"dataset {data.name!r} has no held-out images to analyze")
    size = len(data.val)
    if indices is None:
        indices = list(range(size if count is None else min(count, size)))
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(
            f"--indices {bad[0]} is out of range: {data.name} has {size} held-out images (0 .. {size - 1})"
        )
    held = AugmentedDataset(data.val, data.eval_transform)
    items = [held[i] for i in indices]
    pixels = torch.stack([image for image, _ in items])
    inputs = Normalizer(data.mean, data.std, "cpu")(pixels)
    return AnalysisImages(pixels, inputs, [t for _, t in items], list(indices))
