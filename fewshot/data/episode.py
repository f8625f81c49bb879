"""The episode: one N-way K-shot Q-query few-shot task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Episode:
    """One few-shot task.

    ``support_images``: (ways*shots, C, H, W) float; ``support_labels``: (ways*shots,) int64 in
    0..ways-1; likewise for the query set. ``classes``: (ways,) int64, the dataset's class index of
    each episode label (``classes[label]``).
    """

    support_images: Tensor
    support_labels: Tensor
    query_images: Tensor
    query_labels: Tensor
    classes: Tensor

    @property
    def ways(self) -> int:
        return int(self.classes.numel())

    @property
    def shots(self) -> int:
        return self.support_labels.numel() // self.ways

    @property
    def queries(self) -> int:
        return self.query_labels.numel() // self.ways

    def to(
        self,
        device: torch.device | str,
        non_blocking: bool = False,
        memory_format: torch.memory_format = torch.preserve_format,
    ) -> Episode:
        """A copy with every tensor moved to ``device``; the images in ``memory_format`` (e.g.
        ``torch.channels_last``: the same values, stored pixel-major, which CPU convolutions run faster)."""
        return Episode(
            self.support_images.to(device, non_blocking=non_blocking, memory_format=memory_format),
            self.support_labels.to(device, non_blocking=non_blocking),
            self.query_images.to(device, non_blocking=non_blocking, memory_format=memory_format),
            self.query_labels.to(device, non_blocking=non_blocking),
            self.classes.to(device, non_blocking=non_blocking),
        )
