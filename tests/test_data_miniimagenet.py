"""miniImageNet: the four layouts give identical data; caching; class split file; clear errors."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from fewshot.data import MiniImageNet, cache, detect_layout, load_class_split
from fewshot.data.cache import LOCK_NAME
from fewshot.data.imageio import decode_image
from fewshot.data.miniimagenet import miniimagenet_cache_dir

SPLIT = load_class_split()
# 3 / 2 / 2 real wnids per split, 5 images each (12×12 px): tiny but shaped like the real thing
CLASSES = {"train": SPLIT["train"][:3], "val": SPLIT["val"][:2], "test": SPLIT["test"][:2]}
PER_CLASS, SIZE = 5, 12
JSON_NAME = {"train": "base", "val": "val", "test": "novel"}


def test_class_split_file():
    assert {k: len(v) for k, v in SPLIT.items()} == {"train": 64, "val": 16, "test": 20}
    every = SPLIT["train"] + SPLIT["val"] + SPLIT["test"]
    assert len(set(every)) == 100 and all(w.startswith("n") and len(w) == 9 for w in every)
    assert "n01532829" in SPLIT["train"] and "n01855672" in SPLIT["val"] and "n01930112" in SPLIT["test"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same images written in all four layouts (+ the JSON layout with per-split labels).

    Returns (roots by layout name, expected images by split (N,3,S,S) class-major, expected targets)."""
    base = tmp_path_factory.mktemp("mini")
    rng = np.random.default_rng(0)
    roots = {name: base / name for name in ("csv", "pickle", "json", "json_per_split", "hdf5")}
    for r in roots.values():
        r.mkdir()
    (roots["csv"] / "images").mkdir()
    all_names = [w for s in ("train", "val", "test") for w in CLASSES[s]]
    expected, targets = {}, {}
    for split, wnids in CLASSES.items():
        rows = []  # (filename, wnid), interleaved across classes on purpose
        for k in range(PER_CLASS):
            for w in wnids:
                name = f"{w}{k + 1:08d}.jpg"
                pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(roots["csv"] / "images" / name, quality=90)
                rows.append((name, w))
        (roots["csv"] / f"{split}.csv").write_text("filename,label\n" + "".join(f"{n},{w}\n" for n, w in rows))
        # the decoded JPEG pixels are what every other layout stores
        decoded = {n: decode_image(roots["csv"] / "images" / n, SIZE) for n, _ in rows}
        by_class = {w: [n for n, lab in rows if lab == w] for w in wnids}
        order = sorted(wnids)
        expected[split] = np.stack([decoded[n] for w in order for n in by_class[w]])
        targets[split] = np.repeat(np.arange(len(order)), PER_CLASS)
        hwc = {n: a.transpose(1, 2, 0) for n, a in decoded.items()}

        # pickle: rows shuffled, class_dict points into them (val under its "-validation" name)
        perm = rng.permutation(len(rows))
        image_data = np.stack([hwc[rows[i][0]] for i in perm])
        position = {rows[i][0]: j for j, i in enumerate(perm)}
        class_dict = {w: [position[n] for n in by_class[w]] for w in wnids}
        pkl = "validation" if split == "val" else split
        with open(roots["pickle"] / f"mini-imagenet-cache-{pkl}.pkl", "wb") as f:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, f)

        # JSON: absolute paths; labels global (all 100-style names) or per split from 0
        paths = [str(roots["csv"] / "images" / n) for n, _ in rows]
        glob = {"label_names": all_names, "image_names": paths, "image_labels": [all_names.index(w) for _, w in rows]}
        per = {"label_names": wnids, "image_names": paths, "image_labels": [wnids.index(w) for _, w in rows]}
        (roots["json"] / f"{JSON_NAME[split]}.json").write_text(json.dumps(glob))
        (roots["json_per_split"] / f"{JSON_NAME[split]}.json").write_text(json.dumps(per))

        # HDF5: one array per wnid
        with h5py.File(roots["hdf5"] / f"{split}_data.hdf5", "w") as f:
            group = f.create_group("datasets")
            for w in wnids:
                group.create_dataset(w, data=np.stack([hwc[n] for n in by_class[w]]))
        (roots["hdf5"] / f"{split}_labels.json").write_text(json.dumps(wnids))
    return roots, expected, targets


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_all_layouts_give_identical_data(layouts, split, tmp_path):
    roots, expected, targets = layouts
    for name, root in roots.items():
        ds = MiniImageNet(root, split, image_size=SIZE, cache=tmp_path)
        assert ds.layout == name.replace("_per_split", "")
        assert ds.classes == sorted(CLASSES[split])
        assert np.array_equal(np.asarray(ds.images), expected[split]), name
        assert np.array_equal(ds.targets.numpy(), targets[split]), name
        image, target = ds[PER_CLASS + 1]
        assert (
            target == 1
            and image.shape == (3, SIZE, SIZE)
            and np.array_equal(image.numpy(), expected[split][PER_CLASS + 1])
        )
        assert [len(i) for i in ds.class_indices] == [PER_CLASS] * len(CLASSES[split])


