"""run_pretrain.py under torchrun: 2 CPU processes (gloo) train a tiny ACDC net on fake CIFAR-10."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fewshot.data.classification import AugmentedDataset, Normalizer, load_classification_data
from fewshot.training.classifier_metrics import evaluate_classifier
from fewshot.training.models import model_from_checkpoint
from fewshot.training.optim import Precision
from tests.test_pretrain import write_fake_cifar10

REPO = Path(__file__).resolve().parents[1]

# Runs the pretraining CLI (run_pretrain.py) under torchrun and saves every rank's final weights next to the run.
DRIVER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {repo!r})
    import fewshot.training.supervised as supervised
    from fewshot.cli import pretrain as run_pretrain

    original_fit = supervised.fit

    def fit(model, *args, **kwargs):
        result = original_fit(model, *args, **kwargs)
        torch.save(model.state_dict(), os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
        return result

    supervised.fit = fit
    run_pretrain.main(sys.argv[1:])
""")


def test_torchrun_two_processes_agree_and_checkpoint_loads_in_one(tmp_path):
    data_root, out = tmp_path / "data", tmp_path / "run"
    write_fake_cifar10(data_root, per_batch=8, test=16)  # 40 train, 16 val images
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(driver),
        "--dataset",
        "cifar10",
        "--data-root",
        str(data_root),
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
        "5",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "result.json").read_text())
    assert (results["world_size"], results["step"], results["epoch"]) == (2, 8, 2)  # 40 / (2 x 5) = 4 steps/epoch
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert list(rank0) == list(rank1)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert not any(k.startswith("module.") for k in rank0)

    # Rank 0's checkpoint loads in one process, holds rank 0's weights, and gives the reported accuracy:
    # the two ranks' evaluation shards add up to the whole validation set.
    model, ckpt = model_from_checkpoint(out / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, rank0[key]), key
    data = load_classification_data("cifar10", data_root)
    loader = torch.utils.data.DataLoader(AugmentedDataset(data.val, data.eval_transform), batch_size=16)
    single = evaluate_classifier(
        model, loader, Normalizer(data.mean, data.std, "cpu"), Precision("off", torch.device("cpu"))
    )
    assert single["images"] == 16
    assert single["top1"] == pytest.approx(results["top1"]) and single["top5"] == pytest.approx(results["top5"])
    assert single["loss"] == pytest.approx(results["val_loss"], rel=1e-5)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "last.pt",
        "log.jsonl",
        "rank0.pt",
        "rank1.pt",
        "result.json",
    ]
