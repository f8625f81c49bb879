"""The dataset registry: every dataset by name, for few-shot episodes and for supervised (pre)training.

- ``register_dataset(name, ...)`` adds one; ``list_datasets()`` names them all, ``list_datasets(few_shot=True)``
  those with class splits for episodes (the choices of the few-shot command lines).
- ``create_dataset(name, split, ...)``: one class split (``train``/``val``/``test``) of a few-shot dataset.
- ``fewshot.data.classification.load_classification_data(name, ...)``: training and validation images of any
  registered dataset: its own (CIFAR, ImageFolder trees) or a few-shot dataset's base classes with a held-out
  part of each class.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fewshot.data.glyphs import Glyphs
from fewshot.data.miniimagenet import README, MiniImageNet
from fewshot.data.store import ClassIndexedDataset

__all__ = ["DatasetEntry", "register_dataset", "list_datasets", "dataset_entry", "create_dataset"]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset.

    ``splits(split, root, image_size, transform, **kwargs)`` builds one class split (few-shot datasets);
    ``classification(root, image_size, augment)`` builds its own training / validation data (datasets for
    supervised training only). Exactly one of the two is set.
    """

    name: str
    image_size: int  # default side in pixels
    splits: Callable[..., ClassIndexedDataset] | None = None
    classification: Callable[..., Any] | None = None

    @property
    def few_shot(self) -> bool:
        return self.splits is not None


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str,
    *,
    image_size: int,
    splits: Callable[..., ClassIndexedDataset] | None = None,
    classification: Callable[..., Any] | None = None,
) -> DatasetEntry:
    """Register dataset ``name`` (lower case) with either few-shot ``splits`` or its own ``classification`` data."""
    if name != name.lower() or name in _DATASETS:
        raise ValueError(f"dataset {name!r} is registered twice or not in lower case")
    if (splits is None) == (classification is None):
        raise ValueError(f"dataset {name!r}: give exactly one of splits= or classification=")
    entry = DatasetEntry(name, image_size, splits, classification)
    _DATASETS[name] = entry
    return entry


def list_datasets(few_shot: bool = False) -> list[str]:
    """Names of the registered datasets in registration order; ``few_shot=True``: those with class splits."""
    return [name for name, entry in _DATASETS.items() if entry.few_shot or not few_shot]


def dataset_entry(name: str, few_shot: bool = False) -> DatasetEntry:
    """The entry of ``name`` (any case); a ValueError naming the valid ones otherwise."""
    entry = _DATASETS.get(name.lower())
    if entry is not None and (entry.few_shot or not few_shot):
        return entry
    valid = ", ".join(list_datasets(few_shot))
    if entry is not None:
        raise ValueError(
            f"dataset {name!r} has no few-shot class splits (it serves supervised training); "
            f"few-shot datasets are {valid}"
        )
    raise ValueError(f"unknown dataset {name!r}; valid names are {valid}")


def create_dataset(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    transform: Callable[[Tensor], Any] | None = None,
    **kwargs: Any,
) -> ClassIndexedDataset:
    """One split of a few-shot dataset by name.

    - ``"miniimagenet"``: ``root`` is the directory holding one of the layouts of data/miniimagenet/README.md
      (required); ``image_size`` defaults to 84; extra keywords go to ``MiniImageNet`` (``layout``, ``cache``,
      ``workers``).
    - ``"glyphs"``: embedded, no download; ``root`` is the cache root (default ``$FEWSHOT_CACHE`` or
      ``~/.cache/fewshot``); ``image_size`` defaults to 28.

    The result has ``classes``, ``targets``, ``class_indices``, ``channels`` (3 or 1) and ``image_size``.
    """
    entry = dataset_entry(name, few_shot=True)
    size = entry.image_size if image_size is None else image_size
    return entry.splits(split, root, size, transform, **kwargs)


def _glyphs(split: str, root, image_size: int, transform, **kwargs: Any) -> Glyphs:
    if kwargs:
        raise ValueError(f"create_dataset: unexpected arguments for glyphs: {', '.join(sorted(kwargs))}")
    return Glyphs(split, image_size=image_size, transform=transform, root=root)


def _miniimagenet(split: str, root, image_size: int, transform, **kwargs: Any) -> MiniImageNet:
    if root is None:
        raise ValueError(f"create_dataset('miniimagenet') needs root=<directory with miniImageNet>; see {README}")
    return MiniImageNet(root, split, image_size=image_size, transform=transform, **kwargs)


def _own_data(name: str) -> Callable[..., Any]:
    """The ``classification`` builder of a dataset for supervised training (``fewshot.data.classification``)."""

    def build(root, image_size: int, augment: bool):
        from fewshot.data.classification import read_supervised_dataset

        return read_supervised_dataset(name, root, image_size, augment)

    return build


register_dataset("miniimagenet", image_size=84, splits=_miniimagenet)
register_dataset("glyphs", image_size=28, splits=_glyphs)
for _name, _size in (("cifar10", 32), ("cifar100", 32), ("imagefolder", 224), ("imagenet", 224), ("tinyimagenet", 64)):
    register_dataset(_name, image_size=_size, classification=_own_data(_name))
