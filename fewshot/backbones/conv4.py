"""Conv4 of Chen et al. (2019): four [conv3x3 (with bias), BatchNorm, ReLU, max-pool 2] blocks, flattened."""

from __future__ import annotations

from torch import Tensor, nn

from fewshot.backbones.base import Backbone, check_int, halved, init_weights
from fewshot.backbones.registry import register_backbone


class Conv4(Backbone):
    """Four conv blocks of ``width`` channels whose output is flattened, as in Chen et al.

    The flattened size depends on the image size, so the network is built for one ``image_size``:
    ``out_features = width * (image_size // 16) ** 2`` (1600 at 84 px, 64 at 28 px). Feeding another size
    raises a ValueError rather than silently changing the feature size. ``forward_map`` gives the map
    before flattening: ``(width, image_size // 16, image_size // 16)`` (5x5 at 84 px, 1x1 at 28 px).
    """

    def __init__(self, num_classes: int = 0, *, image_size: int = 84, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        check_int(image_size, "conv4: image_size (four 2x2 max-pools)", 16)
        check_int(width, "conv4: width")
        check_int(in_channels, "conv4: in_channels")
        self.image_size = image_size
        self.width = width
        channels = [in_channels, width, width, width, width]
        for i in range(4):
            self.add_module(
                f"layer{i + 1}",
                nn.Sequential(
                    nn.Conv2d(channels[i], channels[i + 1], 3, padding=1, bias=True),
                    nn.BatchNorm2d(channels[i + 1]),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                ),
            )
        self.out_features = width * (image_size // 16) ** 2
        init_weights(self)
        self._add_head(num_classes)

    def forward_map(self, x: Tensor) -> Tensor:
        """The output of the fourth block, ``(batch, width, image_size // 16, image_size // 16)``."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"conv4 was built for {self.image_size}x{self.image_size} images ({self.out_features} features) "
                f"but got {x.shape[-2]}x{x.shape[-1]}; create it with image_size={x.shape[-1]}"
            )
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_map(x).flatten(1)

    def feature_map_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(width, image_size // 16, image_size // 16)``; only for the image size conv4 was built for."""
        if image_size != self.image_size:
            raise ValueError(
                f"conv4 was built for {self.image_size}x{self.image_size} images, not image_size={image_size!r}"
            )
        side = halved(image_size, 4, ceil=False)
        return self.width, side, side


@register_backbone("conv4", fewshot=True)
def conv4(num_classes: int = 0, *, image_size: int = 84, width: int = 64, in_channels: int = 3) -> Conv4:
    """Conv4 (Chen et al.): 113,088 parameters at width 64; 1600 features at 84 px, 64 at 28 px."""
    return Conv4(num_classes, image_size=image_size, width=width, in_channels=in_channels)
