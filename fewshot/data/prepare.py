"""Build datasets on disk.

``python -m fewshot.data.prepare miniimagenet --imagenet-train DIR --csv-dir DIR --out DIR``
builds miniImageNet in the CSV layout (``train.csv``, ``val.csv``, ``test.csv`` + ``images/`` of 84×84
JPEGs) from a raw ImageNet train folder (one sub-folder per wnid) and Ravi & Larochelle's split CSVs.
A CSV row ``n0153282900000005.jpg,n01532829`` names the 5th image of class n01532829, counting the
class's files in the order of their ImageNet number (``n01532829_<number>.JPEG``), as the usual
generator scripts do. Each split's CSV is written only after all its images, so an interrupted run
never leaves a split that looks complete; rerunning it resumes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot.data.imageio import IMAGE_EXTENSIONS, decode_image
from fewshot.data.miniimagenet import read_split_csv
from fewshot.data.store import SPLITS


def class_files(folder: Path) -> list[Path]:
    """The image files of one ImageNet class folder, ordered by their ImageNet number (``<wnid>_<n>``)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet class folder not found: {str(folder)!r}")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]

    def key(p: Path) -> tuple[int, str]:
        m = re.search(r"_(\d+)$", p.stem)
        return (int(m.group(1)) if m else sys.maxsize, p.name)

    return sorted(files, key=key)


def check_image_size(image_size: int) -> int:
    """``image_size`` if it is an integer >= 8 (as ``MiniImageNet`` accepts); otherwise a ValueError."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"--image-size must be an integer >= 8, got {image_size!r}")
    return image_size


def check_file_name(name: str, csv_path: Path, line: int, out: Path) -> None:
    """Refuse a CSV file name that is not a plain name, to be written as ``out/images/<name>``.

    ``../../x.jpg`` or ``/tmp/x.jpg`` would be written outside ``out``; ``a/x.jpg`` into a missing folder.
    """
    if name not in ("", ".", "..") and Path(name).name == name:
        return
    where = f"{str(csv_path)!r} line {line}: file name {name!r}"
    if not os.path.abspath(out / "images" / name).startswith(os.path.join(os.path.abspath(out), "")):
        raise ValueError(
            f"{where} would be written outside the output folder {str(out)!r}; "
            "file names must be plain names like n0153282900000005.jpg"
        )
    raise ValueError(
        f"{where} is not a plain file name like n0153282900000005.jpg "
        f"(the CSV layout keeps every image directly in {str(out / 'images')!r})"
    )


def resolve_sources(rows: list[tuple[str, str]], imagenet_train: Path, csv_path: Path) -> list[Path]:
    """The ImageNet file behind each CSV row (``<wnid><number>.jpg`` → number-th file of the class, from 1)."""
    listing: dict[str, list[Path]] = {}
    sources = []
    for line, (name, label) in enumerate(rows, 2):
        if label not in listing:
            listing[label] = class_files(imagenet_train / label)
        files = listing[label]
        m = re.fullmatch(re.escape(label) + r"(\d+)", Path(name).stem)
        if m is None:
            raise ValueError(
                f"{str(csv_path)!r} line {line}: file name {name!r} is not '<label><number>.jpg' for label {label!r}"
            )
        k = int(m.group(1))
        if not 1 <= k <= len(files):
            raise ValueError(
                f"{str(csv_path)!r} line {line}: {name!r} asks for image {k} of class {label!r}, "
                f"but {str(imagenet_train / label)!r} has {len(files)} images"
            )
        sources.append(files[k - 1])
    return sources


def _convert(job: tuple[str, str, int]) -> None:
    source, target, size = job
    image = decode_image(source, size).transpose(1, 2, 0)
    tmp = target + ".tmp"
    Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="JPEG", quality=95)
    os.replace(tmp, target)


def prepare_miniimagenet(
    imagenet_train: str | os.PathLike[str],
    csv_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    image_size: int = 84,
    splits: Sequence[str] = SPLITS,
    workers: int | None = None,
    log=print,
) -> Path:
    """Write the CSV layout of miniImageNet to ``out``; returns ``out``."""
    imagenet_train, csv_dir, out = Path(imagenet_train), Path(csv_dir), Path(out)
    check_image_size(image_size)
    if not imagenet_train.is_dir():
        raise FileNotFoundError(f"--imagenet-train: ImageNet train folder not found: {str(imagenet_train)!r}")
    csvs = {s: csv_dir / f"{s}.csv" for s in splits}
    missing = [str(p) for p in csvs.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"--csv-dir: split CSV not found: {missing[0]!r} (expected {', '.join(f'{s}.csv' for s in splits)})"
        )
    plans = {}
    for split, path in csvs.items():  # check everything before writing anything
        rows = read_split_csv(path)
        for line, (name, _) in enumerate(rows, 2):
            check_file_name(name, path, line, out)
        plans[split] = (rows, resolve_sources(rows, imagenet_train, path))
    (out / "images").mkdir(parents=True, exist_ok=True)
    workers = (os.cpu_count() or 1) if workers is None else workers
    for split, (rows, sources) in plans.items():
        jobs = [
            (str(src), str(out / "images" / name), image_size)
            for (name, _), src in zip(rows, sources)
            if not (out / "images" / name).is_file()
        ]
        log(f"{split}: {len(rows)} images ({len(rows) - len(jobs)} already there)")
        if workers > 1 and len(jobs) > 256:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(_convert, jobs, chunksize=64))
        else:
            for job in jobs:
                _convert(job)
        tmp = out / f".{split}.csv.tmp"
        tmp.write_text("filename,label\n" + "".join(f"{name},{label}\n" for name, label in rows))
        os.replace(tmp, out / f"{split}.csv")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fewshot.data.prepare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    mini = sub.add_parser("miniimagenet", help="build miniImageNet (CSV layout) from ImageNet train + split CSVs")
    mini.add_argument("--imagenet-train", required=True, help="ImageNet train folder with one sub-folder per wnid")
    mini.add_argument("--csv-dir", required=True, help="folder with train.csv, val.csv, test.csv (Ravi & Larochelle)")
    mini.add_argument("--out", required=True, help="output folder (gets <split>.csv and images/)")
    mini.add_argument("--image-size", type=int, default=84)
    mini.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    mini.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    args = parser.parse_args(argv)
    try:
        prepare_miniimagenet(args.imagenet_train, args.csv_dir, args.out, args.image_size, args.splits, args.workers)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: python -c \"import fewshot.data as d; d.MiniImageNet({args.out!r}, 'train')\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
