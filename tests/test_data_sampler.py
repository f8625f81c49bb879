"""Episode sampler and transforms: structure, determinism across processes and workers, errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fewshot.data import BatchTransform, ClassIndexedDataset, Episode, EpisodeSampler, build_transform, episode_loader

MAKE_DATASET = """
import numpy as np
from fewshot.data import ClassIndexedDataset
def make_dataset(classes=8, per_class=6, size=16, channels=3):
    rng = np.random.default_rng(123)
    images = rng.integers(0, 256, (classes * per_class, channels, size, size), dtype=np.uint8)
    targets = np.tile(np.arange(classes), per_class)  # interleaved on purpose
    return ClassIndexedDataset(images, targets, [f"c{i}" for i in range(classes)], name="toy")
"""
exec(MAKE_DATASET)


def episode_digest(episodes) -> str:
    h = hashlib.sha256()
    for e in episodes:
        for t in (e.support_images, e.support_labels, e.query_images, e.query_labels, e.classes):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_episode_structure_and_contents():
    ds = make_dataset()  # noqa: F821
    sampler = EpisodeSampler(ds, ways=5, shots=2, queries=3, episodes=4, seed=7)
    assert len(sampler) == 4
    for i, episode in enumerate(sampler):
        assert isinstance(episode, Episode)
        assert episode.support_images.shape == (10, 3, 16, 16)
        assert episode.query_images.shape == (15, 3, 16, 16)
        assert episode.support_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        assert episode.query_labels.tolist() == sum(([j] * 3 for j in range(5)), [])
        assert (episode.ways, episode.shots, episode.queries) == (5, 2, 3)
        assert len(set(episode.classes.tolist())) == 5
        classes, support, query, _ = sampler.indices(i)
        assert torch.equal(classes, episode.classes)
        # every image of label j belongs to class classes[j]; support and query never share an image
        assert torch.equal(ds.targets[support], classes.repeat_interleave(2))
        assert torch.equal(ds.targets[query], classes.repeat_interleave(3))
        assert not set(support.tolist()) & set(query.tolist())
        # no transform: the stored images scaled to [0, 1]
        assert torch.equal(episode.support_images, ds.load(support).float() / 255)
        assert torch.equal(episode.query_images, ds.load(query).float() / 255)


def test_labels_are_not_always_sorted_class_indices():
    sampler = EpisodeSampler(make_dataset(), 5, 1, 1, 20, seed=0)  # noqa: F821
    orders = {tuple(sampler.indices(i)[0].tolist()) for i in range(20)}
    assert any(list(o) != sorted(o) for o in orders)


def test_same_seed_same_episodes_different_seed_different():
    ds = make_dataset()  # noqa: F821
    train = build_transform("miniimagenet", 16, train=True)
    a = EpisodeSampler(ds, 5, 1, 2, 6, seed=3, transform=train)
    b = EpisodeSampler(ds, 5, 1, 2, 6, seed=3, transform=train)
    c = EpisodeSampler(ds, 5, 1, 2, 6, seed=4, transform=train)
    assert episode_digest(a) == episode_digest(b)
    assert episode_digest(a) != episode_digest(c)
    assert any(not torch.equal(a.indices(i)[1], c.indices(i)[1]) for i in range(6))
    # the random augmentation itself is seeded per episode: episode 2 alone equals episode 2 of the stream
    assert torch.equal(b[2].query_images, list(a)[2].query_images)


def test_sampler_leaves_global_rng_alone():
    ds = make_dataset()  # noqa: F821
    sampler = EpisodeSampler(ds, 3, 1, 1, 2, seed=0, transform=build_transform("miniimagenet", 16, train=True))
    state = torch.get_rng_state()
    list(sampler)
    assert torch.equal(state, torch.get_rng_state())


def test_same_episodes_in_another_process():
    code = MAKE_DATASET + textwrap.dedent(
        """
        import hashlib, sys
        from fewshot.data import EpisodeSampler, build_transform
        ds = make_dataset()
        s = EpisodeSampler(ds, 5, 1, 2, 5, seed=11, transform=build_transform("miniimagenet", 16, train=True))
        h = hashlib.sha256()
        for e in s:
            for t in (e.support_images, e.support_labels, e.query_images, e.query_labels, e.classes):
                h.update(t.contiguous().numpy().tobytes())
        print(h.hexdigest())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    ds = make_dataset()  # noqa: F821
    local = EpisodeSampler(ds, 5, 1, 2, 5, seed=11, transform=build_transform("miniimagenet", 16, train=True))
    assert out == episode_digest(local)


