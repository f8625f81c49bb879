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
    return all((directory / name).is_file() for name in ("images.npy", "targets.npy", "meta.json"))


def read_store(directory: Path) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """``(images, targets, classes, meta)`` of a store; ``images`` is memory-mapped read-only."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("format") != STORE_FORMAT:
        raise ValueError(
            f"cache {str(directory)!r} has format {meta.get('format')!r}, expected {STORE_FORMAT}; delete it to rebuild"
        )
    images = np.load(directory / "images.npy", mmap_mode="r")
    targets = np.load(directory / "targets.npy")
    return images, targets, list(meta["classes"]), meta
