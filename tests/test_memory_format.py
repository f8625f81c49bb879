"""channels_last: the same values in another memory layout, end to end (Episode.to, ACDC layers, MAML,
the training loop, evaluation and the command line's --memory-format)."""

from __future__ import annotations

import json

import pytest
import torch

from fewshot import create_backbone
from fewshot.acdc.layer import ACDCConv2d
from fewshot.cli import main
from fewshot.data.episode import Episode
from fewshot.learners.maml import MAML
from tests.helpers import make_episode
from tests.test_maml_tuning import TINY

CL = torch.channels_last


def stored_channels_last(t: torch.Tensor) -> bool:
    """Channels-last strides (channels innermost; for one channel, the stride that says so)."""
    return t.dim() == 4 and t.stride(1) == 1 and t.is_contiguous(memory_format=CL)


def test_episode_to_lays_out_the_images_only() -> None:
    episode = make_episode(ways=2, shots=2, queries=3, size=5)
    moved = episode.to("cpu", memory_format=CL)
    assert stored_channels_last(moved.support_images) and stored_channels_last(moved.query_images)
    for field in ("support_images", "support_labels", "query_images", "query_labels", "classes"):
        assert torch.equal(getattr(moved, field), getattr(episode, field)), field
    assert moved.support_images.stride() == (75, 1, 15, 3)
    kept = moved.to("cpu")  # the default keeps the layout it is given
    assert stored_channels_last(kept.support_images)
    assert episode.to("cpu").support_images.is_contiguous()
    gray = Episode(torch.rand(4, 1, 6, 6), torch.arange(4), torch.rand(2, 1, 6, 6), torch.arange(2), torch.arange(4))
    assert gray.support_images.stride(1) == 36
    assert gray.to("cpu", memory_format=CL).support_images.stride() == (36, 1, 6, 1)  # says channels-last to conv2d


@pytest.mark.parametrize("evaluation", ["kernel", "two-stage"])
def test_acdc_conv_output_follows_the_input_layout(evaluation: str) -> None:
    torch.manual_seed(0)
    conv = ACDCConv2d(6, 10, 3, atoms=4, padding=1).double().eval()
    conv.evaluation = evaluation
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    y, y_cl = conv(x), conv(x.contiguous(memory_format=CL))
    assert y.is_contiguous() and stored_channels_last(y_cl)
    assert (y - y_cl).abs().max().item() <= 1e-12


def learner_pair(name: str, acdc: str, **kw) -> tuple[MAML, MAML]:
    """Two equal second-order MAML learners (float64, no atom-drop), the second stored channels_last."""
    learners = []
    for _ in range(2):
        torch.manual_seed(0)
        backbone = create_backbone(name, acdc=acdc, atoms=4, atom_drop=0.0, **kw)
        learners.append(MAML(backbone, ways=3, inner_steps=2, inner_lr=0.1, test_inner_steps=3).double())
    return learners[0], learners[1].to(memory_format=CL)


@pytest.mark.parametrize(
    "name,acdc,kw,size,dense_convs",
    [
        ("conv4", "none", {"width": 8, "image_size": 16}, 16, 4),
        ("conv4", "net", {"width": 8, "image_size": 16}, 16, 0),  # no 4-D weight: only the images change
        ("resnet10", "net", {"width": 4, "stem": "small"}, 12, 3),  # the 1x1 shortcuts stay dense
    ],
)
def test_maml_meta_gradients_and_predictions_do_not_depend_on_the_layout(
    name: str, acdc: str, kw: dict, size: int, dense_convs: int
) -> None:
    plain, cl = learner_pair(name, acdc, **kw)
    conv_weights = [p for p in cl.parameters() if p.dim() == 4]
    assert len(conv_weights) == dense_convs  # (1x1 kernels are stored alike in both layouts)
    assert all(p.is_contiguous(memory_format=CL) for p in conv_weights)
    assert any(stored_channels_last(p) and p.shape[-1] > 1 for p in conv_weights) == (acdc == "none")
    episodes = [make_episode(ways=3, shots=1, queries=2, size=size, seed=s) for s in range(2)]
    grads = {}
    for learner, layout in ((plain, torch.contiguous_format), (cl, CL)):
        learner.zero_grad()
        learner.backward_batch([e.to("cpu", memory_format=layout) for e in episodes])
        grads[layout] = {n: p.grad for n, p in learner.named_parameters()}
    assert grads[CL].keys() == grads[torch.contiguous_format].keys()
    for n, g in grads[CL].items():
        assert (g - grads[torch.contiguous_format][n]).abs().max().item() <= 1e-10, n
    plain.eval(), cl.eval()
    for e in episodes:
        difference = plain.predict(e) - cl.predict(e.to("cpu", memory_format=CL))
        assert difference.abs().max().item() <= 1e-10