def test_resizing_is_the_same_for_files_and_arrays(layouts, tmp_path):
    roots, _, _ = layouts
    sets = [MiniImageNet(roots[n], "val", image_size=10, cache=tmp_path) for n in ("csv", "pickle", "hdf5")]
    assert sets[0].images.shape == (10, 3, 10, 10)
    assert all(np.array_equal(np.asarray(s.images), np.asarray(sets[0].images)) for s in sets)


def test_cache_is_reused_and_memory_mapped(layouts, tmp_path):
    roots, expected, _ = layouts
    first = MiniImageNet(roots["csv"], "test", image_size=SIZE, cache=tmp_path)
    assert isinstance(first.images, np.memmap)
    assert first.cache_dir.parent == tmp_path / "miniimagenet"
    moved = tmp_path / "images-moved"
    (roots["csv"] / "images").rename(moved)  # the second load reads only the cache
    try:
        (roots["csv"] / "images").mkdir()
        second = MiniImageNet(roots["csv"], "test", image_size=SIZE, cache=tmp_path)
        assert second.cache_dir == first.cache_dir
        assert np.array_equal(np.asarray(second.images), expected["test"])
    finally:
        (roots["csv"] / "images").rmdir()
        moved.rename(roots["csv"] / "images")


def test_cache_root_from_environment(layouts, tmp_path, monkeypatch):
    roots, _, _ = layouts
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "envcache"))
    ds = MiniImageNet(roots["hdf5"], "val", image_size=SIZE)
    assert ds.cache_dir.parent == tmp_path / "envcache" / "miniimagenet"


def test_missing_root_lists_layouts_and_readme(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        MiniImageNet(tmp_path / "nowhere", "val")
    message = str(err.value)
    assert "does not exist" in message and "data/miniimagenet/README.md" in message
    for expected in (
        "val.csv + images/",
        "mini-imagenet-cache-val.pkl or mini-imagenet-cache-validation.pkl",
        "val.json",
        "val_data.hdf5 + val_labels.json",
    ):
        assert expected in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=r"no miniImageNet layout found in .*empty.* for split 'test'(.|\n)*"
        r"novel\.json(.|\n)*data/miniimagenet/README\.md",
    ):
        MiniImageNet(tmp_path / "empty", "test")


def test_unknown_split_and_layout(layouts):
    roots, _, _ = layouts
    with pytest.raises(
        ValueError, match=r"miniImageNet: unknown split 'validation'; valid splits are train, val, test"
    ):
        MiniImageNet(roots["csv"], "validation")
    with pytest.raises(ValueError, match=r"unknown layout 'lmdb'; valid layouts are csv, pickle, json, hdf5"):
        detect_layout(roots["csv"], "train", layout="lmdb")
    assert detect_layout(roots["pickle"], "val")[0] == "pickle"


def test_csv_without_expected_column(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "train.csv").write_text("file,label\nn0153282900000001.jpg,n01532829\n")
    with pytest.raises(
        ValueError, match=r"train\.csv': missing column 'filename' \(columns found: \['file', 'label'\]\)"
    ):
        MiniImageNet(tmp_path, "train", cache=tmp_path / "cache")


