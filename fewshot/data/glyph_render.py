"""Rendering of the ``glyphs`` dataset from the fonts that ship inside matplotlib (no download).

Structured like Omniglot: a class is one letter of one alphabet; its images are the fonts that truly
have that letter, rendered white on black and varied by seeded augmentations (affine warp, stroke
width, noise). These are rendered font glyphs, not handwriting.

Steps (all deterministic: same bytes on every build with the same matplotlib fonts and torch version):
1. Every font in ``FONTS`` renders every letter (Unicode categories Lu/Ll/Lt) of the ``ALPHABETS`` ranges
   that its character map claims, once, on a ``BASE``×``BASE`` canvas (baseline and size fixed, so ``o``
   and ``O`` differ by size as on paper; centred horizontally). The Computer Modern fonts are used for ASCII
   letters only (they map other code points to TeX slots); fonts that lie about letters (LastResort,
   cmex10, cmsy10, Display, STIXNonUni, STIXSize) are not used at all.
2. A letter becomes a class when at least ``MIN_FONTS`` fonts render it.
3. Look-alike letters (Latin A / Greek Α / Cyrillic А, Latin o / Armenian օ, ...) are found by rendered
   appearance at ``REFERENCE_SIZE`` px, and only one copy is kept: the one in the held-out split
   (test before val before train), so no test class is seen in training.
4. Each class gets ``IMAGES_PER_CLASS`` images, cycling over its fonts, each with its own augmentation.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BASE = 64  # render canvas (px); images are resized from it to the requested size
EM_PX = 36  # font size in pixels on the canvas
BASELINE = 45  # canvas row of the baseline
REFERENCE_SIZE = 28  # resolution at which look-alikes are judged (independent of the requested size)
MIN_FONTS = 12
IMAGES_PER_CLASS = 32
LOOKALIKE_THRESHOLD = 0.0125  # mean normalised squared distance below which two letters are one class
SEED = 20220101
CHUNK = 256

# (file in matplotlib's fonts/ttf, ASCII letters only)
FONTS: tuple[tuple[str, bool], ...] = tuple(
    [(f"DejaVuSans{s}.ttf", False) for s in ("", "-Bold", "-Oblique", "-BoldOblique")]
    + [(f"DejaVuSerif{s}.ttf", False) for s in ("", "-Bold", "-Italic", "-BoldItalic")]
    + [(f"DejaVuSansMono{s}.ttf", False) for s in ("", "-Bold", "-Oblique", "-BoldOblique")]
    + [(f"STIXGeneral{s}.ttf", False) for s in ("", "Bol", "Italic", "BolIta")]
    + [(f"{n}.ttf", True) for n in ("cmr10", "cmb10", "cmss10", "cmti10", "cmtt10", "cmmi10")]
)

# alphabet -> (Unicode ranges, split). Order matters: it is the class order within a split.
ALPHABETS: dict[str, tuple[tuple[tuple[int, int], ...], str]] = {
    "Latin": (((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F)), "train"),
    "Georgian": (((0x10A0, 0x10FF),), "train"),
    "Greek": (((0x370, 0x3FF),), "val"),
    "Cyrillic": (((0x400, 0x52F),), "test"),
    "Armenian": (((0x531, 0x58F),), "test"),
}
SPLIT_RANK = {"test": 0, "val": 1, "train": 2}  # which copy of a look-alike pair is kept: lowest rank


def font_dir() -> str:
    """matplotlib's bundled TrueType fonts."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


@dataclass
class GlyphClass:
    """One letter of one alphabet and its base renders (one BASE×BASE uint8 canvas per font)."""

    alphabet: str
    codepoint: int
    fonts: list[str] = field(default_factory=list)
    renders: list[np.ndarray] = field(default_factory=list)

    @property
    def split(self) -> str:
        return ALPHABETS[self.alphabet][1]

    @property
    def name(self) -> str:
        return f"{self.alphabet}/U+{self.codepoint:04X} {chr(self.codepoint)}"


def _letters(ranges: tuple[tuple[int, int], ...]) -> list[int]:
    return [cp for lo, hi in ranges for cp in range(lo, hi + 1) if unicodedata.category(chr(cp)) in ("Lu", "Ll", "Lt")]


