"""Few-shot datasets, transforms and the episode sampler.

- ``ClassIndexedDataset``: uint8 images grouped by class (``classes``, ``targets``, ``class_indices``).
- ``MiniImageNet(root, split)``: any of the four common layouts, cached memory-mapped on first use.
- ``Glyphs(split)``: the embedded Omniglot-like dataset of rendered font glyphs (no download).
- ``create_dataset(name, split, ...)``, ``build_transform(name, image_size, train)``.
- ``EpisodeSampler`` / ``episode_loader``: seeded N-way K-shot Q-query ``Episode`` objects.
"""

from fewshot.data.episode import Episode
from fewshot.data.factory import create_dataset, list_datasets
from fewshot.data.glyphs import Glyphs
from fewshot.data.miniimagenet import LAYOUTS, MiniImageNet, detect_layout, load_class_split
from fewshot.data.sampler import EpisodeSampler, collate_episode, episode_loader
from fewshot.data.store import SPLITS, ClassIndexedDataset
from fewshot.data.transforms import BatchTransform, build_transform

__all__ = [
    "Episode",
    "ClassIndexedDataset",
    "MiniImageNet",
    "Glyphs",
    "EpisodeSampler",
    "episode_loader",
    "collate_episode",
    "BatchTransform",
    "build_transform",
    "create_dataset",
    "list_datasets",
    "detect_layout",
    "load_class_split",
    "LAYOUTS",
    "SPLITS",
]
