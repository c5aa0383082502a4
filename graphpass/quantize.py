"""Compressed storage of tensors kept for backward: K-bit codes packed into bytes.

Three layouts, each a :class:`Packed` record that :func:`unpack` expands again:

- ``group``: generic. Elements are taken in memory order and split into groups of ``group_size``;
  each group keeps its own float32 ``base`` and ``step`` (min/max of its finite values).
- ``anchored``: BLPA's zero-anchored per-channel grid (papers.md section 1.4). The step is
  ``6 * std_c / 2**bits`` and the grid has a bin boundary at 0, so ``code >= shift_c`` exactly when
  ``v > 0``: a ReLU mask rebuilt from the codes is exact. The shift is clamped to ``[1, 2**bits - 1]``
  so both signs always own a bin (the official code gives positive values negative codes for
  ``mean_c/step_c`` below about -3). Values are rebuilt at bin midpoints, so they keep their sign.
- ``mask``: one bit per element of a bool tensor.

Codes of ``8 // bits`` consecutive elements share a byte, the first in the low bits.

Non-finite values are stored in band, so no code path needs a data-dependent shape or a host sync:
a group (``group``) or block of ``FLAG_BLOCK`` elements (``anchored``) that holds NaN or +-Inf is
flagged, three of its codes then stand for NaN, +Inf and -Inf, and its finite values use the other
``2**bits - 3`` (a single level at 2 bits). Group layout: the top three codes; scales are computed
over finite values. Anchored layout: codes 0 (-Inf), n-2 (NaN), n-1 (+Inf), with the shift moved
into [2, n-3] so that from 4 bits finite values keep their exact sign there too.

CUDA tensors go through the fused Triton kernels in :mod:`graphpass.triton_kernels` (one pass each
way); CPU, meta and fake tensors through the PyTorch code here, which computes the same codes
with the same float32 operations; on a real CPU tensor, where a host sync is free, it skips the
NaN/Inf steps when no group or block is flagged. Inputs are read in memory order (``Packed.perm``), so
channels_last and other dense layouts are not copied and come back with the same strides.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from graphpass.errors import InputError, UnsupportedError

__all__ = [
    "Packed",
    "pack_groups",
    "pack_anchored",
    "pack_mask",
    "pack_positive_mask",
    "unpack",
    "channel_sums",
    "fused_norm_grad",
    "LayerMaps",
    "layer_maps",
    "layer_tables",
    "batch_norm_grad_tables",
    "batch_norm_backward",
    "group_norm_backward",
    "group_norm_reads",
    "GROUP_NORM_GRAD_ROWS",
    "LAYER_TABLE_ROWS",
    "NORM_GRAD_ROWS",
    "TINY_GAMMA",
    "Activation",
    "apply_epilogue",
    "SUPPORTED_BITS",
    "aligned_rows",
    "DEFAULT_GROUP_SIZE",
    "FLAG_BLOCK",
    "triton_available",
    "anchored_grid",
]

_log = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 4, 8)
DEFAULT_GROUP_SIZE = 256
FLAG_BLOCK = 1024  # anchored layout: elements per NaN/Inf flag (one Triton program each)
TORCH_CHUNK = 2**17  # elements the PyTorch path rebuilds at a time where it need not rebuild all
TINY_STEP = 2.0**-100  # smallest grid step; keeps 1/step finite for constant channels
# Half-width of the per-channel grid's window, in standard deviations, by bit width. At 8 bits the
# values BLPA's +-3 std (papers.md 1.4) clips carried most of the error (three times the rounding
# error for a Gaussian); +-4.5 cut gradient errors to exact by 2-3x. BLPA's window stays at 4 bits,
# where it was best, and at 2: +-2 lowered one step's gradient error there, but its clipping biases
# every step, and training on digits lost two points (README).
WINDOW_STDS = {8: 4.5, 4: 3.0, 2: 3.0}
_EXACT_INTEGERS = float(2**24)  # float32 holds every integer up to this
_FLOAT32_MAX = torch.finfo(torch.float32).max
_BACKENDS = (None, "torch", "triton")
T = TypeVar("T")


def without_grad(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with grad mode off, as under ``torch.no_grad()`` but without building
    that context (a few microseconds, several hundred times a step in the runtime's hooks); mostly
    grad mode is already off (backward, or the runtime's own no-grad calls) and nothing is switched."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    torch._C._set_grad_enabled(False)
    try:
        return fn(*args, **kwargs)
    finally:
        torch._C._set_grad_enabled(True)


def _no_grad(fn: Callable[..., T]) -> Callable[..., T]:
    """:func:`without_grad` as a decorator."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        if not torch.is_grad_enabled():  # inline: one call layer less on every call
            return fn(*args, **kwargs)
        return without_grad(fn, *args, **kwargs)

    return wrapper