def _render(font, codepoint: int, no_hinting: int) -> np.ndarray | None:
    """The letter on a BASE×BASE canvas (ink 255 on 0), baseline at BASELINE; None if empty or too big."""
    font.set_text(chr(codepoint), 0.0, flags=no_hinting)
    font.draw_glyphs_to_bitmap(antialiased=True)
    bitmap = np.asarray(font.get_image())
    rows = np.flatnonzero(bitmap.any(axis=1))
    cols = np.flatnonzero(bitmap.any(axis=0))
    if rows.size == 0:
        return None
    height, descent = font.get_width_height()[1], font.get_descent()  # 26.6 fixed point
    ink = bitmap[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = ink.shape
    top = BASELINE - int(round((height - descent) / 64)) + int(rows[0])
    left = (BASE - w) // 2
    if top < 0 or top + h > BASE or left < 0:
        return None
    canvas = np.zeros((BASE, BASE), dtype=np.uint8)
    canvas[top : top + h, left : left + w] = ink
    return canvas


def render_letters() -> list[GlyphClass]:
    """Every candidate letter with the renders of every font that has it (before any filtering)."""
    from matplotlib.ft2font import FT2Font, LoadFlags

    letters = {cp: GlyphClass(alphabet, cp) for alphabet, (ranges, _) in ALPHABETS.items() for cp in _letters(ranges)}
    fonts = {name: FT2Font(os.path.join(font_dir(), name)) for name, _ in FONTS}
    claimed = {
        name: {cp for cp in fonts[name].get_charmap() if cp in letters and not (ascii_only and cp > 0x7F)}
        for name, ascii_only in FONTS
    }
    # a letter that fewer than MIN_FONTS fonts even claim can never become a class: do not render it
    wanted = {cp for cp in letters if sum(cp in c for c in claimed.values()) >= MIN_FONTS}
    for name, _ in FONTS:
        font = fonts[name]
        font.set_size(EM_PX, 72)
        for cp in sorted(claimed[name] & wanted):
            letter = letters[cp]
            canvas = _render(font, cp, LoadFlags.NO_HINTING)
            if canvas is not None:
                letter.fonts.append(name)
                letter.renders.append(canvas)
    return list(letters.values())


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def lookalike_distances(classes: list[GlyphClass]) -> np.ndarray:
    """Mean over shared fonts of the normalised squared distance ``|a-b|² / (|a|² + |b|²)`` between the
    REFERENCE_SIZE renders of two letters (inf where they share no font).

    Pixels are quantised to 0..127 so that every dot product (at most 127² · 28² < 2²⁴) is an exact
    integer in float32: the result does not depend on the BLAS library or the summation order.
    """
    n = len(classes)
    owner = np.array([i for i, c in enumerate(classes) for _ in c.fonts])
    font_of = np.array([f for c in classes for f in c.fonts])
    base = torch.from_numpy(np.stack([r for c in classes for r in c.renders])).unsqueeze(1)
    ref = torch.cat([torch.round(_resize(b.float(), REFERENCE_SIZE) * (127 / 255)) for b in base.split(CHUNK)])
    ref = ref.flatten(1)
    total = np.zeros((n, n))
    shared = np.zeros((n, n))
    for filename, _ in FONTS:
        rows = np.flatnonzero(font_of == filename)
        if rows.size < 2:
            continue
        x, idx = ref[torch.from_numpy(rows)], owner[rows]
        sq = (x * x).sum(1).double().numpy()
        dot = (x @ x.T).double().numpy()
        norm = np.maximum(sq[:, None] + sq[None, :], 1.0)
        total[np.ix_(idx, idx)] += (sq[:, None] + sq[None, :] - 2.0 * dot) / norm
        shared[np.ix_(idx, idx)] += 1.0
    mean = np.full((n, n), np.inf)
    np.divide(total, shared, out=mean, where=shared > 0)
    np.fill_diagonal(mean, np.inf)
    return mean


def select_classes(letters: list[GlyphClass]) -> tuple[list[GlyphClass], list[tuple[str, str]]]:
    """Letters with at least MIN_FONTS fonts, one copy per look-alike group (the held-out one).

    Returns the kept classes (ordered by split, alphabet, code point) and the (dropped, kept) name pairs.
    """
    alphabet_rank = {a: i for i, a in enumerate(ALPHABETS)}
    candidates = [c for c in letters if len(c.fonts) >= MIN_FONTS]
    candidates.sort(key=lambda c: (SPLIT_RANK[c.split], alphabet_rank[c.alphabet], c.codepoint))
    dist = lookalike_distances(candidates)
    kept: list[int] = []
    dropped: list[tuple[str, str]] = []
    for i, c in enumerate(candidates):
        twins = np.flatnonzero(dist[i, kept] < LOOKALIKE_THRESHOLD)
        if twins.size:
            dropped.append((c.name, candidates[kept[twins[0]]].name))
        else:
            kept.append(i)
    split_order = {"train": 0, "val": 1, "test": 2}
    result = [candidates[i] for i in kept]
    result.sort(key=lambda c: (split_order[c.split], alphabet_rank[c.alphabet], c.codepoint))
    return result, dropped


def _dilate(x: Tensor) -> Tensor:
    """3×3 grey-level dilation (max filter), separable; pixels outside count as 0.

    (``F.max_pool2d`` with stride 1 is ~20× slower on CPU for one-channel images.)"""
    p = F.pad(x, (1, 1, 0, 0))
    x = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    p = F.pad(x, (0, 0, 1, 1))
    return torch.maximum(torch.maximum(p[..., :-2, :], p[..., 1:-1, :]), p[..., 2:, :])


def augment(base: Tensor, params: Tensor, noise: Tensor, size: int) -> Tensor:
    """Augment BASE×BASE uint8 images (B,1,H,W) and return uint8 (B,1,size,size).

    ``params`` (B, 8) uniform in [0, 1): rotation ±12°, shear ±0.2, scale 0.85–1.1, aspect 1/1.1–1.1,
    translation ±4 px per axis, stroke width (erode … dilate), noise level (σ up to 0.05).
    ``noise`` (B,1,size,size) standard normal. Only elementwise arithmetic, pooling, grid sampling and
    interpolation are used (no matrix products), so results do not depend on the BLAS library.
    """
    u = params.float()
    angle = (u[:, 0] * 2 - 1) * (12 * torch.pi / 180)
    shear = (u[:, 1] * 2 - 1) * 0.2
    scale = 0.85 + 0.25 * u[:, 2]
    aspect = torch.exp((u[:, 3] * 2 - 1) * float(np.log(1.1)))
    tx = (u[:, 4] * 2 - 1) * (4 / (BASE / 2))
    ty = (u[:, 5] * 2 - 1) * (4 / (BASE / 2))
    stroke = -0.4 + 1.4 * u[:, 6]
    sigma = 0.05 * u[:, 7]

    # stroke width: blend towards a 3×3 dilation (bolder) or erosion (thinner)
    dilated = _dilate(base).float()
    eroded = (255 - _dilate(255 - base)).float()
    x = base.float()
    s = stroke.view(-1, 1, 1, 1)
    x = (x + s.clamp(min=0) * (dilated - x) + (-s).clamp(min=0) * (eroded - x)) / 255

    # forward map: out = R(angle) · Shear(shear) · diag(sx, sy) · in + t; the grid needs its inverse
    sx, sy = scale * aspect, scale / aspect
    cos, sin = torch.cos(angle), torch.sin(angle)
    m00, m01 = cos * sx, (cos * shear - sin) * sy
    m10, m11 = sin * sx, (sin * shear + cos) * sy
    det = m00 * m11 - m01 * m10
    i00, i01, i10, i11 = m11 / det, -m01 / det, -m10 / det, m00 / det
    coords = (torch.arange(BASE, dtype=torch.float32) * 2 + 1) / BASE - 1  # pixel centres in (-1, 1)
    dx = (coords.view(1, 1, -1) - tx.view(-1, 1, 1)).unsqueeze(-1)  # (B, 1, W, 1)
    dy = (coords.view(1, -1, 1) - ty.view(-1, 1, 1)).unsqueeze(-1)  # (B, H, 1, 1)
    col_x = torch.stack((i00, i10), dim=-1).view(-1, 1, 1, 2)
    col_y = torch.stack((i01, i11), dim=-1).view(-1, 1, 1, 2)
    grid = dx * col_x + dy * col_y  # (B, H, W, 2): input (x, y) of each output pixel
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    x = _resize(x, size) + sigma.view(-1, 1, 1, 1) * noise
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


@dataclass
class GlyphSplits:
    """The built dataset: per split, images (N,1,S,S) uint8, targets, class names; plus build notes."""

    images: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    classes: dict[str, list[str]]
    alphabets: dict[str, list[str]]  # alphabet of each class
    fonts: dict[str, list[list[str]]]  # fonts of each class
    dropped_lookalikes: list[tuple[str, str]]  # (dropped letter, the kept look-alike)


def build_glyphs(image_size: int) -> GlyphSplits:
    """Render, select, augment: the whole dataset at ``image_size`` px, deterministically."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster, and far faster on a busy machine
    try:
        return _build(image_size)
    finally:
        torch.set_num_threads(threads)


def _build(image_size: int) -> GlyphSplits:
    classes, dropped = select_classes(render_letters())
    generator = torch.Generator().manual_seed(SEED)
    total = len(classes) * IMAGES_PER_CLASS
    params = torch.rand(total, 8, generator=generator, dtype=torch.float64)
    sources = [c.renders[k % len(c.fonts)] for c in classes for k in range(IMAGES_PER_CLASS)]
    out = np.empty((total, 1, image_size, image_size), dtype=np.uint8)
    for start in range(0, total, CHUNK):
        stop = min(start + CHUNK, total)
        base = torch.from_numpy(np.stack(sources[start:stop])).unsqueeze(1)
        noise = torch.randn(stop - start, 1, image_size, image_size, generator=generator)
        out[start:stop] = augment(base, params[start:stop], noise, image_size).numpy()
    images, targets, names, alphabets, fonts = {}, {}, {}, {}, {}
    labels = np.repeat(np.arange(len(classes)), IMAGES_PER_CLASS)
    for split in ("train", "val", "test"):
        members = [i for i, c in enumerate(classes) if c.split == split]
        rows = np.isin(labels, members)
        images[split] = out[rows]
        remap = {old: new for new, old in enumerate(members)}
        targets[split] = np.array([remap[t] for t in labels[rows]], dtype=np.int64)
        names[split] = [classes[i].name for i in members]
        alphabets[split] = [classes[i].alphabet for i in members]
        fonts[split] = [list(classes[i].fonts) for i in members]
    return GlyphSplits(images, targets, names, alphabets, fonts, dropped)
