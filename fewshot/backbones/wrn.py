"""Wide ResNets (Zagoruyko & Komodakis): pre-activation basic blocks in three groups of widths 16k, 32k, 64k."""

from __future__ import annotations

from collections.abc import Hashable

from torch import Tensor, nn

from fewshot.backbones.base import Backbone, check_int, halved, init_weights
from fewshot.backbones.registry import register_backbone


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3 (strided)-BN-ReLU-dropout-conv3x3; 1x1 conv shortcut on the pre-activated input
    where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        reshape = stride != 1 or c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if reshape else None

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + identity


class WideResNet(Backbone):
    """WRN-depth-k: a 3x3 stem of 16 channels, groups ``block1``..``block3`` of (depth-4)/6 wide blocks,
    final BN-ReLU and global average pooling; ``out_features = 64 * widen_factor``.

    Under the ``block`` scopes of ACDC each group is one sharing block (three), and the stem joins the
    first group.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 0,
        *,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        check_int(depth, "wrn: depth", 10)
        if (depth - 4) % 6:
            raise ValueError(f"wrn: depth must be 6n+4 (10, 16, 22, 28, 34, 40, ...), got {depth}")
        check_int(widen_factor, "wrn: widen_factor")
        check_int(in_channels, "in_channels")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"wrn: dropout must be in [0, 1), got {dropout!r}")
        self.depth, self.widen_factor = depth, widen_factor
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        c_in = 16
        for i, width in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
            strides = [2 if i > 0 else 1] + [1] * (n - 1)
            blocks = [WideBlock(c_in if j == 0 else width, width, stride, dropout) for j, stride in enumerate(strides)]
            self.add_module(f"block{i + 1}", nn.Sequential(*blocks))
            c_in = width
        self.bn = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = c_in
        init_weights(self)
        self._add_head(num_classes)

    def forward_map(self, x: Tensor) -> Tensor:
        """The final BN-ReLU output of the last group, before global average pooling."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn(x))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.avgpool(self.forward_map(x)).flatten(1)

    def feature_map_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(out_features, s, s)``: the image size halved (rounding up) by the stride-2 groups 2 and 3."""
        check_int(image_size, "wrn: image_size")
        side = halved(image_size, 2, ceil=True)
        return self.out_features, side, side

    def acdc_block_of(self, name: str, conv: nn.Conv2d) -> Hashable:
        return "block1" if name == "conv1" else name.split(".")[0]


@register_backbone("wrn")
def wrn(
    num_classes: int = 0, *, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0, in_channels: int = 3
) -> WideResNet:
    """WRN of any depth (6n+4) and widen factor."""
    return WideResNet(depth, widen_factor, num_classes, dropout=dropout, in_channels=in_channels)


@register_backbone("wrn40_4")
def wrn40_4(num_classes: int = 0, *, dropout: float = 0.0, in_channels: int = 3) -> WideResNet:
    """WRN-40-4: 8.95M parameters with a 10-class head (the ACDC paper prints 8.90M); 256 features."""
    return WideResNet(40, 4, num_classes, dropout=dropout, in_channels=in_channels)


@register_backbone("wrn40_1")
def wrn40_1(num_classes: int = 0, *, dropout: float = 0.0, in_channels: int = 3) -> WideResNet:
    """WRN-40-1: 0.56M parameters with a 10-class head; 64 features."""
    return WideResNet(40, 1, num_classes, dropout=dropout, in_channels=in_channels)


@register_backbone("wrn28_10")
def wrn28_10(num_classes: int = 0, *, dropout: float = 0.0, in_channels: int = 3) -> WideResNet:
    """WRN-28-10: 36.5M parameters with a 10-class head; 640 features."""
    return WideResNet(28, 10, num_classes, dropout=dropout, in_channels=in_channels)