@dataclass(eq=False)
class Packed:
    """Everything kept for one compressed tensor."""

    layout: str  # "group" | "anchored" | "mask"
    bits: int
    shape: torch.Size
    dtype: torch.dtype
    codes: torch.Tensor  # uint8, 1-D, 8 // bits codes per byte
    perm: tuple[int, ...]  # memory order: original.permute(perm) was contiguous
    scales: torch.Tensor | None = None  # group: (groups, 2) float32 rows [base, step]
    grid: torch.Tensor | None = None  # anchored: (C, 3) float32 rows [step, 1/step, shift] (anchored_grid)
    flags: torch.Tensor | None = None  # uint8 per group / FLAG_BLOCK: 1 where NaN/Inf are coded
    group_size: int = 0  # group: elements per group; anchored: FLAG_BLOCK
    channel_dim: int = 1  # anchored: channel dimension of the original shape

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.grid, self.flags)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def unit(self) -> int:
        """Elements per group (group), flag block (anchored) or byte (mask): spans of the memory
        order whose codes, scales and flags are slices start at multiples of it."""
        return self.group_size if self.layout != "mask" else 8

    @property
    def row_step(self) -> int:
        """Smallest number of leading-dimension rows that fill whole units (:attr:`unit`): :meth:`rows`
        slices at multiples of it; 0 when the leading dimension is not outermost in memory."""
        if not self.shape or self.perm[0] != 0:
            return 0
        return aligned_rows(self.numel // max(self.shape[0], 1), self.unit)

    def rows(self, start: int, stop: int) -> "Packed":
        """The copy of ``original[start:stop]`` (leading dimension), sharing these codes; ``start``
        is a multiple of :attr:`row_step`."""
        step = self.row_step
        if not step or start % step or not 0 <= start <= stop <= self.shape[0]:
            raise InputError(f"Packed.rows({start}, {stop}): rows start at multiples of {step} within {self.shape[0]}")
        row = self.numel // self.shape[0]
        codes, scales, flags = self.span(start * row, stop * row)
        return Packed(
            self.layout, self.bits, torch.Size((stop - start, *self.shape[1:])), self.dtype, codes, self.perm,
            scales=scales, grid=self.grid, flags=flags, group_size=self.group_size, channel_dim=self.channel_dim,
        )  # fmt: skip

    def span(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(codes, scales, flags) of elements ``first:last`` of the memory order, as slices;
        ``first`` is a multiple of :attr:`unit`."""
        per_unit = slice(first // self.unit, -(-last // self.unit))
        codes = self.codes[first * self.bits // 8 : -(-last * self.bits // 8)]
        return (
            codes,
            self.scales[per_unit] if self.scales is not None else None,
            self.flags[per_unit] if self.flags is not None else None,
        )


def aligned_rows(row_elements: int, unit: int) -> int:
    """Fewest rows of ``row_elements`` elements that end on a multiple of ``unit`` elements."""
    return unit // math.gcd(row_elements, unit)


@dataclass(frozen=True)
class Activation:
    """An elementwise activation by name, as PyTorch computes it: "relu", "relu6", "leaky_relu", "silu",
    "gelu" (``approximate`` "none" or "tanh"), "hardswish", "mish"; any other name is the identity."""

    name: str
    negative_slope: float = 0.01
    approximate: str = "none"

    def __call__(self, v: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if self.name == "relu":
            return torch.relu_(v) if inplace else torch.relu(v)
        if self.name == "relu6":
            return F.hardtanh(v, 0.0, 6.0, inplace=inplace)
        if self.name == "leaky_relu":
            return F.leaky_relu(v, self.negative_slope, inplace=inplace)
        if self.name == "silu":
            return F.silu(v, inplace=inplace)
        if self.name == "gelu":
            return F.gelu(v, approximate=self.approximate)
        if self.name == "hardswish":
            return F.hardswish(v, inplace=inplace)
        if self.name == "mish":
            return F.mish(v, inplace=inplace)
        return v

    def backward(self, grad: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """dL/dv from dL/d(activation(v)): the op autograd's own backward of the activation runs, so
        boundary conventions (kinks, NaN) match eager."""
        aten = torch.ops.aten
        if self.name == "relu":
            return aten.threshold_backward(grad, v, 0)
        if self.name == "relu6":
            return aten.hardtanh_backward(grad, v, 0.0, 6.0)
        if self.name == "leaky_relu":
            return aten.leaky_relu_backward(grad, v, self.negative_slope, False)
        if self.name == "silu":
            return aten.silu_backward(grad, v)
        if self.name == "gelu":
            return aten.gelu_backward(grad, v, approximate=self.approximate)
        if self.name == "hardswish":
            return aten.hardswish_backward(grad, v)
        if self.name == "mish":
            return aten.mish_backward(grad, v)
        return grad

    @property
    def jumps(self) -> tuple[float, ...]:
        """Where the derivative jumps, besides 0 (which the anchored grid keeps exact): a value
        rebuilt on the wrong side of one would get the wrong derivative (:func:`anchored_grid`)."""
        return {"relu6": (6.0,), "hardswish": (-3.0, 3.0)}.get(self.name, ())

    @property
    def homogeneous(self) -> bool:
        """Positively homogeneous: ``act(v) == v * act'(v)``, so a backward needs no separate
        reduction of ``grad * act(v)``."""
        return self.name not in ("relu6", "silu", "gelu", "hardswish", "mish")


# ----------------------------------------------------------------------------- public API


@_no_grad
def pack_groups(
    x: torch.Tensor,
    bits: int,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    stochastic: bool = False,
    backend: str | None = None,
) -> Packed:
    """Quantize ``x`` with a float32 ``base``/``step`` per group of ``group_size`` elements.

    Deterministic rounding is round-to-nearest (error at most ``step / 2``); ``stochastic=True``
    rounds up with probability equal to the fractional part, which is unbiased.
    ``backend`` forces "torch" or "triton"; by default CUDA tensors use Triton.
    """
    _check_bits(bits)
    _check_float(x, "pack_groups")
    _check_backend(backend)
    if not (4 <= group_size <= 2**16 and group_size & (group_size - 1) == 0):
        raise InputError(f"pack_groups: group_size={group_size} must be a power of two in [4, 65536]")
    flat, perm = _flatten(x)
    numel = flat.numel()
    num_groups = -(-numel // group_size)
    kernels = _kernels_for(x, backend)
    if kernels is not None and numel > 0:
        codes, scales, flags = kernels.group_pack(flat, bits, group_size, stochastic)
    else:
        codes, scales, flags = _group_pack_torch(flat, bits, group_size, num_groups, stochastic)
    return Packed("group", bits, x.shape, x.dtype, codes, perm, scales=scales, flags=flags, group_size=group_size)


@_no_grad
def pack_anchored(
    v: torch.Tensor,
    bits: int,
    *,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    grid: torch.Tensor | None = None,
    anchored: bool = True,
    jumps: Sequence[float] = (),
    channel_dim: int = 1,
    stochastic: bool = False,
    backend: str | None = None,
) -> Packed:
    """Quantize ``v`` on BLPA's zero-anchored per-channel grid.

    ``mean``/``std`` are the per-channel mean and standard deviation of ``v`` (C elements each,
    any shape); they set the window ``mean_c +- w std_c`` (w = ``WINDOW_STDS[bits]``). The
    per-channel grid derived from them (:func:`anchored_grid`) is stored (12 bytes per channel).
    Sign is exact: codes at or above the channel's shift are exactly ``v > 0``, and rebuilt values
    are > 0 exactly where ``v > 0``.
    Inside the window the error is at most ``step_c / 2``. ``stochastic=True`` rounds between bin
    midpoints without bias, except within half a step of zero (the sign wins) and outside the
    window (clipped). ``jumps``: where the derivative of the activation applied to ``v`` jumps
    (:attr:`Activation.jumps`); each near the window becomes a bin boundary. ``anchored=False``
    centres the grid on the mean instead (a finer step where ``|mean| > w std``); then the sign is
    not kept.
    Instead of ``mean``/``std``, ``grid`` may give that grid itself (as :func:`layer_tables` makes it).
    """
    _check_bits(bits)
    _check_float(v, "pack_anchored")
    _check_backend(backend)
    if v.dim() == 0 or not -v.dim() <= channel_dim < v.dim():
        raise InputError(f"pack_anchored: channel_dim={channel_dim} is out of range for a tensor of shape {tuple(v.shape)}")
    channel_dim %= v.dim()
    channels = v.shape[channel_dim]
    flat, perm = _flatten(v)
    inner = _inner(v.shape, perm, channel_dim)
    kernels = _kernels_for(v, backend)
    use_kernels = kernels is not None and flat.numel() > 0
    if grid is not None:
        if mean is not None or std is not None:
            raise InputError("pack_anchored: give either mean and std or grid, not both")
        if not anchored or jumps:
            raise InputError("pack_anchored: anchored and jumps apply to the grid made from mean and std, not to a given grid")
        if grid.shape != (channels, 3) or grid.dtype != torch.float32 or not grid.is_contiguous() or grid.device != v.device:
            raise InputError(
                f"pack_anchored: grid must be a contiguous float32 ({channels}, 3) table on {v.device} "
                f"(rows [step, 1/step, shift]), got {tuple(grid.shape)} {grid.dtype} on {grid.device}"
            )
    else:
        stats = []
        for name, t in (("mean", mean), ("std", std)):
            if not isinstance(t, torch.Tensor) or t.numel() != channels:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(f"pack_anchored: {name} must be a tensor of {channels} elements (channel_dim={channel_dim}), got {got}")
            stats.append(_flat_float32(t, v.device))
        if use_kernels:
            grid = kernels.anchored_table(*stats, bits, anchored, _jump_bounds(jumps))
        else:
            grid = torch.stack(anchored_grid(*stats, bits, anchored=anchored, jumps=jumps), 1)
    if use_kernels:
        codes, flags = kernels.anchored_pack(flat, bits, grid, channels, inner, stochastic)
    else:
        codes, flags = _anchored_pack_torch(flat, bits, grid, channels, inner, stochastic)
    return Packed(
        "anchored", bits, v.shape, v.dtype, codes, perm,
        grid=grid, flags=flags, group_size=FLAG_BLOCK, channel_dim=channel_dim,
    )  # fmt: skip


@_no_grad
def pack_mask(m: torch.Tensor, *, backend: str | None = None) -> Packed:
    """Store a bool tensor in one bit per element."""
    _check_backend(backend)
    if m.dtype != torch.bool:
        raise InputError(f"pack_mask: expected a bool tensor, got {m.dtype}; pass (tensor != 0) for a mask")
    return _pack_mask(m, backend)


@_no_grad
def pack_positive_mask(x: torch.Tensor, *, backend: str | None = None) -> Packed:
    """Store ``~(x <= 0)`` of a floating-point tensor (NaN counts as positive, as in ReLU's
    backward) in one bit per element; :func:`unpack` gives the bool mask. One pass over ``x``."""
    _check_backend(backend)
    _check_float(x, "pack_positive_mask")
    return _pack_mask(x, backend)


def _pack_mask(m: torch.Tensor, backend: str | None) -> Packed:
    """Bits of a bool tensor, or of ``~(m <= 0)`` for a floating-point one."""
    flat, perm = _flatten(m)
    kernels = _kernels_for(m, backend)
    if kernels is not None and flat.numel() > 0:
        codes = kernels.mask_pack(flat)
    else:
        bits = flat if flat.dtype == torch.bool else ~(flat <= 0)
        codes = _pack_bits(_pad(bits.to(torch.uint8), 8), 1)
    return Packed("mask", 1, m.shape, torch.bool, codes, perm)


@_no_grad
def unpack(
    p: Packed,
    *,
    activation: Activation | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Rebuild the tensor ``p`` was packed from: same shape, dtype and memory layout.

    Anchored layout: optionally an epilogue in the same pass, ``activation(v) * scale + shift`` computed
    in float32 on the rebuilt value ``v`` and rounded once to ``dtype`` (default ``p.dtype``). ``scale``
    and ``shift`` (together) hold one float per channel (C elements) or per sample and channel
    (``shape[0] * C`` elements, row-major). This is :func:`apply_epilogue` on the plain unpacked value
    in float32; the Triton kernel fuses the multiply-add as ``torch.addcmul`` does on FMA-capable CPUs.
    Activations without a Triton form (mish, tanh-approximated gelu) run in PyTorch after the kernel.
    Mask layout: ``dtype`` gives the mask as 0 and 1 in that dtype, in the same pass.
    """
    _check_backend(backend)
    numel = p.numel
    kernels = _kernels_for(p.codes, backend)
    epilogue = activation is not None or scale is not None or shift is not None
    if p.layout != "anchored" and (epilogue or (dtype is not None and p.layout != "mask")):
        raise InputError(
            f"unpack: activation/scale/shift need the anchored layout (per-channel grid), and dtype the anchored or "
            f"mask layout, not {p.layout!r}"
        )
    if p.layout == "group":
        if kernels is not None and numel > 0:
            flat = kernels.group_unpack(p.codes, p.scales, p.flags, p.bits, p.group_size, numel, p.dtype)
        else:
            flat = _group_unpack_torch(p, numel)
    elif p.layout == "anchored":
        return _anchored_unpack(p, kernels, activation, scale, shift, p.dtype if dtype is None else dtype)
    elif p.layout == "mask":  # as bool, or as 0/1 in ``dtype`` in the same pass
        if kernels is not None and numel > 0:
            flat = kernels.mask_unpack(p.codes, numel, dtype or torch.bool)
        else:
            flat = _unpack_bits(p.codes, 1, numel).to(dtype or torch.bool)
    else:
        raise InputError(f"unpack: unknown layout {p.layout!r}; expected 'group', 'anchored' or 'mask'")
    return _restore(flat, p.shape, p.perm)


def apply_epilogue(
    v: torch.Tensor,
    *,
    activation: Activation | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    channel_dim: int = 1,
    inplace: bool = False,
) -> torch.Tensor:
    """``activation(v) * scale + shift`` with :func:`unpack`'s per-channel or per-(sample, channel)
    float32 tables broadcast over ``v``; ``inplace`` lets it overwrite ``v`` (a fresh buffer)."""
    if activation is not None:
        out = activation(v, inplace=inplace)
        inplace, v = inplace or out is not v, out
    if scale is not None:
        view = _table_shape(v.shape, channel_dim, scale.numel())
        v = torch.addcmul(shift.reshape(view), v, scale.reshape(view), out=v if inplace else None)
    return v


@_no_grad
def channel_sums(
    p: Packed, grad: torch.Tensor, center: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of an anchored copy: ``(sum(grad), sum(grad * (v - center)))`` in float32, ``v``
    the rebuilt values, summed over every dimension but the channel one. ``grad`` has the copy's
    shape; ``center`` (C elements) is subtracted before the product so that a large channel mean
    does not cancel digits away.

    The reductions of a norm's backward (papers.md 1.5, step 7) read the K-bit codes directly: the
    Triton kernel never materialises ``v``; the PyTorch path rebuilds ``TORCH_CHUNK`` elements at a time.
    """
    flat_g, channels, inner = _grad_for(p, grad, "channel_sums", backend)
    center = _flat_float32(center, p.device)
    if center.numel() != channels:
        raise InputError(f"channel_sums: center must have {channels} elements (one per channel), got {center.numel()}")
    kernels = _kernels_for(p.codes, backend)
    if kernels is not None and p.numel > 0:
        partial = kernels.anchored_channel_sums(p.codes, p.flags, p.grid, p.bits, flat_g, center, channels, inner, p.numel)
        total = partial.sum(0)
        return total[0], total[1]
    return _channel_sums_torch(p, flat_g, center, channels, inner)


def _channel_sums_torch(p: Packed, flat_g: torch.Tensor, center: torch.Tensor, channels: int, inner: int):
    sum_g = flat_g.new_zeros(channels, dtype=torch.float32)
    sum_gv = flat_g.new_zeros(channels, dtype=torch.float32)
    rows = flat_g.view(-1, channels, inner)
    for chunk, v in _anchored_row_chunks(p, channels, inner):
        g = rows[chunk].float()
        sum_g += g.sum((0, 2))
        sum_gv += torch.einsum("rci,rci->c", g, v.sub_(center.view(1, channels, 1)))
    return sum_g, sum_gv


@_no_grad
def fused_norm_grad(
    p: Packed,
    grad: torch.Tensor,
    *,
    scale: torch.Tensor,
    shift: torch.Tensor,
    grad_scale: torch.Tensor,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``v * scale + shift + grad_scale * grad`` with per-channel float32 tables (C elements each),
    ``v`` rebuilt from the anchored copy ``p`` in the same pass; rounded once to ``dtype`` (default
    ``grad.dtype``), in the copy's shape and memory layout.

    With tables from :func:`batch_norm_grad_tables` this is a BatchNorm's input gradient (papers.md
    1.5, step 7) without a full-size rebuild of its input.
    """
    flat_g, channels, inner = _grad_for(p, grad, "fused_norm_grad", backend)
    tables = [_flat_float32(t, p.device) for t in (scale, shift, grad_scale)]
    if any(t.numel() != channels for t in tables):
        raise InputError(f"fused_norm_grad: scale, shift and grad_scale must have {channels} elements (one per channel)")
    return _fused_norm_grad(p, flat_g, tables, channels, inner, grad.dtype if dtype is None else dtype, backend)


def _fused_norm_grad(p: Packed, flat_g, tables, channels: int, inner: int, dtype: torch.dtype, backend) -> torch.Tensor:
    """:func:`fused_norm_grad` on checked inputs: ``flat_g`` in ``p``'s memory order, ``tables`` flat
    float32 [scale, shift, grad_scale]."""
    kernels = _kernels_for(p.codes, backend)
    if kernels is not None and p.numel > 0:
        out = kernels.anchored_unpack(
            p.codes, p.flags, p.grid, p.bits, channels, inner, p.numel, dtype,
            tables=tables[:2], addend=(flat_g, tables[2]),
        )  # fmt: skip
        return _restore(out, p.shape, p.perm)
    out = flat_g.new_empty(p.numel, dtype=dtype)
    rows, out_rows = flat_g.view(-1, channels, inner), out.view(-1, channels, inner)
    scale, shift, grad_scale = (t.view(1, channels, 1) for t in tables)
    for chunk, v in _anchored_row_chunks(p, channels, inner):
        v = torch.addcmul(shift, v, scale, out=v)
        out_rows[chunk] = v.addcmul_(rows[chunk].float(), grad_scale)
    return _restore(out, p.shape, p.perm)


# ----------------------------------------------------------------------------- normalized layers

TINY_GAMMA = 1e-12  # |gamma| at most this: the norm's input cannot be rebuilt from its output (its mean instead)
# Rows of layer_tables' floats; grad_scale is h_scale, so rows 2 and 5 map the norm's input to its output.
LAYER_TABLE_ROWS = ("scale", "shift", "grad_scale", "a", "center", "h_shift")
NORM_GRAD_ROWS = ("grad_weight", "grad_bias", "scale", "shift")  # rows of batch_norm_grad_tables
GROUP_NORM_GRAD_ROWS = ("grad_weight", "grad_bias", "grad_mu", "grad_inv")  # rows of group_norm_backward


class LayerMaps(NamedTuple):
    """The affine maps of one Conv -> Norm -> Act layer (BLPA, papers.md 1.4-1.5), per channel or
    per sample and channel: the norm's output ``h = x * h_scale + h_shift``; the role that is not
    stored follows from the stored one as ``stored * scale + shift``; the normalized input is
    ``x_hat = (stored - center) * a``; ``grid_mean``/``grid_std`` are the stored tensor's statistics
    as the norm imposes them (BatchNorm), which set its anchored grid."""

    scale: torch.Tensor
    shift: torch.Tensor
    h_scale: torch.Tensor
    h_shift: torch.Tensor
    a: torch.Tensor
    center: torch.Tensor
    grid_mean: torch.Tensor
    grid_std: torch.Tensor


def layer_maps(
    mean: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *, store_output: bool
) -> LayerMaps:
    """:class:`LayerMaps` from the norm's statistics and affine parameters (float32 tensors that
    broadcast together). ``store_output``: the pre-activation ``h`` is stored (an activation follows),
    else the norm input ``x``; where ``gamma`` is at most :data:`TINY_GAMMA` in magnitude, ``x`` is
    rebuilt as its mean."""
    h_scale = gamma * rstd
    h_shift = beta - mean * h_scale
    if store_output:  # x = (h - beta) / gamma / rstd + mean
        inv_gamma = torch.where(gamma.abs() > TINY_GAMMA, 1.0 / gamma, torch.zeros_like(gamma))
        scale = inv_gamma / rstd
        return LayerMaps(scale, mean - beta * scale, h_scale, h_shift, inv_gamma, beta, beta, gamma.abs())
    return LayerMaps(h_scale, h_shift, h_scale, h_shift, rstd, mean, mean, 1.0 / rstd)


@_no_grad
def layer_tables(
    mean: torch.Tensor,
    rstd: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    *,
    bits: int | None,
    store_output: bool,
    channels: int | None = None,
    jumps: Sequence[float] = (),
    backend: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A normalized layer's tables, in one launch on CUDA: ``(grid, floats)``.

    ``mean``/``rstd`` are the norm's batch statistics: C elements (BatchNorm), or (N, G) per sample
    and group (GroupNorm, with ``channels`` = C a multiple of G; channel c is in group c // (C / G)).
    ``gamma``/``beta`` are its affine parameters (None: 1 and 0), C elements each. ``floats`` is a
    (6, E) float32 table of the :func:`layer_maps` rows named by :data:`LAYER_TABLE_ROWS`, with an
    entry per channel (E = C) or per sample and channel (E = N * C, sample-major). ``grid`` is the
    stored tensor's grid for ``bits`` (as :func:`pack_anchored` takes it), per channel only: None when
    ``bits`` is None. It is zero-anchored where the stored tensor is the output (``store_output``),
    centred on the mean where it is the norm's input (:func:`anchored_grid`). ``jumps``: the
    activation's (:attr:`Activation.jumps`), for a stored output.
    """
    _check_backend(backend)
    if bits is not None:
        _check_bits(bits)
    per_sample = mean.dim() == 2
    if per_sample:
        samples, groups = mean.shape
        if channels is None or groups == 0 or channels % groups:
            raise InputError(f"layer_tables: (N, G) statistics need channels, a multiple of G={groups}; got {channels}")
        if bits is not None:
            raise InputError("layer_tables: the anchored grid is per channel; per-sample statistics take bits=None")
    else:
        samples, channels = 1, mean.numel()
    if rstd.shape != mean.shape:
        raise InputError(f"layer_tables: rstd must have the shape {tuple(mean.shape)} of mean, got {tuple(rstd.shape)}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t is not None and t.numel() != channels:
            raise InputError(f"layer_tables: {name} must have {channels} elements (one per channel), got {t.numel()}")
    kernels = _kernels_for(mean, backend)
    if kernels is not None and mean.numel() > 0:
        tensors = [None if t is None else _dense(t, mean.device) for t in (mean, rstd, gamma, beta)]
        return kernels.layer_tables(*tensors, bits, store_output, channels, samples, _jump_bounds(jumps))
    device = mean.device
    gamma = torch.ones(channels, device=device) if gamma is None else _flat_float32(gamma, device)
    beta = torch.zeros(channels, device=device) if beta is None else _flat_float32(beta, device)
    mean, rstd = _flat_float32(mean, device), _flat_float32(rstd, device)
    if per_sample:  # one entry per (sample, channel): each channel takes its group's statistics
        per_group = channels // groups
        mean, rstd = (t.repeat_interleave(per_group) for t in (mean, rstd))
        gamma, beta = gamma.repeat(samples), beta.repeat(samples)
    maps = layer_maps(mean, rstd, gamma, beta, store_output=store_output)
    if bits is None:
        grid = None
    else:
        grid = torch.stack(anchored_grid(maps.grid_mean, maps.grid_std, bits, anchored=store_output, jumps=jumps), 1)
    return grid, torch.stack([maps.scale, maps.shift, maps.h_scale, maps.a, maps.center, maps.h_shift])


@_no_grad
def batch_norm_grad_tables(
    stored: Packed | torch.Tensor, grad: torch.Tensor, floats: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """A BatchNorm's backward reductions from its layer's stored tensor, as a (4, C) float32 table with
    the rows named by :data:`NORM_GRAD_ROWS`: the gradients of weight and bias, and the per-channel
    ``scale``/``shift`` for which :func:`fused_norm_grad` gives the input gradient.

    ``stored`` is the anchored copy (or, with quantization off, the exact tensor: channels on
    dimension 1), ``floats`` the (3, C) rows ``grad_scale, a, center`` of :func:`layer_tables`: with
    ``x_hat = (v - center) * a`` the input gradient is
    ``grad_scale * (grad - mean(grad) - x_hat * mean(grad * x_hat))``, rearranged as
    ``v * scale + shift + grad_scale * grad`` so that one pass over the copy computes it. On CUDA,
    the channel sums and these tables take one launch.
    """
    grad, channels, inner = _norm_grad_layout(stored, grad, "batch_norm_grad_tables", backend)
    return _norm_grad_tables(stored, grad, _norm_floats(floats, channels, grad.device), channels, inner, backend)


@_no_grad
def batch_norm_backward(
    stored: Packed | torch.Tensor,
    grad: torch.Tensor,
    floats: torch.Tensor,
    *,
    need_input_grad: bool = True,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """A BatchNorm's whole backward from its layer's stored tensor: ``(input grad or None, weight
    grad, bias grad)``, the parameter gradients float32 and the input gradient in ``dtype`` (default
    ``grad.dtype``). :func:`batch_norm_grad_tables`, then :func:`fused_norm_grad` (or its exact-tensor
    form), with the inputs checked and laid out once: two passes over the copy, as the runtime runs
    every compressed BatchNorm layer's backward."""
    grad_in, channels, inner = _norm_grad_layout(stored, grad, "batch_norm_backward", backend)
    floats = _norm_floats(floats, channels, grad.device)
    grad_weight, grad_bias, scale, shift = _norm_grad_tables(stored, grad_in, floats, channels, inner, backend).unbind()
    if not need_input_grad:
        return None, grad_weight, grad_bias
    dtype = grad.dtype if dtype is None else dtype
    if isinstance(stored, Packed):
        return _fused_norm_grad(stored, grad_in, [scale, shift, floats[0]], channels, inner, dtype, backend), grad_weight, grad_bias
    g32 = grad.float()
    view = _table_shape(g32.shape, 1, channels)
    grad_x = stored.float() * scale.view(view) + shift.view(view) + g32 * floats[0].view(view)
    return grad_x.to(dtype), grad_weight, grad_bias


@_no_grad
def group_norm_backward(
    stored: Packed | torch.Tensor,
    grad: torch.Tensor,
    floats: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    groups: int,
    activation: Activation | None = None,
    output_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    need_input_grad: bool = True,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A GroupNorm layer's whole backward from its stored tensor, which is not rebuilt: ``(input grad
    or None, (4, C) float32 rows)`` for ``out = (act(GroupNorm(x) * weight + bias) - mu) * inv``, the
    rows named by :data:`GROUP_NORM_GRAD_ROWS`: the gradients of ``weight``, ``bias``, ``mu``, ``inv``.

    ``stored`` is the layer's anchored copy (channels on dimension 1, samples outermost in memory)
    or, with quantization off, the exact tensor: the pre-activation ``h = GroupNorm(x) * weight +
    bias`` or the input ``x``, as :func:`layer_tables` (per-sample statistics) says. ``floats`` are
    its rows ``grad_scale, a, center``, (3, N * C): ``x_hat = (v - center) * a``. ``activation`` is
    applied before the output map ``output_map`` = ``(mu, inv)`` (C elements each; Proxy Norm's
    statistics; None: 0 and 1); it needs ``h`` stored. ``weight``/``bias``: C elements or None (1, 0).

    With ``gh = act'(h) * grad`` the input gradient is GroupNorm's ``rstd * (W gh - mean(W gh) -
    x_hat * mean(W gh x_hat))``, ``W = weight * inv``, means over each (sample, group): per (sample,
    channel) ``coef * gh + scale * v + shift``. Two passes over the copy, as a BatchNorm's
    :func:`batch_norm_backward`: per-(sample, channel) sums, then the input gradient; on CUDA three
    launches (sums, tables, gradient).
    """
    act = activation or Activation("none")
    grad_in, samples, channels, inner = _group_norm_layout(stored, grad, backend)
    if groups <= 0 or channels % groups:
        raise InputError(f"group_norm_backward: groups={groups} must divide the {channels} channels")
    device = grad.device
    if floats.shape != (3, samples * channels):
        raise InputError(
            f"group_norm_backward: floats must be a (3, {samples * channels}) table (grad_scale, a, center per sample "
            f"and channel), got {tuple(floats.shape)}"
        )
    floats = _dense(floats, device, torch.float32)
    mu, inv = output_map if output_map is not None else (None, None)
    params = [_group_norm_param(t, channels, name, device) for t, name in ((weight, "weight"), (bias, "bias"), (mu, "mu"), (inv, "inv"))]
    numel = grad.numel()
    count = max(numel // max(samples * groups, 1), 1)  # elements per (sample, group)
    dtype = grad.dtype if dtype is None else dtype
    kernels = _kernels_for(stored.codes, backend) if isinstance(stored, Packed) else None
    code = kernels.activation_code(act) if kernels is not None else None
    if code is not None and numel > 0:
        s = stored
        sums = kernels.group_norm_sums(
            s.codes, s.flags, s.grid, s.bits, grad_in, floats[2], channels, inner, numel, samples, code,
            act.negative_slope, act.homogeneous,
        )  # fmt: skip
        tables, rows = kernels.group_norm_tables(sums, floats, *params, groups, count, act.homogeneous)
        if not need_input_grad:
            return None, rows
        coef, scale, shift = tables
        out = kernels.anchored_unpack(
            s.codes, s.flags, s.grid, s.bits, channels, inner, numel, dtype, tables=(scale, shift), batch=samples,
            batch_inner=numel // samples, addend=(grad_in, coef), grad_activation=code, negative_slope=act.negative_slope,
        )  # fmt: skip
        return _restore(out, s.shape, s.perm), rows
    chunks = _group_norm_chunks(stored, grad_in, samples, channels, inner)
    center = floats[2].view(samples, channels, 1)
    sums = grad.new_zeros(samples, 4, channels, dtype=torch.float32)
    for _, sample, v, g in chunks():
        gh = act.backward(g, v)
        part = [gh.sum(2), (gh * (v - center[sample])).sum(2)]
        # An identity's gh is g itself: its sum serves twice, bit for bit (PN's beta gradient cancels exactly).
        part += [part[0] if gh is g else g.sum(2), torch.zeros_like(part[0]) if act.homogeneous else (g * act(v)).sum(2)]
        sums.index_add_(0, sample, torch.stack(part, 1))
    defaults = [torch.full((channels,), value, device=device) if t is None else t for t, value in zip(params, (1.0, 0.0, 0.0, 1.0))]
    tables, rows = _group_norm_tables_torch(sums, floats, *defaults, groups, count, act.homogeneous)
    if not need_input_grad:
        return None, rows
    coef, scale, shift = (t.view(samples, channels, 1) for t in tables)
    out = grad.new_empty(numel, dtype=dtype)
    out_rows = out.view(-1, channels, inner)
    for rows_in, sample, v, g in chunks():
        # Out of place first: an identity's backward returns g itself, which may be the caller's grad.
        out_rows[rows_in] = torch.mul(act.backward(g, v), coef[sample]).addcmul_(v, scale[sample]).add_(shift[sample])
    if isinstance(stored, Packed):
        return _restore(out, stored.shape, stored.perm), rows
    return out.view(stored.shape), rows



def group_norm_reads(stored: Packed | torch.Tensor) -> bool:
    """Whether :func:`group_norm_backward` reads ``stored``: an anchored copy with channels on
    dimension 1 and samples outermost in memory (an NCHW or channels_last tensor's), or an exact
    (N, C, *) tensor."""
    if isinstance(stored, Packed):
        return stored.layout == "anchored" and stored.channel_dim == 1 and stored.perm[0] == 0
    return stored.dim() >= 2


def _group_norm_layout(stored: Packed | torch.Tensor, grad: torch.Tensor, backend: str | None):
    """(grad as the passes read it, samples, channels, inner) (:func:`_norm_grad_layout`): flat in the
    copy's memory order, whose (rows, channels, inner) view has a whole number of rows per sample;
    an exact tensor as (N, C, positions)."""
    if not group_norm_reads(stored):
        raise InputError(
            "group_norm_backward: the stored tensor must be an anchored copy with channels on dimension 1 and "
            "samples outermost in memory, or an (N, C, *) tensor"
        )
    flat, channels, inner = _norm_grad_layout(stored, grad, "group_norm_backward", backend)
    if not isinstance(stored, Packed):
        inner = math.prod(stored.shape[2:])
    return flat, stored.shape[0], channels, inner


def _group_norm_chunks(stored: Packed | torch.Tensor, grad: torch.Tensor, samples: int, channels: int, inner: int):
    """A function yielding, on each call, ``(rows, sample, v, g)`` over the copy's memory order seen
    as (rows, channels, inner): a slice of the rows, the sample of each of its rows, and float32
    (rows, channels, inner) chunks of the stored values and of the gradient. An exact tensor is one
    chunk of (N, C, positions)."""
    if not isinstance(stored, Packed):

        def whole():
            v, g = (t.float().reshape(samples, channels, inner) for t in (stored, grad))
            yield slice(0, samples), torch.arange(samples, device=grad.device), v, g

        return whole
    per_sample = stored.numel // max(samples * channels * inner, 1)
    g_rows = grad.view(-1, channels, inner)

    def chunked():
        for rows, v in _anchored_row_chunks(stored, channels, inner):
            yield rows, torch.arange(rows.start, rows.stop, device=grad.device) // per_sample, v, g_rows[rows].float()

    return chunked


def _group_norm_param(t: torch.Tensor | None, channels: int, name: str, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if t.numel() != channels:
        raise InputError(f"group_norm_backward: {name} must have {channels} elements (one per channel), got {t.numel()}")
    return _flat_float32(t, device)


def _group_norm_tables_torch(sums, floats, weight, bias, mu, inv, groups: int, count: int, homogeneous: bool):
    """From the (N, 4, C) per-(sample, channel) sums of ``gh``, ``gh * (v - center)``, ``grad`` and
    ``grad * act(h)``: the (3, N * C) tables ``coef, scale, shift`` of the input gradient and the
    (4, C) parameter rows (:func:`group_norm_backward`). With ``grad_scale = rstd * weight`` the
    group means carry their rstd factor already."""
    sum_gh, sum_ghv, sum_g, sum_gz = sums.unbind(1)
    samples, channels = sum_gh.shape
    grad_scale, a, center = floats.view(3, samples, channels).unbind(0)
    coef = grad_scale * inv
    per_group = (samples, groups, channels // groups)
    p = (coef * sum_gh).view(per_group).sum(2, keepdim=True) / count  # rstd * mean(W gh)
    q = (coef * a * sum_ghv).view(per_group).sum(2, keepdim=True) / count  # rstd * mean(W gh x_hat)
    qa = (q * a.view(per_group)).view(samples, channels)
    shift = (qa * center).view(per_group) - p
    grad_weight_raw = (a * sum_ghv).sum(0)  # sum(gh * x_hat)
    total_gh, total_g = sum_gh.sum(0), sum_g.sum(0)
    # act(h) = h * act'(h) for homogeneous activations: sum(grad * act(h)) needs no pass of its own.
    total_gz = weight * grad_weight_raw + bias * total_gh if homogeneous else sum_gz.sum(0)
    rows = torch.stack([inv * grad_weight_raw, inv * total_gh, -inv * total_g, total_gz - mu * total_g])
    return torch.stack([coef, -qa, shift.view(samples, channels)]).view(3, -1), rows


def _norm_grad_layout(stored: Packed | torch.Tensor, grad: torch.Tensor, where: str, backend: str | None):
    """(grad as the reductions read it, channels, inner): flat in the copy's memory order for a
    Packed copy (:func:`_grad_for`), as it is for an exact tensor (channels on dimension 1)."""
    if isinstance(stored, Packed):
        return _grad_for(stored, grad, where, backend)
    _check_backend(backend)
    if grad.shape != stored.shape:
        raise InputError(f"{where}: grad must have the shape {tuple(stored.shape)}, got {tuple(grad.shape)}")
    return grad, stored.shape[1], 0


def _norm_floats(floats: torch.Tensor, channels: int, device: torch.device) -> torch.Tensor:
    if floats.shape != (3, channels):
        raise InputError(f"BatchNorm backward: floats must be a (3, {channels}) table (grad_scale, a, center), got {tuple(floats.shape)}")
    return _dense(floats, device, torch.float32)


def _norm_grad_tables(stored: Packed | torch.Tensor, grad, floats, channels: int, inner: int, backend) -> torch.Tensor:
    """:func:`batch_norm_grad_tables` on inputs laid out by :func:`_norm_grad_layout` and checked."""
    numel = stored.numel if isinstance(stored, Packed) else stored.numel()
    neg_inv_count = -channels / numel if numel else 0.0
    if isinstance(stored, Packed):
        kernels = _kernels_for(stored.codes, backend)
        if kernels is not None and numel > 0:
            s = stored
            return kernels.batch_norm_grad_tables(s.codes, s.flags, s.grid, s.bits, grad, floats, neg_inv_count, channels, inner, numel)
        sum_g, sum_gv = _channel_sums_torch(stored, grad, floats[2], channels, inner)
    else:
        dims = [0, *range(2, grad.dim())]
        g32 = grad.float()
        view = _table_shape(g32.shape, 1, channels)
        sum_g, sum_gv = g32.sum(dims), (g32 * (stored.float() - floats[2].view(view))).sum(dims)
    grad_scale, a, center = floats
    sum_gx = sum_gv * a
    b = -center * a  # x_hat = v * a + b
    scale = grad_scale * a * sum_gx * neg_inv_count
    shift = grad_scale * (sum_g + b * sum_gx) * neg_inv_count
    return torch.stack([sum_gx, sum_g, scale, shift])


def _grad_for(p: Packed, grad: torch.Tensor, where: str, backend: str | None) -> tuple[torch.Tensor, int, int]:
    """``grad`` as a flat tensor in ``p``'s memory order (copied only if laid out otherwise), and the
    copy's (channels, inner) decomposition of that order."""
    _check_backend(backend)
    if p.layout != "anchored":
        raise InputError(f"{where}: needs the anchored layout (per-channel grid), not {p.layout!r}")
    if not isinstance(grad, torch.Tensor) or grad.shape != p.shape or not grad.is_floating_point():
        got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise InputError(f"{where}: grad must be a floating-point tensor of shape {tuple(p.shape)}, got {got}")
    if _is_identity(p.perm) and grad.is_contiguous():  # the common case: one view, no permute
        flat = grad.view(-1)
    else:
        ordered = grad.permute(p.perm)
        flat = ordered.reshape(-1) if ordered.is_contiguous() else ordered.contiguous().view(-1)
    return flat, p.shape[p.channel_dim], _inner(p.shape, p.perm, p.channel_dim)


def triton_available() -> bool:
    """Whether the Triton kernels import here (CUDA tensors then use them)."""
    return _kernels() is not None


# ----------------------------------------------------------------------------- dispatch

_KERNELS: list[ModuleType | None] = []  # memo of the guarded import


def _kernels() -> ModuleType | None:
    if not _KERNELS:
        try:
            from graphpass import triton_kernels
        except Exception as e:  # a broken triton must not break CPU users
            _log.info("Triton kernels unavailable, using the PyTorch path: %s", e)
            triton_kernels = None
        _KERNELS.append(triton_kernels)
    return _KERNELS[0]


try:
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # very old torch: no fake tensors to tell apart

    def _is_fake(t: torch.Tensor) -> bool:
        return False


# Devices whose tensors take the Triton kernels by default. examples/host_cost.py and a launch test
# add "cpu" to run the CUDA path's host work on CPU tensors.
KERNEL_DEVICES = ("cuda",)


def _kernels_for(t: torch.Tensor, backend: str | None) -> ModuleType | None:
    if backend == "torch":
        return None
    if backend == "triton":
        kernels = _kernels()
        if kernels is None:
            raise UnsupportedError("backend='triton' was requested but triton cannot be imported here")
        return kernels
    if t.device.type not in KERNEL_DEVICES:
        return None
    # A plain tensor cannot be fake; asking costs more than the kernel launch it decides on.
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and _is_fake(t):
        return None
    return _kernels()


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise InputError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")


def _check_float(x: torch.Tensor, where: str) -> None:
    if not x.is_floating_point():
        raise InputError(f"{where}: expected a floating-point tensor, got {x.dtype}; integer tensors are stored exactly, bool ones with pack_mask")


def _check_backend(backend: str | None) -> None:
    if backend not in _BACKENDS:
        raise InputError(f"backend={backend!r} is not one of {_BACKENDS}")


def _check_tables(p: Packed, scale: torch.Tensor | None, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``scale``/``shift`` as flat contiguous float32 tables on the codes' device, or None."""
    if scale is None and shift is None:
        return None
    channels = p.shape[p.channel_dim]
    sizes = (channels, p.shape[0] * channels) if p.channel_dim != 0 else (channels,)
    tensors = isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor)
    if not tensors or scale.numel() not in sizes or shift.numel() != scale.numel():
        got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (scale, shift)]
        raise InputError(
            f"unpack: scale and shift must both be tensors of {' or '.join(map(str, sizes))} elements (per channel, "
            f"or per sample and channel); got {got[0]} and {got[1]}"
        )
    return _flat_float32(scale, p.device), _flat_float32(shift, p.device)


def _dense(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` contiguous on ``device`` (in ``dtype``): itself when it already is (per-layer tables are
    passed on every call, and each op skipped saves host time)."""
    if t.device == device and t.is_contiguous() and (dtype is None or t.dtype == dtype):
        return t
    return t.detach().to(device=device, dtype=dtype or t.dtype).contiguous()


def _flat_float32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = _dense(t, device, torch.float32)
    return t if t.dim() == 1 else t.reshape(-1)


def _table_shape(shape: torch.Size, channel_dim: int, size: int) -> list[int]:
    """Broadcast shape of a per-channel (C) or per-(sample, channel) (N * C) table over ``shape``."""
    view = [1] * len(shape)
    view[channel_dim] = shape[channel_dim]
    if size != shape[channel_dim]:
        view[0] = shape[0]
    return view


@functools.lru_cache(maxsize=4096)  # asked for every pack and unpack, of a few shapes
def _inner(shape: torch.Size, perm: tuple[int, ...], dim: int) -> int:
    """Elements between consecutive indices of ``dim`` in memory order."""
    return math.prod(shape[d] for d in perm[perm.index(dim) + 1 :])


def _anchored_unpack(p, kernels, activation, scale, shift, dtype) -> torch.Tensor:
    if not dtype.is_floating_point:
        raise InputError(f"unpack: dtype must be a floating-point dtype, got {dtype}")
    tables = _check_tables(p, scale, shift)
    numel, channels = p.numel, p.shape[p.channel_dim]
    inner = _inner(p.shape, p.perm, p.channel_dim)
    fused = kernels.activation_code(activation) if kernels is not None and numel > 0 else None
    if fused is not None:
        slope = activation.negative_slope if activation is not None else 0.0
        batch_inner = _inner(p.shape, p.perm, 0)
        flat = kernels.anchored_unpack(
            p.codes, p.flags, p.grid, p.bits, channels, inner, numel, dtype,
            activation=fused, negative_slope=slope, tables=tables, batch=p.shape[0], batch_inner=batch_inner,
        )  # fmt: skip
        return _restore(flat, p.shape, p.perm)
    if kernels is not None and numel > 0:
        flat = kernels.anchored_unpack(p.codes, p.flags, p.grid, p.bits, channels, inner, numel, torch.float32)
    else:
        flat = _anchored_unpack_torch(p, numel, channels, inner)
    v = _restore(flat, p.shape, p.perm)
    scale, shift = tables if tables is not None else (None, None)
    v = apply_epilogue(v, activation=activation, scale=scale, shift=shift, channel_dim=p.channel_dim, inplace=True)
    return v.to(dtype)


# ----------------------------------------------------------------------------- layout helpers


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A 1-D view of ``x`` in memory order and the permutation giving that order.

    Copies only when ``x`` is not dense (a slice, an expanded tensor)."""
    identity = tuple(range(x.dim()))
    if x.is_contiguous():
        return x.reshape(-1), identity
    perm = tuple(sorted(identity, key=lambda d: (-x.stride(d), d)))
    permuted = x.permute(perm)
    if permuted.is_contiguous():
        return permuted.reshape(-1), perm
    return x.contiguous().reshape(-1), identity


@functools.lru_cache(maxsize=256)
def _is_identity(perm: tuple[int, ...]) -> bool:
    return perm == tuple(range(len(perm)))


def _restore(flat: torch.Tensor, shape: torch.Size, perm: tuple[int, ...]) -> torch.Tensor:
    if _is_identity(perm):  # contiguous: a view, no permute
        # Sizes as separate ints: view parses a torch.Size about 2 us slower.
        return flat.view(*shape) if shape else flat.view(shape)
    inverse = [0] * len(perm)
    for i, d in enumerate(perm):
        inverse[d] = i
    return flat.view([shape[d] for d in perm]).permute(inverse)


def _pad(t: torch.Tensor, multiple: int, value: float = 0) -> torch.Tensor:
    extra = -t.numel() % multiple
    return torch.nn.functional.pad(t, (0, extra), value=value) if extra else t


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (length a multiple of 8 // bits) -> bytes, the first code in the low bits."""
    per = 8 // bits
    rows = codes.view(-1, per)
    out = rows[:, 0].clone()
    for j in range(1, per):
        out |= rows[:, j] << (j * bits)
    return out


def _unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(1) >> shifts).bitwise_and_((1 << bits) - 1).view(-1)[:numel]


def _special_codes(x: torch.Tensor, code: torch.Tensor, top: torch.Tensor | int) -> torch.Tensor:
    """Group layout: codes top+1, top+2, top+3 mean NaN, +Inf, -Inf (only in flagged groups)."""
    code = torch.where(x != x, top + 1, code)
    code = torch.where(x == math.inf, top + 2, code)
    return torch.where(x == -math.inf, top + 3, code)


def _decode_specials(value: torch.Tensor, code: torch.Tensor, top: torch.Tensor | int) -> torch.Tensor:
    special = torch.where(code == top + 1, math.nan, torch.where(code == top + 2, math.inf, -math.inf))
    return torch.where(code > top, special, value)


def _top_code(flagged: torch.Tensor, bits: int) -> torch.Tensor:
    """Group layout: highest code for finite values, 2**bits - 1, or 2**bits - 4 where NaN/Inf take the
    top three."""
    n = 1 << bits
    return torch.where(flagged, n - 4, n - 1)


def _may_have_specials(flags: torch.Tensor) -> bool:
    """False only when ``flags`` (per group or block) are known to be all clear: on a real CPU tensor,
    where asking costs no device sync. The PyTorch path then skips its NaN/Inf steps, which change
    nothing without flags; fake and meta tensors keep the branch-free path."""
    if flags.device.type != "cpu" or _is_fake(flags):
        return True
    return bool(flags.any())


def _per_element(per_block: torch.Tensor, numel: int) -> torch.Tensor:
    """Spread one value per FLAG_BLOCK over the elements."""
    blocks = per_block.numel()
    return per_block[:, None].expand(blocks, FLAG_BLOCK).reshape(-1)[:numel]


def _level_reciprocals(bits: int) -> tuple[float, float]:
    """1 / (levels - 1) for plain and flagged groups (0 where a flagged group has one level)."""
    n = 1 << bits
    return 1.0 / (n - 1), (1.0 / (n - 4) if n > 4 else 0.0)


def anchored_grid(
    mean: torch.Tensor, std: torch.Tensor, bits: int, *, anchored: bool = True, jumps: Sequence[float] = ()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (step, 1/step, shift) of the grid, all float32 (what Packed.grid holds).

    The window is ``mean +- w std`` in steps of ``2 w std / 2**bits``, w = ``WINDOW_STDS[bits]``
    (BLPA's 3 at 4 and 2 bits, 4.5 at 8). ``anchored``: 0 is a bin boundary with a bin on each
    side (shift clamped to [1, 2**bits - 1]), so the sign is exact.
    Where the window lies beyond zero's reach (``|mean| > ~w std``), the step grows until the
    ``2**bits - 1`` bins on the mean's side of zero reach the window's far edge: coarser, but not
    clipped (BLPA's own grid clips that tail, papers.md 1.4). ``jumps``: the points (one magnitude,
    either sign; :attr:`Activation.jumps`) where the stored tensor's activation derivative jumps.
    A jump within 5 std of the mean becomes a bin boundary inside the window, so every value is
    rebuilt on its side of the jump (up to float rounding at the jump), where two bins fit between
    0 and the jump.
    Not ``anchored``: the grid is centred on the mean (for a tensor whose sign nothing reads).
    A zero or non-finite std (constant channel) falls back to a step that still represents the
    mean. The Triton table kernels compute the same float32 expressions."""
    n = 1 << bits
    half = WINDOW_STDS[bits]
    lo, hi = mean - half * std, mean + half * std
    # The shift's bounds. Centred: float32's exact integers, which also keep an infinite mean's shift finite.
    low, high = (1.0, n - 1.0) if anchored else (-_EXACT_INTEGERS, _EXACT_INTEGERS)
    if anchored:
        step = _anchored_step(lo, hi, n)
        jump_low, jump_high = _jump_bounds(jumps)
        if jump_low or jump_high:
            # Each jump within 5 std of the mean, and a step beyond it, join the window; the step
            # becomes the coarsest that divides the jump, and the shift keeps a bin beyond each jump.
            # Only where at least two bins fit between 0 and the jump: at 2 bits, ReLU-like bins at
            # +-jump cost more than they keep.
            near = torch.zeros_like(mean, dtype=torch.bool)
            wide_lo, wide_hi = lo, hi
            for jump in (j for j in (jump_low, jump_high) if j):
                near = near | ((jump - mean).abs() < 5.0 * std)
                wide_lo = torch.where(jump - step < wide_lo, jump - step, wide_lo)
                wide_hi = torch.where(jump + step > wide_hi, jump + step, wide_hi)
            magnitude = torch.full_like(step, max(-jump_low, jump_high))  # `float / tensor` would multiply by a reciprocal
            bins = torch.floor(magnitude / _anchored_step(wide_lo, wide_hi, n))
            kept = near & (bins >= 2.0)
            lo, hi = torch.where(kept, wide_lo, lo), torch.where(kept, wide_hi, hi)
            step = torch.where(kept, magnitude / bins, step)
            if jump_low:
                low = torch.where(kept, bins + 1.0, low)
            if jump_high:
                high = torch.where(kept, (n - 1.0) - bins, high)
    else:
        step = std * (2.0 * half / n)
    alt = mean.abs() * (2.0 / n)
    alt = torch.where((alt > TINY_STEP) & (alt < math.inf), alt, TINY_STEP)
    step = torch.where((step > TINY_STEP) & (step < math.inf), step, alt)
    inv = 1.0 / step
    q = torch.floor((lo + hi) * 0.5 * inv)
    q = torch.where(q == q, q, 0.0)
    shift = (n // 2) - q
    shift = torch.where(shift < low, low, shift)
    return step, inv, torch.where(shift > high, high, shift)


def _jump_bounds(jumps: Sequence[float]) -> tuple[float, float]:
    """``jumps`` as the Triton grid's (JUMP_LOW, JUMP_HIGH) constants, 0.0 where absent."""
    jumps = tuple(float(j) for j in jumps)
    if 0.0 in jumps or len(jumps) > 2 or len({abs(j) for j in jumps}) > 1 or sorted(jumps) != list(jumps):
        raise InputError(f"jumps must be at most two nonzero points of one magnitude, in order; got {jumps}")
    return (min(min(jumps), 0.0), max(max(jumps), 0.0)) if jumps else (0.0, 0.0)


def _anchored_step(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """The step of an anchored grid covering [lo, hi]: n bins across it, and the n - 1 bins on one
    side of zero reaching its far end."""
    wide = torch.where(hi.abs() > lo.abs(), hi.abs(), lo.abs()) * (1.0 / (n - 1))
    step = (hi - lo) * (1.0 / n)
    return torch.where(wide > step, wide, step)


# ----------------------------------------------------------------------------- PyTorch path


def _group_pack_torch(flat: torch.Tensor, bits: int, group_size: int, num_groups: int, stochastic: bool):
    numel = flat.numel()
    x = flat.to(torch.float32)
    if numel and numel % group_size:
        # Repeat the last element: it leaves min/max and the NaN flag of the last group unchanged.
        x = torch.cat([x, x[-1:].expand(num_groups * group_size - numel)])
    x = x.view(num_groups, group_size)
    finite = torch.isfinite(x)
    lo = torch.where(finite, x, math.inf).amin(1) if numel else x.new_zeros(0)
    hi = torch.where(finite, x, -math.inf).amax(1) if numel else x.new_zeros(0)
    flagged = ~finite.all(1)
    none_finite = lo > hi
    lo = torch.where(none_finite, 0.0, lo)
    hi = torch.where(none_finite, 0.0, hi)
    top = _top_code(flagged, bits)
    rcp_plain, rcp_flagged = _level_reciprocals(bits)
    rcp = torch.where(flagged, rcp_flagged, rcp_plain)
    # (hi - lo) * rcp rather than hi * rcp - lo * rcp: a GPU compiler cannot fuse it into an FMA, so
    # CUDA and CPU codes agree bit for bit. A range beyond float32 is capped instead of becoming inf.
    step = torch.clamp_max(hi - lo, _FLOAT32_MAX) * rcp
    base = torch.where(top > 0, lo, lo * 0.5 + hi * 0.5)
    inv = torch.where(step > 0, 1.0 / torch.where(step > 0, step, 1.0), 0.0)
    inv = torch.where(inv < math.inf, inv, 0.0)
    # The kernel's expressions, in place in one float buffer.
    t = torch.where(finite, x, 0.0)
    del finite
    t.sub_(base[:, None]).mul_(inv[:, None])
    t.masked_fill_(~(inv[:, None] > 0), 0.0)
    t.add_(torch.rand_like(t) if stochastic else 0.5).floor_().clamp_min_(0.0)
    code = torch.minimum(t, top[:, None].to(torch.float32), out=t).to(torch.uint8)
    del t
    if _may_have_specials(flagged):
        # In uint8, top + 1 wraps to 0 only in groups without NaN/Inf, where no special code is chosen.
        code = _special_codes(x, code, top[:, None].to(torch.uint8))
    code = code.view(-1)
    if numel % group_size:
        code[numel:] = 0
    codes = _pack_bits(code, bits)
    return codes, torch.stack([base, step], 1), flagged.to(torch.uint8)


def _group_unpack_torch(p: Packed, numel: int) -> torch.Tensor:
    groups = p.scales.shape[0]
    code = _unpack_bits(p.codes, p.bits, groups * p.group_size).view(groups, p.group_size)
    base, step = p.scales[:, 0:1], p.scales[:, 1:2]
    value = code.to(torch.float32).mul_(step).add_(base)  # base + code * step, in the output buffer
    if _may_have_specials(p.flags):
        value = _decode_specials(value, code.to(torch.int32), _top_code(p.flags.bool(), p.bits)[:, None])
    return value.view(-1)[:numel].to(p.dtype)


def _anchored_flagged_grid(flagged: torch.Tensor, shift: torch.Tensor, bits: int):
    """Shift and finite code range per element. Flagged blocks keep codes 0, n-2, n-1 for -Inf, NaN,
    +Inf and move the shift into [2, n-3], so finite values still get a bin of each sign (from 4 bits;
    at 2 bits one code is left and finite values come back as -step/2)."""
    n = 1 << bits
    shift = torch.where(flagged, shift.clamp(max=n - 3).clamp_(min=2), shift)
    return shift, flagged.to(torch.float32), torch.where(flagged, n - 3.0, n - 1.0)


def _anchored_pack_torch(flat, bits, grid, channels, inner, stochastic):
    """The kernel's codes, computed in place in one float buffer (plus byte-wide masks)."""
    numel = flat.numel()
    if numel == 0:
        return flat.new_zeros(0, dtype=torch.uint8), flat.new_zeros(0, dtype=torch.uint8)
    n = 1 << bits
    x = flat.to(torch.float32).view(-1, channels, inner)
    inv, shift = grid[:, 1].view(1, channels, 1), grid[:, 2].view(1, channels, 1)
    finite = torch.isfinite(x)
    blocks = -(-numel // FLAG_BLOCK)
    block_flagged = ~_pad(finite.view(-1), FLAG_BLOCK, value=True).view(blocks, FLAG_BLOCK).all(1)
    r = torch.where(finite, x, 0.0)
    del finite
    positive = r > 0
    r.mul_(inv)
    if stochastic:
        r.add_(torch.rand_like(r).sub_(0.5)).floor_()
    else:
        r.ceil_().sub_(1.0)
    # Exact sign even where v * inv underflows or stochastic rounding would cross zero.
    r.masked_fill_(positive & (r < 0), 0.0)
    r.masked_fill_(~positive & (r > -1), -1.0)
    del positive
    specials = _may_have_specials(block_flagged)
    # + shift, then clamp to the finite codes; flagged blocks use their own shift and range (the
    # kernel's per-element grid). Exact: r is an integer, or so large that every form clamps alike.
    r.add_(shift)
    if specials:
        flagged_shift, _, _ = _anchored_flagged_grid(torch.ones_like(shift, dtype=torch.bool), shift, bits)
        flagged = _per_element(block_flagged, numel).view_as(x)
        r.addcmul_(flagged, flagged_shift - shift)
    r.clamp_(0.0, n - 1.0)
    if specials:
        r.masked_fill_(flagged & (r < 1), 1.0)
        r.masked_fill_(flagged & (r > n - 3), n - 3.0)
    code = r.to(torch.uint8)
    del r
    if specials:
        code.masked_fill_(x != x, n - 2)
        code.masked_fill_(x == math.inf, n - 1)
        code.masked_fill_(x == -math.inf, 0)
    codes = _pack_bits(_pad(code.view(-1), 8 // bits), bits)
    return codes, block_flagged.to(torch.uint8)


def _anchored_unpack_torch(p: Packed, numel: int, channels: int, inner: int) -> torch.Tensor:
    """The rebuilt values in memory order, float32, computed in place in one float buffer."""
    if numel == 0:
        return p.codes.new_zeros(0, dtype=torch.float32)
    return _anchored_decode_torch(p.codes, p.flags, p.grid, p.bits, numel, channels, inner).view(-1)


def _anchored_row_chunks(p: Packed, channels: int, inner: int):
    """Yield ``(rows, v)``: ``v`` the float32 values of ``rows`` (a slice of the copy's memory order
    seen as (rows, channels, inner)), about TORCH_CHUNK elements at a time. A chunk starts on a
    FLAG_BLOCK boundary so that its codes and flags are slices; where no row count allows that, the
    whole copy is one chunk."""
    row = channels * inner
    total = p.numel // row if row else 0
    aligned = aligned_rows(row, p.unit)
    step = aligned * max(1, TORCH_CHUNK // (aligned * row)) if aligned < total else total
    for first in range(0, total, max(step, 1)):
        last = min(first + step, total)
        start, stop = first * row, last * row
        codes, _, flags = p.span(start, stop)
        yield slice(first, last), _anchored_decode_torch(codes, flags, p.grid, p.bits, stop - start, channels, inner)


def _anchored_decode_torch(codes, flags, grid, bits: int, numel: int, channels: int, inner: int) -> torch.Tensor:
    """Values of ``numel`` elements from codes and flags starting on a FLAG_BLOCK boundary, as
    (rows, channels, inner) float32."""
    n = 1 << bits
    step, shift = grid[:, 0].view(1, channels, 1), grid[:, 2].view(1, channels, 1)
    code = _unpack_bits(codes, bits, numel).view(-1, channels, inner)
    specials = _may_have_specials(flags)
    # ((code - shift) + 0.5) * step as the kernel computes it: the terms are exact integers until the
    # multiply, so subtracting the flagged blocks' shift correction separately changes no bit.
    value = code.to(torch.float32).sub_(shift)
    if specials:
        flagged = _per_element(flags.bool(), numel).view_as(code)
        flagged_shift, _, _ = _anchored_flagged_grid(torch.ones_like(shift, dtype=torch.bool), shift, bits)
        value.addcmul_(flagged, flagged_shift - shift, value=-1)
    value.add_(0.5).mul_(step)
    if specials:
        value.masked_fill_(flagged & (code == 0), -math.inf)
        value.masked_fill_(flagged & (code == n - 2), math.nan)
        value.masked_fill_(flagged & (code == n - 1), math.inf)
    return value
