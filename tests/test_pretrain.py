"""Supervised pretraining: data readers, reproducible augmentation, the loop's exact resume, the CLI."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from fewshot.data.classification import (
    AugmentedDataset,
    ClassificationData,
    EpochSampler,
    Normalizer,
    TensorImageDataset,
    cifar_transforms,
    holdout_split,
    load_classification_data,
    read_cifar,
)
from fewshot.data.transforms import GLYPHS_MEAN, GLYPHS_STD, IMAGENET_MEAN, IMAGENET_STD, ToNormalizedFloat
from fewshot.training.checkpoint import load_checkpoint
from fewshot.training.classifier_metrics import evaluate_classifier, topk_correct
from fewshot.training.models import model_from_checkpoint
from fewshot.training.optim import OptimConfig
from fewshot.training.supervised import LoopConfig, fit

# --------------------------------------------------------------------------------- tiny data


def write_fake_cifar10(root: Path, per_batch: int = 8, test: int = 16, seed: int = 0) -> dict:
    """CIFAR-10 in torchvision's extracted pickle format: 5 train batches of ``per_batch`` images."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = test if name == "test_batch" else per_batch
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "batch_label": name,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        written["test" if name == "test_batch" else "train"].append(batch)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return written


def write_image_folder(root: Path, sizes=((20, 24), (17, 31), (24, 24)), classes=("cat", "dog")) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 3), ("val", 2)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = sizes[i % len(sizes)]
                pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread each is both faster and steadier for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root)
    return root


# ----------------------------------------------------------------------------------- readers


def test_read_cifar_matches_the_pickles(tmp_path):
    written = write_fake_cifar10(tmp_path, per_batch=4, test=6)
    train = read_cifar(tmp_path, "cifar10", train=True)
    assert len(train) == 20 and train.classes[3] == "class3"
    expected = np.concatenate([b["data"] for b in written["train"]]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.targets == sum((b["labels"] for b in written["train"]), [])
    test = read_cifar(tmp_path / "cifar-10-batches-py", "cifar10", train=False)  # the folder itself works too
    image, target = test[5]
    assert torch.equal(image, torch.from_numpy(written["test"][0]["data"][5].reshape(3, 32, 32)))
    assert target == written["test"][0]["labels"][5]


def test_read_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for name, labels in (("train", [5, 99]), ("test", [0, 1])):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0, 0]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    ds = load_classification_data("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.train.targets == [5, 99] and ds.mean[0] == pytest.approx(0.5071)
    assert torch.equal(ds.train[1][0].flatten(), torch.from_numpy(data[1]))


def test_cifar_errors_name_path_and_expectation(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        read_cifar(tmp_path, "cifar10")
    assert str(err.value) == (
        f"CIFAR-10 not found: expected the folder '{tmp_path / 'cifar-10-batches-py'}' (torchvision's extracted "
        "cifar-10-python.tar.gz) holding data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, "
        "test_batch, batches.meta"
    )
    write_fake_cifar10(tmp_path, per_batch=2, test=2)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"CIFAR-10 folder '.*cifar-10-batches-py' is incomplete: missing test_batch"
    ):
        read_cifar(tmp_path, "cifar10")
    write_fake_cifar10(tmp_path, per_batch=2, test=2)
    (folder / "data_batch_3").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"CIFAR-10: '.*data_batch_3' is not a readable CIFAR pickle"):
        read_cifar(tmp_path, "cifar10")
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(
        ValueError, match=r"'data' must be uint8 \(N, 3072\) with N = len\(labels\); got torch.uint8 \(2, 100\)"
    ):
        read_cifar(tmp_path, "cifar10")
    with pytest.raises(ValueError, match="--data-root is required for cifar10"):
        load_classification_data("cifar10", None)


