"""The episodic training loop: exact resume, checkpoints, log, validation."""

from __future__ import annotations

import json

import pytest
import torch

from fewshot.learners.maml import MAML
from fewshot.training.checkpoint import ModelSpec, load_checkpoint
from fewshot.training.episodic import EpisodicSchedule, train_episodic
from tests.helpers import DropNet, make_episode

SPEC = ModelSpec(backbone="dropnet")
TRAIN = [make_episode(seed=100 + i, dtype=torch.float32) for i in range(16)]
VAL = [make_episode(seed=900 + i, dtype=torch.float32) for i in range(3)]


def fresh_learner() -> MAML:
    torch.manual_seed(0)
    return MAML(DropNet(), ways=3, inner_steps=2, test_inner_steps=2)


def run(tmp, steps: int, resume: bool = False, learner: MAML | None = None) -> MAML:
    learner = learner or fresh_learner()
    schedule = EpisodicSchedule(meta_steps=steps, meta_batch=2, val_every=2)
    train_episodic(learner, TRAIN, VAL, schedule, tmp, spec=SPEC, resume=resume, progress=False)
    return learner


def test_resume_gives_identical_parameters(tmp_path) -> None:
    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    torch.manual_seed(12345)  # whatever the global RNG holds now, resuming restores it
    resumed = run(tmp_path / "b", 6, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, 7))
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_checkpoints_and_log(tmp_path) -> None:
    run(tmp_path, 4)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    val = [r for r in records if "val_acc" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert all(r["val_seconds"] > 0 for r in val) and not any("val_seconds" in r for r in records if r not in val)
    best = load_checkpoint(tmp_path / "best.pt")
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["progress"]["step"] == 4
    assert best["progress"]["best_val_acc"] == pytest.approx(max(r["val_acc"] for r in val), abs=1e-3)
    assert best["progress"]["step"] == max(val, key=lambda r: r["val_acc"])["step"]
    assert best["meta"]["backbone"] == "dropnet"


def test_resume_refuses_other_model(tmp_path) -> None:
    run(tmp_path, 2)
    learner = fresh_learner()
    schedule = EpisodicSchedule(meta_steps=4, meta_batch=2)
    with pytest.raises(ValueError, match="was saved for backbone=dropnet.*you asked for backbone=other"):
        train_episodic(
            learner, TRAIN, VAL, schedule, tmp_path, spec=ModelSpec(backbone="other"), resume=True, progress=False
        )


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="meta_batch must be >= 1, got 0"):
        EpisodicSchedule(meta_steps=1, meta_batch=0)
    with pytest.raises(ValueError, match="has 16 episodes; 9 meta-steps of 2 need 18"):
        train_episodic(
            fresh_learner(),
            TRAIN,
            VAL,
            EpisodicSchedule(meta_steps=9, meta_batch=2),
            "/tmp/unused-fewshot",
            spec=SPEC,
            progress=False,
        )


def test_a_non_finite_loss_stops_training_before_the_step_and_keeps_the_last_checkpoint(tmp_path) -> None:
    learner = fresh_learner()
    original = learner.backward_batch
    calls = {"n": 0}

    def diverging(batch):
        calls["n"] += 1
        loss, logits = original(batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), logits

    learner.backward_batch = diverging  # meta-steps 1-2 are fine (validated and saved at 2), step 3 is NaN
    with pytest.raises(FloatingPointError, match=r"the training loss became nan at meta-step 3; stopped without"):
        run(tmp_path, 6, learner=learner)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["progress"]["step"] == 2
    for name, value in learner.state_dict().items():  # the parameters were not stepped with the NaN loss
        assert torch.isfinite(value.float()).all(), name


def test_a_start_in_the_folder_removes_temporary_checkpoints_a_killed_run_left(tmp_path) -> None:
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / ".last.pt.k1llx.tmp", tmp_path / ".best.pt.abc123.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    other = tmp_path / ".notes.tmp"  # not a checkpoint temporary: left alone
    other.write_bytes(b"x")
    run(tmp_path, 2)
    assert not any(p.exists() for p in stale) and other.exists()
    assert not list(tmp_path.glob(".*.pt.*.tmp"))  # and the run left none of its own