def test_unreadable_image_is_named_and_leaves_no_cache(layouts, tmp_path):
    roots, _, _ = layouts
    root = tmp_path / "broken"
    (root / "images").mkdir(parents=True)
    for p in (roots["csv"] / "images").iterdir():
        (root / "images" / p.name).write_bytes(p.read_bytes())
    (root / "train.csv").write_text((roots["csv"] / "train.csv").read_text())
    bad = root / "images" / f"{CLASSES['train'][1]}00000003.jpg"
    bad.write_bytes(b"not a jpeg at all")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"cannot read image '{bad}'"):
        MiniImageNet(root, "train", image_size=SIZE, cache=cache)
    assert list((cache / "miniimagenet").iterdir()) == []  # no cache, no temporary directory
    bad.unlink()
    with pytest.raises(FileNotFoundError, match=f"image file not found: '{bad}'"):
        MiniImageNet(root, "train", image_size=SIZE, cache=cache)


def test_bad_pickle_json_and_missing_h5py(tmp_path, monkeypatch):
    with open(tmp_path / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": np.zeros((1, 4, 4, 3), np.uint8)}, f)
    with pytest.raises(ValueError, match=r"mini-imagenet-cache-train\.pkl': missing key 'class_dict'"):
        MiniImageNet(tmp_path, "train", cache=tmp_path / "c")
    (tmp_path / "novel.json").write_text(json.dumps({"label_names": ["a"], "image_names": []}))
    with pytest.raises(ValueError, match=r"novel\.json': missing key 'image_labels'"):
        MiniImageNet(tmp_path, "test", cache=tmp_path / "c")
    (tmp_path / "val_data.hdf5").write_bytes(b"")
    (tmp_path / "val_labels.json").write_text("[]")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"needs h5py, an optional extra: pip install 'acdc-fewshot\[hdf5\]'"):
        MiniImageNet(tmp_path, "val", cache=tmp_path / "c")


def test_pickles_under_both_validation_names(layouts, tmp_path):
    roots, expected, _ = layouts
    root = tmp_path / "valpkl"
    root.mkdir()
    (root / "mini-imagenet-cache-val.pkl").write_bytes(
        (roots["pickle"] / "mini-imagenet-cache-validation.pkl").read_bytes()
    )
    ds = MiniImageNet(root, "val", image_size=SIZE, cache=tmp_path)
    assert np.array_equal(np.asarray(ds.images), expected["val"])


def test_dataset_pickles_by_file_name(layouts, tmp_path):
    roots, expected, _ = layouts
    ds = MiniImageNet(roots["csv"], "train", image_size=SIZE, cache=tmp_path)
    assert isinstance(ds.__getstate__()["images"], Path)  # pickled by file name, not by contents
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(np.asarray(clone.images), expected["train"]) and clone.classes == ds.classes
    assert Path(clone.images.filename) == Path(ds.images.filename)


# ------------------------------------------------------------------------------------ bad files: one clear error


def write_mini_pickle(root: Path, split: str, image_data, class_dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"mini-imagenet-cache-{split}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"image_data": image_data, "class_dict": class_dict}, f)
    return path


def assert_nothing_cached(cache: Path) -> None:
    assert not (cache / "miniimagenet").exists() or list((cache / "miniimagenet").iterdir()) == []


@pytest.mark.parametrize("index", [-1, 4, 10**6])
def test_pickle_row_index_out_of_range(tmp_path, index):
    images = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    write_mini_pickle(tmp_path / "mini", "test", images, {"n01930112": [0, 1], "n01981276": [2, index]})
    with pytest.raises(ValueError) as err:
        MiniImageNet(tmp_path / "mini", "test", image_size=SIZE, cache=tmp_path / "cache")
    assert str(err.value) == (
        f"'{tmp_path / 'mini' / 'mini-imagenet-cache-test.pkl'}': class 'n01981276' has row index {index}, "
        "outside the valid range 0..3 of image_data (4 images)"
    )
    assert_nothing_cached(tmp_path / "cache")


@pytest.mark.parametrize(
    "image_data, got",
    [
        (["abc", "def"], "list"),
        (np.array(["abc", "def"]), "<U3 array of shape (2,)"),
        (np.zeros((2, SIZE, SIZE, 3), np.float32), "float32 array of shape (2, 12, 12, 3)"),
    ],
)
def test_pickle_image_data_not_a_uint8_image_array(tmp_path, image_data, got):
    path = write_mini_pickle(tmp_path / "mini", "train", image_data, {"n01532829": [0, 1]})
    with pytest.raises(ValueError) as err:
        MiniImageNet(tmp_path / "mini", "train", image_size=SIZE, cache=tmp_path / "cache")
    assert str(err.value) == f"'{path}': 'image_data' must be a uint8 array N×H×W×3, got {got}"
    assert_nothing_cached(tmp_path / "cache")


def test_pickle_truncated(layouts, tmp_path):
    roots, _, _ = layouts
    root = tmp_path / "mini"
    root.mkdir()
    whole = (roots["pickle"] / "mini-imagenet-cache-train.pkl").read_bytes()
    (root / "mini-imagenet-cache-train.pkl").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        ValueError, match=r"cannot read pickle '.*mini-imagenet-cache-train\.pkl': UnpicklingError"
    ) as err:
        MiniImageNet(root, "train", image_size=SIZE, cache=tmp_path / "cache")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["not hdf5", "truncated"])