def test_image_folder_reads_and_augments(tmp_path):
    write_image_folder(tmp_path)
    data = load_classification_data("imagefolder", tmp_path, image_size=16)
    assert data.classes == ["cat", "dog"] and len(data.train) == 6 and len(data.val) == 4
    image, target = data.train[4]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 17, 31) and target == 1
    train = AugmentedDataset(data.train, data.train_transform, seed=0)
    val = AugmentedDataset(data.val, data.eval_transform)
    assert tuple(train[(0, 4)][0].shape) == (3, 16, 16) and tuple(val[1][0].shape) == (3, 16, 16)


def test_image_folder_and_miniimagenet_share_one_decoder(tmp_path):
    """ImageFolder images go through fewshot.data.imageio.read_rgb, so a damaged file gets its error."""
    write_image_folder(tmp_path)
    broken = tmp_path / "train" / "cat" / "0.png"
    broken.write_bytes(b"not an image")
    data = load_classification_data("imagefolder", tmp_path, image_size=16)
    index = next(i for i, (path, _) in enumerate(data.train.samples) if path == str(broken))
    with pytest.raises(ValueError, match=f"cannot read image '{broken}'"):
        data.train[index]


def test_image_folder_errors(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"image folder '.*nothing' does not exist \(expected .*/train/<class>/<image>"
    ):
        load_classification_data("imagenet", tmp_path / "nothing")
    write_image_folder(tmp_path)
    (tmp_path / "val" / "dog" / "0.png").unlink()
    (tmp_path / "val" / "dog" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) without images in '.*val': dog"):
        load_classification_data("imagefolder", tmp_path)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "cow")
    (tmp_path / "val" / "cow" / "x.jpg").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"the classes of '.*val' differ from train's: not in train \['cow'\], missing \['dog'\]"
    ):
        load_classification_data("imagefolder", tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "val")
    with pytest.raises(FileNotFoundError, match=r"expected the folder '.*val' with one sub-folder of images per class"):
        load_classification_data("imagefolder", tmp_path)


def test_tinyimagenet_original_val_layout(tmp_path):
    write_image_folder(tmp_path, classes=("n01", "n02"))
    import shutil

    shutil.rmtree(tmp_path / "val")
    (tmp_path / "val" / "images").mkdir(parents=True)
    shutil.copy(tmp_path / "train" / "n01" / "0.png", tmp_path / "val" / "images" / "val_0.png")
    shutil.copy(tmp_path / "train" / "n02" / "1.png", tmp_path / "val" / "images" / "val_1.png")
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.png\tn01\t0\t0\t1\t1\nval_1.png\tn02\t0\t0\t1\t1\n")
    data = load_classification_data("tinyimagenet", tmp_path)
    assert data.image_size == 64 and [t for _, t in data.val.samples] == [0, 1]
    assert torch.equal(data.val[1][0], data.train[4][0])
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.png\tn09\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt' line 1: expected '<file>\\t<train class>"):
        load_classification_data("tinyimagenet", tmp_path)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(
        ValueError,
        match="unknown dataset 'mnist'; valid names are miniimagenet, glyphs, cifar10, cifar100, imagefolder, "
        "imagenet, tinyimagenet",
    ):
        load_classification_data("mnist")


def test_one_dataset_registry_serves_few_shot_and_pretraining():
    """fewshot.data.factory holds every dataset once: the few-shot command lines offer those with class
    splits, pretraining all of them (a few-shot dataset through its base classes)."""
    from fewshot.cli.fewshot import DATASETS
    from fewshot.cli.pretrain import build_parser
    from fewshot.data import create_dataset, list_datasets
    from fewshot.data.factory import dataset_entry, register_dataset

    assert list_datasets(few_shot=True) == list(DATASETS) == ["miniimagenet", "glyphs"]
    choices = next(a.choices for a in build_parser()._actions if a.dest == "dataset")
    assert (
        list(choices)
        == list_datasets()
        == [*DATASETS, "cifar10", "cifar100", "imagefolder", "imagenet", "tinyimagenet"]
    )
    assert [dataset_entry(n).image_size for n in list_datasets()] == [84, 28, 32, 32, 224, 224, 64]
    with pytest.raises(
        ValueError,
        match="^dataset 'cifar10' has no few-shot class splits .* few-shot datasets are miniimagenet, glyphs$",
    ):
        create_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="dataset 'glyphs' is registered twice"):
        register_dataset("glyphs", image_size=28, splits=lambda *a: None)
    with pytest.raises(ValueError, match="give exactly one of splits= or classification="):
        register_dataset("both", image_size=28)
    assert "both" not in list_datasets()


