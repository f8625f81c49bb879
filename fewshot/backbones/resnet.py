"""ResNets: the few-shot ones of Chen et al. (10/18/34), CIFAR ResNet18 and the ImageNet ResNet18/34/50.

One architecture serves them all: a stem, four stages of basic or bottleneck blocks (widths 64-128-256-512,
stride 2 at the first block of stages 2-4, 1x1 conv + BatchNorm shortcut where the shape changes), global
average pooling. Two stems:

- ``"imagenet"``: 7x7 stride-2 conv + 3x3 stride-2 max-pool (Chen et al., torchvision);
- ``"small"``: 3x3 stride-1 conv, no max-pool (CIFAR; 84 px few-shot inputs).

Adaptive average pooling makes every ResNet accept any input size. ``forward_map`` gives the last stage's
map before that pooling: ``(out_features, s, s)`` where ``s`` is the image size halved (rounding up) five
times with the ImageNet stem (7 at 224 px, 3 at 84 px) and three times with the small stem (4 at 28 px).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from torch import Tensor, nn

from fewshot.backbones.base import Backbone, check_int, halved, init_weights
from fewshot.backbones.registry import register_backbone

STEMS = ("imagenet", "small")


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a residual connection."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with BatchNorm and a residual connection (ResNet v1.5)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Backbone):
    """A four-stage ResNet; ``out_features`` is 512 (basic blocks) or 2048 (bottlenecks).

    Module names follow torchvision (``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 0,
        *,
        stem: str = "imagenet",
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; valid: {', '.join(STEMS)}")
        check_int(in_channels, "in_channels")
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c_in = widths[0]
        for i, (width, count) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(count):
                blocks.append(block(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = c_in
        init_weights(self)
        self._add_head(num_classes)

    def forward_map(self, x: Tensor) -> Tensor:
        """The output of ``layer4``, before global average pooling: ``(batch, out_features, s, s)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.avgpool(self.forward_map(x)).flatten(1)

    def feature_map_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(out_features, s, s)``: three stride-2 stages after a stem that halves twice (ImageNet) or never."""
        check_int(image_size, "resnet: image_size")
        side = halved(image_size, 5 if self.stem == "imagenet" else 3, ceil=True)
        return self.out_features, side, side

    def acdc_block_of(self, name: str, conv: nn.Conv2d) -> Hashable:
        """One sharing block per stage; the stem conv joins the first stage (same width)."""
        return "layer1" if name == "conv1" else name.split(".")[0]


def _stage_widths(width: int) -> tuple[int, int, int, int]:
    check_int(width, "width")
    return (width, 2 * width, 4 * width, 8 * width)


@register_backbone("resnet10", fewshot=True)
def resnet10(num_classes: int = 0, *, stem: str = "imagenet", in_channels: int = 3, width: int = 64) -> ResNet:
    """Few-shot ResNet10 (Chen et al.): basic blocks [1,1,1,1]; 4,905,792 parameters; 512 features.
    ``width`` scales the stages to width-2·width-4·width-8·width (64 = Chen et al.)."""
    return ResNet(
        BasicBlock, (1, 1, 1, 1), num_classes, stem=stem, in_channels=in_channels, widths=_stage_widths(width)
    )


@register_backbone("resnet18", fewshot=True)
def resnet18(num_classes: int = 0, *, stem: str = "imagenet", in_channels: int = 3, width: int = 64) -> ResNet:
    """Few-shot ResNet18 (Chen et al.): basic blocks [2,2,2,2]; 11,176,512 parameters; 512 features.
    ``width`` scales the stages to width-2·width-4·width-8·width (64 = Chen et al.)."""
    return ResNet(
        BasicBlock, (2, 2, 2, 2), num_classes, stem=stem, in_channels=in_channels, widths=_stage_widths(width)
    )


@register_backbone("resnet34", fewshot=True)
def resnet34(num_classes: int = 0, *, stem: str = "imagenet", in_channels: int = 3, width: int = 64) -> ResNet:
    """Few-shot ResNet34 (Chen et al.): basic blocks [3,4,6,3]; 21,284,672 parameters; 512 features.
    ``width`` scales the stages to width-2·width-4·width-8·width (64 = Chen et al.)."""
    return ResNet(
        BasicBlock, (3, 4, 6, 3), num_classes, stem=stem, in_channels=in_channels, widths=_stage_widths(width)
    )


@register_backbone("resnet18_cifar")
def resnet18_cifar(num_classes: int = 0, *, stem: str = "small", in_channels: int = 3) -> ResNet:
    """CIFAR ResNet18: 3x3 stride-1 stem without max-pool; 11.17M parameters with a 10-class head."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, stem=stem, in_channels=in_channels)


@register_backbone("resnet18_imagenet")
def resnet18_imagenet(num_classes: int = 0, *, stem: str = "imagenet", in_channels: int = 3) -> ResNet:
    """ImageNet ResNet18 (torchvision layout): 11.18M parameters without the classifier."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, stem=stem, in_channels=in_channels)


@register_backbone("resnet34_imagenet")
def resnet34_imagenet(num_classes: int = 0, *, stem: str = "imagenet", in_channels: int = 3) -> ResNet:
    """ImageNet ResNet34 (torchvision layout): 21.28M parameters without the classifier."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, stem=stem, in_channels=in_channels)


@register_backbone("resnet50_imagenet")
def resnet50_imagenet(num_classes: int = 0, *, stem: str = "imagenet", in_channels: int = 3) -> ResNet:
    """ImageNet ResNet50 (bottlenecks, stride on the 3x3 as in torchvision): 2048 features."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, stem=stem, in_channels=in_channels)