def test_hdf5_not_hdf5_or_truncated(layouts, tmp_path, damage):
    roots, _, _ = layouts
    root = tmp_path / "mini"
    root.mkdir()
    whole = (roots["hdf5"] / "val_data.hdf5").read_bytes()
    (root / "val_data.hdf5").write_bytes(
        b"this is not an HDF5 file" if damage == "not hdf5" else whole[: len(whole) // 2]
    )
    (root / "val_labels.json").write_text((roots["hdf5"] / "val_labels.json").read_text())
    with pytest.raises(ValueError) as err:
        MiniImageNet(root, "val", image_size=SIZE, cache=tmp_path / "cache")
    message = str(err.value)
    assert message.startswith(f"'{root / 'val_data.hdf5'}' is not a readable HDF5 file (") and "\n" not in message
    assert_nothing_cached(tmp_path / "cache")


def test_hdf5_class_that_is_not_an_image_array(tmp_path):
    root = tmp_path / "mini"
    root.mkdir()
    with h5py.File(root / "val_data.hdf5", "w") as f:
        f.create_group("datasets").create_dataset("n01855672", data=np.zeros((2, SIZE, SIZE), np.uint8))
    (root / "val_labels.json").write_text(json.dumps(["n01855672"]))
    with pytest.raises(
        ValueError,
        match=r"val_data\.hdf5': class 'n01855672' must be a uint8 array n×H×W×3, "
        r"got uint8 array of shape \(2, 12, 12\)",
    ):
        MiniImageNet(root, "val", image_size=SIZE, cache=tmp_path / "cache")
    assert_nothing_cached(tmp_path / "cache")


@pytest.mark.parametrize(
    "name, text",
    [
        ("novel.json", '{"label_names": ["a"], "image_names": [}'),
        ("test_labels.json", "[n01930112]"),
        ("novel.json", b"\xff\xfe not utf-8"),
    ],
)
def test_malformed_json_names_the_file(tmp_path, name, text):
    root = tmp_path / "mini"
    root.mkdir()
    if name == "test_labels.json":
        with h5py.File(root / "test_data.hdf5", "w") as f:
            f.create_group("datasets")
    path = root / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as err:
        MiniImageNet(root, "test", image_size=SIZE, cache=tmp_path / "cache")
    assert str(err.value).startswith(f"'{path}' is not valid JSON (") and "\n" not in str(err.value)


def test_json_list_of_wrong_shape(tmp_path):
    (tmp_path / "val.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(
        ValueError,
        match=r"val\.json': expected a JSON object with label_names, image_names and "
        r"image_labels, got a list",
    ):
        MiniImageNet(tmp_path, "val", cache=tmp_path / "c")
    (tmp_path / "val.json").write_text(json.dumps({"label_names": ["a"], "image_names": [3], "image_labels": [0]}))
    with pytest.raises(ValueError, match=r"val\.json': 'image_names' must be a list of strings"):
        MiniImageNet(tmp_path, "val", cache=tmp_path / "c")


@pytest.mark.parametrize(
    "file, damage",
    [
        ("images.npy", "truncate"),
        ("targets.npy", "truncate"),
        ("meta.json", "truncate"),
        ("targets.npy", "shorter"),
    ],
)
def test_damaged_cache_names_the_file_and_how_to_rebuild(layouts, tmp_path, file, damage):
    roots, expected, _ = layouts
    ds = MiniImageNet(roots["pickle"], "test", image_size=SIZE, cache=tmp_path)
    path = ds.cache_dir / file
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 50])
    else:
        np.save(path, np.zeros(3, np.int64))
    del ds
    with pytest.raises(ValueError) as err:
        MiniImageNet(roots["pickle"], "test", image_size=SIZE, cache=tmp_path)
    message = str(err.value)
    assert message.startswith(f"cache file '{path}' is damaged (") and "\n" not in message
    assert message.endswith(f"); delete the cache folder '{path.parent}' and it is rebuilt on the next run")
    if file == "images.npy":
        assert "(mmap length is greater than file size)" in message
    shutil.rmtree(path.parent)
    rebuilt = MiniImageNet(roots["pickle"], "test", image_size=SIZE, cache=tmp_path)
    assert np.array_equal(np.asarray(rebuilt.images), expected["test"])


