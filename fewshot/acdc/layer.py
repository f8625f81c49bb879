"""The ACDC convolution: kernels rebuilt from per-layer filter atoms and (shared) atom coefficients.

A decomposed conv with ``c_out`` outputs, ``c_in`` inputs and a ``kh x kw`` kernel holds its own atoms
``D`` (``m x kh x kw``) and reads the coefficients ``A[:c_out, :c_in, :m]`` (atoms last) of a
:class:`SharedCoefficients` module, which several convs may hold as the *same* submodule object. Its
kernel is ``K[o, i] = sum_k A[o, i, k] * D[k]``; the forward pass rebuilds ``K`` and runs ``F.conv2d``,
so compute equals the dense conv. Where the batch is small next to the kernel (deep layers of a MAML
support set), a plain layer instead convolves each input channel with the ``m`` atoms and mixes the result
with ``A`` (the paper's two-sub-layer form, as two matrix products on the unfolded input): the same
function, without building ``K`` (:meth:`ACDCConv2d.prefers_two_stage`).

Grouped variant (``group_size=s``): the ``c_out`` outputs form ``g = c_out / s`` groups, each with its
own atoms (``D`` is ``g x m x kh x kw``) and all reading the same ``A[:s, :s]`` (a layer with
``c_out < s`` is one group of ``c_out`` channels reading ``A[:c_out, ...]``). It runs as one grouped
conv with ``c_in / s`` conv groups, so input group ``i`` feeds the ``c_out / c_in`` consecutive output
groups ``i*r .. i*r + r - 1``; when ``c_in < s`` there is one conv group and every output group reads all
inputs through ``A[:s, :c_in]``. A ShuffleNet channel shuffle over the ``g`` output groups follows.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.utils.weak import WeakIdKeyDictionary

from fewshot.acdc.rules import check_atom_drop, check_positive_int

__all__ = [
    "SharedCoefficients",
    "CoefficientCorners",
    "ACDCConv2d",
    "channel_shuffle",
    "grouped_layout_error",
    "PADDING_MODES",
]

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


def _summable(grad: Tensor) -> bool:
    """Whether a gradient may be added into a sum in place: no double backward (grad mode off), a plain
    dense tensor (not a tensor subclass or a functorch wrapper)."""
    return (
        not torch.is_grad_enabled()
        and type(grad) is Tensor
        and not torch._C._functorch.is_functorch_wrapped_tensor(grad)
    )


class _CutCorners(torch.autograd.Function):
    """The leading corners ``a[:rows, :cols]`` of ``shapes`` (largest first), cut at once: the full-size
    one sharing ``a``'s storage, the others as contiguous copies. Backward returns one tensor of ``a``'s
    size: the sum that the layers' products added their gradients into during this backward
    (``sums``, by graph task: :class:`_CornerProduct`), with the gradients that reached the corners
    otherwise added in place at their own size."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, shapes: tuple[tuple[int, int], ...], sums: dict[int, Tensor]) -> tuple[Tensor, ...]:
        # The full-size one shares a's storage (and version counter) but is not a view of a: a view would
        # keep the tensor a itself alive from the cache that holds the corners, which is keyed by it.
        full = (a.shape[0], a.shape[1])
        return tuple(a.detach() if s == full else a[: s[0], : s[1]].clone() for s in shapes)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, tuple[tuple[int, int], ...], dict], output: Any) -> None:
        a, shapes, sums = inputs
        ctx.shapes = shapes
        ctx.sums = sums
        ctx.full = (a.shape[0], a.shape[1])
        ctx.set_materialize_grads(False)  # a corner whose readers all added into the sum sends None

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, None, None]:
        total = ctx.sums.pop(torch._C._current_graph_task_id(), None)  # built by this backward: ours
        rows_full, cols_full = ctx.full
        for (rows, cols), g in zip(ctx.shapes, grads):  # largest first
            if g is None:
                continue
            padding = (0, 0, 0, cols_full - cols, 0, rows_full - rows)
            if total is None:  # the largest gradient present, padded to full size, becomes the sum
                total = g.clone() if (rows, cols) == ctx.full else F.pad(g, padding)
                continue
            try:
                total[:rows, :cols].add_(g)  # (not `+=`, whose setitem copies the corner onto itself)
            except RuntimeError:  # under vmap, an unbatched sum cannot take a batched gradient in place
                total = total + F.pad(g, padding)
        return total, None, None


