"""miniImageNet from any of its four common on-disk layouts, cached once as a memory-mapped uint8 store.

Layouts (file names for split ``val``; see data/miniimagenet/README.md):

1. ``csv``: ``val.csv`` (header ``filename,label``) and ``images/`` holding the JPEGs it names.
2. ``pickle``: ``mini-imagenet-cache-val.pkl`` (or ``-validation.pkl``): dict with ``image_data``
   (uint8 N×H×W×3) and ``class_dict`` (wnid → row indices).
3. ``json``: ``val.json`` (``base.json`` / ``novel.json`` for train / test) with ``label_names``,
   ``image_names`` and ``image_labels``; labels index ``label_names`` (global 0–99 or per split from 0).
4. ``hdf5``: ``val_data.hdf5`` (group ``datasets``: one uint8 n×H×W×3 array per wnid) and
   ``val_labels.json`` (the wnids). Needs the optional ``h5py``.

Every layout gives the same dataset: classes sorted by name, images grouped by class in the order the
source lists them, squashed to ``image_size``×``image_size`` (Lanczos) when stored at another size.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from fewshot.data.cache import (
    atomic_directory,
    cache_root,
    is_complete_store,
    open_images_for_writing,
    read_store,
    write_store,
)
from fewshot.data.imageio import decode_into, resize_array
from fewshot.data.safe_pickle import ForbiddenGlobalError, load_data_pickle
from fewshot.data.store import ClassIndexedDataset, check_split

README = "data/miniimagenet/README.md"
LAYOUTS = ("csv", "pickle", "json", "hdf5")
JSON_FILES = {"train": "base.json", "val": "val.json", "test": "novel.json"}
# Package data (it ships in the wheel); data/miniimagenet/split.json in the source tree links to it.
SPLIT_FILE = Path(__file__).resolve().parent / "splits" / "miniimagenet.json"


def load_class_split(path: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """The standard miniImageNet class split (Ravi & Larochelle): {"train": 64 wnids, "val": 16, "test": 20}."""
    path = Path(path) if path is not None else SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"class split file not found: {str(path)!r}")
    data = load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r}: expected a JSON object of split name -> list of wnids")
    return {k: list(v) for k, v in data.items()}


def load_json(path: Path) -> Any:
    """The JSON value in ``path``; a ValueError naming the file if it is not valid UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None


