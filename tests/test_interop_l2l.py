"""learn2learn over our backbones: its MAML (second and first order), ANIL-style head adaptation, Meta-SGD
(through fewshot.interop.l2l) and GBML give our MAML's meta-gradients; MetaDataset from our datasets.

learn2learn does not pip-install on Python 3.11+ as published; ``python scripts/install_learn2learn.py``
installs it, and CI runs that script first (with FEWSHOT_REQUIRE_LEARN2LEARN=1 these tests fail instead of
skipping when learn2learn is missing).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.acdc import ACDCConv2d
from fewshot.backbones import create_backbone
from fewshot.data.episode import Episode
from fewshot.learners.maml import MAML
from tests.helpers import make_episode

try:
    import learn2learn as l2l
except ImportError as exc:
    if os.environ.get("FEWSHOT_REQUIRE_LEARN2LEARN") == "1":
        raise
    pytest.skip(
        f"learn2learn is not installed ({exc}); `python scripts/install_learn2learn.py` installs it "
        "(CI does, and sets FEWSHOT_REQUIRE_LEARN2LEARN=1 so that these tests cannot skip there)",
        allow_module_level=True,
    )

from fewshot.interop.l2l import MetaSGD, ThreeDimensional, labels_to_indices, meta_dataset  # noqa: E402

INNER_LR = 0.1
INNER_STEPS = 2
SCOPES = ["none", "net", "block", "g-net"]
BACKBONES = ["conv4", "resnet10"]


def backbone(name: str, scope: str) -> nn.Module:
    options = {"image_size": 16, "width": 8} if name == "conv4" else {"width": 4, "stem": "small"}
    if scope.startswith("g-"):
        options["group_size"] = 4
    acdc = {} if scope == "none" else {"acdc": scope, "atoms": 3, "atom_drop": 0.0}
    torch.manual_seed(0)
    return create_backbone(name, **acdc, **options)


def our_learner(name: str, scope: str, **options) -> MAML:
    learner = MAML(backbone(name, scope), ways=3, inner_steps=INNER_STEPS, inner_lr=INNER_LR, **options)
    learner = learner.double().train()
    with torch.no_grad():  # a non-zero head, so that every parameter gets a gradient
        learner.head.weight.normal_(0, 0.3)
        learner.head.bias.normal_(0, 0.1)
        for rates in (learner.inner_lrs or {}).values():
            rates.fill_(INNER_LR)  # they were made in float32: 0.1 rounded there differs by 1.5e-9
    return learner


def episodes() -> list[Episode]:
    return [make_episode(size=16, seed=s) for s in range(2)]


def our_meta_gradients(learner: MAML, tasks: list[Episode]) -> dict[str, torch.Tensor]:
    learner.zero_grad()
    loss, _ = learner.batch_loss(tasks)
    loss.backward()
    return {n: p.grad.clone() for n, p in learner.named_parameters()}


def l2l_meta_gradients(wrapper: nn.Module, model: nn.Module, tasks: list[Episode]) -> dict[str, torch.Tensor]:
    """Meta-gradients of ``model`` wrapped in a learn2learn learner (MAML, MetaSGD, GBML): clone, adapt
    on the support set, backward of the query loss, summed over the tasks as our batch loss is."""
    wrapper.zero_grad()
    for task in tasks:
        clone = wrapper.clone()
        for _ in range(INNER_STEPS):
            clone.adapt(F.cross_entropy(clone(task.support_images), task.support_labels))
        F.cross_entropy(clone(task.query_images), task.query_labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tol: float = 1e-10) -> None:
    assert set(theirs) <= set(ours) and theirs
    for name, grad in theirs.items():
        assert (ours[name] - grad).abs().max().item() <= tol, name


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("first_order", [False, True])
def test_l2l_maml_equals_ours(name: str, scope: str, first_order: bool) -> None:
    learner = our_learner(name, scope, first_order=first_order)
    model = copy.deepcopy(learner)
    theirs = l2l_meta_gradients(l2l.algorithms.MAML(model, lr=INNER_LR, first_order=first_order), model, episodes())
    assert_same(our_meta_gradients(learner, episodes()), theirs)
    if scope != "none":  # one shared coefficient tensor per block / net: listed once, adapted as one
        assert sum(n.endswith(".coefficients") for n in theirs) >= 1


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("name", BACKBONES)
def test_l2l_anil_equals_our_head_adaptation(name: str, scope: str) -> None:
    learner = our_learner(name, scope, adapt="head")
    model = copy.deepcopy(learner)
    head = l2l.algorithms.MAML(model.head, lr=INNER_LR)
    model.zero_grad()
    for task in episodes():
        support = model.backbone(task.support_images).flatten(1)
        query = model.backbone(task.query_images).flatten(1)
        clone = head.clone()
        for _ in range(INNER_STEPS):
            clone.adapt(F.cross_entropy(clone(support), task.support_labels))
        F.cross_entropy(clone(query), task.query_labels).backward()
    theirs = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert_same(our_meta_gradients(learner, episodes()), theirs)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("name", BACKBONES)
def test_meta_sgd_equals_our_learned_step_sizes(name: str, scope: str) -> None:
    """Meta-SGD's per-element rates start at one value; ours are one per tensor and step. The model's
    meta-gradients agree, and each tensor's rate gradient, summed over its elements, equals the sum of
    our per-step rate gradients."""
    learner = our_learner(name, scope, learn_inner_lr=True)
    model = our_learner(name, scope)  # the same network without the learned step sizes
    model.load_state_dict({k: v for k, v in learner.state_dict().items() if not k.startswith("inner_lrs.")})
    meta_sgd = MetaSGD(model, lr=INNER_LR)
    theirs = l2l_meta_gradients(meta_sgd, model, episodes())
    ours = our_meta_gradients(learner, episodes())
    assert_same(ours, theirs)
    rates = list(meta_sgd.lrs)
    assert len(rates) == len(theirs)
    for (param_name, _), rate in zip(model.named_parameters(), rates):
        per_step = ours["inner_lrs." + param_name.replace(".", "-")]
        assert per_step.shape == (INNER_STEPS,)
        assert abs(rate.grad.sum().item() - per_step.sum().item()) <= 1e-10, param_name


@pytest.mark.parametrize("scope", ["net", "block", "g-net"])
def test_stock_meta_sgd_unties_shared_coefficients_and_ours_does_not(scope: str) -> None:
    features = backbone("resnet10", scope)
    model = nn.Sequential(features, nn.Linear(features.out_features, 3)).double()
    task = episodes()[0]
    adapted = {}
    for cls in (l2l.algorithms.MetaSGD, MetaSGD):
        clone = cls(copy.deepcopy(model), lr=INNER_LR).clone()
        clone.adapt(F.cross_entropy(clone(task.support_images), task.support_labels))
        convs = [m for m in clone.module.modules() if isinstance(m, ACDCConv2d)]
        adapted[cls] = {id(conv.shared.coefficients) for conv in convs}, len(list(clone.parameters()))
    distinct_theirs, count_theirs = adapted[l2l.algorithms.MetaSGD]
    distinct_ours, count_ours = adapted[MetaSGD]
    shared = len({id(m.shared.coefficients) for m in model.modules() if isinstance(m, ACDCConv2d)})
    assert len(distinct_ours) == shared  # still one tensor per sharing group, each moved once
    assert count_ours == len(list(model.parameters()))  # so the rates pair with the same tensors next step
    # learn2learn 0.2.0's update unties them: more distinct tensors, and the rates no longer pair up
    assert len(distinct_theirs) > shared and count_theirs > count_ours


@pytest.mark.parametrize("scope", SCOPES + ["layer", "g-block", "g-layer"])
@pytest.mark.parametrize("name", BACKBONES)
def test_gbml_identity_transform_equals_our_maml_on_every_scope(name: str, scope: str) -> None:
    learner = our_learner(name, scope)
    model = copy.deepcopy(learner)
    gbml = l2l.algorithms.GBML(model, transform=l2l.optim.ModuleTransform(nn.Identity), lr=INNER_LR)
    assert_same(our_meta_gradients(learner, episodes()), l2l_meta_gradients(gbml, model, episodes()))


@pytest.mark.parametrize("scope", SCOPES + ["layer", "g-block", "g-layer"])
@pytest.mark.parametrize("name", BACKBONES)
def test_gbml_meta_curvature_through_three_dimensional(name: str, scope: str) -> None:
    """MetaCurvature starts at identity matrices, so the first meta-gradients are MAML's; its matrices
    are trained too. Without the wrapper it refuses ACDC's 3-D tensors."""
    learner = our_learner(name, scope)
    model = copy.deepcopy(learner)
    if scope != "none":
        with pytest.raises(NotImplementedError, match="not supported by MetaCurvature"):
            l2l.algorithms.GBML(model, transform=l2l.optim.MetaCurvatureTransform, lr=INNER_LR)
    transform = ThreeDimensional(l2l.optim.MetaCurvatureTransform)
    gbml = l2l.algorithms.GBML(model, transform=transform, lr=INNER_LR).double()  # its matrices: float32
    assert_same(our_meta_gradients(learner, episodes()), l2l_meta_gradients(gbml, model, episodes()))
    curvature = [p.grad for p in gbml.compute_update.parameters()]
    assert curvature and all(g is not None and torch.isfinite(g).all() for g in curvature)
    assert sum(g.abs().sum().item() for g in curvature) > 0


