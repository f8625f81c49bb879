"""The embedded glyphs dataset: counts, split by alphabet, look-alike dedup, polarity, determinism, atomic cache.

All tests share one build in the default cache ($FEWSHOT_CACHE or ~/.cache/fewshot).
"""

from __future__ import annotations

import hashlib
import json

import matplotlib
import numpy as np
import pytest
import torch

import fewshot.data.glyphs as glyphs_module
from fewshot.data import EpisodeSampler, Glyphs, build_transform, create_dataset
from fewshot.data.glyph_render import ALPHABETS, IMAGES_PER_CLASS, GlyphSplits, build_glyphs
from fewshot.data.glyphs import ensure_glyphs_cache

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def glyphs():
    return {s: Glyphs(s) for s in SPLITS}


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_counts(glyphs):
    assert sum(len(g.classes) for g in glyphs.values()) >= 300
    for g in glyphs.values():
        counts = torch.bincount(g.targets, minlength=len(g.classes))
        assert int(counts.min()) >= 20 and int(counts.max()) == IMAGES_PER_CLASS
        assert g.images.shape[1:] == (1, 28, 28) and g.images.dtype == np.uint8
        assert (g.channels, g.image_size) == (1, 28)
    if matplotlib.__version__.startswith("3.11."):  # the counts in the Glyphs docstring and README
        assert {s: len(g.classes) for s, g in glyphs.items()} == {"train": 377, "val": 84, "test": 262}
        assert {s: len(g) for s, g in glyphs.items()} == {"train": 12064, "val": 2688, "test": 8384}


def test_splits_are_disjoint_by_alphabet(glyphs):
    alphabets = {s: set(g.alphabets) for s, g in glyphs.items()}
    assert alphabets == {
        "train": {"Latin", "Georgian"},
        "val": {"Greek"},
        "test": {"Cyrillic", "Armenian"},
    }
    assert {a: s for a, (_, s) in ALPHABETS.items()} == {a: s for s in SPLITS for a in alphabets[s]}
    names = [set(g.classes) for g in glyphs.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    for g in glyphs.values():
        assert all(c.split("/")[0] == a for c, a in zip(g.classes, g.alphabets))


def test_lookalikes_keep_the_held_out_copy(glyphs):
    train, val, test = (set(glyphs[s].classes) for s in SPLITS)
    assert "Cyrillic/U+0410 А" in test and "Latin/U+0041 A" not in train and "Greek/U+0391 Α" not in val
    assert "Cyrillic/U+043E о" in test and "Latin/U+006F o" not in train
    assert "Armenian/U+057D ս" in test and "Latin/U+0075 u" not in train
    assert "Latin/U+0044 D" in train and "Greek/U+0394 Δ" in val and "Cyrillic/U+0416 Ж" in test
    build = json.loads((ensure_glyphs_cache() / "build.json").read_text())
    rank = {"test": 0, "val": 1, "train": 2}
    split_of = {a: s for a, (_, s) in ALPHABETS.items()}
    for dropped, kept in build["dropped_lookalikes"]:
        assert rank[split_of[kept.split("/")[0]]] <= rank[split_of[dropped.split("/")[0]]]
        assert not any(dropped in g.classes for g in glyphs.values())


def test_white_on_black(glyphs):
    for g in glyphs.values():
        images = np.asarray(g.images)
        border = np.concatenate([images[:, 0, 0, :], images[:, 0, -1, :], images[:, 0, :, 0], images[:, 0, :, -1]])
        assert border.mean() < 10  # black background (a little noise)
        assert (images.reshape(len(images), -1).max(1) > 128).mean() > 0.99  # bright ink in (almost) every image


def test_build_is_deterministic(glyphs):
    again = build_glyphs(28)
    for s in SPLITS:
        assert digest(again.images[s]) == digest(glyphs[s].images)
        assert again.classes[s] == glyphs[s].classes
        assert np.array_equal(again.targets[s], glyphs[s].targets.numpy())


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    tiny = GlyphSplits(
        images={s: np.zeros((2, 1, 28, 28), np.uint8) for s in SPLITS},
        targets={s: np.zeros(2, np.int64) for s in SPLITS},
        classes={s: ["x"] for s in SPLITS},
        alphabets={s: ["Latin"] for s in SPLITS},
        fonts={s: [["f.ttf"]] for s in SPLITS},
        dropped_lookalikes=[],
    )
    monkeypatch.setattr(glyphs_module.glyph_render, "build_glyphs", lambda size: tiny)
    calls = []

    def failing_write(directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_write(directory, *args, **kwargs)

    real_write = glyphs_module.write_store
    monkeypatch.setattr(glyphs_module, "write_store", failing_write)
    with pytest.raises(OSError, match="simulated"):
        Glyphs("train", root=tmp_path)
    assert len(calls) == 2
    assert list((tmp_path / "glyphs").iterdir()) == []  # neither the cache nor its temporary directory
    monkeypatch.setattr(glyphs_module, "write_store", real_write)
    assert len(Glyphs("val", root=tmp_path)) == 2  # the next build completes


def test_factory_and_episodes(glyphs):
    val = create_dataset("glyphs", "val")
    assert isinstance(val, Glyphs) and val.classes == glyphs["val"].classes
    episode = EpisodeSampler(val, 5, 5, 15, 1, seed=0, transform=build_transform("glyphs", 28, train=True))[0]
    assert episode.support_images.shape == (25, 1, 28, 28) and episode.query_images.shape == (75, 1, 28, 28)
    with pytest.raises(ValueError, match=r"glyphs: unknown split 'dev'; valid splits are train, val, test"):
        Glyphs("dev")
    with pytest.raises(ValueError, match=r"unknown dataset 'omniglot'; valid names are miniimagenet, glyphs"):
        create_dataset("omniglot", "train")
    with pytest.raises(ValueError, match=r"needs root=.*data/miniimagenet/README.md"):
        create_dataset("miniimagenet", "train")
