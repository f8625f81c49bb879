"""The one image decoder: image files to uint8 RGB arrays (at their size, or squashed to S×S and decoded in
parallel for large datasets), and the file extensions read as images."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

PARALLEL_MIN = 512  # fewer files than this are decoded in-process
CHUNK = 256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_rgb(path: str | os.PathLike[str], draft_size: int | None = None) -> np.ndarray:
    """The image file at ``path`` (any format Pillow reads) as RGB uint8 (H, W, 3). With ``draft_size`` a JPEG
    is decoded at the smallest DCT scale that still gives at least that size (faster when it is shrunk after).

    Raises FileNotFoundError or ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {str(path)!r}")
    try:
        with Image.open(path) as im:
            if draft_size is not None:
                im.draft("RGB", (draft_size, draft_size))
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from None


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, 3) uint8 image squashed to (size, size, 3) with Lanczos filtering (a no-op if already so)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def decode_image(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """The image file at ``path`` as RGB uint8 (3, size, size), squashed to size×size as in Ravi & Larochelle.

    Raises FileNotFoundError or ValueError naming the file.
    """
    return np.ascontiguousarray(resize_array(read_rgb(path, draft_size=size), size).transpose(2, 0, 1))


def _decode_chunk(paths: Sequence[str], size: int) -> np.ndarray:
    return np.stack([decode_image(p, size) for p in paths])


def decode_into(
    paths: Sequence[str | os.PathLike[str]],
    size: int,
    out: np.ndarray,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Decode ``paths`` into ``out[i]`` (uint8 (N, 3, size, size), e.g. a writable memmap).

    Uses ``workers`` processes (default: all CPUs) when there are at least PARALLEL_MIN files.
    ``progress`` is called with the number of images done after each chunk.
    """
    names = [str(p) for p in paths]
    if workers is None:
        workers = os.cpu_count() or 1
    chunks = [names[i : i + CHUNK] for i in range(0, len(names), CHUNK)]
    done = 0
    if workers <= 1 or len(names) < PARALLEL_MIN:
        results = (_decode_chunk(c, size) for c in chunks)
        for c, block in zip(chunks, results):
            out[done : done + len(c)] = block
            done += len(c)
            if progress:
                progress(done)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for c, block in zip(chunks, pool.map(_decode_chunk, chunks, [size] * len(chunks))):
            out[done : done + len(c)] = block
            done += len(c)
            if progress:
                progress(done)