def _describe(value: Any) -> str:
    """``uint8 array of shape (2, 3)`` / ``list``: what a value is, for error messages."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


# ---------------------------------------------------------------- layout detection
def expected_files(root: str | os.PathLike[str], split: str) -> dict[str, list[list[Path]]]:
    """For each layout, the alternative sets of paths that hold ``split`` of miniImageNet under ``root``."""
    root = Path(root)
    pickles = [split, "validation"] if split == "val" else [split]
    return {
        "csv": [[root / f"{split}.csv", root / "images"]],
        "pickle": [[root / f"mini-imagenet-cache-{name}.pkl"] for name in pickles],
        "json": [[root / JSON_FILES[split]]],
        "hdf5": [[root / f"{split}_data.hdf5", root / f"{split}_labels.json"]],
    }


def _looked_for(expected: dict[str, list[list[Path]]]) -> str:
    lines = []
    for i, (layout, alternatives) in enumerate(expected.items(), 1):
        options = " or ".join(
            " + ".join(p.name + ("/" if p.suffix == "" else "") for p in paths) for paths in alternatives
        )
        lines.append(f"({i}) {layout}: {options}")
    return "; ".join(lines)


def detect_layout(root: str | os.PathLike[str], split: str, layout: str | None = None) -> tuple[str, list[Path]]:
    """``(layout, files)`` of ``split`` under ``root``: the first of LAYOUTS (or the forced ``layout``) whose
    files all exist. Raises FileNotFoundError listing what was looked for."""
    check_split(split, "miniImageNet")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"miniImageNet: unknown layout {layout!r}; valid layouts are {', '.join(LAYOUTS)}")
    root = Path(root).expanduser()
    expected = expected_files(root, split)
    if layout is not None:
        expected = {layout: expected[layout]}
    if not root.is_dir():
        raise FileNotFoundError(
            f"miniImageNet root {str(root)!r} does not exist or is not a directory. Looked for one of these "
            f"layouts for split {split!r}: {_looked_for(expected)}. See {README} for how to obtain miniImageNet"
        )
    for name, alternatives in expected.items():
        for paths in alternatives:
            if all(p.exists() for p in paths):
                return name, paths
    raise FileNotFoundError(
        f"no miniImageNet layout found in {str(root)!r} for split {split!r}. Looked for: {_looked_for(expected)}. "
        f"See {README} for how to obtain miniImageNet and which layouts are accepted"
    )


# ---------------------------------------------------------------- readers
# Each reader returns (class names sorted, count per class, filler); filler(out, size, workers) writes the
# images class-major into out (N, 3, size, size) uint8.
Filler = Callable[[np.ndarray, int, "int | None"], None]


def _group(names: Sequence[str], items: Sequence[Any]) -> tuple[list[str], list[int], list[Any]]:
    """Sort ``items`` by class name (stable) → (classes, counts, items in class-major order)."""
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    order = sorted(range(len(items)), key=lambda i: index[names[i]])
    counts = np.bincount([index[n] for n in names], minlength=len(classes)).tolist()
    return classes, counts, [items[i] for i in order]


def _file_filler(paths: list[Path]) -> Filler:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"image file not found: {str(missing[0])!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return lambda out, size, workers: decode_into(paths, size, out, workers)


def _array_filler(blocks: Callable[[], Iterator[np.ndarray]], source: Path) -> Filler:
    def fill(out: np.ndarray, size: int, workers: int | None) -> None:
        start = 0
        for block in blocks():
            if block.ndim != 4 or block.shape[-1] != 3 or block.dtype != np.uint8:
                raise ValueError(
                    f"{str(source)!r}: images must be uint8 arrays n×H×W×3, got {block.dtype} {block.shape}"
                )
            for image in block:
                out[start] = resize_array(image, size).transpose(2, 0, 1)
                start += 1

    return fill


def read_split_csv(csv_path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The ``(filename, label)`` rows of a Ravi & Larochelle split CSV (header ``filename,label``)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]] if rows else []
    for column in ("filename", "label"):
        if column not in header:
            raise ValueError(
                f"{str(csv_path)!r}: missing column {column!r} (columns found: {header}); "
                "expected the header 'filename,label'"
            )
    fi, li = header.index("filename"), header.index("label")
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    if not body:
        raise ValueError(f"{str(csv_path)!r}: no rows after the header")
    short = [i for i, r in enumerate(body, 2) if len(r) <= max(fi, li)]
    if short:
        raise ValueError(f"{str(csv_path)!r}: line {short[0]} has fewer columns than the header {header}")
    return [(r[fi].strip(), r[li].strip()) for r in body]


def _read_csv(csv_path: Path, images_dir: Path) -> tuple[list[str], list[int], Filler]:
    rows = read_split_csv(csv_path)
    labels = [label for _, label in rows]
    paths = [images_dir / name for name, _ in rows]
    # some copies keep the images in one folder per class: images/<wnid>/<file>
    paths = [
        p if p.is_file() or not (images_dir / lab / p.name).is_file() else images_dir / lab / p.name
        for p, lab in zip(paths, labels)
    ]
    classes, counts, ordered = _group(labels, paths)
    return classes, counts, _file_filler(ordered)


def _read_json(json_path: Path) -> tuple[list[str], list[int], Filler]:
    data = load_json(json_path)
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(json_path)!r}: expected a JSON object with label_names, image_names and image_labels, "
            f"got a {type(data).__name__}"
        )
    for key in ("label_names", "image_names", "image_labels"):
        if key not in data:
            raise ValueError(f"{str(json_path)!r}: missing key {key!r} (keys found: {sorted(data)})")
    names, files, labels = data["label_names"], data["image_names"], data["image_labels"]
    for key, value in (("label_names", names), ("image_names", files)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{str(json_path)!r}: {key!r} must be a list of strings")
    if not isinstance(labels, list):
        raise ValueError(f"{str(json_path)!r}: 'image_labels' must be a list of integers")
    if len(files) != len(labels):
        raise ValueError(f"{str(json_path)!r}: {len(files)} image_names but {len(labels)} image_labels")
    bad = [lab for lab in labels if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < len(names)]
    if bad:
        raise ValueError(
            f"{str(json_path)!r}: image label {bad[0]!r} is not an index into label_names (0..{len(names) - 1})"
        )
    root = json_path.parent

    def locate(name: str) -> Path:
        p = Path(name)
        # the file lists of Chen et al. hold absolute paths of the machine that wrote them: fall back to
        # <root>/<path>, <root>/<wnid>/<file> and <root>/images/<file>
        for candidate in (p, root / p, root / p.parent.name / p.name, root / "images" / p.name):
            if candidate.is_file():
                return candidate
        return p if p.is_absolute() else root / p

    classes, counts, ordered = _group([names[lab] for lab in labels], [locate(f) for f in files])
    return classes, counts, _file_filler(ordered)


def _load_pickle(path: Path) -> Any:
    """The object pickled in ``path`` (by Python 3 or 2), read without running code (``safe_pickle``)."""
    try:
        try:
            return load_data_pickle(path)
        except UnicodeDecodeError:  # written by Python 2
            return load_data_pickle(path, encoding="latin1")
    except ForbiddenGlobalError:
        raise
    except Exception as e:  # truncated, not a pickle, inconsistent numpy state, ...
        raise ValueError(f"cannot read pickle {str(path)!r}: {type(e).__name__}: {e}") from None


def _class_rows(path: Path, name: str, rows: Any, n_images: int) -> np.ndarray:
    """The row indices of class ``name`` as int64, each checked to lie in ``0..n_images - 1``."""
    indices = np.asarray(rows) if isinstance(rows, (list, tuple, np.ndarray)) else None
    if indices is None or indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(
            f"{str(path)!r}: class_dict[{name!r}] must be a list of row indices into image_data, got {_describe(rows)}"
        )
    if indices.size == 0:
        raise ValueError(f"{str(path)!r}: class {name!r} has no images (empty list in class_dict)")
    bad = indices[(indices < 0) | (indices >= n_images)]
    if bad.size:
        raise ValueError(
            f"{str(path)!r}: class {name!r} has row index {int(bad[0])}, outside the valid range "
            f"0..{n_images - 1} of image_data ({n_images} images)"
        )
    return indices.astype(np.int64)


def _read_pickle(path: Path) -> tuple[list[str], list[int], Filler]:
    data = _load_pickle(path)
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r}: expected a dict with keys 'image_data' and 'class_dict', got {type(data).__name__}"
        )
    for key in ("image_data", "class_dict"):
        if key not in data:
            raise ValueError(f"{str(path)!r}: missing key {key!r} (keys found: {sorted(map(str, data))})")
    images, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{str(path)!r}: 'image_data' must be a uint8 array N×H×W×3, got {_describe(images)}")
    if not isinstance(class_dict, dict) or not all(isinstance(c, str) for c in class_dict):
        raise ValueError(
            f"{str(path)!r}: 'class_dict' must be a dict of class name (wnid) -> list of row indices, "
            f"got {_describe(class_dict)}"
        )
    classes = sorted(class_dict)
    rows = {c: _class_rows(path, c, class_dict[c], len(images)) for c in classes}
    counts = [len(rows[c]) for c in classes]

    def blocks() -> Iterator[np.ndarray]:
        for c in classes:
            yield images[rows[c]]

    return classes, counts, _array_filler(blocks, path)


def _read_hdf5(data_path: Path, labels_path: Path) -> tuple[list[str], list[int], Filler]:
    try:
        import h5py
    except ImportError:
        raise ImportError(
            f"reading the HDF5 layout of miniImageNet ({str(data_path)!r}) needs h5py, an optional extra: "
            "pip install 'acdc-fewshot[hdf5]' (or pip install h5py)"
        ) from None
    wnids = load_json(labels_path)
    if not isinstance(wnids, list) or not all(isinstance(w, str) for w in wnids):
        raise ValueError(f"{str(labels_path)!r}: expected a JSON list of class names (wnids)")
    try:
        with h5py.File(data_path, "r") as f:
            counts = _hdf5_counts(f, data_path, labels_path, wnids)
    except OSError as e:  # not HDF5, truncated, unreadable
        raise ValueError(f"{str(data_path)!r} is not a readable HDF5 file ({e})") from None
    classes = sorted(wnids)

    def blocks() -> Iterator[np.ndarray]:
        try:
            with h5py.File(data_path, "r") as f:
                for c in classes:
                    yield f["datasets"][c][()]
        except OSError as e:
            raise ValueError(f"{str(data_path)!r}: cannot read the images ({e})") from None

    return classes, [counts[c] for c in classes], _array_filler(blocks, data_path)


def _hdf5_counts(f: Any, data_path: Path, labels_path: Path, wnids: list[str]) -> dict[str, int]:
    """Images per class of an open HDF5 file, after checking that every class is a uint8 n×H×W×3 array."""
    import h5py

    group = f.get("datasets")
    if not isinstance(group, h5py.Group):
        raise ValueError(f"{str(data_path)!r}: missing group 'datasets' (found: {sorted(f.keys())})")
    counts = {}
    for w in wnids:
        array = group.get(w)
        if array is None:
            raise ValueError(f"{str(data_path)!r}: no array for class {w!r} listed in {str(labels_path)!r}")
        if not isinstance(array, h5py.Dataset) or array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            got = f"{array.dtype} array of shape {array.shape}" if isinstance(array, h5py.Dataset) else "a group"
            raise ValueError(f"{str(data_path)!r}: class {w!r} must be a uint8 array n×H×W×3, got {got}")
        counts[w] = int(array.shape[0])
    return counts


def _reader(layout: str, files: list[Path]) -> tuple[list[str], list[int], Filler]:
    if layout == "csv":
        return _read_csv(files[0], files[1])
    if layout == "json":
        return _read_json(files[0])
    if layout == "pickle":
        return _read_pickle(files[0])
    return _read_hdf5(files[0], files[1])


# ---------------------------------------------------------------- cache
def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"miniImageNet: image_size must be an integer >= 8, got {image_size!r}")
    return image_size


def miniimagenet_cache_dir(
    root: str | os.PathLike[str],
    split: str,
    image_size: int = 84,
    layout: str | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> Path:
    """The cache directory for this root/split/size: keyed by the layout's files (path, size, mtime)."""
    found, files = detect_layout(root, split, layout)
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    key = hashlib.sha256(json.dumps([found, split, _check_image_size(image_size), stats]).encode()).hexdigest()[:12]
    return cache_root(cache) / "miniimagenet" / f"{split}-{found}-{image_size}px-{key}"


