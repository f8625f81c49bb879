"""Reading a data file never runs code: dataset pickles go through ``fewshot.data.safe_pickle``.

A crafted pickle whose ``__reduce__`` calls ``os.system`` is refused before anything is called (the
command would create a marker file; it must not exist afterwards), with one line naming the file and
the global. Legitimate pickles of every protocol, of numpy 1.x and of Python 2 (CIFAR) still load.
"""

from __future__ import annotations

import io
import os
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest

from fewshot.data import MiniImageNet
from fewshot.data.classification import read_cifar
from fewshot.data.safe_pickle import DataUnpickler, ForbiddenGlobalError, load_data_pickle

FORBIDDEN = r"refusing to load: it references (os|posix)\.system, which a dataset pickle never contains"


class RunsCommand:
    """Pickles as a call of ``os.system(command)``: what an attacker puts into a dataset pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def touch(marker: Path) -> RunsCommand:
    return RunsCommand(f"touch {shlex.quote(str(marker))}")


def mini_pickle(n: int = 4, size: int = 8, seed: int = 0) -> dict:
    """A miniImageNet pickle's dict: uint8 image_data N×S×S×3 and class_dict wnid → row indices."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return {"image_data": images, "class_dict": {"n01930112": list(range(0, n, 2)), "n01981276": list(range(1, n, 2))}}


def expected_images(data: dict) -> np.ndarray:
    rows = [i for c in sorted(data["class_dict"]) for i in data["class_dict"][c]]
    return data["image_data"][rows].transpose(0, 3, 1, 2)


# ------------------------------------------------------------------------------------ refused


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_crafted_miniimagenet_pickle_runs_no_command(tmp_path, protocol):
    marker = tmp_path / "marker"
    data = {**mini_pickle(), "extra": touch(marker)}
    root = tmp_path / "mini"
    root.mkdir()
    with open(root / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    with pytest.raises(ForbiddenGlobalError, match=f"mini-imagenet-cache-test\\.pkl': {FORBIDDEN}") as err:
        MiniImageNet(root, "test", image_size=8, cache=tmp_path / "cache")
    assert not marker.exists()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "miniimagenet").exists()  # nothing written


@pytest.mark.parametrize("file", ["batches.meta", "data_batch_2"])
def test_crafted_cifar_pickle_runs_no_command(tmp_path, file):
    marker = tmp_path / "marker"
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    with open(folder / file, "rb") as f:
        data = pickle.load(f)
    data["x"] = touch(marker)
    with open(folder / file, "wb") as f:
        pickle.dump(data, f, protocol=2)
    with pytest.raises(ForbiddenGlobalError, match=f"{file}': {FORBIDDEN}"):
        read_cifar(tmp_path, "cifar10", train=True)
    assert not marker.exists()


def test_cli_prints_one_error_line_and_runs_nothing(tmp_path, capsys, monkeypatch):
    from fewshot.cli import main

    marker = tmp_path / "marker"
    root = tmp_path / "mini"
    root.mkdir()
    for split in ("train", "val", "test"):
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({**mini_pickle(), "extra": touch(marker)}, f)
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_:
        main(
            ["--dataset", "miniimagenet", "--data-root", str(root), "--no-progress", "--out", str(tmp_path / "run")],
            method="maml",
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "refusing to load" in err
    assert not marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("subprocess", "Popen"),
        ("os", "system"),
        ("posix", "system"),
        ("numpy", "load"),
        ("numpy.testing._private.utils", "runstring"),
        ("copyreg", "_reconstructor"),
        ("builtins", "getattr"),
        ("__builtin__", "eval"),
        ("numpy.core.multiarray", "_get_ndarray_c_version"),
    ],
)
def test_any_other_global_is_refused_before_import(module, name):
    payload = f"c{module}\n{name}\n(S'1+1'\ntR.".encode()  # protocol 0: GLOBAL, then call it with '1+1'
    with pytest.raises(ForbiddenGlobalError, match=rf"^'data\.pkl': refusing to load: it references {module}\.{name},"):
        DataUnpickler(io.BytesIO(payload), "data.pkl").load()