# ------------------------------------------------------------------------------------ leftovers of killed builds


def test_stale_temporary_folders_are_removed_on_the_next_build(layouts, tmp_path):
    """A build killed with SIGKILL leaves ``.<cache>.tmp-*``; the next build of that cache removes it if its
    lock is free (or, without a lock file, if untouched for a day) and leaves every other folder alone."""
    roots, expected, _ = layouts
    final = miniimagenet_cache_dir(roots["pickle"], "val", SIZE, cache=tmp_path)
    final.parent.mkdir(parents=True)
    hour_ago, two_days_ago = time.time() - 3600, time.time() - 2 * 86400

    def leftover(name: str, lock: bool, when: float) -> Path:
        folder = final.parent / name
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"half-written")
        if lock:
            (folder / LOCK_NAME).touch()
            os.utime(folder / LOCK_NAME, (when, when))
        os.utime(folder / "images.npy", (when, when))
        os.utime(folder, (when, when))
        return folder

    dead = leftover(f".{final.name}.tmp-dead1234", lock=True, when=hour_ago)
    legacy = leftover(f".{final.name}.tmp-old5678", lock=False, when=two_days_ago)
    live = leftover(f".{final.name}.tmp-live0000", lock=True, when=hour_ago)
    recent = leftover(f".{final.name}.tmp-new0000", lock=False, when=time.time())
    other = leftover(".val-pickle-99px-0123456789ab.tmp-dead0000", lock=True, when=hour_ago)
    holder = os.open(live / LOCK_NAME, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a build still running (here or in another process)
    try:
        ds = MiniImageNet(roots["pickle"], "val", image_size=SIZE, cache=tmp_path)
    finally:
        os.close(holder)
    assert np.array_equal(np.asarray(ds.images), expected["val"]) and ds.cache_dir == final
    assert not dead.exists() and not legacy.exists()
    assert live.exists() and recent.exists() and other.exists()
    assert sorted(p.name for p in final.iterdir()) == ["images.npy", "meta.json", "targets.npy"]  # no lock file left


def test_a_build_killed_by_sigkill_is_cleaned_up(tmp_path, monkeypatch):
    """A real SIGKILL: the kernel frees the dead build's lock, so its folder counts as stale."""
    final = tmp_path / "store"
    script = textwrap.dedent(f"""
        import sys, time
        from fewshot.data.cache import atomic_directory
        with atomic_directory({str(final)!r}) as tmp:
            (tmp / "images.npy").write_bytes(b"partial")
            print(tmp, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.is_dir() and tmp.name.startswith(".store.tmp-")
        monkeypatch.setattr(cache, "LOCK_GRACE_S", 0.0)
        assert cache.remove_stale_builds(final) == []  # still running: its lock is held
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert tmp.is_dir()  # nothing cleaned up after SIGKILL ...
    with cache.atomic_directory(final) as new:  # ... until the next build of the same cache
        (new / "images.npy").write_bytes(b"complete")
    assert not tmp.exists() and (final / "images.npy").read_bytes() == b"complete"
