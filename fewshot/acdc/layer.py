"""The ACDC convolution: kernels rebuilt from per-layer filter atoms and (shared) atom coefficients.

A decomposed conv with ``c_out`` outputs, ``c_in`` inputs and a ``kh x kw`` kernel holds its own atoms
``D`` (``m x kh x kw``) and reads the coefficients ``A[:c_out, :c_in, :m]`` (atoms last) of a
:class:`SharedCoefficients` module, which several convs may hold as the *same* submodule object. Its
kernel is ``K[o, i] = sum_k A[o, i, k] * D[k]``; the forward pass rebuilds ``K`` and runs ``F.conv2d``,
so compute equals the dense conv. Where the batch is small next to the kernel (deep layers of a MAML
support set), a plain layer instead convolves each input channel with the ``m`` atoms and mixes the result
with ``A`` as a 1×1 conv (the paper's two-sub-layer form): the same function, without building ``K``
(:meth:`ACDCConv2d.prefers_two_stage`).

Grouped variant (``group_size=s``): the ``c_out`` outputs form ``g = c_out / s`` groups, each with its
own atoms (``D`` is ``g x m x kh x kw``) and all reading the same ``A[:s, :s]`` (a layer with
``c_out < s`` is one group of ``c_out`` channels reading ``A[:c_out, ...]``). It runs as one grouped
conv with ``c_in / s`` conv groups, so input group ``i`` feeds the ``c_out / c_in`` consecutive output
groups ``i*r .. i*r + r - 1``; when ``c_in < s`` there is one conv group and every output group reads all
inputs through ``A[:s, :c_in]``. A ShuffleNet channel shuffle over the ``g`` output groups follows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from fewshot.acdc.rules import check_atom_drop, check_positive_int

__all__ = ["SharedCoefficients", "ACDCConv2d", "channel_shuffle", "grouped_layout_error", "PADDING_MODES"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
EVALUATIONS = ("auto", "kernel", "two-stage")
_PaddingArg = str | int | tuple[int, int]


def grouped_layout_error(in_channels: int, out_channels: int, group_size: int) -> str | None:
    """Why a conv with these channels cannot use filter groups of ``group_size`` channels (None: it can).

    Valid layouts: ``c_out`` a multiple of ``s`` (or ``c_out < s``: one group of ``c_out`` channels), and
    ``c_in < s`` (every group reads all inputs) or ``c_in`` a multiple of ``s`` dividing ``c_out``.
    """
    s = group_size
    if out_channels >= s and out_channels % s != 0:
        return (
            f"out_channels={out_channels} is not divisible by group_size={s}; "
            f"use a group_size that divides every decomposed layer's channels"
        )
    if in_channels >= s and in_channels % s != 0:
        return (
            f"in_channels={in_channels} is not divisible by group_size={s}; "
            f"use a group_size that divides every decomposed layer's channels"
        )
    if in_channels >= s and out_channels % in_channels != 0:
        return (
            f"out_channels={out_channels} is not a multiple of in_channels={in_channels}; grouped ACDC "
            f"supports layers that keep or multiply their width (each input group feeds "
            f"out/in consecutive output groups)"
        )
    return None


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle: channel ``t`` of group ``j`` moves to position ``t * groups + j``."""
    return x if groups == 1 else F.channel_shuffle(x, groups)