def test_same_episodes_with_0_and_2_workers():
    ds = make_dataset()  # noqa: F821
    train = build_transform("miniimagenet", 16, train=True)
    serial = list(episode_loader(ds, 4, 1, 2, 6, seed=5, transform=train, num_workers=0))
    parallel = list(episode_loader(ds, 4, 1, 2, 6, seed=5, transform=train, num_workers=2))
    assert all(isinstance(e, Episode) for e in parallel)
    assert episode_digest(serial) == episode_digest(parallel)


def test_dataset_transform_is_used_and_generic_datasets_work():
    ds = make_dataset()  # noqa: F821
    ds.transform = build_transform("miniimagenet", 16, train=False)
    e = EpisodeSampler(ds, 3, 1, 1, 1, seed=0)[0]
    _, support, _, _ = EpisodeSampler(ds, 3, 1, 1, 1, seed=0).indices(0)
    assert torch.allclose(e.support_images, ds.transform(ds.load(support)))

    class Plain(torch.utils.data.Dataset):  # torchvision-like: targets + __getitem__ only
        def __init__(self):
            self.targets = [i % 4 for i in range(20)]

        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.full((1, 2, 2), float(i)), self.targets[i]

    e = EpisodeSampler(Plain(), 4, 2, 1, 1, seed=0)[0]
    ids = e.support_images[:, 0, 0, 0].long()
    assert torch.equal(ids % 4, e.classes.repeat_interleave(2))


def test_sampler_errors_name_the_problem():
    ds = make_dataset(classes=4, per_class=6)  # noqa: F821
    with pytest.raises(ValueError, match=r"toy has 4 classes, fewer than ways=5; choose ways <= 4"):
        EpisodeSampler(ds, 5, 1, 1, 1)
    images = np.zeros((13, 1, 4, 4), dtype=np.uint8)
    targets = [0] * 6 + [1] * 4 + [2] * 3
    small = ClassIndexedDataset(images, targets, ["ant", "bee", "cat"], name="tiny")
    with pytest.raises(
        ValueError,
        match=r"class 'bee' \(index 1\) of tiny has 4 images, fewer than shots \+ queries = 1 \+ 4 = 5 "
        r"\(1 other classes too\)",
    ):
        EpisodeSampler(small, 2, 1, 4, 1)
    for kwargs, what in [({"ways": 0}, "ways"), ({"shots": 1.5}, "shots"), ({"queries": -1}, "queries")]:
        args = {"ways": 2, "shots": 1, "queries": 1, "episodes": 1} | kwargs
        with pytest.raises(ValueError, match=f"{what} must be an integer"):
            EpisodeSampler(ds, **args)
    with pytest.raises(IndexError, match="episode 3 out of range for 3 episodes"):
        EpisodeSampler(ds, 2, 1, 1, 3)[3]


def test_transforms_shapes_and_batching():
    x = torch.randint(0, 256, (3, 84, 84), dtype=torch.uint8)
    for train in (True, False):
        y = build_transform("miniimagenet", 84, train)(x)
        assert y.shape == (3, 84, 84) and y.dtype == torch.float32
    assert build_transform("miniimagenet", 32, False)(torch.zeros(3, 50, 70, dtype=torch.uint8)).shape == (3, 32, 32)
    g = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    assert build_transform("glyphs", 28, True)(g).shape == (1, 28, 28)
    # test transform: resize to 1.15x then centre crop, ImageNet normalisation; batch == per image
    test = build_transform("miniimagenet", 84, False)
    assert isinstance(test, BatchTransform)
    batch = torch.randint(0, 256, (4, 3, 84, 84), dtype=torch.uint8)
    assert torch.allclose(test(batch), torch.stack([test(b) for b in batch]), atol=1e-6)
    black = test(torch.zeros(3, 84, 84, dtype=torch.uint8))
    assert torch.allclose(black[:, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'; valid names are miniimagenet, natural, glyphs"):
        build_transform("cifar", 32, True)