def test_codecs_encode_only_decodes_latin1(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="pickles of bytes use latin1"):
        load_data_pickle(path)


# ------------------------------------------------------------------------------------ still loaded


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_legitimate_miniimagenet_pickles_load(tmp_path, protocol):
    data = mini_pickle(n=6, size=8, seed=protocol)
    root = tmp_path / "mini"
    root.mkdir()
    with open(root / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    ds = MiniImageNet(root, "val", image_size=8, cache=tmp_path / "cache")
    assert ds.classes == ["n01930112", "n01981276"]
    assert np.array_equal(np.asarray(ds.images), expected_images(data))


def test_numpy1_pickle_loads(tmp_path):
    """numpy 1.x wrote ``numpy.core.multiarray``; numpy 2 writes ``numpy._core.multiarray``."""
    data = {**mini_pickle(), "scalar": np.int64(7)}
    payload = pickle.dumps(data, protocol=2)
    assert b"numpy._core.multiarray" in payload or b"numpy.core.multiarray" in payload
    root = tmp_path / "mini"
    root.mkdir()
    (root / "mini-imagenet-cache-train.pkl").write_bytes(payload.replace(b"numpy._core.", b"numpy.core."))
    assert load_data_pickle(root / "mini-imagenet-cache-train.pkl")["scalar"] == 7
    ds = MiniImageNet(root, "train", image_size=8, cache=tmp_path / "cache")
    assert np.array_equal(np.asarray(ds.images), expected_images(data))


def test_python2_cifar_pickles_load(tmp_path):
    """CIFAR's python batches were written by Python 2 cPickle: str raw data, read with latin1."""
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar10(folder, python2=True)
    train = read_cifar(tmp_path, "cifar10", train=True)
    assert train.classes == [f"class{i}" for i in range(10)]
    assert train.targets == [t for b in written[:5] for t in b["labels"]]
    data = np.concatenate([b["data"] for b in written[:5]])
    assert np.array_equal(train.images.numpy(), data.reshape(-1, 3, 32, 32))


# ------------------------------------------------------------------------------------ helpers


def write_cifar10(folder: Path, python2: bool = False) -> list[dict]:
    """A tiny CIFAR-10 folder (2 images per batch); ``python2``: pickled as Python 2 cPickle does."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, 2)],
            "batch_label": f"{name} of 6",
        }
        (folder / name).write_bytes(py2_pickle(batch) if python2 else pickle.dumps(batch, protocol=2))
        batches.append(batch)
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta) if python2 else pickle.dumps(meta, protocol=2))
    return batches


def py2_pickle(obj) -> bytes:
    """Protocol-2 bytes as Python 2's cPickle writes them for dicts, lists, str, int and uint8 arrays."""
    return b"\x80\x02" + _py2(obj) + b"."


def _py2(obj) -> bytes:
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(v) for v in obj) + b"e"
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, (str, bytes)):  # a Python 2 str: BINSTRING of raw bytes
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        return b"T" + struct.pack("<i", len(raw)) + raw
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8
    dtype = (
        b"cnumpy\ndtype\n"
        + _py2("u1")
        + b"J\x00\x00\x00\x00J\x01\x00\x00\x00\x87R"
        + b"(J\x03\x00\x00\x00"
        + _py2("|")
        + b"NNN"
        + b"J\xff\xff\xff\xff" * 2
        + b"J\x00\x00\x00\x00tb"
    )
    shape = b"(" + b"".join(_py2(int(d)) for d in obj.shape) + b"t"
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n(J\x00\x00\x00\x00t"
        + _py2("b")
        + b"\x87R"
        + b"(J\x01\x00\x00\x00"
        + shape
        + dtype
        + b"\x89"
        + _py2(obj.tobytes())
        + b"tb"
    )