# -------------------------------------------------------------------- reproducible data order


def test_augmentation_is_a_function_of_seed_epoch_index():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    base = TensorImageDataset(images, [0, 1, 2, 0, 1, 2], ["a", "b", "c"])
    augment, _ = cifar_transforms(True)
    ds = AugmentedDataset(base, augment, seed=3)
    torch.manual_seed(0)
    first = ds[(2, 4)][0]
    state = torch.get_rng_state()
    torch.manual_seed(123)  # the caller's RNG does not matter ...
    assert torch.equal(ds[(2, 4)][0], first)
    torch.manual_seed(0)
    ds[(5, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
    differs = [not torch.equal(ds[(e, 4)][0], first) for e in range(3, 9)]
    assert sum(differs) >= 4  # another epoch, another crop/flip (a few may coincide)
    others = [AugmentedDataset(base, augment, seed=s)[(2, 4)][0] for s in (4, 5, 6)]
    assert any(not torch.equal(o, first) for o in others)  # another run seed, other crops


def test_epoch_sampler_skip_and_shards():
    base = TensorImageDataset(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), list(range(10)), [str(i) for i in range(10)])
    full = EpochSampler(base, seed=1)
    full.set_epoch(3)
    order = list(full)
    assert sorted(i for _, i in order) == list(range(10)) and {e for e, _ in order} == {3}
    full.set_epoch(3, skip=4)
    assert list(full) == order[4:] and len(full) == 6
    full.set_epoch(4)
    assert [i for _, i in full] != [i for _, i in order]
    shards = [EpochSampler(base, 3, r, seed=1) for r in range(3)]
    for s in shards:
        s.set_epoch(0)
    parts = [[i for _, i in s] for s in shards]
    assert [len(p) for p in parts] == [3, 3, 3] and len(set(sum(parts, []))) == 9


def test_holdout_split_per_class():
    targets = [0] * 20 + [1] * 7 + [2] * 3
    train, held = holdout_split(targets, 0.1)
    assert sorted(train + held) == list(range(30))
    assert [sum(targets[i] == c for i in held) for c in range(3)] == [2, 1, 1]
    assert holdout_split(targets, 0.1) == (train, held)
    assert holdout_split(targets, 0.0)[1] == []
    with pytest.raises(ValueError, match="--holdout 0.9 leaves no training image of class 2"):
        holdout_split(targets, 0.9)


@pytest.mark.parametrize("mean, std", [(GLYPHS_MEAN, GLYPHS_STD), (IMAGENET_MEAN, IMAGENET_STD)])
def test_one_normalization_per_batch_and_per_image_gives_the_same_floats(mean, std):
    """The supervised loop's per-batch Normalizer and the episodes' per-image ToNormalizedFloat: bit-equal
    on every uint8 value, so a pretrained backbone sees exactly the inputs its episodes give it."""
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(3, len(mean), 1, 1)
    batch = Normalizer(mean, std, "cpu")(pixels)
    per_image = torch.stack([ToNormalizedFloat(mean, std)(image) for image in pixels])
    assert torch.equal(batch, per_image)
    assert batch.dtype == torch.float32
    ref = (pixels.double() / 255 - torch.tensor(mean).double().view(1, -1, 1, 1)) / torch.tensor(std).double().view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(batch.double(), ref, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match=r"ToNormalizedFloat: expected images \(…, 1, H, W\) .* got shape \(3, 8, 8\)"):
        ToNormalizedFloat(GLYPHS_MEAN, GLYPHS_STD)(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="std must be positive"):
        ToNormalizedFloat((0.5,), (0.0,))


def test_normalizer_and_topk():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = Normalizer(mean, std, "cpu", torch.channels_last)(x)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"Normalizer: expected a \(B, 3, H, W\) batch .* got shape \(2, 1, 4, 4\)"):
        Normalizer(mean, std, "cpu")(x[:, :1])
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    top1, top2, top5 = topk_correct(logits, torch.tensor([1, 2, 0]), (1, 2, 5))
    assert (top1.item(), top2.item(), top5.item()) == (1, 2, 3)


