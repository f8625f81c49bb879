"""Conv4 of Chen et al. (2019): four [conv3x3 (with bias), BatchNorm, ReLU, max-pool 2] blocks, flattened;
and its variant for RelationNet (``conv4_nopool``: max-pool in the first two blocks only)."""

from __future__ import annotations

from torch import Tensor, nn

from fewshot.backbones.base import Backbone, check_int, init_weights
from fewshot.backbones.registry import register_backbone


def conv_block(in_channels: int, out_channels: int, *, padding: int, pool: bool) -> nn.Sequential:
    """conv3x3 (with bias), BatchNorm, ReLU, then a 2x2 max-pool if ``pool``."""
    layers = [
        nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=True),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class Conv4(Backbone):
    """Four conv blocks of ``width`` channels whose output is flattened, as in Chen et al.

    The flattened size depends on the image size, so the network is built for one ``image_size``:
    ``out_features = width * (image_size // 16) ** 2`` (1600 at 84 px, 64 at 28 px). Feeding another size
    raises a ValueError rather than silently changing the feature size. ``forward_map`` gives the map
    before flattening: ``(width, image_size // 16, image_size // 16)`` (5x5 at 84 px, 1x1 at 28 px).
    """

    name = "conv4"
    # (padding, max-pool) of the four blocks
    blocks: tuple[tuple[int, bool], ...] = ((1, True),) * 4
    min_image_size = 16
    size_rule = "four 2x2 max-pools"

    def __init__(self, num_classes: int = 0, *, image_size: int = 84, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        check_int(image_size, f"{self.name}: image_size ({self.size_rule})", self.min_image_size)
        check_int(width, f"{self.name}: width")
        check_int(in_channels, f"{self.name}: in_channels")
        self.image_size = image_size
        self.width = width
        channels = [in_channels, width, width, width, width]
        for i, (padding, pool) in enumerate(self.blocks):
            self.add_module(f"layer{i + 1}", conv_block(channels[i], channels[i + 1], padding=padding, pool=pool))
        self.out_features = width * self.map_side() ** 2
        init_weights(self)
        self._add_head(num_classes)

    def map_side(self) -> int:
        """Side of the last feature map for ``self.image_size`` images: each 3x3 conv changes the side by
        ``2 * padding - 2``, each 2x2 max-pool halves it (floor)."""
        side = self.image_size
        for padding, pool in self.blocks:
            side += 2 * padding - 2
            side = side // 2 if pool else side
        return side

    def forward_map(self, x: Tensor) -> Tensor:
        """The output of the fourth block, ``(batch, width, side, side)`` (``feature_map_shape``)."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.name} was built for {self.image_size}x{self.image_size} images ({self.out_features} "
                f"features) but got {x.shape[-2]}x{x.shape[-1]}; create it with image_size={x.shape[-1]}"
            )
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_map(x).flatten(1)

    def feature_map_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(width, side, side)``; only for the image size the network was built for."""
        if image_size != self.image_size:
            raise ValueError(
                f"{self.name} was built for {self.image_size}x{self.image_size} images, not image_size={image_size!r}"
            )
        side = self.map_side()
        return self.width, side, side


class Conv4NoPool(Conv4):
    """Chen et al.'s Conv4 for RelationNet (their ``ConvNetNopool``): the first two blocks have unpadded
    convs and max-pool, the last two keep the map size. The map is ``(width, s, s)`` with
    ``s = ((image_size - 2) // 2 - 2) // 2``: 19x19 at 84 px, 5x5 at 28 px (Conv4: 5x5 and 1x1), so the
    relation module compares spatial positions rather than one pooled vector.
    """

    name = "conv4_nopool"
    blocks = ((0, True), (0, True), (1, False), (1, False))
    min_image_size = 10
    size_rule = "two unpadded convs and 2x2 max-pools"


@register_backbone("conv4", fewshot=True)
def conv4(num_classes: int = 0, *, image_size: int = 84, width: int = 64, in_channels: int = 3) -> Conv4:
    """Conv4 (Chen et al.): 113,088 parameters at width 64; 1600 features at 84 px, 64 at 28 px."""
    return Conv4(num_classes, image_size=image_size, width=width, in_channels=in_channels)


@register_backbone("conv4_nopool", fewshot=True)
def conv4_nopool(num_classes: int = 0, *, image_size: int = 84, width: int = 64, in_channels: int = 3) -> Conv4NoPool:
    """Conv4 pooling in its first two blocks only (Chen et al.'s RelationNet backbone): the same 113,088
    parameters at width 64; a 64x19x19 map at 84 px, 64x5x5 at 28 px."""
    return Conv4NoPool(num_classes, image_size=image_size, width=width, in_channels=in_channels)
