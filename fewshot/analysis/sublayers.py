"""The two sub-layers of a plain ACDC conv (paper Sec. 3.1): atom outputs ``Z = D * X`` and ``Y = A Z``.

For a conv with ``c_in`` inputs, ``m`` atoms and ``c_out`` outputs, ``Z`` has ``c_in * m`` channels (channel
``i * m + k`` is input channel ``i`` convolved with atom ``k``) and ``Y`` is the 1x1 mix of ``Z`` by the
coefficient matrix ``A`` (``c_out x c_in*m``, :func:`coefficient_matrix`); ``Y + bias`` is the conv's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.acdc.layer import ACDCConv2d

__all__ = ["acdc_layers", "coefficient_matrix", "atom_outputs", "coefficient_outputs", "layer_inputs"]


def acdc_layers(model: nn.Module) -> list[tuple[str, ACDCConv2d]]:
    """The plain (ungrouped) ACDC convs of ``model`` in registration order; a ValueError if there are none."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ACDCConv2d)]
    grouped = [n for n, m in layers if m.grouped]
    if grouped:
        raise ValueError(f"grouped ACDC layers ({grouped[0]}, ...) are not supported; use scope 'layer'")
    if not layers:
        raise ValueError("the model has no ACDC convs; build it with acdc='layer'")
    return layers


def coefficient_matrix(layer: ACDCConv2d) -> Tensor:
    """``A`` as the ``c_out x (c_in * m)`` matrix of the coefficient sub-layer (column ``i * m + k``)."""
    a = layer.coefficient_view().detach()
    return a.reshape(a.shape[0], -1)


def atom_outputs(layer: ACDCConv2d, x: Tensor) -> Tensor:
    """``Z = D * X``: ``(N, c_in * m, H_out, W_out)`` for the layer's input ``x`` (no atom-drop)."""
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._pad_for_mode, mode=layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    n, c, h, w = x.shape
    d = layer.atoms.detach().unsqueeze(1)  # m x 1 x kh x kw
    z = F.conv2d(x.reshape(n * c, 1, h, w), d, None, layer.stride, padding, layer.dilation)
    return z.reshape(n, c * layer.num_atoms, z.shape[-2], z.shape[-1])


def coefficient_outputs(layer: ACDCConv2d, z: Tensor) -> Tensor:
    """``Y = A Z`` (bias excluded): ``(N, c_out, H, W)`` from atom outputs ``z``."""
    a = coefficient_matrix(layer)
    return torch.einsum("oc,nchw->nohw", a.to(z.dtype), z)


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: list[nn.Module], images: Tensor, batch_size: int = 256) -> list[Tensor]:
    """The input of each of ``layers`` when ``model`` (in eval mode) runs on ``images``, batch by batch."""
    seen: list[list[Tensor]] = [[] for _ in layers]
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach()))
        for i, layer in enumerate(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            model(images[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [torch.cat(parts) for parts in seen]
