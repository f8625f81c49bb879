"""The whole-job wall-clock budget (``--job-seconds``): its arithmetic, the training loop stopping where
the validation's timing says the test would no longer fit, the CLI's result and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fewshot.cli import main
from fewshot.learners.maml import MAML
from fewshot.training.budget import JobBudget
from fewshot.training.checkpoint import ModelSpec, load_checkpoint
from fewshot.training.episodic import EpisodicSchedule, train_episodic
from tests.helpers import DropNet, make_episode
from tests.test_maml_tuning import TINY

pytestmark = pytest.mark.usefixtures("torch_one_thread", "glyphs_cache")


class FakeClock:
    """A clock that reads whatever the test sets."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------------
# JobBudget
def test_room_counts_the_step_the_validation_and_the_test() -> None:
    clock = FakeClock()
    job = JobBudget(60.0, test_episodes=300, started=clock.now, clock=clock)
    clock.now += 30.0
    assert job.elapsed() == 30.0
    # Before any evaluation was timed only the step counts.
    assert job.predicted_evaluation(400) == 0.0
    assert job.room_for_another_step(30.0, val_episodes=100)
    assert not job.room_for_another_step(30.5, val_episodes=100)
    job.note_evaluation(2.0, 100)  # 20 ms an episode: validation 2 s, test 6 s
    assert job.eval_episode_seconds == pytest.approx(0.02)
    assert job.predicted_evaluation(300) == pytest.approx(6.0)
    assert job.room_for_another_step(22.0, val_episodes=100)  # 30 + 22 + 2 + 6 = 60
    assert not job.room_for_another_step(22.1, val_episodes=100)
    job.note_evaluation(4.0, 100)  # the latest pass sets the price
    assert job.predicted_evaluation(300) == pytest.approx(12.0)
    job.note_evaluation(1.0, 0)  # nothing evaluated: nothing learned
    assert job.eval_episode_seconds == pytest.approx(0.04)


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), float("inf")])
def test_job_budget_must_be_positive_and_finite(seconds: float) -> None:
    with pytest.raises(ValueError, match=r"--job-seconds must be a positive number of seconds, got"):
        JobBudget(seconds, test_episodes=10)


def test_job_budget_refuses_a_negative_test() -> None:
    with pytest.raises(ValueError, match="test_episodes must be >= 0, got -1"):
        JobBudget(10.0, test_episodes=-1)


# ------------------------------------------------------------------------------------------------
# The training loop
TRAIN = [make_episode(seed=100 + i, dtype=torch.float32) for i in range(40)]
VAL = [make_episode(seed=900 + i, dtype=torch.float32) for i in range(3)]


