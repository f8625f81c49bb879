"""Class activation maps at every convolutional layer (the paper's Fig. 8 extends CAM to all layers).

Definition used: Grad-CAM (Selvaraju et al., 2017) at the output ``F`` (``K x h x w``) of each conv layer,
for the class ``c`` the network predicts (or a given one)::

    alpha_k = mean over positions of d logit_c / d F_k,    CAM = ReLU(sum_k alpha_k F_k)

upsampled bilinearly to the image and scaled to [0, 1] per image and layer (an all-zero map stays 0).
Why Grad-CAM: Zhou et al.'s CAM weights the *last* feature map by the classifier's weights of class ``c``,
which exists only for the map that feeds the classifier (and only when the channel counts match). Grad-CAM
weights a layer's channels by how much the class logit depends on them, which is defined at every layer of
any architecture; for a map that feeds global average pooling and a linear classifier directly it *is* Zhou
et al.'s CAM up to a positive factor (``alpha_k = w_ck / hw``; tested). "Conv layers" are the
``nn.Conv2d`` and ACDC convs with kernels larger than 1x1 (1x1 shortcuts and projections are left out), in
registration order; the maps are the convs' outputs (before BatchNorm and ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.acdc.layer import ACDCConv2d

__all__ = ["CAMs", "conv_layers", "grad_cam", "agreement_with_last"]


@dataclass
class CAMs:
    """``maps``: ``N x L x H x W`` in [0, 1] (one per image and layer), ``layers`` (names), ``classes``
    (the class each map explains), ``logits`` of the network."""

    maps: Tensor
    layers: list[str]
    classes: Tensor
    logits: Tensor


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv layers with a kernel larger than 1x1 (dense or ACDC), in registration order."""
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, ACDCConv2d)) and tuple(m.kernel_size) != (1, 1)
    ]
    if not layers:
        raise ValueError("the model has no conv layer with a kernel larger than 1x1")
    return layers


def grad_cam(
    model: nn.Module, images: Tensor, layers: list[tuple[str, nn.Module]] | None = None, target: Tensor | None = None
) -> CAMs:
    """Grad-CAM of ``model`` (eval mode, images -> logits) at ``layers`` (default :func:`conv_layers`)."""
    layers = conv_layers(model) if layers is None else layers
    outputs: list[Tensor | None] = [None] * len(layers)

    def keep(i: int):
        def hook(_module: nn.Module, _inputs: object, output: Tensor) -> None:
            if outputs[i] is not None:
                raise ValueError(f"layer {layers[i][0]!r} runs more than once per forward; Grad-CAM needs one map")
            outputs[i] = output

        return hook

    handles = [module.register_forward_hook(keep(i)) for i, (_, module) in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(images)
            classes = logits.argmax(1) if target is None else target.to(logits.device)
            chosen = logits.gather(1, classes.view(-1, 1)).sum()
            found = [o for o in outputs if o is not None]
            if len(found) != len(layers):
                raise ValueError("some of the layers did not run in the forward pass")
            grads = torch.autograd.grad(chosen, found)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    size = images.shape[-2:]
    maps = [_one_map(f.detach(), g, size) for f, g in zip(found, grads)]
    return CAMs(torch.stack(maps, 1), [name for name, _ in layers], classes.detach(), logits.detach())


def _one_map(features: Tensor, grads: Tensor, size: torch.Size) -> Tensor:
    """ReLU(sum_k alpha_k F_k), upsampled to ``size`` and scaled to [0, 1] per image: ``N x H x W``."""
    alpha = grads.mean((2, 3), keepdim=True)
    cam = F.relu((alpha * features).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return cam / peak


def agreement_with_last(maps: Tensor) -> list[float]:
    """Per layer, the Pearson correlation of its maps with the last layer's, averaged over images
    (a constant map counts as 0)."""
    flat = maps.flatten(2)  # N x L x HW
    flat = flat - flat.mean(2, keepdim=True)
    norm = flat.norm(dim=2).clamp_min(1e-12)
    corr = (flat * flat[:, -1:]).sum(2) / (norm * norm[:, -1:])
    return [float(v) for v in corr.mean(0)]
