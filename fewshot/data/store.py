"""A dataset held as class-indexed uint8 images: the common base of every dataset in ``fewshot.data``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


def check_split(split: str, dataset: str) -> str:
    """Return ``split`` if it is one of ``train``, ``val``, ``test``; otherwise raise a ValueError."""
    if split not in SPLITS:
        raise ValueError(f"{dataset}: unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
    return split


class ClassIndexedDataset(Dataset):
    """Images as one uint8 array (N, C, H, W), possibly memory-mapped, with a class index per image.

    Like torchvision datasets it exposes ``classes`` (class names), ``targets`` (int64 tensor, the class
    index of each image) and returns ``(image, target)``; without a transform ``image`` is the uint8
    (C, H, W) tensor. ``class_indices[c]`` lists the images of class ``c`` (what the episode sampler uses),
    and ``load(indices)`` returns the untransformed uint8 images of many indices at once.
    No float copy of the data is ever made.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int] | np.ndarray | Tensor,
        classes: Sequence[str],
        transform: Callable[[Tensor], Any] | None = None,
        name: str = "dataset",
    ) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"{name}: images must be a uint8 array (N, C, H, W), got {images.dtype} {images.shape}")
        targets_t = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        if targets_t.shape != (images.shape[0],):
            raise ValueError(f"{name}: {images.shape[0]} images but targets of shape {tuple(targets_t.shape)}")
        if targets_t.numel() and (int(targets_t.min()) < 0 or int(targets_t.max()) >= len(classes)):
            raise ValueError(f"{name}: targets must lie in 0..{len(classes) - 1} (one per class name)")
        self.images = images
        self.targets = targets_t
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self.name = name
        order = torch.argsort(targets_t, stable=True)
        counts = torch.bincount(targets_t, minlength=len(self.classes)).tolist()
        self.class_indices: list[Tensor] = list(torch.split(order, counts))

    @property
    def channels(self) -> int:
        """Channels per image (3 for natural images, 1 for glyphs)."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Height (= width) of the stored images."""
        return int(self.images.shape[2])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(self, indices: Sequence[int] | Tensor | np.ndarray) -> Tensor:
        """The uint8 images (K, C, H, W) at ``indices``, untransformed (a copy, never a view of the store)."""
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(np.array(self.images[idx], dtype=np.uint8, copy=True))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = torch.from_numpy(np.array(self.images[index], dtype=np.uint8, copy=True))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"{type(self).__name__}({self.name}: {len(self.classes)} classes, {n} images of {c}x{h}x{w})"

    # A memory-mapped store is pickled (e.g. to DataLoader workers started with spawn) by its file name,
    # not by its contents.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if isinstance(self.images, np.memmap) and self.images.filename is not None:
            state["images"] = Path(self.images.filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("images"), Path):
            state["images"] = np.load(state["images"], mmap_mode="r")
        self.__dict__.update(state)