class _CornerProduct(torch.autograd.Function):
    """``corner.reshape(shape) @ other`` for a corner that a :class:`_Cut` handed out. Where the
    gradient may be summed in place (:func:`_summable`: not a double backward, not in a ``torch.func``
    transform), backward adds the corner's gradient straight into the cut's full-size sum for this
    backward (:meth:`_Cut.accumulate`) and sends the corner none: no corner-size gradient per layer
    written and then added, no sum of several layers' gradients by autograd. Otherwise it returns the
    corner's gradient, as ``corner.reshape(shape) @ other`` would."""

    @staticmethod
    def forward(corner: Tensor, other: Tensor, shape: tuple[int, int], cut: _Cut) -> Tensor:
        return corner.reshape(shape) @ other

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, tuple[int, int], _Cut], output: Tensor) -> None:
        corner, other, shape, cut = inputs
        ctx.save_for_backward(corner, other)
        ctx.shape = shape
        ctx.cut = cut
        ctx.cut_node = corner.grad_fn  # the cut's autograd node

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        corner, other = ctx.saved_tensors
        grad_other = corner.reshape(ctx.shape).mT @ grad if ctx.needs_input_grad[1] else None
        grad_corner = None
        if ctx.needs_input_grad[0] and torch._C._will_engine_execute_node(ctx.cut_node):
            if _summable(grad):
                ctx.cut.accumulate(corner.shape, grad, other)
            else:
                grad_corner = (grad @ other.mT).view(corner.shape)
        return grad_corner, grad_other, None, None


class _Cut:
    """One application of :class:`_CutCorners` to one tensor: the corners no conv has taken yet (held
    here) and those taken (held by weak reference: the graph of the pass that took them keeps them).

    A shape may be cut several times (the full-size one, once per conv that reads all of ``A``), so that
    where the readers' products hand back their gradient instead of adding it into the sum (a double
    backward, ``torch.func`` transforms: :class:`_CornerProduct`) each reaches the backward of
    :class:`_CutCorners` on its own and is added there in place, instead of autograd summing them into a
    new full-size tensor first. The readers are counted per cut: passes that share one (their graphs alive
    together) give each of their readers an alias.
    """

    def __init__(self, a: Tensor, version: int, shapes: tuple[tuple[int, int], ...]) -> None:
        self.version = version
        self.sums: dict[int, Tensor] = {}  # graph task id -> the gradient sum this backward builds
        self.waiting: dict[tuple[int, int], list[Tensor]] = {}
        for shape, corner in zip(shapes, _CutCorners.apply(a, shapes, self.sums)):
            self.waiting.setdefault(shape, []).append(corner)
        self.taken: list[tuple[tuple[int, int], weakref.ref]] = []
        self.shape = tuple(a.shape)  # of A, and of the gradient sums

    def usable(self, version: int) -> bool:
        """Still the same values, and the pass that took corners still holds them all."""
        return version == self.version and all(ref() is not None for _, ref in self.taken)

    def take(self, shape: tuple[int, int]) -> tuple[Tensor, bool]:
        """A corner of ``shape``, and whether it was taken before (more readers than cuts of it)."""
        waiting = self.waiting.get(shape)
        if waiting:
            corner = waiting.pop(0)
            self.taken.append((shape, weakref.ref(corner)))
            return corner, False
        last = next(ref for taken_shape, ref in reversed(self.taken) if taken_shape == shape)
        return last(), True  # alive: usable() said so

    def accumulate(self, corner_shape: torch.Size, grad: Tensor, other: Tensor) -> None:
        """Add ``grad @ other.mT``, the gradient of a corner of ``corner_shape`` read as the matrix
        ``grad.shape[0] x -1`` (:class:`_CornerProduct`; a matrix view of the sum), into this backward's
        full-size sum: the first full-size corner's product becomes the sum, the others are added in place
        as one matrix product each."""
        task = torch._C._current_graph_task_id()
        total = self.sums.get(task)
        rows, cols = corner_shape[0], corner_shape[1]
        if total is None:
            if tuple(corner_shape) == self.shape:
                self.sums[task] = (grad @ other.mT).view(corner_shape)
                return
            total = self.sums[task] = grad.new_zeros(self.shape)
        total[:rows, :cols].view(grad.shape[0], -1).addmm_(grad, other.mT)  # (a matrix view: product())


