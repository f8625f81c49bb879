"""python -m fewshot.data.prepare miniimagenet: builds the CSV layout from a (tiny, fake) ImageNet folder."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fewshot.data import MiniImageNet
from fewshot.data.prepare import main

WNIDS = {"train": ["n01532829", "n01558993"], "val": ["n01855672"], "test": ["n01930112"]}
NUMBERS = [2, 10, 33, 7, 100]  # ImageNet numbers: numeric order 2,7,10,33,100 differs from text order
SIZE = 16


def colour(wnid: str, number: int) -> np.ndarray:
    """A distinct flat colour per source image (survives resizing and JPEG)."""
    seed = int(wnid[1:]) % 1000 * 1000 + number
    return np.random.default_rng(seed).integers(30, 226, 3)


def fake_imagenet(root):
    for wnids in WNIDS.values():
        for w in wnids:
            (root / w).mkdir(parents=True)
            for i, n in enumerate(NUMBERS):
                h, w_ = 40 + 7 * i, 50 - 3 * i  # full-size images of varying shapes
                Image.fromarray(np.full((h, w_, 3), colour(w, n), np.uint8)).save(root / w / f"{w}_{n}.JPEG")
    (root / WNIDS["train"][0] / "README.txt").write_text("not an image")


def write_csvs(csv_dir, picks):
    csv_dir.mkdir()
    for split, wnids in WNIDS.items():
        rows = [f"{w}{k:08d}.jpg,{w}\n" for w in wnids for k in picks]
        (csv_dir / f"{split}.csv").write_text("filename,label\n" + "".join(rows))


def test_prepare_builds_the_csv_layout(tmp_path, capsys):
    fake_imagenet(tmp_path / "train")
    write_csvs(tmp_path / "csv", picks=[1, 3, 5])  # 1st, 3rd and 5th image by ImageNet number: 2, 10, 100
    out = tmp_path / "mini"
    argv = [
        "miniimagenet",
        "--imagenet-train",
        str(tmp_path / "train"),
        "--csv-dir",
        str(tmp_path / "csv"),
        "--out",
        str(out),
        "--image-size",
        str(SIZE),
        "--workers",
        "1",
    ]
    assert main(argv) == 0
    for split, wnids in WNIDS.items():
        ds = MiniImageNet(out, split, image_size=SIZE, cache=tmp_path / "cache")
        assert ds.layout == "csv" and ds.classes == sorted(wnids) and ds.images.shape == (3 * len(wnids), 3, SIZE, SIZE)
        for c, w in enumerate(ds.classes):
            for image, number in zip(ds.load(ds.class_indices[c]), [2, 10, 100]):
                mean = image.float().mean(dim=(1, 2)).numpy()
                assert np.abs(mean - colour(w, number)).max() < 4, (w, number)
    assert "train: 6 images (0 already there)" in capsys.readouterr().out
    assert main(argv) == 0  # rerun: everything is already there
    assert "train: 6 images (6 already there)" in capsys.readouterr().out


def test_prepare_errors(tmp_path, capsys):
    fake_imagenet(tmp_path / "train")
    write_csvs(tmp_path / "csv", picks=[1, 6])  # each class has only 5 images
    argv = [
        "miniimagenet",
        "--imagenet-train",
        str(tmp_path / "train"),
        "--csv-dir",
        str(tmp_path / "csv"),
        "--out",
        str(tmp_path / "mini"),
        "--image-size",
        str(SIZE),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.csv' line 3: 'n0153282900000006.jpg' asks for image 6 of class 'n01532829'" in err
    assert "has 5 images" in err
    assert not (tmp_path / "mini").exists()  # nothing written before every row is checked
    assert main(argv[:3] + ["--csv-dir", str(tmp_path / "nocsv")] + argv[5:]) == 2
    assert "split CSV not found" in capsys.readouterr().err


def test_prepare_refuses_file_names_that_leave_the_output_folder(tmp_path, capsys):
    fake_imagenet(tmp_path / "train")
    write_csvs(tmp_path / "csv", picks=[1, 2])
    escape = "../../escape/n0155899300000001.jpg"  # a valid <label><number> stem: only the folder part is wrong
    val = (tmp_path / "csv" / "val.csv").read_text()
    (tmp_path / "csv" / "train.csv").write_text(
        f"filename,label\nn0153282900000001.jpg,n01532829\n{escape},n01558993\n"
    )
    out = tmp_path / "work" / "mini"
    argv = [
        "miniimagenet",
        "--imagenet-train",
        str(tmp_path / "train"),
        "--csv-dir",
        str(tmp_path / "csv"),
        "--out",
        str(out),
        "--image-size",
        str(SIZE),
        "--workers",
        "1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: '{tmp_path / 'csv' / 'train.csv'}' line 3: file name {escape!r} would be written outside "
        f"the output folder '{out}'; file names must be plain names like n0153282900000005.jpg\n"
    )
    assert not (tmp_path / "escape").exists() and not (tmp_path / "work").exists()
    (tmp_path / "csv" / "train.csv").write_text("filename,label\nn01532829/n0153282900000001.jpg,n01532829\n")
    assert main(argv) == 2
    assert "line 2: file name 'n01532829/n0153282900000001.jpg' is not a plain file name" in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and val == (tmp_path / "csv" / "val.csv").read_text()


def test_prepare_refuses_a_bad_image_size_before_writing(tmp_path, capsys):
    fake_imagenet(tmp_path / "train")
    write_csvs(tmp_path / "csv", picks=[1])
    out = tmp_path / "mini"
    for size in ("0", "-3", "4"):
        argv = [
            "miniimagenet",
            "--imagenet-train",
            str(tmp_path / "train"),
            "--csv-dir",
            str(tmp_path / "csv"),
            "--out",
            str(out),
            "--image-size",
            size,
            "--workers",
            "1",
        ]
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: --image-size must be an integer >= 8, got {size}\n"
        assert not out.exists()
