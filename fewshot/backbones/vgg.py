"""VGG16 with BatchNorm for CIFAR: 13 conv3x3-BN-ReLU layers in five stages, each ending in a 2x2 max-pool."""

from __future__ import annotations

from torch import Tensor, nn

from fewshot.backbones.base import Backbone, check_int, halved, init_weights
from fewshot.backbones.registry import register_backbone

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(Backbone):
    """VGG with BatchNorm: stages ``stage1``..``stage5`` of [conv3x3 (no bias), BN, ReLU] + max-pool 2.

    Global average pooling after the last stage (a no-op at 32 px, where the map is 1x1) gives
    ``out_features`` = 512 at any input size >= 32. Convs carry no bias since BatchNorm follows each.
    Under the ``block`` scopes of ACDC each stage is one sharing block (five for VGG16).
    """

    def __init__(self, stages=VGG16_STAGES, num_classes: int = 0, *, in_channels: int = 3) -> None:
        super().__init__()
        c_in = check_int(in_channels, "in_channels")
        for i, widths in enumerate(stages):
            layers: list[nn.Module] = []
            for width in widths:
                conv = nn.Conv2d(c_in, width, 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                c_in = width
            layers.append(nn.MaxPool2d(2))
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = c_in
        init_weights(self)
        self._add_head(num_classes)

    def forward_map(self, x: Tensor) -> Tensor:
        """The output of the last stage, before global average pooling."""
        for i in range(self.num_stages):
            x = getattr(self, f"stage{i + 1}")(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        return self.avgpool(self.forward_map(x)).flatten(1)

    def feature_map_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(out_features, s, s)`` with ``s = image_size // 2 ** stages`` (each stage ends in a 2x2 max-pool)."""
        minimum = 2**self.num_stages
        check_int(image_size, f"vgg: image_size ({self.num_stages} 2x2 max-pools)", minimum)
        side = halved(image_size, self.num_stages, ceil=False)
        return self.out_features, side, side


@register_backbone("vgg16_cifar")
def vgg16_cifar(num_classes: int = 0, *, in_channels: int = 3) -> VGG:
    """VGG16-BN for CIFAR: 14.72M parameters with a 10-class head; 512 features."""
    return VGG(VGG16_STAGES, num_classes, in_channels=in_channels)