# test_maml_tuning's tiny glyphs run, dense (its 3x3 weights show the layout) and validated once
GLYPHS_TINY = [*TINY, "--acdc", "none", "--train-episodes", "8", "--val-every", "1", "--val-episodes", "2"]


@pytest.mark.usefixtures("torch_one_thread", "glyphs_cache")
@pytest.mark.parametrize("flag,expected", [(None, "channels_last"), ("contiguous", "contiguous")])
def test_the_command_line_trains_and_evaluates_in_the_chosen_layout(monkeypatch, tmp_path, flag, expected) -> None:
    seen: dict[str, set[bool]] = {"train": set(), "predict": set(), "weights": set()}
    backward_batch, predict_batch = MAML.backward_batch, MAML.predict_batch

    def record(kind: str, learner: MAML, episodes: list[Episode]) -> None:
        seen[kind].update(stored_channels_last(t) for e in episodes for t in (e.support_images, e.query_images))
        seen["weights"].update(stored_channels_last(p) for p in learner.parameters() if p.dim() == 4)  # dense 3x3

    def spy_backward(self, episodes):
        record("train", self, episodes)
        return backward_batch(self, episodes)

    def spy_predict(self, episodes):
        record("predict", self, episodes)
        return predict_batch(self, episodes)

    monkeypatch.setattr(MAML, "backward_batch", spy_backward)
    monkeypatch.setattr(MAML, "predict_batch", spy_predict)
    flags = [] if flag is None else ["--memory-format", flag]
    record_ = main([*GLYPHS_TINY, *flags, "--device", "cpu", "--out", str(tmp_path / "run")], method="maml")
    want = expected == "channels_last"
    assert seen == {"train": {want}, "predict": {want}, "weights": {want}}  # validation and test both predict
    assert record_["memory_format"] == expected
    assert json.loads((tmp_path / "run" / "result.json").read_text())["memory_format"] == expected


def test_the_normalizer_lays_out_even_one_channel_batches() -> None:
    from fewshot.data.classification import Normalizer

    gray = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    plain = Normalizer((0.5,), (0.25,), "cpu")(gray)
    laid_out = Normalizer((0.5,), (0.25,), "cpu", CL)(gray)
    assert plain.stride() == (16, 16, 4, 1) and laid_out.stride() == (16, 1, 4, 1)
    assert torch.equal(plain, laid_out)


@pytest.mark.usefixtures("torch_one_thread")
def test_supervised_training_gives_the_same_model_in_either_layout(tmp_path) -> None:
    """fit with LoopConfig.memory_format: weights and batches channels-last, the same training to float32
    rounding (two epochs of a conv + BatchNorm + dropout classifier)."""
    from fewshot.training.optim import OptimConfig
    from fewshot.training.supervised import LoopConfig, fit
    from tests.test_pretrain import TinyClassifier, tiny_data

    models, results = {}, {}
    for layout in (torch.contiguous_format, CL):
        torch.manual_seed(0)
        model = TinyClassifier()
        loop = LoopConfig(epochs=2, batch_size=4, seed=7, progress=False, memory_format=layout)
        results[layout] = fit(model, tiny_data(), OptimConfig(lr=0.05), loop, run_dir=tmp_path / str(layout))
        models[layout] = model
    conv = models[CL].body[0].weight
    assert stored_channels_last(conv) and models[torch.contiguous_format].body[0].weight.is_contiguous()
    for (name, a), b in zip(models[torch.contiguous_format].state_dict().items(), models[CL].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert results[CL]["step"] == results[torch.contiguous_format]["step"] == 12
    assert results[CL]["val_loss"] == pytest.approx(results[torch.contiguous_format]["val_loss"], rel=1e-4)


@pytest.mark.usefixtures("torch_one_thread", "glyphs_cache")
def test_baseline_trains_on_the_base_classes_in_the_chosen_layout(monkeypatch, tmp_path) -> None:
    """run_fewshot's --memory-format reaches the Baselines' supervised stage too (not only the episodes)."""
    import fewshot.training.supervised as supervised

    layouts = []
    fit = supervised.fit

    def spy_fit(model, data, optim, loop, **kw):
        layouts.append(loop.memory_format)
        return fit(model, data, optim, loop, **kw)

    monkeypatch.setattr(supervised, "fit", spy_fit)
    flags = ["--dataset", "glyphs", "--no-progress", "--backbone", "conv4", "--width", "8", "--device", "cpu"]
    flags += ["--pretrain-epochs", "1", "--pretrain-batch", "64", "--head-epochs", "2", "--test-episodes", "2"]
    for i, (flag, layout) in enumerate((("channels_last", CL), ("contiguous", torch.contiguous_format))):
        main([*flags, "--memory-format", flag, "--out", str(tmp_path / f"run{i}")], method="baseline")
        assert layouts[-1] == layout
    assert len(layouts) == 2