def test_meta_dataset_items_are_our_episode_images_and_no_item_is_read(monkeypatch) -> None:
    from fewshot.data import EpisodeSampler, build_transform, create_dataset
    from fewshot.data.store import ClassIndexedDataset

    reads = []
    original = ClassIndexedDataset.__getitem__
    monkeypatch.setattr(ClassIndexedDataset, "__getitem__", lambda self, i: reads.append(i) or original(self, i))
    tasks = meta_dataset("glyphs", "test")
    assert reads == []  # the class index comes from class_indices, not from reading the items
    dataset = tasks.dataset
    assert len(tasks.labels) == len(dataset.classes) and len(tasks) == len(dataset)
    assert all(tasks.indices_to_labels[i] == int(dataset.targets[i]) for i in range(0, len(dataset), 97))

    sampler = EpisodeSampler(dataset, 5, 1, 2, 1, seed=3, transform=build_transform("glyphs", 28, train=False))
    _, support, query, _ = sampler.indices(0)
    episode = sampler[0]
    for position, index in enumerate(torch.cat([support, query]).tolist()):
        image, label = tasks[index]
        assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
        expected = torch.cat([episode.support_images, episode.query_images])[position]
        assert torch.equal(image, expected)
        assert label == int(dataset.targets[index])

    plain = create_dataset("glyphs", "test")
    assert labels_to_indices(plain) == {c: [i for i, t in enumerate(plain.targets.tolist()) if t == c]
                                        for c in range(len(plain.classes))}  # fmt: skip


