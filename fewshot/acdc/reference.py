"""Reference computations for an :class:`ACDCConv2d`: the dense equivalent kernel and the two-sub-layer form.

These are for checking and inspection (tests, interpretation), not for running the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.acdc.layer import ACDCConv2d, channel_shuffle

__all__ = ["reconstruct_kernel", "two_sublayer_forward"]


def _input_channels_of_group(conv: ACDCConv2d, j: int) -> range:
    """Input channels read by output group ``j`` (all of them for the plain variant)."""
    s = conv.group_size
    if s is None or conv.in_channels < s:
        return range(conv.in_channels)
    r = conv.out_channels // conv.in_channels  # output groups per input group
    i = j // r
    return range(i * s, (i + 1) * s)


def _group_atoms(conv: ACDCConv2d, j: int, atom_mask: Tensor | None) -> Tensor:
    d = conv.atoms if conv.group_size is None else conv.atoms[j]
    if atom_mask is not None:
        m = atom_mask if conv.group_size is None else atom_mask[j]
        d = d * m[:, None, None]
    return d


def reconstruct_kernel(conv: ACDCConv2d, atom_mask: Tensor | None = None) -> Tensor:
    """Dense ``(c_out, c_in, kh, kw)`` kernel with ``F.conv2d(x, K, conv.bias, ...)`` equal to ``conv(x)``.

    Built group by group with an explicit loop (independent of the layer's einsum); for grouped layers the
    kernel is block-sparse and already includes the channel shuffle. No atom-drop unless ``atom_mask``.
    """
    kh, kw = conv.kernel_size
    a = conv.coefficient_view()
    s, g = conv.group_width, conv.num_groups
    pre = torch.zeros(conv.out_channels, conv.in_channels, kh, kw, dtype=a.dtype, device=a.device)
    for j in range(g):
        cols = _input_channels_of_group(conv, j)
        d = _group_atoms(conv, j, atom_mask)  # (m, kh, kw)
        block = (a[:, : len(cols), :, None, None] * d[None, None]).sum(dim=2)  # (s, |cols|, kh, kw)
        pre[j * s : (j + 1) * s, cols.start : cols.stop] = block
    # shuffle: pre-shuffle output channel j*s+t becomes channel t*g+j
    return pre.view(g, s, conv.in_channels, kh, kw).transpose(0, 1).reshape(conv.out_channels, conv.in_channels, kh, kw)


def two_sublayer_forward(conv: ACDCConv2d, x: Tensor, atom_mask: Tensor | None = None) -> Tensor:
    """``conv(x)`` computed as in the paper's Sec. 3.1, group by group.

    Atom sub-layer: every input channel convolved with each of the ``m`` atoms (a depthwise conv,
    ``Z`` has ``c_in * m`` channels); coefficient sub-layer: a 1x1 conv with ``A`` reshaped to
    ``(s, c_in * m)``. Then channel shuffle and bias. No atom-drop unless ``atom_mask``.
    """
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._pad_for_mode, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    a = conv.coefficient_view()
    outs = []
    for j in range(conv.num_groups):
        cols = _input_channels_of_group(conv, j)
        xj = x[:, cols.start : cols.stop]
        d = _group_atoms(conv, j, atom_mask)
        m = d.shape[0]
        atom_weight = d.repeat(len(cols), 1, 1).unsqueeze(1)  # channel c*m+k holds atom k of input c
        z = F.conv2d(xj, atom_weight, None, conv.stride, padding, conv.dilation, groups=len(cols))
        coef = a[:, : len(cols)].reshape(a.shape[0], len(cols) * m, 1, 1)
        outs.append(F.conv2d(z, coef))
    y = channel_shuffle(torch.cat(outs, dim=1), conv.num_groups)
    if conv.bias is not None:
        y = y + conv.bias.view(1, -1, 1, 1)
    return y