def ensure_miniimagenet_cache(
    root: str | os.PathLike[str],
    split: str,
    image_size: int = 84,
    layout: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> Path:
    """The cache directory of ``split``, decoding the source into it first if needed (atomically)."""
    directory = miniimagenet_cache_dir(root, split, image_size, layout, cache)
    if is_complete_store(directory):
        return directory
    found, files = detect_layout(root, split, layout)
    classes, counts, fill = _reader(found, files)
    with atomic_directory(directory) as tmp:
        out = open_images_for_writing(tmp, (sum(counts), 3, image_size, image_size))
        fill(out, image_size, workers)
        out.flush()
        del out
        targets = np.repeat(np.arange(len(classes)), counts)
        write_store(tmp, targets, classes, layout=found, split=split, source=[str(p) for p in files])
    return directory


class MiniImageNet(ClassIndexedDataset):
    """One split of miniImageNet (100 ImageNet classes: 64 train / 16 val / 20 test, 600 images each).

    ``root`` may hold any of the four layouts described in data/miniimagenet/README.md; which one is
    detected (or forced with ``layout``). The first use decodes the split once into a memory-mapped uint8
    cache under ``cache`` (default ``$FEWSHOT_CACHE`` or ``~/.cache/fewshot``), using ``workers`` processes
    for JPEGs; later uses start in about a second. ``classes`` are the wnids (sorted), ``targets`` the class
    index of each image, and ``dataset[i]`` is ``(image, target)`` with image the uint8 (3, S, S) tensor
    (or ``transform(image)``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        image_size: int = 84,
        transform: Callable[[Tensor], Any] | None = None,
        *,
        layout: str | None = None,
        cache: str | os.PathLike[str] | None = None,
        workers: int | None = None,
    ) -> None:
        check_split(split, "miniImageNet")
        directory = ensure_miniimagenet_cache(root, split, image_size, layout, cache, workers)
        self._init_from(directory, transform)

    @classmethod
    def from_cache(
        cls, directory: str | os.PathLike[str], transform: Callable[[Tensor], Any] | None = None
    ) -> MiniImageNet:
        """Open an existing cache directory (as written by ``ensure_miniimagenet_cache``) directly."""
        self = cls.__new__(cls)
        self._init_from(Path(directory), transform)
        return self

    def _init_from(self, directory: Path, transform: Callable[[Tensor], Any] | None) -> None:
        images, targets, classes, meta = read_store(directory)
        self.split = str(meta.get("split", "?"))
        self.layout = str(meta.get("layout", "?"))
        self.cache_dir = directory
        super().__init__(images, targets, classes, transform, name=f"miniImageNet/{self.split}")
