"""Small models and synthetic episodes shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from fewshot.data.episode import Episode


class TinyNet(nn.Module):
    """Two conv blocks with BatchNorm; ``smooth`` swaps ReLU/max-pool for GELU/avg-pool."""

    def __init__(self, smooth: bool = False, channels: int = 6) -> None:
        super().__init__()
        act = nn.GELU() if smooth else nn.ReLU()
        pool = nn.AvgPool2d(2) if smooth else nn.MaxPool2d(2)
        self.body = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            act,
            pool,
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            act,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DropNet(nn.Module):
    """A tiny backbone whose dropout makes training consume the global RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_episode(
    ways: int = 3,
    shots: int = 2,
    queries: int = 3,
    size: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Episode:
    """A synthetic episode whose classes differ by a per-channel mean."""
    g = torch.Generator().manual_seed(seed)
    labels_s = torch.arange(ways).repeat_interleave(shots)
    labels_q = torch.arange(ways).repeat_interleave(queries)
    means = torch.randn(ways, 3, 1, 1, generator=g, dtype=dtype)
    sup = means[labels_s] + 0.5 * torch.randn(len(labels_s), 3, size, size, generator=g, dtype=dtype)
    qry = means[labels_q] + 0.5 * torch.randn(len(labels_q), 3, size, size, generator=g, dtype=dtype)
    return Episode(sup, labels_s, qry, labels_q, torch.arange(ways))