class CoefficientCorners:
    """The leading corners ``A[:rows, :cols]`` that the convs of one scope read, cut all at once per
    forward pass and shared by its convs.

    Why: the backward of a slice ``A[:r, :c]`` fills a zero tensor of ``A``'s full size, and autograd then
    adds one such full-size gradient per conv into ``A``'s gradient, while each conv's kernel build copies
    its (non-contiguous) corner. Here one autograd node cuts every corner (contiguous copies; the full-size
    one shares ``A``'s storage) and its backward returns one full-size sum of the corners' gradients: the
    convs' products that read their corner as a matrix view of ``A`` (all of it, or ``A[:r, :c]`` as
    ``r x c·m`` in the two-stage form) add their gradient into it as one in-place matrix product each
    (:meth:`product`), the other corners' gradients are added in place at their own size. Values and
    gradients are those of plain slicing (``tests/test_acdc_corners.py``).

    Each :class:`ACDCConv2d` registers the corner it reads when it is tied to the coefficients, so every
    forward pass cuts the same corners and sums their gradients in the same order (a resumed run repeats
    an uninterrupted one bit for bit). The corners are cut per coefficient tensor object (the Parameter,
    or the tensor that ``functional_call``, ``higher``, learn2learn or an inner loop put in its place)
    and shared by the convs of one forward pass: once taken by a conv they are held by weak reference
    only, so they live as long as the autograd graph that saved them; a pass that finds one of them gone,
    or the tensor changed in place (its version counter), cuts anew. Where there is no backward (no grad
    mode, a tensor that does not require grad, inference mode), no corner to cut (every conv reads all
    of ``A``) or too little to gain (``A`` under ``min_elements`` elements) the convs slice directly, as
    does a conv that was not registered (its corner is cut with the others from the next pass on).
    Copies (``deepcopy``, pickling) keep the registrations and drop the cut corners.
    """

    # Below this many elements in ``A`` the convs slice it: autograd's full-size gradient per reader then
    # costs less than the cut's own overhead. A MAML meta-step sliced against cut (benchmarks/corner_cut.py,
    # medians of 7 rounds, 2026-12-04 with the layers' products adding into the sum): 0.90x for the main
    # job's Conv4 (A of 16,384 elements), 1.01x and 1.03x for the depth sweep's ResNet10 and ResNet18
    # (262,144), 1.07x for Chen et al.'s ResNet10 (2,097,152). (Before that, 0.97x for the sweep's
    # ResNet18: 2^20 then.)
    min_elements: int = 1 << 18

    def __init__(self, readers: dict[tuple[int, int], int] | None = None) -> None:
        self._readers: dict[tuple[int, int], int] = dict(readers or {})  # corner shape -> convs reading it
        self._cut: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> _Cut

    @property
    def shapes(self) -> frozenset[tuple[int, int]]:
        """The corner shapes ``(rows, cols)`` registered or asked for so far."""
        return frozenset(self._readers)

    def register(self, rows: int, cols: int) -> None:
        """One more conv reads ``A[:rows, :cols]``."""
        self._readers[(rows, cols)] = self._readers.get((rows, cols), 0) + 1
        self._cut = WeakIdKeyDictionary()  # cut without this reader: cut again next time

    def corner(self, a: Tensor, rows: int, cols: int) -> Tensor:
        """``a[:rows, :cols]`` (``a`` itself, or a tensor sharing its storage, when that is all of it)."""
        corner, cut = self._take(a, rows, cols)
        # Not a cut's corner itself, which its layers' products may read too: a view of it, so that what
        # callers do with their tensor (hooks included) stays theirs.
        return corner if cut is None else corner.view_as(corner)

    def product(self, a: Tensor, rows: int, cols: int, shape: tuple[int, int], other: Tensor) -> Tensor:
        """``a[:rows, :cols].reshape(shape) @ other``, the product by which a layer reads its corner: with a
        cut corner (outside ``torch.func`` transforms), its backward adds the corner's gradient straight
        into the sum of all corners' gradients (:class:`_CornerProduct`)."""
        corner, cut = self._take(a, rows, cols)
        # Through _CornerProduct only where the corner, read as that matrix, is a matrix view of the sum
        # (its gradient one in-place product into the sum); a corner narrower than A read as rows of
        # (row, col) pairs gains too little over autograd's own gradient for the cost of a Python node.
        matrix_view = shape[0] == rows or cols == a.shape[1]
        if cut is None or not matrix_view or torch._C._functorch.peek_interpreter_stack() is not None:
            return corner.reshape(shape) @ other
        return _CornerProduct.apply(corner, other, shape, cut)

    def _take(self, a: Tensor, rows: int, cols: int) -> tuple[Tensor, _Cut | None]:
        """``a[:rows, :cols]`` as :meth:`corner` explains, and the cut it came from (None: sliced)."""
        full = (a.shape[0], a.shape[1])
        shape = (rows, cols)
        sliced = a if shape == full else a[:rows, :cols]
        if shape not in self._readers:
            self.register(rows, cols)
            return sliced, None
        if a.numel() < self.min_elements or self._readers.keys() <= {full}:
            return sliced, None  # too little to gain, or nothing to cut
        if not (a.requires_grad and torch.is_grad_enabled()) or a.is_inference():
            return sliced, None  # no backward
        try:
            version = a._version
        except RuntimeError:  # a tensor without a version counter (some functorch wrappers)
            return sliced, None
        cut = self._cut.get(a)
        if cut is None or not cut.usable(version):
            fitting = [s for s in self._readers if s[0] <= full[0] and s[1] <= full[1]]
            fitting += [full] * (self._readers.get(full, 1) - 1)  # an alias per conv that reads all of A
            shapes = tuple(sorted(fitting, key=lambda s: (-s[0] * s[1], s)))  # largest first
            cut = _Cut(a, version, shapes)
            self._cut[a] = cut
        corner, again = cut.take(shape)
        if again and shape == full:  # one more conv reads all of A: the next cut gives it its own alias
            self._readers[full] += 1
        return corner, cut

    def __deepcopy__(self, memo: dict) -> CoefficientCorners:
        return CoefficientCorners(self._readers)

    def __reduce__(self) -> tuple[Any, ...]:
        return (CoefficientCorners, (dict(sorted(self._readers.items())),))

    def __repr__(self) -> str:
        return f"CoefficientCorners(readers={dict(sorted(self._readers.items()))})"


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
        self.corners = CoefficientCorners()
        self.reset_parameters()

    @classmethod
    def holding(cls, coefficients: nn.Parameter, corners: CoefficientCorners | None = None) -> SharedCoefficients:
        """A new holder registering the given Parameter (no copy, no init); ``corners`` as :meth:`tie` passes."""
        if not isinstance(coefficients, nn.Parameter) or coefficients.dim() != 3:
            raise TypeError("SharedCoefficients.holding needs a 3-dimensional nn.Parameter (rows, cols, atoms)")
        holder = cls.__new__(cls)
        nn.Module.__init__(holder)
        holder.coefficients = coefficients
        holder.corners = CoefficientCorners() if corners is None else corners
        return holder

    def tie(self) -> SharedCoefficients:
        """A new holder of this holder's Parameter (what each conv of a scope registers); all the holders
        of one Parameter cut their corners through one :class:`CoefficientCorners`."""
        return type(self).holding(self.coefficients, self.corners)

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
    """The identity (a view of its input) whose backward makes the incoming gradient contiguous (vmap- and
    twice-differentiable)."""

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


