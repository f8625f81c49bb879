"""Data pipeline benchmark: episodes per second and resident memory of a full-size miniImageNet train split.

    python benchmarks/data_pipeline.py [--out benchmarks/results/data_pipeline.json] [--workdir DIR]

A synthetic train split of the real size (64 classes × 600 images, 3×84×84 uint8 = 38,400 images, 813 MB)
is written as a memory-mapped cache (in a child process, so that writing it does not count) and opened
through ``MiniImageNet.from_cache``, the same class and code path as a real split. Then:
- resident memory (VmRSS) after opening, after reading every image once, after the episodes;
- episodes per second, 5-way 1-shot 15-query at 84×84, with the test transform (resize 1.15× + centre crop
  + normalise, applied per episode) and the training augmentation (random resized crop, colour jitter,
  flip, normalise, per image), in-process and with 2 DataLoader workers;
- the same for glyphs (28×28) for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository on sys.path)

CLASSES, PER_CLASS, SIZE = 64, 600, 84


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(directory: Path) -> None:
    """Write the synthetic split as a cache store (runs in a child process)."""
    from fewshot.data.cache import atomic_directory, open_images_for_writing, write_store

    with atomic_directory(directory) as tmp:
        images = open_images_for_writing(tmp, (CLASSES * PER_CLASS, 3, SIZE, SIZE))
        rng = np.random.default_rng(0)
        for c in range(CLASSES):
            # smooth-ish random images: a per-class colour plus noise
            block = rng.integers(0, 64, (PER_CLASS, 3, SIZE, SIZE), dtype=np.uint8)
            block += rng.integers(0, 192, (1, 3, 1, 1), dtype=np.uint8)
            images[c * PER_CLASS : (c + 1) * PER_CLASS] = block
        images.flush()
        del images
        targets = np.repeat(np.arange(CLASSES), PER_CLASS)
        write_store(tmp, targets, [f"n{c:08d}" for c in range(CLASSES)], layout="synthetic", split="train")


def episodes_per_second(dataset, transform, episodes: int, workers: int) -> float:
    from fewshot.data import episode_loader

    loader = episode_loader(
        dataset, 5, 1, 15, episodes + (2 if workers else 0), seed=0, transform=transform, num_workers=workers
    )
    iterator = iter(loader)
    if workers:  # do not count worker start-up: skip the first two episodes
        next(iterator), next(iterator)
    start = time.perf_counter()
    n = sum(1 for _ in iterator)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/data_pipeline.json)")
    parser.add_argument(
        "--workdir", default=None, help="where to write the 813 MB synthetic cache (default: a temp dir)"
    )
    parser.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        store = Path(work) / "train-synthetic-84px"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", str(store)], check=True)
        write_seconds = time.perf_counter() - t0

        import torch

        from fewshot.data import Glyphs, MiniImageNet, build_transform

        rss = {"before_open": rss_mib()}
        t0 = time.perf_counter()
        train = MiniImageNet.from_cache(store)
        open_seconds = time.perf_counter() - t0
        rss["after_open"] = rss_mib()
        for start in range(0, len(train), 4096):  # read every image once: all pages resident
            np.asarray(train.images[start : start + 4096]).max()
        rss["after_reading_every_image"] = rss_mib()
        rss["split_resident"] = rss["after_reading_every_image"] - rss["after_open"]

        test_tf = build_transform("miniimagenet", SIZE, train=False)
        train_tf = build_transform("miniimagenet", SIZE, train=True)
        speed = {
            "test_transform": episodes_per_second(train, test_tf, 300, 0),
            "train_augmentation": episodes_per_second(train, train_tf, 40, 0),
            "no_transform": episodes_per_second(train, None, 300, 0),
            "test_transform_2_workers": episodes_per_second(train, test_tf, 300, 2),
            "train_augmentation_2_workers": episodes_per_second(train, train_tf, 60, 2),
        }
        rss["after_episodes_incl_torchvision"] = rss_mib()
        glyphs = Glyphs("train")
        glyph_speed = {
            "test_transform": episodes_per_second(glyphs, build_transform("glyphs", 28, False), 300, 0),
            "train_augmentation": episodes_per_second(glyphs, build_transform("glyphs", 28, True), 60, 0),
        }
        result = {
            "command": "python benchmarks/data_pipeline.py",
            "machine": {
                "cpus": os.cpu_count(),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "note": "shared 2-core machine; other jobs were running, so speeds are lower bounds. "
                "RSS includes torch itself (about 500 MiB for a CUDA build of torch) and, after the episodes, "
                "torchvision (about 160 MiB)",
            },
            "train_split": {
                "images": len(train),
                "shape": list(train.images.shape),
                "dtype": str(train.images.dtype),
                "bytes": int(train.images.nbytes),
                "write_cache_seconds": round(write_seconds, 2),
                "open_seconds": round(open_seconds, 3),
                "rss_mib": {k: round(v, 1) for k, v in rss.items()},
            },
            "floors": {
                "rss_holding_split_gb": round(rss["after_reading_every_image"] * 2**20 / 1e9, 3),
                "rss_holding_split_below_1.5_gb": rss["after_reading_every_image"] * 2**20 < 1.5e9,
                "test_transform_at_least_50_episodes_per_second": speed["test_transform"] >= 50,
            },
            "episode": {"ways": 5, "shots": 1, "queries": 15, "image_size": SIZE},
            "episodes_per_second": {k: round(v, 1) for k, v in speed.items()},
            "glyphs_episodes_per_second": {k: round(v, 1) for k, v in glyph_speed.items()},
        }
    print(json.dumps(result, indent=2))
    common.save_result(args.out, "data_pipeline", result)


if __name__ == "__main__":
    main()
