"""What the MAML tuning work added: the wall-clock budget (``--train-seconds``), the cosine schedule,
evaluation on the validation split, atom-drop modes inside the inner loop, the step sizes of test steps
beyond the trained ones, and the tuned main-job config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fewshot.acdc import ACDCConv2d, hold_atom_masks
from fewshot.backbones import create_backbone
from fewshot.cli import main
from fewshot.data import create_dataset
from fewshot.learners.maml import MAML
from fewshot.training.checkpoint import load_checkpoint
from fewshot.training.episodic import EpisodicSchedule
from tests.helpers import TinyNet, make_episode

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--dataset",
    "glyphs",
    "--no-progress",
    "--backbone",
    "conv4",
    "--width",
    "8",
    "--acdc",
    "net",
    "--first-order",
    "--inner-lr",
    "0.1",
    "--val-episodes",
    "4",
    "--test-episodes",
    "6",
    "--eval-batch",
    "3",
]


pytestmark = pytest.mark.usefixtures("torch_one_thread", "glyphs_cache")


# ------------------------------------------------------------------------------------------------
# The wall-clock budget and the schedule
def test_train_seconds_stops_training_and_writes_a_complete_result(tmp_path: Path) -> None:
    out = tmp_path / "run"
    record = main(
        [*TINY, "--train-episodes", "4000", "--val-every", "500", "--train-seconds", "0.001", "--out", str(out)],
        method="maml",
    )
    # The first meta-step already passes 1 ms: training stops after it, validates it and tests as usual.
    assert record["meta_steps"] == 1 and record["meta_steps_planned"] == 1000
    assert record["stopped_by"] == "train_seconds"
    assert record["best_step"] == 1 and record["episodes"] == 6
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and "val_acc" in log[0] and log[0]["seconds"] > 0
    assert load_checkpoint(out / "best.pt")["progress"]["step"] == 1
    assert json.loads((out / "result.json").read_text())["stopped_by"] == "train_seconds"


def test_without_train_seconds_the_step_budget_ends_training(tmp_path: Path) -> None:
    record = main([*TINY, "--train-episodes", "8", "--val-every", "0", "--out", str(tmp_path / "r")], method="maml")
    assert record["meta_steps"] == 2 and record["stopped_by"] == "meta_steps"


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_train_seconds_must_be_positive_and_finite(capsys, tmp_path: Path, value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--train-seconds", value, "--out", str(tmp_path / "r")], method="maml")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --train-seconds must be a positive number of seconds") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_inner_atom_drop_is_refused_for_other_methods(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--method", "protonet", *TINY[:9], "--inner-atom-drop", "task", "--out", str(tmp_path / "r")])
    assert "--inner-atom-drop does not apply to --method protonet (only to maml)" in capsys.readouterr().err


def test_cosine_schedule_follows_the_larger_fraction_of_the_budget() -> None:
    steps = EpisodicSchedule(meta_steps=100, lr=0.01, lr_schedule="cosine")
    assert steps.learning_rate(0, 0.0) == pytest.approx(0.01)
    assert steps.learning_rate(50, 0.0) == pytest.approx(0.005)
    assert steps.learning_rate(100, 0.0) == pytest.approx(0.0, abs=1e-12)
    timed = EpisodicSchedule(meta_steps=100, lr=0.01, lr_schedule="cosine", train_seconds=10.0)
    assert timed.learning_rate(10, 5.0) == pytest.approx(0.005)  # half the seconds, a tenth of the steps
    assert timed.learning_rate(75, 5.0) == pytest.approx(0.01 * 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert timed.learning_rate(10, 60.0) == pytest.approx(0.0, abs=1e-12)  # past the budget: clamped
    assert EpisodicSchedule(meta_steps=100, lr=0.01).learning_rate(99, 1e9) == 0.01
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine"):
        EpisodicSchedule(meta_steps=1, lr_schedule="step")


def test_cosine_schedule_reaches_the_optimizer(tmp_path: Path) -> None:
    out = tmp_path / "run"
    main(
        [
            *TINY,
            "--train-episodes",
            "16",
            "--val-every",
            "0",
            "--lr",
            "0.01",
            "--lr-schedule",
            "cosine",
            "--out",
            str(out),
        ],
        method="maml",
    )
    rates = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([0.005 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])


def test_val_split_evaluation_uses_validation_classes(tmp_path: Path) -> None:
    record = main(
        [
            *TINY,
            "--train-episodes",
            "4",
            "--val-every",
            "0",
            "--test-split",
            "val",
            "--test-seed",
            "100",
            "--out",
            str(tmp_path / "r"),
        ],
        method="maml",
    )
    assert record["split"] == "val"
    val_classes = create_dataset("glyphs", "val", image_size=28).classes
    assert not set(val_classes) & set(create_dataset("glyphs", "test", image_size=28).classes)
    from fewshot.cli import build_parser, episode_source, resolve
    from fewshot.config import parse_args_with_config

    args = resolve(parse_args_with_config(build_parser("maml"), [*TINY, "--test-split", "val"]))
    assert episode_source(args, args.test_split, 2, 0, train=False).dataset.classes == val_classes


# ------------------------------------------------------------------------------------------------
# Atom-drop inside the inner loop
def _acdc_net(drop: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("conv4", acdc="net", atoms=4, atom_drop=drop, image_size=16, width=4, in_channels=3).double()


def test_hold_atom_masks_reuses_one_mask_per_layer() -> None:
    net = _acdc_net().train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.manual_seed(1)
    assert not torch.equal(net(x), net(x))  # a new mask at every forward
    with hold_atom_masks(net):
        first = net(x)
        assert torch.equal(first, net(x))
    with hold_atom_masks(net, drop=False):
        undropped = net(x)
    for layer in net.modules():
        if isinstance(layer, ACDCConv2d):
            layer.atom_drop = 0.0
    net.train()
    assert torch.allclose(undropped, net(x), atol=1e-12)  # drop=False: as without atom-drop
    assert all(m._held_mask is None for m in net.modules() if isinstance(m, ACDCConv2d))


@pytest.mark.parametrize("mode,draws_per_layer", [("step", 4), ("task", 1), ("query", 1)])
def test_inner_atom_drop_modes_draw_the_expected_masks(monkeypatch, mode: str, draws_per_layer: int) -> None:
    torch.manual_seed(0)
    learner = MAML(_acdc_net(), ways=3, inner_steps=3, inner_lr=0.1, inner_atom_drop=mode).double()
    learner.train()
    draws: list[int] = []
    original = ACDCConv2d.draw_atom_mask

    def counting(self):
        draws.append(id(self))
        return original(self)

    monkeypatch.setattr(ACDCConv2d, "draw_atom_mask", counting)
    episode = make_episode(ways=3, shots=1, queries=2, size=16)
    learner.loss(episode)[0].backward()
    layers = sum(isinstance(m, ACDCConv2d) for m in learner.modules())
    # step: 3 support steps + the query pass; task: one mask for all; query: none on support, one at query
    assert len(draws) == layers * draws_per_layer


def test_query_mode_adapts_as_without_atom_drop() -> None:
    episode = make_episode(ways=3, shots=1, queries=2, size=16)
    dropped = MAML(_acdc_net(0.5), ways=3, inner_steps=2, inner_lr=0.1, inner_atom_drop="query").double()
    plain = MAML(_acdc_net(0.0), ways=3, inner_steps=2, inner_lr=0.1).double()
    plain.load_state_dict(dropped.state_dict())
    params = dropped.model_parameters()
    with hold_atom_masks(dropped, drop=False):
        ours = dropped.adapt_to_support(params, episode.support_images, episode.support_labels, 2, 0.1, False)
    reference = plain.adapt_to_support(
        plain.model_parameters(), episode.support_images, episode.support_labels, 2, 0.1, False
    )
    for name in reference:
        assert torch.allclose(ours[name], reference[name], atol=1e-12), name


def test_unknown_inner_atom_drop_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown inner_atom_drop 'layer'; choose one of: step, task, query"):
        MAML(TinyNet(), ways=3, inner_atom_drop="layer")


# ------------------------------------------------------------------------------------------------
# Learned step sizes for test steps beyond the trained ones
def test_extra_test_steps_use_the_last_learned_step_size() -> None:
    torch.manual_seed(0)
    learner = MAML(TinyNet(), ways=3, inner_steps=2, test_inner_steps=4, inner_lr=0.1, learn_inner_lr=True).double()
    assert all(rates.shape == (2,) for rates in learner.inner_lrs.values())  # trained steps only
    with torch.no_grad():
        for i, rates in enumerate(learner.inner_lrs.values()):
            rates.copy_(torch.tensor([0.05 + 0.01 * i, 0.2 + 0.01 * i]))
    learner.eval()
    episode = make_episode(ways=3, shots=2, queries=3)
    ours = learner.predict(episode)
    # Reference: plain SGD with the step sizes written out: steps 3 and 4 repeat step 2's.
    fast = {n: p.detach().clone() for n, p in learner.model_parameters().items()}
    for step in range(4):
        fast = {n: w.requires_grad_() for n, w in fast.items()}
        loss = F.cross_entropy(learner._forward(fast, episode.support_images), episode.support_labels)
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {
            n: (w - learner.inner_lrs[n.replace(".", "-")][min(step, 1)] * g).detach()
            for (n, w), g in zip(fast.items(), grads)
        }
    reference = learner._forward(fast, episode.query_images)
    assert torch.allclose(ours, reference, atol=1e-10)


def test_learned_step_sizes_need_a_training_step() -> None:
    with pytest.raises(ValueError, match="learn_inner_lr needs inner_steps >= 1"):
        MAML(TinyNet(), ways=3, inner_steps=0, learn_inner_lr=True)


# ------------------------------------------------------------------------------------------------
# The tuned main job
def test_main_job_config_loads_and_runs_a_few_steps(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    record = main(
        [
            "--config",
            str(REPO / "configs/maml_glyphs_demo.yaml"),
            "--train-episodes",
            "8",
            "--val-every",
            "1",
            "--val-episodes",
            "3",
            "--test-episodes",
            "4",
            "--eval-batch",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
        method="maml",
    )
    config = yaml.safe_load((REPO / "configs/maml_glyphs_demo.yaml").read_text())
    assert record["dataset"] == "glyphs" and record["acdc"] == config["acdc"] != "none"
    assert record["episodes"] == 4 and record["meta_steps"] == max(1, 8 // config["meta_batch"])
    assert record["job_seconds"] == config["job_seconds"] == 560 and record["stopped_by"] == "meta_steps"
    assert (out / "best.pt").is_file() and (out / "config.yaml").is_file()
