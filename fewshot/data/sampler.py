"""Seeded N-way K-shot Q-query episodes: episode i depends only on (seed, i), never on the process or worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fewshot.data.episode import Episode
from fewshot.data.transforms import BatchTransform


def episode_seed(seed: int, index: int) -> int:
    """A 63-bit seed for episode ``index`` of the stream ``seed`` (distinct pairs give independent seeds)."""
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread, as DataLoader workers do.

    Per-image transforms work on tensors far too small for threading to pay off, and on a busy machine
    two OpenMP threads made them up to 8× slower. The previous setting is restored afterwards.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _positive_int(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"EpisodeSampler: {what} must be an integer >= {minimum}, got {value!r}")
    return value


def _class_indices(dataset: Any) -> list[Tensor]:
    if hasattr(dataset, "class_indices"):
        return [torch.as_tensor(i, dtype=torch.int64) for i in dataset.class_indices]
    if not hasattr(dataset, "targets"):
        raise ValueError(
            f"EpisodeSampler: dataset {type(dataset).__name__} has neither 'class_indices' nor 'targets'; "
            "give it a 'targets' sequence (class index of each item)"
        )
    targets = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    n = int(targets.max()) + 1 if targets.numel() else 0
    order = torch.argsort(targets, stable=True)
    return list(torch.split(order, torch.bincount(targets, minlength=n).tolist()))


class EpisodeSampler(Dataset):
    """``episodes`` seeded N-way K-shot Q-query episodes from a class-indexed dataset.

    A map-style dataset of ``Episode`` objects (iterate it directly, or use ``episode_loader`` for
    DataLoader workers). Episode ``i`` is drawn from its own ``torch.Generator`` seeded by
    ``(seed, i)``: which classes (in random label order), which images, and the random augmentation, so
    the same seed gives the same episodes in any process and with any number of workers.

    Support images are ordered label-major (label 0's ``shots`` images, then label 1's, ...); likewise
    the query images. ``classes[label]`` is the dataset class index of each label.

    ``transform`` (default: the dataset's own ``transform``; if neither, images are scaled to float
    in [0, 1]) maps one uint8 (C, H, W) image to a float tensor; a ``BatchTransform`` is applied to the
    whole episode at once.
    """

    def __init__(
        self,
        dataset: Any,
        ways: int,
        shots: int,
        queries: int,
        episodes: int,
        seed: int = 0,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.ways = _positive_int(ways, "ways")
        self.shots = _positive_int(shots, "shots")
        self.queries = _positive_int(queries, "queries", 0)
        self.episodes = _positive_int(episodes, "episodes", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"EpisodeSampler: seed must be an integer, got {seed!r}")
        self.seed = seed
        self.dataset = dataset
        # a class-indexed store hands out raw uint8 images (``load``) and its own transform is applied
        # here; a generic dataset's ``__getitem__`` has applied its transform already
        self._raw = hasattr(dataset, "load")
        if transform is None and self._raw:
            transform = getattr(dataset, "transform", None)
        self.transform = transform
        self.class_indices = _class_indices(dataset)
        name = getattr(dataset, "name", type(dataset).__name__)
        names = getattr(dataset, "classes", None) or [str(c) for c in range(len(self.class_indices))]
        if self.ways > len(self.class_indices):
            raise ValueError(
                f"EpisodeSampler: {name} has {len(self.class_indices)} classes, fewer than ways={ways}; "
                f"choose ways <= {len(self.class_indices)}"
            )
        need = self.shots + self.queries
        small = [c for c, idx in enumerate(self.class_indices) if idx.numel() < need]
        if small:
            c = small[0]
            more = f" ({len(small) - 1} other classes too)" if len(small) > 1 else ""
            raise ValueError(
                f"EpisodeSampler: class {names[c]!r} (index {c}) of {name} has {self.class_indices[c].numel()} "
                f"images, fewer than shots + queries = {self.shots} + {self.queries} = {need}{more}"
            )

    def __len__(self) -> int:
        return self.episodes

    def indices(self, index: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """``(classes, support_indices, query_indices, augmentation_seed)`` of episode ``index``."""
        g = torch.Generator().manual_seed(episode_seed(self.seed, index))
        classes = torch.randperm(len(self.class_indices), generator=g)[: self.ways]
        support, query = [], []
        for c in classes.tolist():
            members = self.class_indices[c]
            picks = members[torch.randperm(members.numel(), generator=g)[: self.shots + self.queries]]
            support.append(picks[: self.shots])
            query.append(picks[self.shots :])
        aug_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        return classes, torch.cat(support), torch.cat(query), aug_seed

    def _images(self, indices: Tensor) -> Tensor:
        if self._raw:
            return self.dataset.load(indices)
        return torch.stack([torch.as_tensor(self.dataset[int(i)][0]) for i in indices])

    def _apply(self, images: Tensor, aug_seed: int) -> Tensor:
        if self.transform is None:
            return images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        # transforms.v2 draws from torch's global generator: fork it, so that the caller's random
        # state is untouched and the augmentation depends only on (seed, index)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(aug_seed)
            if isinstance(self.transform, BatchTransform):
                return self.transform(images)
            return torch.stack([self.transform(image) for image in images])

    def __getitem__(self, index: int) -> Episode:
        if not -self.episodes <= index < self.episodes:
            raise IndexError(f"episode {index} out of range for {self.episodes} episodes")
        index %= self.episodes
        classes, support, query, aug_seed = self.indices(index)
        with _one_thread():
            images = self._apply(self._images(torch.cat([support, query])), aug_seed)
        n_support = support.numel()
        labels = torch.arange(self.ways)
        return Episode(
            support_images=images[:n_support],
            support_labels=labels.repeat_interleave(self.shots),
            query_images=images[n_support:],
            query_labels=labels.repeat_interleave(self.queries),
            classes=classes,
        )

    def __iter__(self) -> Iterator[Episode]:
        for i in range(self.episodes):
            yield self[i]


def collate_episode(episode: Episode) -> Episode:
    """The DataLoader collate for ``batch_size=None``: the episode as it is."""
    return episode


def episode_loader(
    dataset: Any,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int = 0,
    transform: Callable[[Tensor], Tensor] | None = None,
    num_workers: int = 0,
    **loader_kwargs: Any,
) -> DataLoader:
    """A DataLoader yielding ``Episode`` objects in order 0..episodes-1, identical for any ``num_workers``.

    Extra keyword arguments go to ``DataLoader`` (e.g. ``prefetch_factor``, ``persistent_workers``).
    """
    sampler = EpisodeSampler(dataset, ways, shots, queries, episodes, seed, transform)
    return DataLoader(
        sampler, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=collate_episode, **loader_kwargs
    )