def _output_size(
    size: Sequence[int],
    padding: _PaddingArg,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """``(H_out, W_out)`` of a convolution of an ``H x W`` input (the formula of ``nn.Conv2d``)."""
    if padding == "same":
        return size[0], size[1]
    pad = (0, 0) if padding == "valid" else _pair(padding)
    h_out, w_out = (
        (extent + 2 * p - d * (k - 1) - 1) // s + 1
        for extent, p, k, s, d in zip(size, pad, kernel_size, stride, dilation)
    )
    return h_out, w_out


def _under_vmap() -> bool:
    """Whether this call runs inside ``torch.func.vmap`` (at any level)."""
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def _layout_of(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D tensor with channels-last strides (channels innermost), else
    contiguous: the layout ``F.conv2d`` gives its output for this input, which the two-stage form keeps too."""
    if x.dim() != 4 or _under_vmap() or x.stride(1) != 1 or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


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

        self.read_from(self._coefficients(shared, atoms, device, dtype))
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

    def read_from(self, shared: SharedCoefficients) -> None:
        """Read the corner :attr:`coefficient_shape` of ``shared``'s coefficients from now on (tied: this
        layer registers its own holder of the same Parameter, :meth:`SharedCoefficients.tie`)."""
        self.shared = shared.tie()
        self.shared.corners.register(*self.coefficient_shape)

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

    @property
    def kernel_macs(self) -> int:
        """Multiply-adds of one kernel reconstruction ``K = A·D`` (``c_out·c_in·m·kh·kw``, per filter group
        for grouped layers): the work the kernel form adds once per forward pass, whatever the batch."""
        rows, cols = self.coefficient_shape
        return self.num_groups * rows * cols * self.num_atoms * self.kernel_size[0] * self.kernel_size[1]

    def coefficient_view(self) -> Tensor:
        """``A[:rows, :cols]`` of :attr:`coefficient_shape` (cut as :class:`CoefficientCorners` explains)."""
        rows, cols = self.coefficient_shape
        return self.shared.corners.corner(self.shared(), rows, cols)

    def _coefficient_product(self, shape: tuple[int, int], other: Tensor) -> Tensor:
        """``coefficient_view().reshape(shape) @ other`` (:meth:`CoefficientCorners.product`)."""
        rows, cols = self.coefficient_shape
        return self.shared.corners.product(self.shared(), rows, cols, shape, other)

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
        if self.group_size is None:
            # K as a (c_out*c_in, m) @ (m, kh*kw) product: the (o, i, h, w) layout the conv wants. (One
            # product: two rows at a time on a block-diagonal pair of atoms is slower,
            # benchmarks/tall_matmul.py.)
            rows, cols = self.coefficient_shape
            m = d.shape[0]
            rebuilt = self._coefficient_product((rows * cols, m), d.reshape(m, -1))
            return rebuilt.view(rows, cols, *self.kernel_size)
        a = self.coefficient_view()
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
        """Whether to skip building the kernel: convolve with the atoms, then mix with ``A`` (two matrix
        products on the unfolded input, :meth:`_two_stage`).

        Both evaluations are exact. The two-stage one materializes ``N·H_out·W_out·c_in·m`` intermediate
        values instead of the ``c_out·c_in·kh·kw`` kernel; it is taken when that is at most half the
        kernel: the deepest layers on small batches (a MAML support set), where building and
        differentiating the kernel costs more than the convolution itself. Measured per layer
        (``python benchmarks/acdc_overhead.py --per-layer``, 2026-12-04, 4d24ac8, against dense): at 0.078
        of the kernel (ResNet's last stage at batch 5) two-stage 0.86x and 1.08x against kernel 1.31x and
        1.63x; at 0.391 (that stage at batch 25) 0.87x and 1.13x against 1.17x and 1.19x; at 0.625 (the
        third stage at batch 5) the kernel form wins, 1.25x and 1.29x against 1.36x and 1.54x. Plain layers
        only, and not under ``torch.func.vmap`` (not measured there).
        """
        if self.grouped or x.dim() != 4 or self.evaluation == "kernel":
            return False
        if self.evaluation == "two-stage":
            return True
        if _under_vmap():
            return False
        kh, kw = self.kernel_size
        h_out, w_out = _output_size(x.shape[-2:], padding, self.kernel_size, self.stride, self.dilation)
        positions = x.shape[0] * h_out * w_out
        return 2 * positions * self.num_atoms <= self.out_channels * kh * kw

    def _two_stage(self, x: Tensor, mask: Tensor | None, bias: Tensor | None, padding: _PaddingArg) -> Tensor:
        """``y = A · (D ⊛ x)`` as two matrix products on the unfolded input, without building ``K``."""
        if isinstance(padding, str):  # 'same' may pad unevenly, which unfold cannot: pad first
            x = F.pad(x, _reversed_padding(padding, self.kernel_size, self.dilation))
            padding = 0
        padding = _pair(padding)
        n, c = x.shape[:2]
        m = self.num_atoms
        taps = self.kernel_size[0] * self.kernel_size[1]
        h_out, w_out = _output_size(x.shape[-2:], padding, self.kernel_size, self.stride, self.dilation)
        positions = n * h_out * w_out
        # (N, c_in*taps, L) -> (c_in, taps, N*L): one column per output position of every image
        cols = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride)
        cols = cols.view(n, c, taps, h_out * w_out).permute(1, 0, 3, 2).reshape(c * positions, taps)
        d = self.atoms if mask is None else self.atoms * mask[:, None, None]
        d = _ContiguousGrad.apply(d).reshape(m, taps).t()  # (a transposed view: its gradient made contiguous)
        z = cols @ d  # every input channel at every position with each atom
        z = z.view(c, positions, m).transpose(1, 2).reshape(c * m, positions)  # rows i*m + k
        y = self._coefficient_product((self.out_channels, c * m), z)  # A as [o, i*m + k]: (c_out, N*L)
        if bias is not None:
            y = y + bias.unsqueeze(1)
        return y.view(self.out_channels, n, h_out, w_out).transpose(0, 1).contiguous(memory_format=_layout_of(x))

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
