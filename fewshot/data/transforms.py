"""Per-image transforms on uint8 (C, H, W) tensors (torchvision.transforms.v2), as in Chen et al. 2019."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GLYPHS_MEAN = (0.073,)  # of the glyphs train split at 28 px (white ink on black)
GLYPHS_STD = (0.199,)


class ToNormalizedFloat:
    """uint8 (…, C, H, W) → float32 ``(x / 255 - mean) / std`` in two passes over the data (ToDtype(scale=True)
    followed by Normalize takes four); float input is taken to be in [0, 1] already.

    The toolkit's one normalization: the episode transforms apply it per image on the host, the supervised
    loop's ``Normalizer`` per batch on the training device, with the same arithmetic (the same floats).
    """

    def __init__(
        self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str | None = None
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"ToNormalizedFloat: mean {self.mean} and std {self.std} need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ToNormalizedFloat: std must be positive, got {self.std}")
        std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = (1.0 / std_t).to(device)
        self._scale_uint8 = (1.0 / std_t / 255).to(device)
        self._shift = (-torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1) / std_t).to(device)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[-3] != len(self.mean):
            raise ValueError(
                f"ToNormalizedFloat: expected images (…, {len(self.mean)}, H, W) for mean {self.mean}, "
                f"got shape {tuple(x.shape)}"
            )
        scale = self._scale_uint8 if x.dtype == torch.uint8 else self._scale
        return x.to(torch.float32).mul_(scale).add_(self._shift)

    def __repr__(self) -> str:
        return f"ToNormalizedFloat(mean={self.mean}, std={self.std})"


class BatchTransform:
    """A deterministic transform that may be applied to a whole (B, C, H, W) batch at once.

    The episode sampler calls a plain transform once per image (each image gets its own random
    augmentation) but a ``BatchTransform`` once per episode, which is several times faster.
    It still works on single images.
    """

    def __init__(self, transform: Callable[[Tensor], Tensor]) -> None:
        self.transform = transform

    def __call__(self, images: Tensor) -> Tensor:
        return self.transform(images)

    def __repr__(self) -> str:
        return f"BatchTransform({self.transform!r})"


def natural_transform(image_size: int, train: bool) -> Callable[[Tensor], Tensor]:
    """Chen et al.'s transforms for natural images (miniImageNet), to ``image_size`` px, normalised.

    train: random resized crop, colour jitter 0.4 (brightness, contrast, saturation), horizontal flip;
    test: resize to 1.15 × ``image_size`` then centre crop.
    """
    from torchvision.transforms import v2  # imported on first use: torchvision takes seconds to import

    to_float = [ToNormalizedFloat(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return v2.Compose(
            [
                v2.RandomResizedCrop(image_size, antialias=True),
                v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
                v2.RandomHorizontalFlip(),
                *to_float,
            ]
        )
    big = int(image_size * 1.15)
    return BatchTransform(v2.Compose([v2.Resize([big, big], antialias=True), v2.CenterCrop(image_size), *to_float]))


def glyphs_transform(image_size: int, train: bool) -> Callable[[Tensor], Tensor]:
    """For glyphs (1 channel, white on black): a small random affine in training (filled with black,
    no flip: mirrored letters are other letters), resize to ``image_size`` if needed, normalise."""
    from torchvision.transforms import v2

    steps: list[Callable[[Tensor], Tensor]] = [v2.Resize([image_size, image_size], antialias=True)]
    if train:
        steps.append(v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), shear=5, fill=0))
    steps.append(ToNormalizedFloat(GLYPHS_MEAN, GLYPHS_STD))
    return v2.Compose(steps) if train else BatchTransform(v2.Compose(steps))


TRANSFORMS: dict[str, Callable[[int, bool], Callable[[Tensor], Tensor]]] = {
    "miniimagenet": natural_transform,
    "natural": natural_transform,
    "glyphs": glyphs_transform,
}


def build_transform(dataset_name: str, image_size: int, train: bool) -> Callable[[Tensor], Tensor]:
    """The transform for ``dataset_name`` ("miniimagenet"/"natural" or "glyphs"): uint8 (C, H, W) in,
    normalised float32 (C, image_size, image_size) out; random augmentation when ``train``."""
    key = dataset_name.lower()
    if key not in TRANSFORMS:
        raise ValueError(f"build_transform: unknown dataset {dataset_name!r}; valid names are {', '.join(TRANSFORMS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"build_transform: image_size must be a positive integer, got {image_size!r}")
    return TRANSFORMS[key](image_size, train)
