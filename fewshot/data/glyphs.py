"""The embedded ``glyphs`` dataset: letters of five alphabets rendered from matplotlib's fonts."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from fewshot.data import glyph_render
from fewshot.data.cache import atomic_directory, cache_root, is_complete_store, read_store, write_store
from fewshot.data.store import SPLITS, ClassIndexedDataset, check_split

GLYPHS_VERSION = 1  # bump whenever glyph_render changes what it produces


class Glyphs(ClassIndexedDataset):
    """Omniglot-like few-shot dataset of *rendered font glyphs* (not handwriting), white on black, 1 channel.

    A class is one letter of one alphabet; its 32 images are the fonts (bundled with matplotlib) that truly
    have that letter, cycled, each image with its own seeded augmentation (affine warp, stroke width,
    noise). Splits are by alphabet, so val/test alphabets are never seen in training, and look-alike
    letters across alphabets (Latin A / Greek Α / Cyrillic А, ...) are kept only in the held-out split:

    ========  ===========================  =======  ======
    split     alphabets (classes)          classes  images
    ========  ===========================  =======  ======
    train     Latin 334, Georgian 43       377      12,064
    val       Greek 84                     84       2,688
    test      Cyrillic 187, Armenian 75    262      8,384
    ========  ===========================  =======  ======

    (723 classes, 23,136 images, 32 per class; 106 look-alike letters dropped.) The dataset is built on
    first use (about 8 s of CPU on this 2-core machine) into ``<root>/glyphs/`` — ``root`` defaults to
    ``$FEWSHOT_CACHE`` or ``~/.cache/fewshot`` — and memory-mapped from there afterwards. The build is
    deterministic and atomic.
    Class names look like ``"Cyrillic/U+0416 Ж"``; ``alphabets[c]`` gives the alphabet of class ``c``.
    See ``fewshot.data.glyph_render`` for how letters are chosen, rendered and deduplicated.
    """

    def __init__(
        self,
        split: str,
        image_size: int = 28,
        transform: Callable[[Tensor], Any] | None = None,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        check_split(split, "glyphs")
        directory = ensure_glyphs_cache(image_size, root)
        images, targets, classes, meta = read_store(directory / split, cache_dir=directory)
        super().__init__(images, targets, classes, transform, name=f"glyphs/{split}")
        self.split = split
        self.alphabets: list[str] = list(meta["alphabets"])


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"glyphs: image_size must be an integer >= 8, got {image_size!r}")
    return image_size


def glyphs_fingerprint() -> str:
    """Identifies what a build produces: code version, matplotlib/FreeType versions and the font files."""
    import matplotlib
    from matplotlib import ft2font

    fonts = [(name, os.path.getsize(os.path.join(glyph_render.font_dir(), name))) for name, _ in glyph_render.FONTS]
    key = json.dumps([GLYPHS_VERSION, matplotlib.__version__, ft2font.__freetype_version__, fonts])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def glyphs_cache_dir(image_size: int = 28, root: str | os.PathLike[str] | None = None) -> Path:
    """Where the glyphs dataset of ``image_size`` px lives (whether or not it is built yet)."""
    size = _check_image_size(image_size)
    return cache_root(root) / "glyphs" / f"v{GLYPHS_VERSION}-{size}px-{glyphs_fingerprint()}"


def ensure_glyphs_cache(image_size: int = 28, root: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory of the glyphs dataset, building it first if needed (atomically)."""
    directory = glyphs_cache_dir(image_size, root)
    if all(is_complete_store(directory / split) for split in SPLITS):
        return directory
    built = glyph_render.build_glyphs(image_size)
    with atomic_directory(directory) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
            write_store(
                tmp / split,
                built.targets[split],
                built.classes[split],
                images=built.images[split],
                alphabets=built.alphabets[split],
                fonts=built.fonts[split],
            )
        summary = {
            "image_size": image_size,
            "classes": {s: len(built.classes[s]) for s in SPLITS},
            "images": {s: int(built.images[s].shape[0]) for s in SPLITS},
            "dropped_lookalikes": built.dropped_lookalikes,
        }
        (tmp / "build.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    return directory
