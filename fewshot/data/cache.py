"""Where decoded datasets are cached, and how a cache is written so that none is ever left half-built.

A cache is a directory holding ``images.npy`` (N×C×H×W uint8, opened memory-mapped), ``targets.npy``
(N int64) and ``meta.json`` (class names and provenance). It is built in a temporary directory next to
its final place and renamed into place only when complete; a failed build removes its temporary directory.

A build killed outright (SIGKILL, power loss) cannot clean up, so each temporary directory holds a lock
file that its build keeps locked (``flock``) while it runs; the kernel drops the lock when the process
dies, however it dies. The next build of the same cache removes that cache's temporary directories whose
lock is free (``remove_stale_builds``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so no temporary directory is ever judged stale
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "FEWSHOT_CACHE"
STORE_FORMAT = 1
STORE_FILES = ("images.npy", "targets.npy", "meta.json")
LOCK_NAME = ".building.lock"
# A lock file younger than this may belong to a build that has created it but not locked it yet.
LOCK_GRACE_S = 60.0
# Temporary directories without a lock file (made before builds took locks, or by a build that could not
# lock) count as stale only when nothing in them changed for this long: no build takes a day.
UNLOCKED_STALE_S = 24 * 3600.0


def cache_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``root`` if given, else ``$FEWSHOT_CACHE``, else ``~/.cache/fewshot``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fewshot"


def temporary_prefix(final: Path) -> str:
    """The name prefix of the temporary directories in which ``final`` is built."""
    return f".{Path(final).name}.tmp-"


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; rename it to ``final`` when the block succeeds.

    On any error (including KeyboardInterrupt) the temporary directory is removed and the error re-raised,
    so ``final`` either does not exist or is complete. If another process completed ``final`` first, its
    copy is kept and ours is discarded. Temporary directories of ``final`` left by killed builds are
    removed first (``remove_stale_builds``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(final)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(final), dir=final.parent))
    lock = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished cache is an ordinary directory
        lock = _hold_build_lock(tmp)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _release(lock)
        raise
    try:
        if lock is not None:
            (tmp / LOCK_NAME).unlink()  # still locked through the open descriptor until the rename is done
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():  # only a completed rename ever creates ``final``
            raise
    finally:
        _release(lock)


def _hold_build_lock(tmp: Path) -> int | None:
    """Create ``tmp/LOCK_NAME`` and lock it for as long as this build runs; the open descriptor, or None
    where the file system cannot lock (then the directory has no lock file and is judged by age)."""
    if fcntl is None:
        return None
    fd = os.open(tmp / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        os.unlink(tmp / LOCK_NAME)
        return None
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def remove_stale_builds(final: Path, now: float | None = None) -> list[Path]:
    """Remove the temporary directories of ``final`` left by builds that no longer run; returns them.

    Only directories named ``.<final name>.tmp-*`` beside ``final`` are considered, and one is stale when
    - its lock file exists, is older than LOCK_GRACE_S, and can be locked (its build is dead: the kernel
      releases a lock when its holder exits or is killed, and a live build holds it until it finishes), or
    - it has no lock file and neither it nor anything directly in it changed for UNLOCKED_STALE_S.
    Anything else (a live build here or on another machine sharing the cache) is left alone.
    """
    final = Path(final)
    now = time.time() if now is None else now
    prefix = temporary_prefix(final)
    try:
        candidates = [p for p in final.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for path in candidates:
        if path.is_dir() and not path.is_symlink() and _remove_if_stale(path, now):
            removed.append(path)
    return removed


def _remove_if_stale(path: Path, now: float) -> bool:
    """Remove the temporary directory ``path`` if its build is gone (see ``remove_stale_builds``)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        if now - _newest_change(path) < UNLOCKED_STALE_S:
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    except OSError:
        return False
    try:
        if now - os.fstat(fd).st_mtime < LOCK_GRACE_S:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EWOULDBLOCK: a live build holds it; anything else: cannot tell, keep it
            return False
        shutil.rmtree(path, ignore_errors=True)  # under the lock, so no other cleaner races this one
        return True
    finally:
        os.close(fd)


def _newest_change(path: Path) -> float:
    """The latest mtime of ``path`` and of the entries directly in it (now, if it cannot be read)."""
    try:
        times = [path.lstat().st_mtime] + [p.lstat().st_mtime for p in path.iterdir()]
    except OSError:
        return time.time()
    return max(times)


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