class SharedCoefficients(nn.Module):
    """Holder of an atom-coefficient tensor ``coefficients`` of shape ``(rows, cols, atoms)``.

    Sharing is plain PyTorch weight tying: every :class:`ACDCConv2d` of a scope has its *own* holder
    (``conv.shared``, made by :meth:`tie`) and all these holders register the *same* ``nn.Parameter``.
    So ``named_parameters()``/``parameters()`` list it once (under the first conv's name),
    ``state_dict`` save/load, ``deepcopy``, ``.to()``, ``torch.func.functional_call`` (default
    ``tie_weights=True``) and ``higher`` keep it one tensor. (One holder *object* registered under several
    convs would not do: ``functional_call`` swaps and restores the same slot once per path and leaves the
    replacement tensor in the model.) Like any tied weight, the tie is lost by operations that give each
    module a new Parameter object (``load_state_dict(..., assign=True)``, ``to_empty``).

    Init: Kaiming normal (ReLU gain) with torch's fan convention for an ``(out, in, *receptive)``
    tensor, i.e. ``fan_in = cols * atoms`` and ``std = sqrt(2 / (cols * atoms))``. With ``m <= kh*kw``
    orthonormal atoms this gives a layer of full width ``cols`` exactly the dense Kaiming kernel
    variance ``2 / (c_in * kh * kw)``; with ``m > kh*kw`` the kernel variance is ``kh*kw/m`` of that.
    """

    def __init__(self, rows: int, cols: int, atoms: int, *, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int(rows, "rows")
        check_positive_int(cols, "cols")
        check_positive_int(atoms, "atoms")
        self.coefficients = nn.Parameter(torch.empty(rows, cols, atoms, device=device, dtype=dtype))
        self.reset_parameters()

    @classmethod
    def holding(cls, coefficients: nn.Parameter) -> SharedCoefficients:
        """A new holder registering the given Parameter (no copy, no init)."""
        if not isinstance(coefficients, nn.Parameter) or coefficients.dim() != 3:
            raise TypeError("SharedCoefficients.holding needs a 3-dimensional nn.Parameter (rows, cols, atoms)")
        holder = cls.__new__(cls)
        nn.Module.__init__(holder)
        holder.coefficients = coefficients
        return holder

    def tie(self) -> SharedCoefficients:
        """A new holder of this holder's Parameter (what each conv of a scope registers)."""
        return type(self).holding(self.coefficients)

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.coefficients, mode="fan_in", nonlinearity="relu")

    def forward(self) -> Tensor:
        """The coefficient tensor. Convs read it through this call (not the attribute) so that
        libraries which substitute a module's parameters when its forward runs (``higher``) see it."""
        return self.coefficients

    @property
    def rows(self) -> int:
        return self.coefficients.shape[0]

    @property
    def cols(self) -> int:
        return self.coefficients.shape[1]

    @property
    def num_atoms(self) -> int:
        return self.coefficients.shape[2]

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, atoms={self.num_atoms}"


def init_atoms_(atoms: Tensor) -> Tensor:
    """Orthogonal init of atoms ``(..., m, kh, kw)``: each ``m x (kh*kw)`` slice via ``orthogonal_``."""
    with torch.no_grad():
        flat = atoms.view(-1, atoms.shape[-3], atoms.shape[-2] * atoms.shape[-1])
        for d in flat:  # one m x l^2 matrix per layer (per group for grouped layers)
            nn.init.orthogonal_(d)
    return atoms


class _ContiguousGrad(torch.autograd.Function):
    """The identity whose backward makes the incoming gradient contiguous (vmap- and twice-differentiable)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _checked_padding(padding: _PaddingArg, stride: tuple[int, int]) -> _PaddingArg:
    """``padding`` as ``nn.Conv2d`` takes it ('same', 'valid' or a pair of ints >= 0), else a ValueError."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
        return padding
    pad = _pair(padding)
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pad):
        raise ValueError(f"padding must be 'same', 'valid', or ints >= 0, got {padding!r}")
    return tuple(pad)


