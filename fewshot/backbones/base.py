"""What every backbone shares: ``out_features``, its last feature map, an optional linear head, and its ACDC
block structure."""

from __future__ import annotations

from collections.abc import Hashable

from torch import Tensor, nn


class Backbone(nn.Module):
    """A feature extractor with an optional linear classifier.

    Subclasses build their layers, call ``_add_head(num_classes)`` last, and implement
    ``forward_features`` (images -> ``(batch, out_features)``) and ``acdc_block_of`` (which sharing block
    a conv belongs to under the ``block`` scopes of ACDC).

    Backbones whose features are a pooled or flattened feature map also implement ``forward_map`` (images
    -> the last map ``(batch, C, H, W)``, before pooling / flattening; ``forward_features`` is computed
    from it) and ``feature_map_shape(image_size)`` (that map's ``(C, H, W)`` for square images), which
    learners comparing spatial positions (RelationNet) use.

    ``forward`` returns features when ``num_classes == 0`` (``fc`` is an ``nn.Identity``) and logits of
    ``fc = nn.Linear(out_features, num_classes)`` otherwise.
    """

    out_features: int
    num_classes: int

    def _add_head(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Linear(self.out_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_map(self, x: Tensor) -> Tensor:
        """The last feature map ``(batch, C, H, W)``: the features before pooling / flattening."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its last feature map (forward_map)")

    def feature_map_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of ``forward_map`` for ``image_size`` x ``image_size`` images."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its last feature map (feature_map_shape)")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))

    def acdc_block_of(self, name: str, conv: nn.Conv2d) -> Hashable:
        """Sharing block of the conv called ``name`` (as in ``named_modules``): its top-level stage."""
        return name.split(".")[0]


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan-out) convs, unit BatchNorm, zero biases: the torchvision / Chen et al. init.

    Modules on the ``meta`` device hold no values, so they are left alone (building on ``meta`` to count
    parameters or trace shapes then costs nothing).
    """
    for m in module.modules():
        if any(p.is_meta for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def halved(size: int, times: int, *, ceil: bool) -> int:
    """``size`` after ``times`` halvings: ceil for stride-2 convs / pools with padding 1 (3x3 / 7x7 kernels),
    floor for 2x2 max-pools without padding."""
    for _ in range(times):
        size = (size + 1) // 2 if ceil else size // 2
    return size


def check_int(value: object, what: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``; otherwise raise a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value
