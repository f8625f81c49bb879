"""Whole-dataset classification data for supervised (pre)training: CIFAR, ImageFolder trees, base classes.

``load_classification_data(name, root, ...)`` returns a ``ClassificationData``: raw train / val datasets
yielding ``(uint8 CHW tensor, class index)``, the standard augmentation of the dataset's recipe, and the
normalization constants. Normalization happens on the batch, on the training device (``Normalizer``, with
the episode transforms' ``ToNormalizedFloat`` arithmetic), so that workers and host-to-device copies move
uint8 images.

Augmentation is a pure function of ``(seed, epoch, index)`` (``AugmentedDataset`` keyed by
``EpochSampler``): the images a run sees do not depend on the number of workers, on DDP, or on where a
run was interrupted and resumed.

Datasets:
- ``cifar10`` / ``cifar100``: torchvision's extracted format (``cifar-10-batches-py/``,
  ``cifar-100-python/`` under ``root``, or ``root`` itself); read directly, never downloaded.
- ``imagefolder`` / ``imagenet`` / ``tinyimagenet``: ``root/train/<class>/*`` and ``root/val/<class>/*``
  (TinyImageNet's original ``val/images`` + ``val/val_annotations.txt`` is read too).
- any few-shot dataset of the registry (``fewshot.data.list_datasets(few_shot=True)``: ``miniimagenet``,
  ``glyphs``): its ``train`` split (the base classes), with a held-out fraction of every class as the
  validation set.

Every name is registered in ``fewshot.data.factory`` (``list_datasets()``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

from fewshot.data.imageio import IMAGE_EXTENSIONS, read_rgb
from fewshot.data.safe_pickle import ForbiddenGlobalError, load_data_pickle
from fewshot.data.transforms import GLYPHS_MEAN, GLYPHS_STD, IMAGENET_MEAN, IMAGENET_STD, ToNormalizedFloat

__all__ = [
    "ClassificationData",
    "TensorImageDataset",
    "AugmentedDataset",
    "EpochSampler",
    "ShardSampler",
    "Normalizer",
    "read_cifar",
    "read_image_folder",
    "load_classification_data",
    "holdout_split",
]

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# The same statistics as the episode transforms, so that pretrained features meet test episodes
# normalized the same way.
IMAGENET_STATS = (IMAGENET_MEAN, IMAGENET_STD)
GLYPHS_STATS = (GLYPHS_MEAN, GLYPHS_STD)

Transform = Callable[[Tensor], Tensor]


@dataclass
class ClassificationData:
    """Train/val datasets of ``(uint8 CHW image, class)`` plus how to augment and normalize them."""

    name: str
    train: Dataset
    val: Dataset | None
    classes: list[str]
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_transform: Transform
    eval_transform: Transform
    root: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (stored with checkpoints and results)."""
        return {
            "dataset": self.name,
            "root": self.root,
            "num_classes": self.num_classes,
            "train_images": len(self.train),
            "val_images": 0 if self.val is None else len(self.val),
            "image_size": self.image_size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            **self.notes,
        }


class TensorImageDataset(Dataset):
    """Images held in one uint8 tensor (N, C, H, W) with integer targets."""

    def __init__(self, images: Tensor, targets: Sequence[int], classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if len(targets) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], self.targets[index]