def _reversed_padding(padding: _PaddingArg, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> list[int]:
    """Padding as ``F.pad`` wants it (last dim first, left/right), for non-zero padding modes."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        out: list[int] = []
        for k, d in zip(reversed(kernel_size), reversed(dilation)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    ph, pw = padding  # type: ignore[misc]
    return [pw, pw, ph, ph]


def _output_area(
    size: Sequence[int],
    padding: _PaddingArg,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> int:
    """``H_out * W_out`` of a convolution of an ``H x W`` input (the formula of ``nn.Conv2d``)."""
    if padding == "same":
        return size[0] * size[1]
    pad = (0, 0) if padding == "valid" else _pair(padding)
    area = 1
    for extent, p, k, s, d in zip(size, pad, kernel_size, stride, dilation):
        area *= (extent + 2 * p - d * (k - 1) - 1) // s + 1
    return area


def _under_vmap() -> bool:
    """Whether this call runs inside ``torch.func.vmap`` (at any level)."""
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


class ACDCConv2d(nn.Module):
    """Conv2d whose kernel is ``K[o, i] = sum_k A[o, i, k] * D[k]`` (see the module docstring).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode:
            as :class:`torch.nn.Conv2d` (``groups`` is not an argument: see ``group_size``).
        atoms: ``m``, atoms per layer; may be omitted when ``shared`` is given.
        shared: the coefficients to use (shared across layers): the layer registers its own holder
            (``shared.tie()``) of the same Parameter; if None the layer owns fresh coefficients
            (``c_out x c_in x m``, or ``min(s, c_out) x min(s, c_in) x m`` grouped).
        group_size: ``s`` for the grouped (ACDC-g) variant, None for the plain one.
        atom_drop: training-only probability of dropping each atom (one Bernoulli mask over the
            ``m`` atoms per forward pass, per group for grouped layers; survivors scaled by ``1/(1-p)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        atoms: int | None = None,
        shared: SharedCoefficients | None = None,
        *,
        stride: int | tuple[int, int] = 1,
        padding: _PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        group_size: int | None = None,
        atom_drop: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(out_channels, "out_channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(check_positive_int(k, "kernel_size") for k in _pair(kernel_size))
        self.stride = tuple(check_positive_int(v, "stride") for v in _pair(stride))
        self.dilation = tuple(check_positive_int(v, "dilation") for v in _pair(dilation))
        self.padding: _PaddingArg = _checked_padding(padding, self.stride)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}; got {padding_mode!r}")
        self.padding_mode = padding_mode
        self._pad_for_mode = _reversed_padding(self.padding, self.kernel_size, self.dilation)
        self.atom_drop = check_atom_drop(atom_drop)
        self._held_mask: tuple[Tensor | None] | None = None  # set by hold_atom_masks()
        self.evaluation = "auto"
        self.scope: str | None = None  # set by convert()/expand()

        if group_size is not None:
            check_positive_int(group_size, "group_size")
            problem = grouped_layout_error(in_channels, out_channels, group_size)
            if problem:
                raise ValueError(f"ACDCConv2d({in_channels}, {out_channels}): {problem}")
        self.group_size = group_size

        self.shared = self._coefficients(shared, atoms, device, dtype).tie()
        m = self.shared.num_atoms
        kh, kw = self.kernel_size
        atom_shape = (m, kh, kw) if group_size is None else (self.num_groups, m, kh, kw)
        self.atoms = nn.Parameter(init_atoms_(torch.empty(atom_shape, device=device, dtype=dtype)))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
            bound = 1.0 / math.sqrt(in_channels * kh * kw)  # nn.Conv2d's default bias init
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    def _coefficients(self, shared: SharedCoefficients | None, atoms: int | None, device, dtype) -> SharedCoefficients:
        """``shared`` checked against this layer's corner ``A[:rows, :cols]`` and ``atoms``, or new
        coefficients of exactly that shape when ``shared`` is None."""
        rows, cols = self.coefficient_shape
        if shared is None:
            if atoms is None:
                raise ValueError("ACDCConv2d needs atoms=<m> when no shared coefficients are given")
            return SharedCoefficients(rows, cols, atoms, device=device, dtype=dtype)
        if not isinstance(shared, SharedCoefficients):
            raise TypeError(f"shared must be a SharedCoefficients module, got {type(shared).__name__}")
        if atoms is not None and atoms != shared.num_atoms:
            raise ValueError(f"atoms={atoms} but the shared coefficients hold {shared.num_atoms} atoms")
        if shared.rows < rows or shared.cols < cols:
            raise ValueError(
                f"shared coefficients of shape {tuple(shared.coefficients.shape)} are too small "
                f"for a layer that uses A[:{rows}, :{cols}]"
            )
        return shared

    @property
    def evaluation(self) -> str:
        """How plain layers compute: ``auto`` (the cheaper of the two exact ways, see
        :meth:`prefers_two_stage`), ``kernel`` (always build ``K``) or ``two-stage`` (never build it)."""
        return self._evaluation

    @evaluation.setter
    def evaluation(self, value: str) -> None:
        if value not in EVALUATIONS:
            raise ValueError(f"evaluation must be one of {', '.join(EVALUATIONS)}; got {value!r}")
        self._evaluation = value

    # ---- layout -------------------------------------------------------------------------------
    @property
    def grouped(self) -> bool:
        return self.group_size is not None

    @property
    def num_atoms(self) -> int:
        return self.atoms.shape[-3]

    @property
    def group_width(self) -> int:
        """Output channels per filter group: ``min(s, c_out)`` grouped, ``c_out`` plain."""
        s = self.group_size
        return self.out_channels if s is None else min(s, self.out_channels)

    @property
    def num_groups(self) -> int:
        """Output filter groups ``g`` (1 for the plain variant)."""
        return self.out_channels // self.group_width

    @property
    def conv_groups(self) -> int:
        """The ``groups`` argument of the underlying ``F.conv2d``."""
        s = self.group_size
        return 1 if s is None or self.in_channels < s else self.in_channels // s

    @property
    def coefficient_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the leading corner of ``A`` this layer reads."""
        s = self.group_size
        if s is None:
            return self.out_channels, self.in_channels
        return min(s, self.out_channels), min(s, self.in_channels)

    def coefficient_view(self) -> Tensor:
        rows, cols = self.coefficient_shape
        a = self.shared()
        if (rows, cols) == tuple(a.shape[:2]):
            return a  # the whole tensor: no slice, whose backward would allocate a zero-filled copy
        return a[:rows, :cols]

    # ---- kernel ---------------------------------------------------------------------------------
    def sample_atom_mask(self) -> Tensor | None:
        """A fresh keep-mask (already scaled by ``1/(1-p)``) in training mode, else None.

        Inside :func:`hold_atom_masks` every forward gets the held mask instead (or None: no atom-drop).
        """
        if self._held_mask is not None:
            return self._held_mask[0]
        return self.draw_atom_mask()

    def draw_atom_mask(self) -> Tensor | None:
        """A newly drawn keep-mask in training mode (None in eval mode or without atom-drop)."""
        p = self.atom_drop
        if not self.training or p == 0.0:
            return None
        # Out of place, so that under torch.func.vmap(randomness="different") each task draws its own.
        keep = torch.full(self.atoms.shape[:-2], 1.0 - p, device=self.atoms.device, dtype=self.atoms.dtype)
        return torch.bernoulli(keep) / (1.0 - p)

    def kernel(self, atom_mask: Tensor | None = None) -> Tensor:
        """The ``F.conv2d`` weight, ``(c_out, c_in / conv_groups, kh, kw)``, before the channel shuffle.

        ``atom_mask`` (shape ``atoms.shape[:-2]``) multiplies the atoms; None means no atom-drop.
        """
        d = self.atoms if atom_mask is None else self.atoms * atom_mask[..., None, None]
        a = self.coefficient_view()
        if self.group_size is None:
            # (kh*kw x m) @ (m x c_out*c_in): a short, wide product, several times faster than the
            # (c_out*c_in x m) @ (m x kh*kw) of the (o, i, h, w) layout; the conv takes the permuted view.
            kh, kw = self.kernel_size
            m = d.shape[0]
            rebuilt = d.reshape(m, kh * kw).t() @ a.reshape(-1, m).t()
            return rebuilt.view(kh, kw, a.shape[0], a.shape[1]).permute(2, 3, 0, 1)
        # The einsum alone hands back a permuted gradient for the atoms; learn2learn's GBML, for one,
        # calls .view on parameter gradients, so they are made contiguous (an identity forward).
        w = torch.einsum("oik,gkhw->goihw", a, _ContiguousGrad.apply(d))
        return w.reshape(self.out_channels, a.shape[1], *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        mask = self.sample_atom_mask()
        bias = self.bias
        if bias is not None and self.num_groups > 1:
            # bias belongs to the shuffled output channel; pre-shuffle channel j*s+t ends at t*g+j
            bias = bias.view(self.group_width, self.num_groups).t().reshape(-1)
        padding: _PaddingArg = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad_for_mode, mode=self.padding_mode)
            padding = 0
        if self.prefers_two_stage(x, padding):
            return self._two_stage(x, mask, bias, padding)
        y = F.conv2d(x, self.kernel(mask), bias, self.stride, padding, self.dilation, self.conv_groups)
        return channel_shuffle(y, self.num_groups)

    # ---- the two-stage evaluation ------------------------------------------------------------------
    def prefers_two_stage(self, x: Tensor, padding: _PaddingArg) -> bool:
        """Whether to skip building the kernel: convolve with the atoms, then mix with ``A`` (a 1×1 conv).

        Both evaluations are exact. The two-stage one materializes ``N·H_out·W_out·c_in·m`` intermediate
        values instead of the ``c_out·c_in·kh·kw`` kernel, so it is taken when that is no more: deep
        layers on small batches (a MAML support set), where building, reordering and differentiating the
        kernel costs more than the convolution itself (benchmarks/README.md). Plain layers only, and not
        under ``torch.func.vmap``, where the atom convolution with per-task atoms runs task by task.
        """
        if self.grouped or x.dim() != 4 or self.evaluation == "kernel":
            return False
        if self.evaluation == "two-stage":
            return True
        if _under_vmap():  # per-task atoms turn the atom convolution into a loop over tasks: slower
            return False
        kh, kw = self.kernel_size
        positions = x.shape[0] * _output_area(x.shape[-2:], padding, self.kernel_size, self.stride, self.dilation)
        return positions * self.num_atoms <= self.out_channels * kh * kw

    def _two_stage(self, x: Tensor, mask: Tensor | None, bias: Tensor | None, padding: _PaddingArg) -> Tensor:
        n, c, h, w = x.shape
        m = self.num_atoms
        d = self.atoms if mask is None else self.atoms * mask[:, None, None]
        # every input channel with each atom: (N*c_in, 1, H, W) -> (N, c_in*m, H_out, W_out), channel i*m + k
        z = F.conv2d(x.reshape(n * c, 1, h, w), d.unsqueeze(1), None, self.stride, padding, self.dilation)
        z = z.reshape(n, c * m, z.shape[-2], z.shape[-1])
        mix = self.coefficient_view().reshape(self.out_channels, c * m, 1, 1)  # [o, i*m + k] = A[o, i, k]
        return F.conv2d(z, mix, bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"atoms={self.num_atoms}, stride={self.stride}"
        )
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.group_size is not None:
            s += f", group_size={self.group_size}, groups={self.num_groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", atom_drop={self.atom_drop}, scope={self.scope!r}"


@contextmanager
def hold_atom_masks(model: nn.Module, drop: bool = True) -> Iterator[None]:
    """Within this context every ACDC layer of ``model`` uses one atom-drop mask for all its forwards.

    ``drop=True``: one mask per layer is drawn on entry (as a forward would draw it: none in eval mode)
    and reused by every forward inside, e.g. all inner steps and the query pass of one MAML task;
    under ``torch.func.vmap(randomness="different")`` each task draws its own. ``drop=False``: no
    atom-drop inside. The layers draw fresh masks again after the context.
    """
    layers = [m for m in model.modules() if isinstance(m, ACDCConv2d)]
    previous = [layer._held_mask for layer in layers]
    try:
        for layer in layers:
            layer._held_mask = (layer.draw_atom_mask() if drop else None,)
        yield
    finally:
        for layer, held in zip(layers, previous):
            layer._held_mask = held