# ------------------------------------------------------------------------------ the loop


class TinyClassifier(nn.Module):
    """Conv + BatchNorm + dropout: BatchNorm buffers and dropout's RNG both have to resume exactly."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.3),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def tiny_data(n: int = 24) -> ClassificationData:
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    targets = torch.arange(n) % 3
    images = (torch.rand(n, 3, 8, 8, generator=g) * 100 + targets.view(-1, 1, 1, 1) * 60).to(torch.uint8)
    train = TensorImageDataset(images, targets.tolist(), ["a", "b", "c"])
    val = TensorImageDataset(images[:9], targets[:9].tolist(), ["a", "b", "c"])
    augment = v2.Compose([v2.RandomCrop(8, padding=1), v2.RandomHorizontalFlip()])
    return ClassificationData(
        "tiny", train, val, ["a", "b", "c"], 8, 3, (0.5,) * 3, (0.25,) * 3, augment, v2.Identity()
    )


def run_fit(run_dir, stop=None, resume=None, epochs=2, amp="off", workers=0, seconds=None):
    torch.manual_seed(0)
    model = TinyClassifier()
    optim = OptimConfig(lr=0.05, milestones=(1,), gamma=0.5)
    loop = LoopConfig(
        epochs=epochs,
        batch_size=4,
        seed=7,
        stop_at_step=stop,
        progress=False,
        amp=amp,
        workers=workers,
        train_seconds=seconds,
    )
    return model, fit(model, tiny_data(), optim, loop, run_dir=run_dir, resume=resume)


@pytest.mark.parametrize("stop", [3, 6, 9])  # mid-epoch, at an epoch's end, mid-epoch of the second epoch
def test_resume_is_exact(tmp_path, stop):
    straight, result = run_fit(tmp_path / "a")
    assert result["step"] == 12 and result["epoch"] == 2  # 24 images / 4 = 6 steps per epoch
    _, first = run_fit(tmp_path / "b", stop=stop)
    assert first["stopped_early"] and first["step"] == stop
    resumed, second = run_fit(tmp_path / "c", resume=tmp_path / "b" / "last.pt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for key in ("train_loss", "train_top1", "val_loss", "top1", "top5", "step", "epoch"):
        assert second[key] == result[key], key
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logs] == [1, 2] and [r["lr"] for r in logs] == [0.05, 0.025]


def test_train_seconds_stops_after_the_batch_that_passes_it_and_resumes_exactly(tmp_path):
    straight, result = run_fit(tmp_path / "a")
    assert result["stopped_by"] == "epochs" and not result["stopped_early"]
    assert result["clock_seconds"] >= result["seconds"] > 0
    _, timed = run_fit(tmp_path / "b", seconds=1e-6)  # the first batch already passes it
    assert (timed["step"], timed["epoch"], timed["steps_per_epoch"]) == (1, 0, 6)
    assert timed["stopped_by"] == "train_seconds" and timed["stopped_early"]
    saved = load_checkpoint(tmp_path / "b" / "last.pt")["progress"]
    assert saved["step"] == 1 and saved["clock"] >= 1e-6
    resumed, second = run_fit(tmp_path / "c", resume=tmp_path / "b" / "last.pt")  # no budget: to the end
    assert second["stopped_by"] == "epochs" and second["step"] == 12
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # A budget that does not run out changes nothing.
    unbounded, third = run_fit(tmp_path / "d", seconds=1e6)
    assert third["stopped_by"] == "epochs" and third["step"] == 12
    for (name, a), b in zip(straight.state_dict().items(), unbounded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), float("inf")])
def test_loop_config_refuses_a_bad_time_budget(seconds):
    with pytest.raises(ValueError, match="--train-seconds must be a positive number of seconds"):
        LoopConfig(epochs=1, batch_size=1, train_seconds=seconds).check()


def test_worker_processes_do_not_change_the_run(tmp_path):
    in_process, _ = run_fit(tmp_path / "a", epochs=1)
    with_workers, _ = run_fit(tmp_path / "b", epochs=1, workers=2)
    for (name, a), b in zip(in_process.state_dict().items(), with_workers.state_dict().values()):
        assert torch.equal(a, b), name


def test_evaluate_matches_a_direct_computation(tmp_path):
    model, result = run_fit(tmp_path, epochs=1)
    data = tiny_data()
    model.eval()
    x = (data.val.images.float() - 127.5) / 63.75
    with torch.no_grad():
        logits = model(x)
    y = torch.tensor(data.val.targets)
    assert result["top1"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert result["val_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert result["top5"] == 1.0  # 3 classes: top-5 is top-3


def test_amp_bf16_trains(tmp_path):
    before = TinyClassifier()
    model, result = run_fit(tmp_path, epochs=1, amp="bf16")
    assert np.isfinite(result["train_loss"]) and result["step"] == 6
    assert not torch.equal(model.fc.weight, before.fc.weight)


# ------------------------------------------------------------------------------- the CLI


def cli(argv):
    from fewshot.cli.pretrain import main

    return main([str(a) for a in argv])


def base_args(cifar_root, out, *extra):
    return [
        "--dataset",
        "cifar10",
        "--data-root",
        cifar_root,
        "--backbone",
        "conv4",
        "--width",
        "4",
        "--acdc",
        "net",
        "--atoms",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "10",
        "--lr",
        "0.05",
        "--milestones",
        "1",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        "--out",
        out,
        *extra,
    ]


def test_cli_writes_results_config_log_and_a_loadable_checkpoint(cifar_root, tmp_path):
    results = cli(base_args(cifar_root, tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in (
        "dataset",
        "backbone",
        "acdc",
        "atoms",
        "parameters",
        "top1",
        "top5",
        "val_loss",
        "train_loss",
        "epoch",
        "step",
        "seconds",
        "images_per_second",
        "world_size",
        "checkpoint",
    ):
        assert key in saved, key
    assert (saved["dataset"], saved["acdc"], saved["atoms"], saved["step"], saved["world_size"]) == (
        "cifar10",
        "net",
        4,
        8,
        1,
    )
    assert saved["backbone_kwargs"] == {"image_size": 32, "in_channels": 3, "width": 4}
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["atoms"] == 4 and config["milestones"] == [1] and config["width"] == 4
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    model, ckpt = model_from_checkpoint(tmp_path / "run" / "last.pt")
    assert sum(p.numel() for p in model.parameters()) == saved["parameters"]
    data = load_classification_data("cifar10", cifar_root)
    from torch.utils.data import DataLoader

    from fewshot.training.optim import Precision

    loader = DataLoader(AugmentedDataset(data.val, data.eval_transform), batch_size=7)
    again = evaluate_classifier(
        model, loader, Normalizer(data.mean, data.std, "cpu"), Precision("off", torch.device("cpu"))
    )
    assert again["top1"] == pytest.approx(saved["top1"])
    assert again["loss"] == pytest.approx(saved["val_loss"], rel=1e-5)
    # The saved config reproduces the run.
    rerun = cli(["--config", tmp_path / "run" / "config.yaml", "--out", tmp_path / "rerun"])
    assert rerun["val_loss"] == saved["val_loss"] and rerun["train_loss"] == saved["train_loss"]


@pytest.mark.parametrize("flag,expected", [(None, "channels_last"), ("contiguous", "contiguous")])
def test_run_pretrain_trains_in_the_chosen_layout(cifar_root, tmp_path, flag, expected) -> None:
    flags = ["--acdc", "none", "--epochs", "1", *([] if flag is None else ["--memory-format", flag])]
    cli(base_args(cifar_root, tmp_path / "run", *flags))
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["memory_format"] == expected  # auto is resolved on the CPU
    weights = [t for t in load_checkpoint(tmp_path / "run" / "last.pt")["model"].values() if t.dim() == 4]
    assert len(weights) == 4 and {t.stride(1) == 1 for t in weights} == {expected == "channels_last"}


def test_cli_resume_is_exact(cifar_root, tmp_path):
    cli(base_args(cifar_root, tmp_path / "a"))
    cli(base_args(cifar_root, tmp_path / "b", "--stop-at-step", "3"))
    cli(["--config", tmp_path / "b" / "config.yaml", "--stop-at-step", "0", "--resume"])
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cli_device_cuda_without_gpu(cifar_root, tmp_path, capsys):
    args = base_args(cifar_root, tmp_path / "run")
    args[args.index("--device") + 1] = "cuda"
    assert error_of(args, capsys).startswith(
        "error: --device cuda was requested but no CUDA GPU is available (torch.cuda.is_available() is False"
    )
    assert not (tmp_path / "run").exists()


def test_cli_missing_dataset_folder(tmp_path, capsys):
    msg = error_of(base_args(tmp_path / "nowhere", tmp_path / "run"), capsys)
    assert msg.startswith(
        f"error: CIFAR-10 not found: expected the folder '{tmp_path / 'nowhere' / 'cifar-10-batches-py'}'"
    )


def test_cli_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: cifar10\nbackbone: conv4\nlearning_rate: 0.1\n")
    msg = error_of(["--config", cfg], capsys)
    assert msg.startswith(f"error: config file '{cfg}': unknown key 'learning_rate'; valid keys: acdc, amp, atom_drop,")
    # a run folder of an earlier version: the key that replaced its channels_last is named
    cfg.write_text("dataset: cifar10\nbackbone: conv4\nchannels_last: true\n")
    assert error_of(["--config", cfg], capsys) == (
        f"error: config file '{cfg}': key 'channels_last' is gone; write memory_format: channels_last (for true) "
        "or contiguous (for false)"
    )


def test_cli_checkpoint_of_another_architecture(cifar_root, tmp_path, capsys):
    cli(base_args(cifar_root, tmp_path / "a", "--epochs", "1"))
    args = base_args(cifar_root, tmp_path / "b", "--init-from", tmp_path / "a" / "last.pt")
    args[args.index("--acdc") + 1] = "layer"
    msg = error_of(args, capsys)
    assert msg == (
        f"error: checkpoint '{tmp_path / 'a' / 'last.pt'}' was saved for backbone=conv4, acdc=net, atoms=4, "
        "num_classes=10, image_size=32, in_channels=3, width=4; you asked for backbone=conv4, acdc=layer, atoms=4, "
        "num_classes=10, image_size=32, in_channels=3, width=4 (differs in: acdc)"
    )
    args = base_args(cifar_root, tmp_path / "a", "--resume", "--atoms", "6")
    assert "(differs in: atoms)" in error_of(args, capsys)


def test_cli_init_from_loads_the_weights(cifar_root, tmp_path):
    cli(base_args(cifar_root, tmp_path / "a", "--epochs", "1"))
    cli(
        base_args(
            cifar_root,
            tmp_path / "b",
            "--epochs",
            "1",
            "--init-from",
            tmp_path / "a" / "last.pt",
            "--lr",
            "1e-12",
            "--atom-drop",
            "0",
            "--momentum",
            "0",
            "--weight-decay",
            "0",
        )
    )
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for key, value in a.items():  # a vanishing lr: weights stay (BatchNorm statistics move)
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(b[key], value, rtol=0, atol=1e-8)


def test_cli_capacity_growth_inherits_the_trained_model(cifar_root, tmp_path):
    from fewshot.acdc import acdc_convs

    cli(base_args(cifar_root, tmp_path / "a", "--epochs", "1"))
    grow = [
        "--init-from",
        tmp_path / "a" / "last.pt",
        "--expand-scope",
        "block",
        "--expand-atoms",
        "6",
        "--lr",
        "1e-12",
        "--momentum",
        "0",
        "--weight-decay",
        "0",
        "--atom-drop",
        "0",
        "--epochs",
        "1",
    ]
    results = cli(base_args(cifar_root, tmp_path / "b", *grow))
    assert (results["acdc"], results["atoms"], results["expanded_from"]) == ("block", 6, {"acdc": "net", "atoms": 4})
    small, _ = model_from_checkpoint(tmp_path / "a" / "last.pt")
    grown, ckpt = model_from_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["meta"]["expanded_from"] == {"acdc": "net", "atoms": 4}
    assert {c.num_atoms for _, c in acdc_convs(grown)} == {6} and {c.scope for _, c in acdc_convs(grown)} == {"block"}
    assert (
        results["parameters"] == sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in small.parameters())
    )
    # Same function: with a vanishing learning rate only BatchNorm statistics moved; copy them and compare.
    small.load_state_dict(
        {k: v for k, v in grown.state_dict().items() if "running" in k or "num_batches" in k}, strict=False
    )
    x = torch.randn(4, 3, 32, 32)
    small.eval(), grown.eval()
    torch.testing.assert_close(grown(x), small(x), rtol=1e-4, atol=1e-5)
    # The grown run resumes (rebuilt as net m4 -> expand -> load) and the architecture check knows it.
    again = cli(["--config", tmp_path / "b" / "config.yaml", "--resume", "--epochs", "2"])
    assert again["epoch"] == 2 and again["expanded_from"] == {"acdc": "net", "atoms": 4}


def test_cli_refuses_to_overwrite_a_run_and_resume_needs_one(cifar_root, tmp_path, capsys):
    cli(base_args(cifar_root, tmp_path / "a", "--epochs", "1"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    msg = error_of(base_args(cifar_root, tmp_path / "a"), capsys)
    assert (
        msg
        == f"error: --out {tmp_path / 'a'} already holds a run; pass --resume to continue it or choose another --out"
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before  # nothing rewritten
    msg = error_of(base_args(cifar_root, tmp_path / "new", "--resume"), capsys)
    assert msg == f"error: --resume: {tmp_path / 'new' / 'last.pt'} does not exist; start without --resume"
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--backbone-arg", "width=8"], "error: --backbone-arg width=...: give it with --width"),
        (
            ["--backbone-arg", "depth=16"],
            "error: --backbone-arg depth: backbone 'conv4' takes image_size, width, in_channels",
        ),
        (["--stem", "small"], "error: --stem applies to the ResNet backbones, not --backbone conv4"),
        (
            ["--backbone", "resnet99"],
            "error: --backbone 'resnet99' is not a registered backbone; valid: conv4, conv4_nopool, resnet10,",
        ),
    ],
)
def test_cli_backbone_options_one_way_each(cifar_root, tmp_path, capsys, flags, expected):
    args = base_args(cifar_root, tmp_path / "run")
    if flags[0] == "--backbone":
        args[args.index("--backbone") + 1] = flags[1]
    else:
        args += flags
    assert error_of(args, capsys).startswith(expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--acdc", "g-net"], "error: --acdc g-net needs --group-size (channels per filter group, e.g. 32)"),
        (
            ["--group-size", "4"],
            "error: --group-size 4 applies only to the grouped scopes g-net, g-block, g-layer, not --acdc net",
        ),
        (["--atom-drop", "1"], "error: --atom-drop must be a number in [0, 1), got 1.0"),
        (["--atoms", "0"], "error: --atoms must be an integer >= 1, got 0"),
        (["--lr", "nan"], "error: --lr must be a finite number > 0, got nan"),
        (["--momentum", "-0.9"], "error: --momentum must be a finite number >= 0, got -0.9"),
        (["--label-smoothing", "1"], "error: --label-smoothing must be a finite number >= 0 and < 1, got 1.0"),
        (["--acdc", "none", "--decompose-stem"], "error: --decompose-stem needs an ACDC scope; got --acdc none"),
    ],
)
def test_cli_bad_acdc_and_optimizer_values(cifar_root, tmp_path, capsys, flags, expected):
    """The rules of fewshot.acdc.rules and the step-size checks, naming the flags as the few-shot command line
    does (a repeated flag: the last one counts)."""
    args = base_args(cifar_root, tmp_path / "run", *flags)
    assert error_of(args, capsys) == expected
    assert not (tmp_path / "run").exists()


def test_cli_growth_flags_need_a_checkpoint(cifar_root, tmp_path, capsys):
    msg = error_of(base_args(cifar_root, tmp_path / "b", "--expand-atoms", "6"), capsys)
    assert msg == "error: --expand-scope/--expand-atoms grow a trained model: give --init-from CHECKPOINT"


def test_base_classes_of_a_fewshot_dataset(monkeypatch):
    import fewshot.data
    from fewshot.data.store import ClassIndexedDataset

    images = np.random.default_rng(0).integers(0, 256, (40, 1, 12, 12), dtype=np.uint8)
    store = ClassIndexedDataset(images, np.arange(40) % 4, ["a", "b", "c", "d"], name="fake")
    calls = []

    def fake_create(name, split, root=None, **kw):
        calls.append((name, split, root, kw))
        return store

    monkeypatch.setattr(fewshot.data, "create_dataset", fake_create)
    data = load_classification_data("glyphs", "/cache", holdout=0.2)
    assert calls == [("glyphs", "train", "/cache", {})]
    assert (len(data.train), len(data.val), data.num_classes, data.channels, data.image_size) == (32, 8, 4, 1, 12)
    assert sorted(data.val.targets) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert set(data.train.indices).isdisjoint(data.val.indices)
    image, target = data.train[0]
    assert torch.equal(image, torch.from_numpy(images[data.train.indices[0]])) and target == data.train.targets[0]
    assert (data.mean, data.std) == (GLYPHS_MEAN, GLYPHS_STD)  # as the test episodes
    assert tuple(AugmentedDataset(data.train, data.train_transform)[(0, 3)][0].shape) == (1, 12, 12)
    with pytest.raises(ValueError, match="--holdout applies to datasets without a validation split; cifar10 has one"):
        load_classification_data("cifar10", "/x", holdout=0.1)


def test_configs_hold_the_paper_recipes():
    from fewshot.cli import pretrain as run_pretrain
    from fewshot.config import parse_args_with_config

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/pretrain_*.yaml"))
    assert len(configs) >= 4
    parsed = {p.stem: parse_args_with_config(run_pretrain.build_parser(), ["--config", str(p)]) for p in configs}
    for args in parsed.values():
        run_pretrain.check_args(args)
    for name in ("pretrain_cifar10", "pretrain_cifar100"):
        a = parsed[name]
        assert (a.optimizer, a.lr, a.momentum, a.weight_decay, a.epochs, a.schedule, a.milestones, a.gamma) == (
            "sgd",
            0.1,
            0.9,
            1e-4,
            350,
            "multistep",
            [150, 250],
            0.1,
        )
    a = parsed["pretrain_imagenet"]
    assert (a.lr, a.weight_decay, a.epochs, a.schedule, a.step_size, a.gamma) == (0.1, 2.5e-5, 90, "step", 30, 0.1)


def test_fit_removes_temporary_checkpoints_a_killed_run_left(tmp_path):
    (tmp_path / "a").mkdir()
    stale = tmp_path / "a" / ".last.pt.k1llx.tmp"
    stale.write_bytes(b"half a checkpoint")
    run_fit(tmp_path / "a", epochs=1)
    assert not stale.exists() and (tmp_path / "a" / "last.pt").is_file()
