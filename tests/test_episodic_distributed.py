"""Meta-training and evaluation under torchrun: 2 CPU processes (gloo) give one process's meta-gradients,
per-episode accuracies and resume; the CLI under torchrun writes one result that a single process's
evaluation of its checkpoint reproduces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewshot.evaluation import evaluate
from fewshot.training.distributed import DistInfo
from fewshot.training.episodic import EpisodicSchedule, backward_meta_batch, train_episodic
from tests.distributed_episodic_cases import GRADIENT_CASES, eval_episodes, gradient_case

REPO = Path(__file__).resolve().parents[1]


def torchrun(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("torchrun")
    done = torchrun(str(REPO / "tests" / "distributed_episodic_driver.py"), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "rank0.pt", weights_only=False), out


@pytest.mark.parametrize("name", list(GRADIENT_CASES))
def test_meta_gradients_equal_one_process(two_processes, name: str) -> None:
    saved = two_processes[0][name]
    learner, batch = gradient_case(name)
    learner.zero_grad()
    loss, accuracy = backward_meta_batch(learner, batch, DistInfo())
    grads = {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}
    assert saved["grads"].keys() == grads.keys() and any(n.startswith("inner_lrs.") for n in grads)
    for n, g in grads.items():
        assert (saved["grads"][n] - g).abs().max().item() <= 1e-10, n
    assert saved["loss"] == pytest.approx(loss.item(), abs=1e-10)
    assert saved["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_sharded_evaluation_equals_one_process(two_processes) -> None:
    learner, episodes = eval_episodes()
    assert two_processes[0]["evaluation"] == evaluate(learner, episodes, progress=False).accuracies


def test_resume_under_torchrun_ends_with_the_uninterrupted_parameters(two_processes) -> None:
    saved, out = two_processes
    for name, tensor in saved["straight"].items():
        assert torch.equal(tensor, saved["resumed"][name]), name
    other_rank = torch.load(out / "straight_rank1.pt")
    assert all(torch.equal(tensor, other_rank[n]) for n, tensor in saved["straight"].items())  # one model
    log = [json.loads(line) for line in (out / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    straight_log = [json.loads(line) for line in (out / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in straight_log] == [r["loss"] for r in log]
    assert len(torch.load(out / "a" / "last.pt", weights_only=False)["rng"]) == 2  # every rank's RNG state


def test_meta_batch_smaller_than_the_processes_is_refused(tmp_path) -> None:
    learner, batch = gradient_case("plain-first")
    with pytest.raises(ValueError, match="meta_batch 1 is smaller than the 2 processes"):
        train_episodic(
            learner,
            batch,
            batch,
            EpisodicSchedule(meta_steps=1, meta_batch=1),
            tmp_path,
            spec=None,
            info=DistInfo(rank=0, world_size=2),
        )
    assert not any(tmp_path.iterdir())


def test_cli_under_torchrun_writes_one_result_that_one_process_reproduces(tmp_path) -> None:
    out = tmp_path / "run"
    flags = ["--dataset", "glyphs", "--backbone", "conv4", "--acdc", "net", "--atoms", "4", "--width", "8"]
    flags += ["--ways", "3", "--shots", "1", "--queries", "2", "--test-queries", "3", "--inner-steps", "1"]
    flags += ["--test-inner-steps", "1", "--inner-lr", "0.1", "--test-inner-lr", "0.1", "--first-order"]
    flags += ["--meta-batch", "2", "--val-episodes", "5", "--test-episodes", "9", "--device", "cpu"]
    common = [*flags, "--atom-drop", "0", "--no-progress"]
    done = torchrun("run_maml.py", *common, "--train-episodes", "6", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("over 9 test episodes") == 1  # rank 0 alone reports
    record = json.loads((out / "result.json").read_text())
    assert record["processes"] == 2 and record["meta_steps"] == 3 and len(record["episode_accuracies"]) == 9
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]

    from fewshot.cli.fewshot import main

    eval_flags = ["--eval-only", "--checkpoint", str(out / "best.pt"), "--out", str(tmp_path / "eval")]
    again = main([*common, *eval_flags], method="maml")
    assert again["episode_accuracies"] == record["episode_accuracies"] and "processes" not in again
