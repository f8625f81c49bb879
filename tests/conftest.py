"""Fixtures shared by several test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for a module's tests: tiny tensors gain nothing from more, and on a
    shared 2-core machine two OpenMP threads spin against other processes (10-30x slower runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def glyphs_cache() -> None:
    """Build the glyphs cache (shared by every test that reads glyphs) before anything reads stderr."""
    from fewshot.data import create_dataset

    for split in ("train", "val", "test"):
        create_dataset("glyphs", split, image_size=28)
