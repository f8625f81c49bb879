"""``create_dataset(name, split, ...)``: datasets by name, for scripts and configs."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import Tensor

from fewshot.data.glyphs import Glyphs
from fewshot.data.miniimagenet import README, MiniImageNet
from fewshot.data.store import ClassIndexedDataset

DEFAULT_IMAGE_SIZE = {"miniimagenet": 84, "glyphs": 28}


def list_datasets() -> list[str]:
    """Names ``create_dataset`` accepts."""
    return list(DEFAULT_IMAGE_SIZE)


def create_dataset(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    transform: Callable[[Tensor], Any] | None = None,
    **kwargs: Any,
) -> ClassIndexedDataset:
    """One split of a dataset by name.

    - ``"miniimagenet"``: ``root`` is the directory holding one of the layouts of data/miniimagenet/README.md
      (required); ``image_size`` defaults to 84; extra keywords go to ``MiniImageNet`` (``layout``, ``cache``,
      ``workers``).
    - ``"glyphs"``: embedded, no download; ``root`` is the cache root (default ``$FEWSHOT_CACHE`` or
      ``~/.cache/fewshot``); ``image_size`` defaults to 28.

    The result has ``classes``, ``targets``, ``class_indices``, ``channels`` (3 or 1) and ``image_size``.
    """
    key = name.lower()
    if key not in DEFAULT_IMAGE_SIZE:
        raise ValueError(f"create_dataset: unknown dataset {name!r}; valid names are {', '.join(DEFAULT_IMAGE_SIZE)}")
    size = DEFAULT_IMAGE_SIZE[key] if image_size is None else image_size
    if key == "glyphs":
        if kwargs:
            raise ValueError(f"create_dataset: unexpected arguments for glyphs: {', '.join(sorted(kwargs))}")
        return Glyphs(split, image_size=size, transform=transform, root=root)
    if root is None:
        raise ValueError(f"create_dataset('miniimagenet') needs root=<directory with miniImageNet>; see {README}")
    return MiniImageNet(root, split, image_size=size, transform=transform, **kwargs)