def test_l2l_task_dataset_draws_float_tasks_from_meta_dataset() -> None:
    data = meta_dataset("glyphs", "val")
    tasks = l2l.data.TaskDataset(
        data,
        task_transforms=[
            l2l.data.transforms.NWays(data, 5),
            l2l.data.transforms.KShots(data, 2),
            l2l.data.transforms.LoadData(data),
        ],
        num_tasks=2,
    )
    images, labels = tasks.sample()
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.float32
    assert images.min().item() < 0 < images.max().item()  # normalized, not 0..255
    assert labels.unique().numel() == 5


def test_labels_to_indices_from_targets_only_and_its_error() -> None:
    class Targets(torch.utils.data.Dataset):
        targets = [2, 0, 2, 1]

    assert labels_to_indices(Targets()) == {2: [0, 2], 0: [1], 1: [3]}
    with pytest.raises(ValueError, match="neither 'class_indices' nor 'targets'"):
        labels_to_indices(object())


def test_install_script_names_the_failed_step() -> None:
    spec = importlib.util.spec_from_file_location(
        "install_learn2learn", Path(__file__).resolve().parents[1] / "scripts" / "install_learn2learn.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(script.StepFailed, match=r"^unpacking failed \(exit 3\): no such archive$"):
        script.run("unpacking", [sys.executable, "-c", "import sys; print('no such archive'); sys.exit(3)"])
    assert script.importable()


def test_readme_learn2learn_example_runs_as_written() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("With learn2learn:") :]
    code = section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")]
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, "README.md (learn2learn example)", "exec"), namespace)
    assert namespace["step"] == 2 and namespace["x"].shape == (10, 1, 28, 28)
    grads = [p.grad for p in namespace["maml"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
