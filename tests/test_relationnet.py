"""RelationNet on feature maps (Chen et al. 2019 / Sung et al. 2018): the relation module's layout for every
map size, class maps, (class, query) pairs, scores against a hand computation, losses, learning, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewshot.acdc import ACDCConv2d
from fewshot.backbones import Backbone, create_backbone
from fewshot.cli import build_learner, build_parser, resolve
from fewshot.data.episode import Episode
from fewshot.learners.base import create_learner
from fewshot.learners.relationnet import (
    RelationModule,
    RelationNet,
    class_maps,
    pair_maps,
    plan_relation_blocks,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def image_episode(ways: int, shots: int, queries: int, size: int, channels: int = 3, seed: int = 0) -> Episode:
    """Random images, supports and queries class-major (labels 0,0,..,1,1,..)."""
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.randn(ways * shots, channels, size, size, generator=g),
        torch.arange(ways).repeat_interleave(shots),
        torch.randn(ways * queries, channels, size, size, generator=g),
        torch.arange(ways).repeat_interleave(queries),
        torch.arange(ways),
    )


# Tiny versions of the backbones RelationNet runs on, their feature map, and the relation module's fc input.
BACKBONES = {
    "conv4-28px": ("conv4", dict(image_size=28, width=8, in_channels=1), 28, (8, 1, 1), 8),
    "conv4-84px": ("conv4", dict(image_size=84, width=8), 84, (8, 5, 5), 8),
    "resnet10-small-28px": ("resnet10", dict(stem="small", width=2, in_channels=1), 28, (16, 4, 4), 16),
    "resnet10-imagenet-84px": ("resnet10", dict(stem="imagenet", width=2), 84, (16, 3, 3), 16),
}


def build(key: str, acdc: str | None = None, **options) -> RelationNet:
    name, kw, size, _, _ = BACKBONES[key]
    backbone = create_backbone(name, acdc=acdc, **kw)
    return create_learner("relationnet", backbone, 5, image_size=size, **options)


def episode_for(key: str, ways: int = 5, shots: int = 1, queries: int = 2, seed: int = 0) -> Episode:
    _, kw, size, _, _ = BACKBONES[key]
    return image_episode(ways, shots, queries, size, kw.get("in_channels", 3), seed)


# ----------------------------------------------------------------------------- layout of the relation module
@pytest.mark.parametrize(
    "size, paddings, pools, out_sizes",
    [
        (1, (1, 1), (False, False), (1, 1)),  # conv4 at 28 px: nothing to pool
        (3, (1, 1), (True, False), (1, 1)),  # ResNet ImageNet stem at 84 px
        (4, (1, 1), (True, True), (2, 1)),  # ResNet small stem at 28 px
        (5, (1, 1), (True, True), (2, 1)),  # conv4 at 84 px
        (7, (1, 1), (True, True), (3, 1)),  # ResNet at 224 px (Chen et al.)
        (9, (1, 1), (True, True), (4, 2)),
        (10, (0, 0), (True, True), (4, 1)),  # from 10 on: no padding (Chen et al.'s rule)
        (11, (0, 0), (True, True), (4, 1)),  # ResNet small stem at 84 px
        (19, (0, 0), (True, True), (8, 3)),  # Chen et al.'s un-pooled Conv4 at 84 px
    ],
)
def test_plan_relation_blocks(size, paddings, pools, out_sizes):
    plan = plan_relation_blocks(size, size)
    assert tuple(b.padding for b in plan) == paddings
    assert tuple(b.pool for b in plan) == pools
    assert tuple(b.out_size for b in plan) == tuple((s, s) for s in out_sizes)


def test_plan_handles_non_square_maps_and_rejects_empty_ones():
    assert [b.out_size for b in plan_relation_blocks(1, 6)] == [(1, 6), (1, 6)]  # no pool below 2 rows
    assert [b.out_size for b in plan_relation_blocks(12, 30)] == [(5, 14), (1, 6)]  # padding 0 from 10 on
    with pytest.raises(ValueError, match=r"the feature map width must be an int >= 1, got 0"):
        plan_relation_blocks(4, 0)


@pytest.mark.parametrize("size", [1, 3, 4, 5, 7, 10, 11, 19, 24])
def test_relation_module_runs_and_matches_its_plan(size):
    module = RelationModule((6, size, size), hidden=8)
    out_h, out_w = module.plan[-1].out_size
    assert module.fc1.in_features == 6 * out_h * out_w
    assert module.blocks(torch.randn(4, 12, size, size)).shape == (4, 6, out_h, out_w)
    assert module(torch.randn(4, 12, size, size)).shape == (4,)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(12, 6), (6, 6)]  # 2C -> C -> C


def test_relation_module_rejects_pairs_of_another_shape():
    module = RelationModule((4, 5, 5))
    with pytest.raises(ValueError, match=r"map pairs of shape \(pairs, 8, 5, 5\); got \(3, 4, 5, 5\)"):
        module(torch.randn(3, 4, 5, 5))


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("key", list(BACKBONES))
def test_output_shapes_on_backbone_feature_maps(key, shots):
    torch.manual_seed(0)
    _, _, _, map_shape, fc_in = BACKBONES[key]
    learner = build(key)
    assert learner.map_shape == map_shape
    assert learner.relation.fc1.in_features == fc_in and learner.relation.fc2.out_features == 1
    ep = episode_for(key, shots=shots, queries=3)
    support, query = learner.embed_maps(ep)
    assert support.shape == (5 * shots, *map_shape) and query.shape == (15, *map_shape)
    pairs = pair_maps(class_maps(support, ep.support_labels, 5), query)
    assert pairs.shape == (15 * 5, 2 * map_shape[0], *map_shape[1:])
    out_h, out_w = learner.relation.plan[-1].out_size
    assert learner.relation.blocks(pairs).shape == (75, map_shape[0], out_h, out_w)
    loss, scores = learner.loss(ep)
    assert scores.shape == (15, 5) and loss.dim() == 0
    assert learner.predict(ep).shape == (15, 5)


# ----------------------------------------------------------------------------- class maps and pairs
def test_class_maps_sum_the_support_maps_of_each_class():
    # 2 classes x 2 shots of 1x1x2 maps, interleaved labels
    maps = torch.tensor([[1.0, 2.0], [10.0, 20.0], [3.0, 4.0], [30.0, 40.0]]).view(4, 1, 1, 2)
    labels = torch.tensor([0, 1, 0, 1])
    summed = class_maps(maps, labels, 2)
    assert summed.shape == (2, 1, 1, 2)
    torch.testing.assert_close(summed.flatten(1), torch.tensor([[4.0, 6.0], [40.0, 60.0]]))
    torch.testing.assert_close(class_maps(maps, labels, 2, "mean").flatten(1), torch.tensor([[2.0, 3.0], [20.0, 30.0]]))
    one_shot = class_maps(maps[:2], labels[:2], 2)  # 1-shot: the class map is the support map
    torch.testing.assert_close(one_shot, maps[:2])
    with pytest.raises(ValueError, match="class maps reduce must be one of sum, mean; got 'max'"):
        class_maps(maps, labels, 2, "max")


def test_pair_maps_concatenate_class_then_query_query_major():
    classes = torch.arange(3.0).view(3, 1, 1, 1)  # class k: value k
    queries = 10.0 + torch.arange(2.0).view(2, 1, 1, 1)  # query q: value 10 + q
    pairs = pair_maps(classes, queries)
    assert pairs.shape == (6, 2, 1, 1)
    expected = [[k, 10 + q] for q in range(2) for k in range(3)]
    assert pairs.flatten(1).tolist() == expected


# ----------------------------------------------------------------------------- scores and losses
def manual_scores(learner: RelationNet, ep: Episode, reduce: str) -> torch.Tensor:
    """Sigmoid relation scores computed pair by pair, with class maps summed / averaged in a loop."""
    with torch.no_grad():
        maps = learner.backbone.forward_map(torch.cat([ep.support_images, ep.query_images]))
        support, query = maps[: ep.support_images.shape[0]], maps[ep.support_images.shape[0] :]
        ways = ep.ways
        classes = []
        for k in range(ways):
            members = [support[i] for i in range(support.shape[0]) if ep.support_labels[i] == k]
            total = members[0].clone()
            for m in members[1:]:
                total = total + m
            classes.append(total / len(members) if reduce == "mean" else total)
        rows = [[learner.relation(torch.cat([classes[k], q]).unsqueeze(0)).item() for k in range(ways)] for q in query]
    return torch.sigmoid(torch.tensor(rows))


@pytest.mark.parametrize("shots", [1, 5])
def test_scores_match_a_hand_computation_with_averaged_class_maps(shots):
    torch.manual_seed(0)
    learner = build("conv4-84px")
    learner.train()
    learner.loss(episode_for("conv4-84px", shots=shots, seed=5))  # move BatchNorm's running statistics
    ep = episode_for("conv4-84px", ways=3, shots=shots, queries=2, seed=1)
    learner.eval()
    scores = learner.predict(ep)
    torch.testing.assert_close(scores, manual_scores(learner, ep, "mean"), atol=1e-5, rtol=1e-4)
    summed = create_learner("relationnet", learner.backbone, 5, image_size=84, class_map="sum")
    summed.load_state_dict(learner.state_dict())
    summed.eval()
    torch.testing.assert_close(summed.predict(ep), manual_scores(learner, ep, "sum"), atol=1e-5, rtol=1e-4)
    if shots == 1:  # one support map per class: summing and averaging agree
        torch.testing.assert_close(summed.predict(ep), scores)
    else:  # the class map's scale reaches the scores: the mean (Chen et al.) is what is used
        assert (summed.predict(ep) - scores).abs().max() > 1e-3


def test_mse_is_the_default_loss_against_one_hot_targets():
    torch.manual_seed(0)
    learner = build("resnet10-small-28px")
    assert learner.loss_type == "mse"
    ep = episode_for("resnet10-small-28px", shots=2, queries=3)
    loss, scores = learner.loss(ep)
    assert bool(((scores > 0) & (scores < 1)).all())
    target = torch.zeros(15, 5)
    target[torch.arange(15), ep.query_labels] = 1.0
    torch.testing.assert_close(loss, ((scores - target) ** 2).sum() / 75)


def test_softmax_loss_is_cross_entropy_of_the_raw_scores():
    torch.manual_seed(0)
    learner = build("resnet10-small-28px", loss="softmax")
    ep = episode_for("resnet10-small-28px", shots=2, queries=3)
    loss, scores = learner.loss(ep)
    manual = -(scores.log_softmax(1)[torch.arange(15), ep.query_labels]).mean()
    torch.testing.assert_close(loss, manual)
    mse = build("resnet10-small-28px")
    mse.load_state_dict(learner.state_dict())
    torch.testing.assert_close(torch.sigmoid(scores), mse.loss(ep)[1])  # same module, raw vs squashed


def test_cli_builds_relationnet_with_mse_and_the_runs_image_size():
    flags = [
        "--method",
        "relationnet",
        "--dataset",
        "glyphs",
        "--backbone",
        "resnet10",
        "--stem",
        "small",
        "--width",
        "2",
        "--device",
        "cpu",
    ]
    learner, _ = build_learner(resolve(build_parser().parse_args(flags)), in_channels=1)
    assert learner.loss_type == "mse" and learner.class_map == "mean"
    assert learner.map_shape == (16, 4, 4)  # 28 px glyphs through the small stem
    args = resolve(build_parser().parse_args([*flags, "--image-size", "40", "--relation-loss", "softmax"]))
    learner, _ = build_learner(args, in_channels=1)
    assert learner.loss_type == "softmax" and learner.map_shape == (16, 5, 5)


# ----------------------------------------------------------------------------- learning
@pytest.mark.parametrize("loss_type", ["mse", "softmax"])
def test_loss_decreases_on_a_fixed_episode(loss_type):
    torch.manual_seed(0)
    learner = build("resnet10-small-28px", loss=loss_type)
    ep = episode_for("resnet10-small-28px", shots=1, queries=3, seed=2)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss, _ = learner.loss(ep)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # measured: mse 0.169 -> 0.074, softmax 1.59 -> 0.53
    assert losses[-1] < 0.6 * losses[0]


def test_acdc_backbone_trains_and_the_relation_module_stays_dense():
    torch.manual_seed(0)
    learner = build("conv4-28px", acdc="net")
    assert any(isinstance(m, ACDCConv2d) for m in learner.backbone.modules())
    assert not any(isinstance(m, ACDCConv2d) for m in learner.relation.modules())
    loss, scores = learner.loss(episode_for("conv4-28px"))
    loss.backward()
    assert scores.shape == (10, 5)
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- errors
def test_backbone_without_feature_maps_is_rejected():
    with pytest.raises(
        ValueError,
        match=r"scores feature maps: the backbone needs forward_map\(x\) and "
        r"feature_map_shape\(image_size\); Flatten has not both",
    ):
        RelationNet(nn.Flatten(), 5, image_size=28)

    class Vectors(Backbone):
        out_features = 4

    with pytest.raises(ValueError, match=r"scores feature maps: Vectors does not expose its last feature map"):
        RelationNet(Vectors(), 5, image_size=28)


def test_image_size_is_needed_where_the_backbone_does_not_fix_it():
    with pytest.raises(
        ValueError, match="relationnet option image_size is needed to size the relation module for ResNet"
    ):
        RelationNet(create_backbone("resnet10", width=2), 5)
    conv4 = create_backbone("conv4", image_size=28, width=4)
    assert RelationNet(conv4, 5).map_shape == (4, 1, 1)  # conv4 knows its image size
    with pytest.raises(ValueError, match=r"conv4 was built for 28x28 images, not image_size=84"):
        RelationNet(conv4, 5, image_size=84)


def test_images_of_another_size_than_built_for_are_rejected():
    learner = RelationNet(create_backbone("resnet10", stem="small", width=2), 5, image_size=28)
    with pytest.raises(
        ValueError,
        match=r"built for feature maps of shape \(N, 16, 4, 4\); for 10 images of "
        r"\(3, 84, 84\) the backbone returned \(10, 16, 11, 11\)",
    ):
        learner.loss(image_episode(5, 1, 1, 84))