class RestlessMAML(MAML):
    """MAML whose predictions draw from the global RNG and count themselves in a buffer, as a learner with
    stochastic or stateful evaluation would."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("predictions", torch.zeros(()))

    def predict_batch(self, episodes):
        torch.rand(1)
        self.predictions += len(episodes)
        return super().predict_batch(episodes)


def _train(
    tmp: Path,
    job: JobBudget | None,
    val_every: int = 2,
    val: list | None = None,
    eval_batch: int = 1,
    learner_class: type[MAML] = MAML,
) -> dict:
    torch.manual_seed(0)
    learner = learner_class(DropNet(), ways=3, inner_steps=1, test_inner_steps=1)
    schedule = EpisodicSchedule(meta_steps=20, meta_batch=2, val_every=val_every, eval_batch=eval_batch)
    return train_episodic(
        learner,
        TRAIN,
        VAL if val is None else val,
        schedule,
        tmp,
        spec=ModelSpec(backbone="dropnet"),
        progress=False,
        job=job,
    )


def test_the_test_is_priced_before_the_first_meta_step(tmp_path: Path, capsys) -> None:
    # An hour of budget, but a test of 10^9 episodes; the first validation would come at step 5. The
    # slice of validation episodes timed before training prices the test out of the budget at once:
    # training stops after the first step (validated), not at step 5.
    summary = _train(tmp_path / "r", JobBudget(3600.0, test_episodes=10**9), val_every=5)
    assert summary["meta_steps"] == 1 and summary["meta_steps_planned"] == 20
    assert summary["stopped_by"] == "job_seconds" and summary["best_step"] == 1
    assert summary["job_seconds"] == 3600.0 and summary["predicted_test_seconds"] > 3600.0
    # eval_batch 1: one episode of warm-up, then the other two of the three timed
    assert summary["priced_eval_episodes"] == 2 and summary["priced_eval_seconds"] > 0
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and "val_acc" in log[0]
    assert load_checkpoint(tmp_path / "r" / "last.pt")["progress"]["step"] == 1
    err = capsys.readouterr().err
    assert err.startswith("--job-seconds 3600: training stopped after meta-step 1 of 20 at ")
    assert "the test of 1000000000 episodes (predicted " in err
    assert "the job will still end past 3600 s: this machine evaluates too slowly for the budget" in err


def test_a_stop_with_room_for_the_test_says_so_without_a_warning(tmp_path: Path, capsys) -> None:
    # 0.1 ms of a 10 s budget left and nothing to test: no room for another step, but the job ends in time.
    clock = FakeClock()
    job = JobBudget(10.0, test_episodes=0, started=clock.now - 9.9999, clock=clock)
    summary = _train(tmp_path / "r", job, val_every=5)
    assert summary["meta_steps"] == 1 and summary["stopped_by"] == "job_seconds"
    err = capsys.readouterr().err
    assert err == (
        "--job-seconds 10: training stopped after meta-step 1 of 20 at 10 s, leaving room for the test of 0 "
        "episodes (predicted 0 s)\n"
    )


@pytest.mark.parametrize(("val_episodes", "eval_batch", "timed"), [(40, 1, 8), (40, 4, 8), (40, 16, 16), (20, 16, 4)])
def test_the_priced_slice_is_a_whole_batch_after_a_batch_of_warm_up(
    tmp_path: Path, val_episodes: int, eval_batch: int, timed: int
) -> None:
    val = [make_episode(seed=900 + i, dtype=torch.float32) for i in range(val_episodes)]
    job = JobBudget(3600.0, test_episodes=1)
    summary = _train(tmp_path / "r", job, val_every=20, val=val, eval_batch=eval_batch)
    assert summary["priced_eval_episodes"] == timed


def test_a_step_past_the_budget_is_validated_before_training_stops(tmp_path: Path) -> None:
    clock = FakeClock()
    job = JobBudget(10.0, test_episodes=0, started=clock.now - 11.0, clock=clock)  # already over
    summary = _train(tmp_path / "r", job, val_every=5)
    assert summary["meta_steps"] == 1 and summary["stopped_by"] == "job_seconds" and summary["best_step"] == 1
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and "val_acc" in log[0]
    assert job.eval_episode_seconds is not None and job.eval_episode_seconds > 0


@pytest.mark.parametrize("learner_class", [MAML, RestlessMAML])
def test_a_budget_with_room_leaves_the_step_budget_in_charge(tmp_path: Path, learner_class: type[MAML]) -> None:
    with_room = _train(tmp_path / "a", JobBudget(3600.0, test_episodes=10), learner_class=learner_class)
    without = _train(tmp_path / "b", None, learner_class=learner_class)
    assert with_room["meta_steps"] == without["meta_steps"] == 20
    assert with_room["stopped_by"] == without["stopped_by"] == "meta_steps"
    assert "job_seconds" not in without and with_room["predicted_test_seconds"] > 0
    # The budget's checks and the evaluation priced before training change nothing: not the model, its
    # buffers nor the random draws of the dropout that training makes, even where evaluating changes them.
    assert with_room["best_val_acc"] == without["best_val_acc"]
    a, b = (load_checkpoint(tmp_path / r / "last.pt")["model"] for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_job_budget_needs_validation_during_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs validation during training \(val_every > 0\)"):
        _train(tmp_path / "r", JobBudget(10.0, test_episodes=1), val_every=0)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------
# The CLI
def test_job_seconds_stops_training_and_writes_a_complete_result(tmp_path: Path) -> None:
    out = tmp_path / "run"
    record = main(
        [*TINY, "--train-episodes", "4000", "--val-every", "500", "--job-seconds", "0.001", "--out", str(out)],
        method="maml",
    )
    # Past the budget already after the first meta-step: it is validated, then the test runs as usual.
    assert record["meta_steps"] == 1 and record["meta_steps_planned"] == 1000
    assert record["stopped_by"] == "job_seconds" and record["job_seconds"] == 0.001
    assert record["best_step"] == 1 and record["episodes"] == 6
    assert record["predicted_test_seconds"] > 0 and record["test_seconds"] > 0
    assert record["priced_eval_episodes"] > 0 and record["priced_eval_seconds"] > 0  # timed before step 1
    assert json.loads((out / "result.json").read_text()) == record
    assert yaml.safe_load((out / "config.yaml").read_text())["job_seconds"] == 0.001


def test_job_seconds_ends_the_training_of_any_episodic_learner(tmp_path: Path) -> None:
    argv = ["--method", "protonet", *TINY[:9], "--train-episodes", "50", "--val-every", "20"]
    record = main(
        [*argv, "--val-episodes", "4", "--test-episodes", "6", "--job-seconds", "0.001", "--out", str(tmp_path / "r")]
    )
    assert record["method"] == "protonet" and record["meta_steps"] == 1 and record["meta_steps_planned"] == 50
    assert record["stopped_by"] == "job_seconds" and record["episodes"] == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--job-seconds", "0"], "error: --job-seconds must be a positive number of seconds, got 0.0"),
        (["--job-seconds", "nan"], "error: --job-seconds must be a positive number of seconds, got nan"),
        (["--job-seconds", "60", "--val-every", "0"], "error: --job-seconds needs --val-every > 0"),
        (
            ["--job-seconds", "60", "--lr-schedule", "cosine"],
            "error: --job-seconds does not go with --lr-schedule cosine",
        ),
        (
            ["--job-seconds", "60", "--eval-only", "--checkpoint", "x.pt"],
            "error: --job-seconds does not apply to --eval-only",
        ),
    ],
)
def test_job_seconds_refusals_name_the_flag(capsys, tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*TINY, *extra, "--out", str(tmp_path / "r")], method="maml")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_job_seconds_is_refused_for_a_method_trained_on_the_base_classes(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--method", "baseline", *TINY[:9], "--job-seconds", "60", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "--job-seconds does not apply to --method baseline" in err and "--train-seconds" in err
    assert not (tmp_path / "r").exists()
