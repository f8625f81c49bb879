"""Where decoded datasets are cached, and how a cache is written so that none is ever left half-built.

A cache is a directory holding ``images.npy`` (N×C×H×W uint8, opened memory-mapped), ``targets.npy``
(N int64) and ``meta.json`` (class names and provenance). It is built in a temporary directory next to
its final place and renamed into place only when complete; a failed build removes its temporary directory.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "FEWSHOT_CACHE"
STORE_FORMAT = 1
STORE_FILES = ("images.npy", "targets.npy", "meta.json")


def cache_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``root`` if given, else ``$FEWSHOT_CACHE``, else ``~/.cache/fewshot``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fewshot"


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; rename it to ``final`` when the block succeeds.

    On any error (including KeyboardInterrupt) the temporary directory is removed and the error re-raised,
    so ``final`` either does not exist or is complete. If another process completed ``final`` first, its
    copy is kept and ours is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished cache is an ordinary directory
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():  # only a completed rename ever creates ``final``
            raise


def open_images_for_writing(directory: Path, shape: Sequence[int]) -> np.memmap:
    """A writable memory-mapped ``images.npy`` of ``shape`` (N, C, H, W) and dtype uint8 in ``directory``."""
    return np.lib.format.open_memmap(Path(directory) / "images.npy", mode="w+", dtype=np.uint8, shape=tuple(shape))


def write_store(
    directory: Path,
    targets: np.ndarray,
    classes: Sequence[str],
    images: np.ndarray | None = None,
    **meta: Any,
) -> None:
    """Write ``targets.npy``, ``meta.json`` and (unless already written via ``open_images_for_writing``)
    ``images.npy`` into ``directory``."""
    directory = Path(directory)
    if images is not None:
        np.save(directory / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
    np.save(directory / "targets.npy", np.asarray(targets, dtype=np.int64))
    info = {"format": STORE_FORMAT, "classes": list(classes), **meta}
    (directory / "meta.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))


def is_complete_store(directory: Path) -> bool:
    """Whether ``directory`` holds the three files of a store."""
    directory = Path(directory)
    return all((directory / name).is_file() for name in STORE_FILES)


class DamagedCacheError(ValueError):
    """A cache file cannot be read or does not fit the rest of its cache (one line, naming the file)."""

    def __init__(self, file: Path, problem: str, cache_dir: Path) -> None:
        super().__init__(
            f"cache file {str(file)!r} is damaged ({problem}); "
            f"delete the cache folder {str(cache_dir)!r} and it is rebuilt on the next run"
        )


def read_store(
    directory: Path, cache_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """``(images, targets, classes, meta)`` of a store; ``images`` is memory-mapped read-only.

    Raises DamagedCacheError (a ValueError) naming the file if any of the three is unreadable or they
    do not fit together (e.g. ``images.npy`` truncated by a full disk); its message says to delete
    ``cache_dir`` (default ``directory``), the folder whose absence makes the next run rebuild it.
    """
    directory = Path(directory)
    cache_dir = directory if cache_dir is None else Path(cache_dir)
    meta = _read_meta(directory, cache_dir)
    if meta.get("format") != STORE_FORMAT:
        raise ValueError(
            f"cache {str(directory)!r} has format {meta.get('format')!r}, expected {STORE_FORMAT}; delete it to rebuild"
        )
    classes = meta.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DamagedCacheError(directory / "meta.json", "'classes' is not a list of names", cache_dir)
    images = _read_array(directory / "images.npy", cache_dir, mmap_mode="r")
    targets = _read_array(directory / "targets.npy", cache_dir)
    if images.ndim != 4 or images.dtype != np.uint8:
        problem = f"expected uint8 (N, C, H, W), got {images.dtype} {images.shape}"
        raise DamagedCacheError(directory / "images.npy", problem, cache_dir)
    if targets.shape != (images.shape[0],) or not np.issubdtype(targets.dtype, np.integer):
        problem = f"expected {images.shape[0]} integers, one per image, got {targets.dtype} {targets.shape}"
        raise DamagedCacheError(directory / "targets.npy", problem, cache_dir)
    if targets.size and (targets.min() < 0 or targets.max() >= len(classes)):
        problem = f"class indices outside 0..{len(classes) - 1}"
        raise DamagedCacheError(directory / "targets.npy", problem, cache_dir)
    return images, targets, list(classes), meta


def _read_meta(directory: Path, cache_dir: Path) -> dict[str, Any]:
    """``meta.json`` of a store as a dict; unreadable JSON becomes DamagedCacheError."""
    path = directory / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DamagedCacheError(path, _one_line(e), cache_dir) from None
    if not isinstance(meta, dict):
        raise DamagedCacheError(path, f"expected a JSON object, got {type(meta).__name__}", cache_dir)
    return meta


def _read_array(path: Path, cache_dir: Path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of ``path`` (never unpickling); unreadable or truncated files become DamagedCacheError."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:  # e.g. "mmap length is greater than file size"
        raise DamagedCacheError(path, _one_line(e), cache_dir) from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