# ------------------------------------------------------------------ reproducible augmentation


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (run seed, epoch, sample index)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class AugmentedDataset(Dataset):
    """``base`` with ``transform`` applied under a per-sample seed.

    Keys are ``(epoch, index)`` pairs (as ``EpochSampler`` yields) or plain indices (epoch 0). The global
    torch RNG of the calling process is left as it was, so model-side randomness (dropout, atom-drop)
    does not depend on data loading.
    """

    def __init__(self, base: Dataset, transform: Transform | None, seed: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, target = self.base[index]
        if self.transform is not None:
            # Transforms draw from the default CPU generator: seed it for this sample and put the
            # caller's state back (cheaper than torch.random.fork_rng; CUDA generators are not touched).
            generator = torch.default_generator
            saved = generator.get_state()
            try:
                generator.manual_seed(sample_seed(self.seed, epoch, index))
                image = self.transform(image)
            finally:
                generator.set_state(saved)
        return image, int(target)


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffled, sharded training order yielding ``(epoch, index)`` keys, resumable mid-epoch.

    The order is ``torch.utils.data.DistributedSampler``'s (a permutation seeded by ``seed + epoch``,
    trimmed to a multiple of ``num_replicas``, rank ``r`` taking every ``num_replicas``-th index). With one
    process this is a plain seeded shuffle. ``set_epoch(e, skip=k)`` drops the first ``k`` keys (the
    samples already trained on before an interruption).
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True
    ) -> None:
        self.inner = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.inner):
            if position >= self.skip:
                yield (self.epoch, index)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample evaluated exactly once across ranks."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = range(rank, length, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class Normalizer:
    """uint8 batch on the host -> normalized float batch on ``device`` in ``memory_format`` (preserve: as
    computed, NCHW), with the same arithmetic as the episode transforms (``ToNormalizedFloat``)."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        memory_format: torch.memory_format = torch.preserve_format,
    ) -> None:
        self.device = torch.device(device)
        self.to_float = ToNormalizedFloat(tuple(mean), tuple(std), device=self.device)
        self.memory_format = memory_format

    def __call__(self, images: Tensor) -> Tensor:
        images = images.to(self.device, non_blocking=True)
        channels = len(self.to_float.mean)
        if images.dim() != 4 or images.shape[1] != channels:
            raise ValueError(
                f"Normalizer: expected a (B, {channels}, H, W) batch for {channels} channel(s), "
                f"got shape {tuple(images.shape)}"
            )
        # .to, not .contiguous: a 1-channel batch counts as channels-last already but keeps NCHW strides,
        # which convolutions then run as NCHW
        return self.to_float(images).to(memory_format=self.memory_format)


# ------------------------------------------------------------------------------------ readers


def _cifar_layout(name: str) -> tuple[str, list[str], list[str], str, str]:
    if name == "cifar10":
        return "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels"
    return "cifar-100-python", ["train"], ["test"], "meta", "fine_labels"


def _load_pickle(path: Path, what: str) -> dict:
    """A CIFAR batch or meta file (Python 2 pickles), read without running code (``safe_pickle``)."""
    try:
        data = load_data_pickle(path, encoding="latin1")
    except ForbiddenGlobalError:
        raise
    except Exception as exc:  # truncated, not a pickle, ...
        raise ValueError(
            f"{what}: {str(path)!r} is not a readable CIFAR pickle ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {str(path)!r} holds a {type(data).__name__}, expected a dict")
    return data


def read_cifar(root: str | Path, name: str = "cifar10", train: bool = True) -> TensorImageDataset:
    """Read CIFAR-10/100 from torchvision's extracted python format (no download, no md5 check).

    ``root`` may be the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` or that folder.
    """
    if name not in CIFAR_STATS:
        raise ValueError(f"unknown CIFAR variant {name!r}; valid: cifar10, cifar100")
    folder_name, train_files, test_files, meta_file, label_key = _cifar_layout(name)
    root = Path(root)
    folder = root if (root / meta_file).is_file() else root / folder_name
    expected = train_files + test_files + [meta_file]
    what = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} not found: expected the folder {str(root / folder_name)!r} (torchvision's extracted "
            f"{'cifar-10' if name == 'cifar10' else 'cifar-100'}-python.tar.gz) holding {', '.join(expected)}"
        )
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what} folder {str(folder)!r} is incomplete: missing {', '.join(missing)} "
            f"(expected {', '.join(expected)})"
        )
    meta = _load_pickle(folder / meta_file, what)
    names_key = "label_names" if name == "cifar10" else "fine_label_names"
    classes = meta.get(names_key)
    n_classes = 10 if name == "cifar10" else 100
    if not isinstance(classes, list) or len(classes) != n_classes:
        raise ValueError(f"{what}: {str(folder / meta_file)!r} must hold {names_key!r} with {n_classes} names")
    images, targets = [], []
    for file in train_files if train else test_files:
        batch = _load_pickle(folder / file, what)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{what}: {str(folder / file)!r} lacks 'data' or {label_key!r} (keys: {sorted(batch)})")
        data = torch.as_tensor(batch["data"])
        labels = list(batch[label_key])
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
            raise ValueError(
                f"{what}: {str(folder / file)!r} 'data' must be uint8 (N, 3072) with N = len({label_key}); "
                f"got {data.dtype} {tuple(data.shape)} and {len(labels)} labels"
            )
        bad = [t for t in labels if not 0 <= int(t) < n_classes]
        if bad:
            raise ValueError(f"{what}: {str(folder / file)!r} has labels outside 0..{n_classes - 1}: {bad[:5]}")
        images.append(data.view(-1, 3, 32, 32))
        targets += [int(t) for t in labels]
    return TensorImageDataset(torch.cat(images), targets, classes)


def decode_rgb(path: str) -> Tensor:
    """An image file (``fewshot.data.imageio.read_rgb``) as a uint8 RGB (3, H, W) tensor."""
    return torch.from_numpy(read_rgb(path).copy()).permute(2, 0, 1).contiguous()


class FileListDataset(Dataset):
    """``(path, class index)`` samples decoded on access to uint8 RGB tensors."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, target = self.samples[index]
        return decode_rgb(path), target


def _scan_class_folders(folder: Path, what: str) -> tuple[list[str], list[tuple[str, int]]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: expected the folder {str(folder)!r} with one sub-folder of images per class")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{what}: {str(folder)!r} has no class sub-folders (expected {folder}/<class>/<image>)")
    samples, empty = [], []
    for index, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            empty.append(cls)
        samples += [(str(p), index) for p in files]
    if empty:
        raise FileNotFoundError(
            f"{what}: class folder(s) without images in {str(folder)!r}: {', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''} (image extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes, samples


def read_image_folder(root: str | Path, split: str, classes: list[str] | None = None) -> FileListDataset:
    """``root/split/<class>/<image>`` as a dataset; with ``classes``, the split must have exactly those.

    TinyImageNet's original validation layout (``val/images/*`` + ``val/val_annotations.txt``) is read too.
    """
    root = Path(root)
    what = f"image folder {str(root)!r}"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{what} does not exist (expected {root}/train/<class>/<image> and {root}/val/<class>/<image>)"
        )
    folder = root / split
    annotations = folder / "val_annotations.txt"
    if classes is not None and annotations.is_file() and (folder / "images").is_dir():
        return _read_tiny_val(folder, annotations, classes)
    found, samples = _scan_class_folders(folder, what)
    if classes is not None and found != classes:
        extra, lacking = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise ValueError(
            f"{what}: the classes of {str(folder)!r} differ from train's: "
            f"not in train {extra[:5]}, missing {lacking[:5]}"
        )
    return FileListDataset(samples, found)


def _read_tiny_val(folder: Path, annotations: Path, classes: list[str]) -> FileListDataset:
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise ValueError(f"{str(annotations)!r} line {number}: expected '<file>\\t<train class>...', got {line!r}")
        path = folder / "images" / parts[0]
        if not path.is_file():
            raise FileNotFoundError(f"{str(annotations)!r} line {number}: image {str(path)!r} does not exist")
        samples.append((str(path), index[parts[1]]))
    return FileListDataset(samples, classes)


def holdout_split(targets: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split indices into (train, held-out) keeping ``fraction`` of every class out (at least one image).

    The split depends only on ``targets``, ``fraction`` and ``seed``, not on the run.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for cls in sorted(by_class):
        items = by_class[cls]
        order = torch.randperm(len(items), generator=generator).tolist()
        n_out = 0 if fraction == 0 else max(1, round(fraction * len(items)))
        if n_out >= len(items):
            raise ValueError(f"--holdout {fraction} leaves no training image of class {cls} ({len(items)} images)")
        held += [items[j] for j in order[:n_out]]
        train += [items[j] for j in order[n_out:]]
    return sorted(train), sorted(held)


class _Subset(Dataset):
    def __init__(self, base: Dataset, indices: list[int], classes: list[str]) -> None:
        self.base, self.indices, self.classes = base, indices, classes
        targets = getattr(base, "targets", None)
        self.targets = [int(targets[i]) for i in indices] if targets is not None else None
        self.channels = getattr(base, "channels", None)
        self.image_size = getattr(base, "image_size", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, target = self.base[self.indices[index]]
        return image, int(target)


# ------------------------------------------------------------------------------------- recipes


def cifar_transforms(augment: bool) -> tuple[Transform, Transform]:
    """Train: random crop 32 with 4-pixel zero padding + horizontal flip; eval: identity."""
    train = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]) if augment else v2.Identity()
    return train, v2.Identity()


def imagenet_transforms(size: int, augment: bool) -> tuple[Transform, Transform]:
    """Train: RandomResizedCrop(size) + flip; eval: resize to size/0.875 then center crop (256 -> 224)."""
    resize = round(size / 0.875)
    evaluate = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])
    if not augment:
        return evaluate, evaluate
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]), evaluate


def fixed_size_transforms(size: int, augment: bool, flip: bool, padding: int) -> tuple[Transform, Transform]:
    """For datasets stored at one size: resize to ``size``; train adds a padded random crop (+ flip)."""
    evaluate = v2.Resize((size, size), antialias=True)
    if not augment:
        return evaluate, evaluate
    steps: list[Any] = [v2.Resize((size, size), antialias=True), v2.RandomCrop(size, padding=padding)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps), evaluate


def load_classification_data(
    name: str,
    root: str | Path | None = None,
    *,
    image_size: int | None = None,
    augment: bool = True,
    holdout: float | None = None,
) -> ClassificationData:
    """The registered dataset ``name`` (``fewshot.data.list_datasets()``) for supervised training; see the
    module docstring for names and layouts.

    ``image_size`` defaults to the dataset's own (32 CIFAR, 224 ImageNet, 64 TinyImageNet, the
    few-shot dataset's default otherwise). ``holdout`` (few-shot datasets only, default 0.05) is the
    fraction of every base class held out for validation.
    """
    from fewshot.data.factory import dataset_entry

    entry = dataset_entry(name)
    if entry.few_shot:
        return _fewshot_base_classes(entry.name, root, image_size, augment, 0.05 if holdout is None else holdout)
    _no_holdout(entry.name, holdout)
    return entry.classification(root, entry.image_size if image_size is None else image_size, augment)


def read_supervised_dataset(name: str, root: str | Path | None, image_size: int, augment: bool) -> ClassificationData:
    """A dataset with its own training and validation images, at ``image_size`` (its registry default unless
    given): CIFAR-10/100 or an ImageFolder tree."""
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"--data-root is required for {name} (the folder holding {_cifar_layout(name)[0]}/)")
        if image_size != 32:
            raise ValueError(f"{name} images are 32x32; --image-size {image_size} is not supported (leave it out)")
        train, val = read_cifar(root, name, True), read_cifar(root, name, False)
        t_train, t_eval = cifar_transforms(augment)
        mean, std = CIFAR_STATS[name]
        return ClassificationData(name, train, val, train.classes, 32, 3, mean, std, t_train, t_eval, str(root))
    if root is None:
        raise ValueError(f"--data-root is required for {name} (a folder with train/<class>/ and val/<class>/)")
    train = read_image_folder(root, "train")
    val = read_image_folder(root, "val", train.classes)
    t_train, t_eval = imagenet_transforms(image_size, augment)
    mean, std = IMAGENET_STATS
    return ClassificationData(name, train, val, train.classes, image_size, 3, mean, std, t_train, t_eval, str(root))


def _no_holdout(name: str, holdout: float | None) -> None:
    if holdout is not None:
        raise ValueError(f"--holdout applies to datasets without a validation split; {name} has one (leave it out)")


def _fewshot_base_classes(
    name: str, root: str | Path | None, image_size: int | None, augment: bool, holdout: float
) -> ClassificationData:
    from fewshot.data import create_dataset

    kwargs: dict[str, Any] = {} if image_size is None else {"image_size": image_size}
    base = create_dataset(name, "train", root=root, **kwargs)
    classes = [str(c) for c in base.classes]
    channels, size = int(base.channels), int(base.image_size)
    train_idx, val_idx = holdout_split([int(t) for t in base.targets], holdout)
    train = _Subset(base, train_idx, classes)
    val = _Subset(base, val_idx, classes) if val_idx else None
    flip = channels == 3  # glyphs (1 channel) are letters: a mirrored letter is another letter
    t_train, t_eval = fixed_size_transforms(size, augment, flip=flip, padding=max(2, size // 8))
    mean, std = IMAGENET_STATS if channels == 3 else GLYPHS_STATS
    return ClassificationData(
        name,
        train,
        val,
        classes,
        size,
        channels,
        mean,
        std,
        t_train,
        t_eval,
        "" if root is None else str(root),
        {"split": "train", "holdout": holdout},
    )
