"""Fused Triton kernels for graphpass.quantize: quantize + bit-pack in one pass over the input,
unpack + dequantize in one pass over the codes.

Imported lazily by :mod:`graphpass.quantize` (only for CUDA tensors, or when a test forces the
Triton backend under ``TRITON_INTERPRET=1``), so a CPU install without a working triton still works.
Every kernel computes the same float32 expressions, in the same order, as the PyTorch path, so
deterministic codes are bit-identical; the formats are documented in :mod:`graphpass.quantize`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime import driver

from graphpass.quantize import (
    _EXACT_INTEGERS, _FLOAT32_MAX, FLAG_BLOCK, TINY_GAMMA, TINY_STEP, WINDOW_STDS, _level_reciprocals,
)  # fmt: skip
from graphpass.triton_launch import direct_launch

__all__ = [
    "group_pack",
    "group_unpack",
    "anchored_table",
    "anchored_pack",
    "anchored_unpack",
    "anchored_channel_sums",
    "layer_tables",
    "batch_norm_grad_tables",
    "group_norm_sums",
    "group_norm_tables",
    "proxy_statistics",
    "proxy_statistics_grads",
    "activation_code",
    "mask_pack",
    "mask_unpack",
]

_GROUP_TILE = 2048  # elements per program in the group kernels (whole groups)
_MASK_TILE = 8192  # elements per program in the mask kernels
_NUM_WARPS = 4
FLOAT32_MAX = tl.constexpr(_FLOAT32_MAX)
EXACT_INTEGERS = tl.constexpr(_EXACT_INTEGERS)


# Host-side integer helpers: triton.cdiv and triton.next_power_of_2 are constexpr functions whose
# calls from Python cost about 3 us each, and the wrappers below run hundreds of times a step.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


@triton.jit
def _top_code(flagged, N: tl.constexpr):
    # Highest code for finite values; flagged groups/blocks keep the top three for NaN, +Inf, -Inf.
    return tl.where(flagged, N - 4, N - 1)


@triton.jit
def _encode_specials(x, code, top):
    code = tl.where(x != x, top + 1, code)
    code = tl.where(x == float("inf"), top + 2, code)
    return tl.where(x == -float("inf"), top + 3, code)


@triton.jit
def _decode_specials(value, code, top):
    special = tl.where(code == top + 1, float("nan"), tl.where(code == top + 2, float("inf"), -float("inf")))
    return tl.where(code > top, special, value)


@triton.jit
def _anchored_step(lo, hi, N: tl.constexpr):
    # graphpass.quantize._anchored_step.
    wide = tl.where(tl.abs(hi) > tl.abs(lo), tl.abs(hi), tl.abs(lo)) * (1.0 / (N - 1))
    step = (hi - lo) * (1.0 / N)
    return tl.where(wide > step, wide, step)


@triton.jit
def _jump_widened(near, wide_lo, wide_hi, mean, std, step, JUMP: tl.constexpr):
    # One jump of graphpass.quantize.anchored_grid's loop.
    near = near | (tl.abs(JUMP - mean) < 5.0 * std)
    wide_lo = tl.where(JUMP - step < wide_lo, JUMP - step, wide_lo)
    wide_hi = tl.where(JUMP + step > wide_hi, JUMP + step, wide_hi)
    return near, wide_lo, wide_hi


@triton.jit
def _anchored_grid(
    mean, std, N: tl.constexpr, HALF: tl.constexpr, TINY: tl.constexpr, ANCHORED: tl.constexpr, JUMP_LOW: tl.constexpr,
    JUMP_HIGH: tl.constexpr,
):  # fmt: skip
    # graphpass.quantize.anchored_grid, per element; HALF: WINDOW_STDS[bits]; JUMP_LOW / JUMP_HIGH 0.0
    # where absent. Launched without FMA contraction, so it rounds as PyTorch's eager ops do.
    lo = mean - HALF * std
    hi = mean + HALF * std
    if ANCHORED:
        low = tl.full(mean.shape, 1.0, tl.float32)
        high = tl.full(mean.shape, N - 1.0, tl.float32)
        step = _anchored_step(lo, hi, N)
        if JUMP_LOW != 0.0 or JUMP_HIGH != 0.0:
            near = mean != mean
            wide_lo, wide_hi = lo, hi
            if JUMP_LOW != 0.0:
                near, wide_lo, wide_hi = _jump_widened(near, wide_lo, wide_hi, mean, std, step, JUMP_LOW)
            if JUMP_HIGH != 0.0:
                near, wide_lo, wide_hi = _jump_widened(near, wide_lo, wide_hi, mean, std, step, JUMP_HIGH)
            magnitude = tl.full(mean.shape, JUMP_HIGH if JUMP_HIGH != 0.0 else -JUMP_LOW, tl.float32)
            bins = tl.floor(tl.math.div_rn(magnitude, _anchored_step(wide_lo, wide_hi, N)))
            kept = near & (bins >= 2.0)
            lo = tl.where(kept, wide_lo, lo)
            hi = tl.where(kept, wide_hi, hi)
            step = tl.where(kept, tl.math.div_rn(magnitude, bins), step)
            if JUMP_LOW != 0.0:
                low = tl.where(kept, bins + 1.0, low)
            if JUMP_HIGH != 0.0:
                high = tl.where(kept, (N - 1.0) - bins, high)
    else:
        low = tl.full(mean.shape, -EXACT_INTEGERS, tl.float32)
        high = tl.full(mean.shape, EXACT_INTEGERS, tl.float32)
        step = std * (2.0 * HALF / N)
    alt = tl.abs(mean) * (2.0 / N)
    alt = tl.where((alt > TINY) & (alt < float("inf")), alt, TINY)
    step = tl.where((step > TINY) & (step < float("inf")), step, alt)
    inv = tl.math.div_rn(tl.full(step.shape, 1.0, tl.float32), step)
    q = tl.floor((lo + hi) * 0.5 * inv)
    q = tl.where(q == q, q, 0.0)
    shift = (N // 2) - q
    shift = tl.where(shift < low, low, shift)
    return step, inv, tl.where(shift > high, high, shift)


# ----------------------------------------------------------------------------- group layout


@direct_launch
@triton.jit
def _group_pack_kernel(
    x_ptr, codes_ptr, scales_ptr, flags_ptr, numel, num_groups, seed,
    BITS: tl.constexpr, GROUP: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr,
    RCP_PLAIN: tl.constexpr, RCP_FLAGGED: tl.constexpr, STOCHASTIC: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    PER: tl.constexpr = 8 // BITS
    N: tl.constexpr = 1 << BITS
    group = tl.program_id(0)
    if WIDE:
        group = group.to(tl.int64)
    group = group * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    byte = tl.arange(0, GROUP // PER)
    lane = tl.arange(0, PER)
    offs = group[:, None, None] * GROUP + byte[None, :, None] * PER + lane[None, None, :]
    # Past the end, repeat the last element: min/max and the NaN flag of the last group stay the same.
    x = tl.load(x_ptr + tl.minimum(offs, numel - 1)).to(tl.float32)
    finite = (x == x) & (tl.abs(x) < float("inf"))
    lo = tl.min(tl.min(tl.where(finite, x, float("inf")), axis=2), axis=1)
    hi = tl.max(tl.max(tl.where(finite, x, -float("inf")), axis=2), axis=1)
    flagged = tl.max(tl.max(tl.where(finite, 0, 1), axis=2), axis=1) > 0
    none_finite = lo > hi
    lo = tl.where(none_finite, 0.0, lo)
    hi = tl.where(none_finite, 0.0, hi)
    top = _top_code(flagged, N)
    rcp = tl.where(flagged, RCP_FLAGGED, RCP_PLAIN)
    # Same expression as the PyTorch path; written so that no FMA contraction can change it.
    step = tl.minimum(hi - lo, FLOAT32_MAX) * rcp
    base = tl.where(top > 0, lo, lo * 0.5 + hi * 0.5)
    inv = tl.where(step > 0, tl.math.div_rn(tl.full(step.shape, 1.0, tl.float32), tl.where(step > 0, step, 1.0)), 0.0)
    inv = tl.where(inv < float("inf"), inv, 0.0)
    t = (tl.where(finite, x, 0.0) - base[:, None, None]) * inv[:, None, None]
    t = tl.where(inv[:, None, None] > 0, t, 0.0)
    if STOCHASTIC:
        t = t + tl.rand(seed, offs.to(tl.int32))
    else:
        t = t + 0.5
    q = tl.minimum(tl.maximum(tl.floor(t), 0.0), top[:, None, None].to(tl.float32))
    code = _encode_specials(x, q.to(tl.int32), top[:, None, None])
    code = tl.where(offs < numel, code, 0)
    packed = tl.sum(code << (lane * BITS)[None, None, :], axis=2)
    in_range = group < num_groups
    tl.store(codes_ptr + group[:, None] * (GROUP // PER) + byte[None, :], packed.to(tl.uint8), mask=in_range[:, None])
    tl.store(scales_ptr + group * 2, base, mask=in_range)
    tl.store(scales_ptr + group * 2 + 1, step, mask=in_range)
    tl.store(flags_ptr + group, flagged.to(tl.uint8), mask=in_range)


@direct_launch
@triton.jit
def _group_unpack_kernel(
    codes_ptr, scales_ptr, flags_ptr, out_ptr, numel, num_groups,
    BITS: tl.constexpr, GROUP: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    PER: tl.constexpr = 8 // BITS
    N: tl.constexpr = 1 << BITS
    group = tl.program_id(0)
    if WIDE:
        group = group.to(tl.int64)
    group = group * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    in_range = group < num_groups
    byte = tl.arange(0, GROUP // PER)
    lane = tl.arange(0, PER)
    packed = tl.load(codes_ptr + group[:, None] * (GROUP // PER) + byte[None, :], mask=in_range[:, None], other=0)
    code = (packed.to(tl.int32)[:, :, None] >> (lane * BITS)[None, None, :]) & (N - 1)
    base = tl.load(scales_ptr + group * 2, mask=in_range, other=0.0)
    step = tl.load(scales_ptr + group * 2 + 1, mask=in_range, other=0.0)
    top = _top_code(tl.load(flags_ptr + group, mask=in_range, other=0) != 0, N)
    value = base[:, None, None] + code.to(tl.float32) * step[:, None, None]
    value = _decode_specials(value, code, top[:, None, None])
    offs = group[:, None, None] * GROUP + byte[None, :, None] * PER + lane[None, None, :]
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=offs < numel)


def _wide(numel: int) -> bool:
    # 64-bit offsets cost integer throughput: only for tensors whose offsets leave int32.
    return numel >= 2**31 - 2**20


def _seed() -> int:
    # From torch's CPU generator: follows torch.manual_seed and needs no device sync.
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def group_pack(flat: torch.Tensor, bits: int, group_size: int, stochastic: bool):
    numel = flat.numel()
    num_groups = -(-numel // group_size)
    per_program = max(1, _GROUP_TILE // group_size)
    codes = torch.empty(num_groups * group_size * bits // 8, dtype=torch.uint8, device=flat.device)
    scales = torch.empty(num_groups, 2, dtype=torch.float32, device=flat.device)
    flags = torch.empty(num_groups, dtype=torch.uint8, device=flat.device)
    rcp_plain, rcp_flagged = _level_reciprocals(bits)
    grid = (_cdiv(num_groups, per_program),)
    _group_pack_kernel[grid](
        flat, codes, scales, flags, numel, num_groups, _seed() if stochastic else 0,
        BITS=bits, GROUP=group_size, GROUPS_PER_PROGRAM=per_program,
        RCP_PLAIN=rcp_plain, RCP_FLAGGED=rcp_flagged, STOCHASTIC=stochastic, WIDE=_wide(numel),
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    return codes, scales, flags


def group_unpack(codes, scales, flags, bits: int, group_size: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    num_groups = scales.shape[0]
    per_program = max(1, _GROUP_TILE // group_size)
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    grid = (_cdiv(num_groups, per_program),)
    _group_unpack_kernel[grid](
        codes, scales, flags, out, numel, num_groups,
        BITS=bits, GROUP=group_size, GROUPS_PER_PROGRAM=per_program, WIDE=_wide(numel),
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- anchored layout


@direct_launch
@triton.jit
def _anchored_table_kernel(
    mean_ptr, std_ptr, table_ptr, channels, N: tl.constexpr, HALF: tl.constexpr, TINY: tl.constexpr,
    ANCHORED: tl.constexpr, JUMP_LOW: tl.constexpr, JUMP_HIGH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Per-channel rows [step, 1/step, shift]: computed once so the element kernels only gather.
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = c < channels
    step, inv, shift = _anchored_grid(
        tl.load(mean_ptr + c, mask=inside, other=0.0), tl.load(std_ptr + c, mask=inside, other=1.0), N, HALF, TINY,
        ANCHORED, JUMP_LOW, JUMP_HIGH,
    )
    tl.store(table_ptr + c * 3, step, mask=inside)
    tl.store(table_ptr + c * 3 + 1, inv, mask=inside)
    tl.store(table_ptr + c * 3 + 2, shift, mask=inside)


@triton.jit
def _anchored_flagged_grid(flagged, shift, N: tl.constexpr):
    # graphpass.quantize._anchored_flagged_grid: flagged blocks keep codes 0, N-2, N-1 for -Inf, NaN, +Inf.
    shift = tl.where(flagged, tl.maximum(tl.minimum(shift, N - 3.0), 2.0), shift)
    return shift, tl.where(flagged, 1.0, 0.0), tl.where(flagged, N - 3.0, N - 1.0)


@triton.jit
def _block_offsets(BITS: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    block = tl.program_id(0)
    if WIDE:
        block = block.to(tl.int64)
    byte = block * (BLOCK // PER) + tl.arange(0, BLOCK // PER)
    lane = tl.arange(0, PER)
    return block, byte, lane, byte[:, None] * PER + lane[None, :]


@functools.lru_cache(maxsize=4096)
def _magic(d: int) -> tuple[int, int]:
    """(m, s) with floor(n / d) == umulhi(2n, m) >> s for 0 <= n < 2**31: m = ceil(2**(31+s) / d),
    s = ceil(log2 d). The error of n*m / 2**(31+s) against n / d is below 1/d, so the floor is exact."""
    s = (d - 1).bit_length()
    return -(-(1 << (31 + s)) // d), s


@triton.jit
def _floordiv(n, magic, shift):
    # Integer division by a runtime divisor costs dozens of instructions per element; this costs three.
    a = (n << 1).to(tl.uint32, bitcast=True)
    return (tl.umulhi(a, magic.to(tl.uint32)) >> shift.to(tl.uint32)).to(tl.int32, bitcast=True)


@triton.jit
def _channel_of(offs, channels, inner, ch_magic, ch_shift, in_magic, in_shift, WIDE: tl.constexpr, INNER_IS_ONE: tl.constexpr):
    if WIDE:
        return (offs // inner) % channels
    q = offs
    if not INNER_IS_ONE:  # channels_last: the channel is the fastest-moving index
        q = _floordiv(offs, in_magic, in_shift)
    return q - _floordiv(q, ch_magic, ch_shift) * channels


_DIVISORS = ["ch_magic", "ch_shift", "in_magic", "in_shift"]  # runtime values: no recompiles per shape


@direct_launch
@triton.jit(do_not_specialize=_DIVISORS)
def _anchored_pack_kernel(
    x_ptr, codes_ptr, flags_ptr, table_ptr, numel, channels, inner, ch_magic, ch_shift, in_magic, in_shift, seed,
    BITS: tl.constexpr, BLOCK: tl.constexpr, STOCHASTIC: tl.constexpr, WIDE: tl.constexpr,
    INNER_IS_ONE: tl.constexpr,
):  # fmt: skip
    PER: tl.constexpr = 8 // BITS
    N: tl.constexpr = 1 << BITS
    block, byte, lane, offs = _block_offsets(BITS, BLOCK, WIDE)
    valid = offs < numel
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    row = _channel_of(offs, channels, inner, ch_magic, ch_shift, in_magic, in_shift, WIDE, INNER_IS_ONE) * 3
    inv = tl.load(table_ptr + row + 1)
    finite = (x == x) & (tl.abs(x) < float("inf"))
    flagged = tl.max(tl.max(tl.where(finite, 0, 1), axis=1), axis=0) > 0
    shift, lowest, highest = _anchored_flagged_grid(flagged, tl.load(table_ptr + row + 2), N)
    xs = tl.where(finite, x, 0.0)
    t = xs * inv
    if STOCHASTIC:
        r = tl.floor(t + (tl.rand(seed, offs.to(tl.int32)) - 0.5))
    else:
        r = tl.ceil(t) - 1.0
    # Exact sign even where v * inv underflows or stochastic rounding would cross zero.
    r = tl.where(xs > 0, tl.maximum(r, 0.0), tl.minimum(r, -1.0))
    code = tl.minimum(tl.maximum(r + shift, lowest), highest).to(tl.int32)
    code = tl.where(x != x, N - 2, tl.where(x == float("inf"), N - 1, tl.where(x == -float("inf"), 0, code)))
    code = tl.where(valid, code, 0)
    packed = tl.sum(code << (lane * BITS)[None, :], axis=1)
    tl.store(codes_ptr + byte, packed.to(tl.uint8), mask=byte * PER < numel)
    tl.store(flags_ptr + block, flagged.to(tl.uint8))


# Activations the unpack kernel applies itself, as graphpass.quantize.Activation computes them.
_ACTIVATION_CODES = {"none": 0, "relu": 1, "relu6": 2, "leaky_relu": 3, "hardswish": 4, "silu": 5, "gelu": 6}


def activation_code(activation) -> int | None:
    """The unpack kernel's code for a graphpass.quantize.Activation (0 for None), or None where the
    kernel has no form of it (mish, tanh-approximated gelu)."""
    if activation is None:
        return 0
    if activation.name == "mish" or (activation.name == "gelu" and activation.approximate != "none"):
        return None
    return _ACTIVATION_CODES.get(activation.name, 0)  # any other name is the identity


@triton.jit
def _activate(v, ACTIVATION: tl.constexpr, negative_slope, ON_CUDA: tl.constexpr):
    # PyTorch's formulas on the tensor's device, NaN propagating like them (comparisons, not
    # min/max, decide).
    if ACTIVATION == 1:
        v = tl.where(v < 0, 0.0, v)
    elif ACTIVATION == 2:
        v = tl.where(v < 0, 0.0, tl.where(v > 6.0, 6.0, v))
    elif ACTIVATION == 3:
        v = tl.where(v > 0, v, v * negative_slope)
    elif ACTIVATION == 4:
        v = v * tl.minimum(tl.maximum(v + 3.0, 0.0), 6.0)
        if ON_CUDA:  # PyTorch's CUDA kernel multiplies by a rounded 1/6, its CPU kernel divides by 6
            v = v * 0.16666667
        else:
            v = tl.math.div_rn(v, tl.full(v.shape, 6.0, tl.float32))
    elif ACTIVATION == 5:
        v = tl.math.div_rn(v, 1.0 + tl.exp(-v))
    elif ACTIVATION == 6:
        v = v * 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
    return v


@triton.jit
def _activation_grad(g, h, ACTIVATION: tl.constexpr, negative_slope):
    # dL/dh from dL/dact(h), as aten's backward ops of each activation compute it.
    if ACTIVATION == 1:  # threshold_backward
        g = tl.where(h > 0, g, 0.0)
    elif ACTIVATION == 2:  # hardtanh_backward
        g = tl.where((h > 0) & (h < 6.0), g, 0.0)
    elif ACTIVATION == 3:  # leaky_relu_backward
        g = tl.where(h > 0, g, g * negative_slope)
    elif ACTIVATION == 4:  # hardswish_backward
        g = tl.where(h < -3.0, 0.0, tl.where(h <= 3.0, g * (h / 3.0 + 0.5), g))
    elif ACTIVATION == 5:  # silu_backward
        s = 1.0 / (1.0 + tl.exp(-h))
        g = g * s * (1.0 + h * (1.0 - s))
    elif ACTIVATION == 6:  # gelu_backward (erf)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        g = g * (cdf + h * pdf)
    return g


_SAMPLE_DIVISORS = ["n_magic", "n_shift", "bi_magic", "bi_shift"]


@direct_launch
@triton.jit(do_not_specialize=_DIVISORS + _SAMPLE_DIVISORS)
def _anchored_unpack_kernel(
    codes_ptr, flags_ptr, table_ptr, scale_ptr, shift_ptr, grad_ptr, grad_scale_ptr, out_ptr, numel, channels, inner,
    ch_magic, ch_shift, in_magic, in_shift, batch, batch_inner, n_magic, n_shift, bi_magic, bi_shift, negative_slope,
    BITS: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr, INNER_IS_ONE: tl.constexpr,
    ACTIVATION: tl.constexpr, AFFINE: tl.constexpr, PER_SAMPLE: tl.constexpr, BATCH_INNER_IS_ONE: tl.constexpr,
    ON_CUDA: tl.constexpr, ADD_GRAD: tl.constexpr, GRAD_ACTIVATION: tl.constexpr,
):  # fmt: skip
    PER: tl.constexpr = 8 // BITS
    block, byte, lane, offs = _block_offsets(BITS, BLOCK, WIDE)
    valid = offs < numel
    packed = tl.load(codes_ptr + byte, mask=byte * PER < numel, other=0)
    code = (packed.to(tl.int32)[:, None] >> (lane * BITS)[None, :]) & ((1 << BITS) - 1)
    channel = _channel_of(offs, channels, inner, ch_magic, ch_shift, in_magic, in_shift, WIDE, INNER_IS_ONE)
    stored = _anchored_decode(code, tl.load(flags_ptr + block) != 0, table_ptr + channel * 3, BITS)
    index = channel
    if PER_SAMPLE:
        sample = _channel_of(offs, batch, batch_inner, n_magic, n_shift, bi_magic, bi_shift, WIDE, BATCH_INNER_IS_ONE)
        index = sample * channels + channel
    # Epilogue (graphpass.quantize.apply_epilogue): activation(value) * scale + shift, then one rounding.
    value = _activate(stored, ACTIVATION, negative_slope, ON_CUDA)
    if AFFINE:
        # torch.addcmul on the CPU is a fused multiply-add too (the interpreter rounds twice).
        value = tl.fma(value, tl.load(scale_ptr + index), tl.load(shift_ptr + index))
    if ADD_GRAD:  # fused_norm_grad: + grad_scale * grad; group_norm_backward: + coef * act'(stored) * grad
        grad = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        grad = _activation_grad(grad, stored, GRAD_ACTIVATION, negative_slope)
        value = tl.fma(grad, tl.load(grad_scale_ptr + index), value)
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _anchored_decode(code, flagged, table_row, BITS: tl.constexpr):
    # Rebuilt values (graphpass.quantize._anchored_decode_torch) of int32 codes; ``table_row``
    # points at each element's channel row [step, 1/step, shift] of the grid.
    N: tl.constexpr = 1 << BITS
    shift, _, _ = _anchored_flagged_grid(flagged, tl.load(table_row + 2), N)
    value = ((code.to(tl.float32) - shift) + 0.5) * tl.load(table_row)
    special = tl.where(code == 0, -float("inf"), tl.where(code == N - 1, float("inf"), float("nan")))
    return tl.where(flagged & ((code == 0) | (code >= N - 2)), special, value)


@direct_launch
@triton.jit
def _anchored_channel_sums_kernel(
    codes_ptr, flags_ptr, table_ptr, grad_ptr, center_ptr, sums_ptr, channels, inner, rows, rows_per_program,
    arrived_ptr, floats_ptr, out_ptr, splits, neg_inv_count, negative_slope,
    BITS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_INNER: tl.constexpr, WIDE: tl.constexpr, FLAG: tl.constexpr,
    FINALIZE: tl.constexpr, GROUP_NORM: tl.constexpr, ACTIVATION: tl.constexpr, HOMOGENEOUS: tl.constexpr,
    ON_CUDA: tl.constexpr,
):  # fmt: skip
    # Program (c, s) sums grad and grad * (v - center) over rows [s * rows_per_program, ...) of channel c, the
    # copy seen as (rows, channels, inner): fixed order, so the sums are deterministic. With FINALIZE the
    # last of a channel's programs to finish adds the parts up, in split order, into its
    # batch_norm_grad_tables column: one launch for the whole backward reduction. With GROUP_NORM
    # (a split per sample) the grad summed is act'(v) * grad, and two more sums follow it: of grad
    # and of grad * act(v) (group_norm_backward's four).
    PER: tl.constexpr = 8 // BITS
    channel = tl.program_id(0)
    split = tl.program_id(1)
    first = split * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    r = tl.arange(0, BLOCK_ROWS)[:, None]
    j = tl.arange(0, BLOCK_INNER)[None, :]
    if WIDE:
        r = r.to(tl.int64)
    sum_g = tl.zeros([BLOCK_ROWS, BLOCK_INNER], dtype=tl.float32)
    sum_gv = tl.zeros([BLOCK_ROWS, BLOCK_INNER], dtype=tl.float32)
    sum_raw = tl.zeros([BLOCK_ROWS, BLOCK_INNER], dtype=tl.float32)
    sum_gz = tl.zeros([BLOCK_ROWS, BLOCK_INNER], dtype=tl.float32)
    table_row = table_ptr + channel * 3
    if FINALIZE:  # row 2 of the floats (grad_scale, a, center)
        center = tl.load(floats_ptr + 2 * channels + channel)
    elif GROUP_NORM:  # per sample and channel
        center = tl.load(center_ptr + split * channels + channel)
    else:
        center = tl.load(center_ptr + channel)
    for row0 in range(first, last, BLOCK_ROWS):
        for inner0 in range(0, inner, BLOCK_INNER):
            valid = (row0 + r < last) & (inner0 + j < inner)
            offs = ((row0 + r) * channels + channel) * inner + inner0 + j
            packed = tl.load(codes_ptr + offs // PER, mask=valid, other=0)
            code = (packed.to(tl.int32) >> ((offs % PER) * BITS).to(tl.int32)) & ((1 << BITS) - 1)
            flagged = tl.load(flags_ptr + offs // FLAG, mask=valid, other=0) != 0
            value = _anchored_decode(code, flagged, table_row, BITS)
            grad = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            if GROUP_NORM:
                if ACTIVATION != 0:
                    sum_raw += grad
                if not HOMOGENEOUS:  # act(v) != v * act'(v): sum(grad * act(v)) too
                    sum_gz += tl.where(valid, grad * _activate(value, ACTIVATION, negative_slope, ON_CUDA), 0.0)
                grad = tl.where(valid, _activation_grad(grad, value, ACTIVATION, negative_slope), 0.0)
            sum_g += grad
            sum_gv += tl.where(valid, grad * (value - center), 0.0)
    rows_out: tl.constexpr = 4 if GROUP_NORM else 2
    tl.store(sums_ptr + split * rows_out * channels + channel, tl.sum(tl.sum(sum_g, axis=1), axis=0))
    tl.store(sums_ptr + (split * rows_out + 1) * channels + channel, tl.sum(tl.sum(sum_gv, axis=1), axis=0))
    if GROUP_NORM:  # the identity's grad is its act'(v) * grad: the same sum, bit for bit
        raw = sum_g if ACTIVATION == 0 else sum_raw
        tl.store(sums_ptr + (split * rows_out + 2) * channels + channel, tl.sum(tl.sum(raw, axis=1), axis=0))
        tl.store(sums_ptr + (split * rows_out + 3) * channels + channel, tl.sum(tl.sum(sum_gz, axis=1), axis=0))
    if FINALIZE:
        # acq_rel: the parts stored before each arrival are visible to the program that arrives last.
        if tl.atomic_add(arrived_ptr + channel, 1) == splits - 1:
            total_g = tl.load(sums_ptr + channel, cache_modifier=".cg")
            total_gv = tl.load(sums_ptr + channels + channel, cache_modifier=".cg")
            for s in range(1, splits):
                total_g += tl.load(sums_ptr + 2 * s * channels + channel, cache_modifier=".cg")
                total_gv += tl.load(sums_ptr + (2 * s + 1) * channels + channel, cache_modifier=".cg")
            # graphpass.quantize.batch_norm_grad_tables, from the sums.
            grad_scale = tl.load(floats_ptr + channel)
            a = tl.load(floats_ptr + channels + channel)
            sum_gx = total_gv * a
            b = -center * a
            tl.store(out_ptr + channel, sum_gx)
            tl.store(out_ptr + channels + channel, total_g)
            tl.store(out_ptr + 2 * channels + channel, grad_scale * a * sum_gx * neg_inv_count)
            tl.store(out_ptr + 3 * channels + channel, grad_scale * (total_g + b * sum_gx) * neg_inv_count)
            tl.store(arrived_ptr + channel, 0)  # zeroed again for the next launch (_arrival_counters)


_SUMS_TILE = 1024  # elements per loop step of the channel-sums kernel
# Programs over all channels: enough loads in flight to fill a GPU (on an H100, ResNet-50's BatchNorm
# shapes summed 13% faster with 4096 than with 1024).
_SUMS_PROGRAMS = 4096
_SUMS_WARPS = _NUM_WARPS


@functools.lru_cache(maxsize=4096)
def _sums_geometry(rows: int, channels: int, inner: int, programs: int) -> tuple[int, int, int]:
    """(row splits, rows per program, inner block) of the channel-sums launch for one shape."""
    splits = max(1, min(rows, programs // channels))
    per_program = _cdiv(rows, splits)
    return _cdiv(rows, per_program), per_program, min(_next_power_of_2(inner), _SUMS_TILE)


_ARRIVALS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _arrival_counters(device: torch.device, channels: int) -> torch.Tensor:
    """Zeroed int32 counters for the channel-sums kernel's last-arrival test, one buffer per device
    and stream. The last program of each channel sets its counter back to 0, so a launch after it on
    the same stream finds them zeroed: no fill (an eager op and a launch) per BatchNorm backward.
    While a CUDA graph is captured, fresh ones: a captured graph replays on whatever stream replays
    it, where another stream's launches must not share its counters."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(channels, dtype=torch.int32, device=device)
        active = driver.active
        key = (device, active.get_current_stream(active.get_current_device()))
    else:  # the interpreter, on the CPU
        key = (device, 0)
    counters = _ARRIVALS.get(key)
    if counters is None or counters.numel() < channels:
        counters = _ARRIVALS[key] = torch.zeros(max(channels, 1024), dtype=torch.int32, device=device)
    return counters


def _channel_sums(
    codes, flags, grid, bits: int, grad, center, channels: int, inner: int, numel: int, finalize=None,
    per_sample: tuple[int, int, float, bool] | None = None,
):  # fmt: skip
    """The channel-sums launch; ``per_sample`` = (samples, activation code, negative slope, whether the
    activation is positively homogeneous): one split per sample, group_norm_backward's four sums."""
    rows = numel // (channels * inner)
    if per_sample is None:
        splits, per_program, block_inner = _sums_geometry(rows, channels, inner, _SUMS_PROGRAMS)
        block_rows, activation, negative_slope, homogeneous = _SUMS_TILE // block_inner, 0, 0.0, True
    else:
        splits, activation, negative_slope, homogeneous = per_sample
        per_program, block_inner = rows // splits, min(_next_power_of_2(inner), _SUMS_TILE)
        block_rows = min(_SUMS_TILE // block_inner, _next_power_of_2(per_program))
    sums = torch.empty(splits, 2 if per_sample is None else 4, channels, dtype=torch.float32, device=codes.device)
    if finalize is not None:
        floats, neg_inv_count = finalize
        arrived = _arrival_counters(codes.device, channels)
        out = torch.empty(4, channels, dtype=torch.float32, device=codes.device)
    else:
        floats, neg_inv_count, arrived, out = sums, 0.0, sums, sums  # unread without FINALIZE
    _anchored_channel_sums_kernel[(channels, splits)](
        codes, flags, grid, grad, center, sums, channels, inner, rows, per_program,
        arrived, floats, out, splits, neg_inv_count, negative_slope,
        BITS=bits, BLOCK_ROWS=block_rows, BLOCK_INNER=block_inner, WIDE=_wide(numel), FLAG=FLAG_BLOCK,
        FINALIZE=finalize is not None, GROUP_NORM=per_sample is not None, ACTIVATION=activation, HOMOGENEOUS=homogeneous,
        ON_CUDA=codes.is_cuda, num_warps=_SUMS_WARPS,
    )  # fmt: skip
    return sums if finalize is None else out


def anchored_channel_sums(codes, flags, grid, bits: int, grad, center, channels: int, inner: int, numel: int):
    """graphpass.quantize.channel_sums, in parts: (splits, 2, C) float32, row [s, 0] the sum of grad
    and [s, 1] of grad * (v - center) over split ``s`` of the rows; the sum over splits is the result."""
    return _channel_sums(codes, flags, grid, bits, grad, center, channels, inner, numel)


def batch_norm_grad_tables(codes, flags, grid, bits: int, grad, floats, neg_inv_count: float, channels: int, inner: int, numel: int):
    """graphpass.quantize.batch_norm_grad_tables, (4, C), in one launch: ``floats`` are its (3, C)
    rows grad_scale, a, center."""
    # No center argument: the kernel reads it from row 2 of the floats.
    return _channel_sums(codes, flags, grid, bits, grad, floats, channels, inner, numel, (floats, neg_inv_count))


def group_norm_sums(
    codes, flags, grid, bits: int, grad, center, channels: int, inner: int, numel: int, samples: int,
    activation: int, negative_slope: float, homogeneous: bool,
):  # fmt: skip
    """graphpass.quantize.group_norm_backward's sums, (N, 4, C) float32: per sample and channel, of
    act'(v) * grad, act'(v) * grad * (v - center), grad and (not for a ``homogeneous`` activation,
    0 there) grad * act(v); ``center`` holds N * C floats."""
    per_sample = (samples, activation, negative_slope, homogeneous)
    return _channel_sums(codes, flags, grid, bits, grad, center, channels, inner, numel, per_sample=per_sample)


@direct_launch
@triton.jit
def _group_norm_tables_kernel(
    sums_ptr, floats_ptr, w_ptr, b_ptr, mu_ptr, inv_ptr, tables_ptr, rows_ptr, samples, channels, group_size, count,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MAP: tl.constexpr, HOMOGENEOUS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # graphpass.quantize._group_norm_tables_torch for group program_id(0): its channels' input-gradient
    # tables for every sample, and their parameter rows, summed over the samples in a fixed order.
    # Absent parameters take their defaults: weight 1, bias 0, output map (mu, inv) = (0, 1).
    group = tl.program_id(0)
    j = tl.arange(0, BLOCK_C)
    inside = j < group_size
    c = group * group_size + j
    one = tl.full([BLOCK_C], 1.0, tl.float32)
    inv = tl.load(inv_ptr + c, mask=inside, other=0.0) if HAS_MAP else one
    entries = samples * channels
    total_gh = tl.zeros([BLOCK_C], dtype=tl.float32)
    total_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    total_gz = tl.zeros([BLOCK_C], dtype=tl.float32)
    weight_raw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, samples, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = (n < samples)[:, None] & inside[None, :]
        at = sums_ptr + n[:, None] * 4 * channels + c[None, :]
        sum_gh = tl.load(at, mask=valid, other=0.0)
        sum_ghv = tl.load(at + channels, mask=valid, other=0.0)
        entry = n[:, None] * channels + c[None, :]
        grad_scale = tl.load(floats_ptr + entry, mask=valid, other=0.0)
        a = tl.load(floats_ptr + entries + entry, mask=valid, other=0.0)
        center = tl.load(floats_ptr + 2 * entries + entry, mask=valid, other=0.0)
        coef = grad_scale * inv[None, :]
        p = tl.sum(coef * sum_gh, axis=1) / count  # rstd * mean(W gh)
        q = tl.sum(coef * a * sum_ghv, axis=1) / count  # rstd * mean(W gh x_hat)
        qa = q[:, None] * a
        tl.store(tables_ptr + entry, coef, mask=valid)
        tl.store(tables_ptr + entries + entry, -qa, mask=valid)
        tl.store(tables_ptr + 2 * entries + entry, qa * center - p[:, None], mask=valid)
        weight_raw += tl.sum(a * sum_ghv, axis=0)
        total_gh += tl.sum(sum_gh, axis=0)
        total_g += tl.sum(tl.load(at + 2 * channels, mask=valid, other=0.0), axis=0)
        if not HOMOGENEOUS:  # else the sums kernel left row 3 empty
            total_gz += tl.sum(tl.load(at + 3 * channels, mask=valid, other=0.0), axis=0)
    if HOMOGENEOUS:  # act(h) = h * act'(h): sum(grad * act(h)) from the other sums
        w = tl.load(w_ptr + c, mask=inside, other=0.0) if HAS_WEIGHT else one
        b = tl.load(b_ptr + c, mask=inside, other=0.0) if HAS_BIAS else one * 0.0
        total_gz = w * weight_raw + b * total_gh
    mu = tl.load(mu_ptr + c, mask=inside, other=0.0) if HAS_MAP else one * 0.0
    tl.store(rows_ptr + c, inv * weight_raw, mask=inside)
    tl.store(rows_ptr + channels + c, inv * total_gh, mask=inside)
    tl.store(rows_ptr + 2 * channels + c, -inv * total_g, mask=inside)
    tl.store(rows_ptr + 3 * channels + c, total_gz - mu * total_g, mask=inside)


def group_norm_tables(sums, floats, weight, bias, mu, inv, groups: int, count: int, homogeneous: bool):
    """graphpass.quantize._group_norm_tables_torch in one launch: ((3, N * C) tables coef, scale,
    shift; (4, C) rows) from the (N, 4, C) sums and the (3, N * C) floats grad_scale, a, center; the
    per-channel ones C float32 each or None (defaults; mu and inv both or neither)."""
    samples, _, channels = sums.shape
    group_size = channels // groups
    tables = torch.empty(3, samples * channels, dtype=torch.float32, device=sums.device)
    rows = torch.empty(4, channels, dtype=torch.float32, device=sums.device)
    block_c = _next_power_of_2(group_size)
    block_n = max(1, min(_next_power_of_2(samples), _TABLE_BLOCK // block_c))
    _group_norm_tables_kernel[(groups,)](
        sums, floats, *(floats if t is None else t for t in (weight, bias, mu, inv)), tables, rows, samples, channels,
        group_size, float(count), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_MAP=inv is not None,
        HOMOGENEOUS=homogeneous, BLOCK_N=block_n, BLOCK_C=block_c,
    )  # fmt: skip
    return tables, rows


def anchored_table(mean, std, bits: int, anchored: bool, jumps: tuple[float, float]) -> torch.Tensor:
    """graphpass.quantize.anchored_grid as a (C, 3) table, in one launch; ``jumps``: (low, high)."""
    channels = mean.numel()
    table = torch.empty(channels, 3, dtype=torch.float32, device=mean.device)
    block = min(1024, _next_power_of_2(channels))
    _anchored_table_kernel[(_cdiv(channels, block),)](
        mean, std, table, channels, N=1 << bits, HALF=WINDOW_STDS[bits], TINY=TINY_STEP, ANCHORED=anchored,
        JUMP_LOW=jumps[0], JUMP_HIGH=jumps[1], BLOCK=block, enable_fp_fusion=False,
    )  # fmt: skip
    return table


def anchored_pack(flat, bits: int, grid, channels: int, inner: int, stochastic: bool):
    numel = flat.numel()
    blocks = _cdiv(numel, FLAG_BLOCK)
    codes = torch.empty(_cdiv(numel, 8 // bits), dtype=torch.uint8, device=flat.device)
    flags = torch.empty(blocks, dtype=torch.uint8, device=flat.device)
    _anchored_pack_kernel[(blocks,)](
        flat, codes, flags, grid, numel, channels, inner, *_magic(channels), *_magic(inner),
        _seed() if stochastic else 0,
        BITS=bits, BLOCK=FLAG_BLOCK, STOCHASTIC=stochastic, WIDE=_wide(numel), INNER_IS_ONE=inner == 1,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    return codes, flags


def anchored_unpack(
    codes, flags, grid, bits: int, channels: int, inner: int, numel: int, dtype,
    *, activation: int = 0, negative_slope: float = 0.0, tables=None, batch: int = 1, batch_inner: int = 1,
    addend=None, grad_activation: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Unpack with the epilogue ``activation(v) * scale + shift (+ grad_scale * act'(v) * grad)``;
    ``tables`` = (scale, shift), flat float32, per channel or per (sample, channel) where a sample is
    ``(offset // batch_inner) % batch``; ``addend`` = (grad in memory order, grad_scale laid out as
    the tables); ``act'`` the derivative of activation ``grad_activation`` (0: none)."""
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    scale, shift = tables if tables is not None else (grid, grid)  # unread without AFFINE
    grad, grad_scale = addend if addend is not None else (grid, grid)  # unread without ADD_GRAD
    _anchored_unpack_kernel[(flags.numel(),)](
        codes, flags, grid, scale, shift, grad, grad_scale, out, numel, channels, inner, *_magic(channels), *_magic(inner),
        batch, batch_inner, *_magic(batch), *_magic(batch_inner), negative_slope,
        BITS=bits, BLOCK=FLAG_BLOCK, WIDE=_wide(numel), INNER_IS_ONE=inner == 1,
        ACTIVATION=activation, AFFINE=tables is not None, PER_SAMPLE=tables is not None and scale.numel() != channels,
        BATCH_INNER_IS_ONE=batch_inner == 1, ON_CUDA=out.is_cuda, ADD_GRAD=addend is not None,
        GRAD_ACTIVATION=grad_activation, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- layer tables
# Per-channel (BatchNorm) or per-(sample, channel) (GroupNorm) work of a few hundred floats: one
# launch, instead of a dozen eager ops (two dozen for GroupNorm) whose launches would cost the host
# more than the step's large kernels (BatchNorm's backward tables come with the channel sums, in
# _anchored_channel_sums_kernel).

_TABLE_BLOCK = 1024


@direct_launch
@triton.jit
def _layer_tables_kernel(
    mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, grid_ptr, floats_ptr, channels, count, group_size, groups,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, STORE_OUTPUT: tl.constexpr, HAS_GRID: tl.constexpr,
    PER_SAMPLE: tl.constexpr, N: tl.constexpr, HALF: tl.constexpr, TINY: tl.constexpr, TINY_GAMMA: tl.constexpr,
    JUMP_LOW: tl.constexpr, JUMP_HIGH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # graphpass.quantize.layer_maps and anchored_grid, per entry, in the same float32 operations
    # (launched without FMA contraction, so they round as PyTorch's eager ops do). An entry is a
    # channel, or with PER_SAMPLE a (sample, channel) pair whose statistics are its group's.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < count
    if PER_SAMPLE:
        c = i % channels
        stat = (i // channels) * groups + c // group_size
    else:
        c = i
        stat = i
    mean = tl.load(mean_ptr + stat, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + stat, mask=inside, other=1.0).to(tl.float32)
    one = tl.full(mean.shape, 1.0, tl.float32)
    gamma = tl.load(gamma_ptr + c, mask=inside, other=1.0).to(tl.float32) if HAS_GAMMA else one
    beta = tl.load(beta_ptr + c, mask=inside, other=0.0).to(tl.float32) if HAS_BETA else one * 0.0
    h_scale = gamma * rstd
    h_shift = beta - mean * h_scale
    if STORE_OUTPUT:
        a = tl.where(tl.abs(gamma) > TINY_GAMMA, tl.math.div_rn(one, gamma), 0.0)
        scale = tl.math.div_rn(a, rstd)
        shift = mean - beta * scale
        center, grid_mean, grid_std = beta, beta, tl.abs(gamma)
    else:
        a, scale, shift = rstd, h_scale, h_shift
        center, grid_mean, grid_std = mean, mean, tl.math.div_rn(one, rstd)
    tl.store(floats_ptr + i, scale, mask=inside)
    tl.store(floats_ptr + count + i, shift, mask=inside)
    tl.store(floats_ptr + 2 * count + i, h_scale, mask=inside)
    tl.store(floats_ptr + 3 * count + i, a, mask=inside)
    tl.store(floats_ptr + 4 * count + i, center, mask=inside)
    tl.store(floats_ptr + 5 * count + i, h_shift, mask=inside)
    if HAS_GRID:
        # Without an activation the stored tensor is the norm's input, whose sign nothing reads.
        step, inv, code_shift = _anchored_grid(grid_mean, grid_std, N, HALF, TINY, STORE_OUTPUT, JUMP_LOW, JUMP_HIGH)
        tl.store(grid_ptr + i * 3, step, mask=inside)
        tl.store(grid_ptr + i * 3 + 1, inv, mask=inside)
        tl.store(grid_ptr + i * 3 + 2, code_shift, mask=inside)


def layer_tables(
    mean, rstd, gamma, beta, bits: int | None, store_output: bool, channels: int, samples: int, jumps: tuple[float, float]
):  # fmt: skip
    """graphpass.quantize.layer_tables: (grid or None, (6, samples * channels) floats) in one launch;
    ``mean``/``rstd`` hold one entry per channel, or per sample and group; ``jumps``: (low, high)."""
    count = samples * channels
    groups = mean.numel() // samples
    floats = torch.empty(6, count, dtype=torch.float32, device=mean.device)
    grid = torch.empty(count, 3, dtype=torch.float32, device=mean.device) if bits is not None else None
    _layer_tables_kernel[(_cdiv(count, _TABLE_BLOCK),)](
        mean, rstd, gamma if gamma is not None else mean, beta if beta is not None else mean,
        grid if grid is not None else floats, floats, channels, count, channels // groups, groups,
        HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, STORE_OUTPUT=store_output, HAS_GRID=grid is not None,
        PER_SAMPLE=groups != count, N=1 << (bits or 8), HALF=WINDOW_STDS[bits or 8], TINY=TINY_STEP,
        TINY_GAMMA=TINY_GAMMA, JUMP_LOW=jumps[0], JUMP_HIGH=jumps[1], BLOCK=_TABLE_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return grid, floats


# ----------------------------------------------------------------------------- Proxy Norm statistics
# PN-Act's per-channel proxy statistics and their gradients, over (C, N) quadrature points that
# depend on the parameters only: one launch each, instead of about 7 and 20 eager ops per layer.

_PROXY_TILE = 4096  # points per program: BLOCK_C channels of BLOCK_P points
MAX_PROXY_POINTS = _PROXY_TILE


@direct_launch
@triton.jit
def _proxy_statistics_kernel(
    w_ptr, b_ptr, pw_ptr, pb_ptr, q_ptr, mu_ptr, inv_ptr, grad_mu_ptr, grad_inv_ptr, out_ptr, channels, num_points,
    negative_slope, eps,
    ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr, ON_CUDA: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # graphpass.proxy_norm.proxy_statistics (forward: out = (mu~, 1/std~)) or _proxy_statistics_grads
    # (BACKWARD: from mu~, 1/std~ and their gradients, out = the gradients of gamma, beta, gamma~,
    # beta~), over the points h[c, i] = gamma (beta~ + (1 + gamma~) q_i) + beta.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = c < channels
    i = tl.arange(0, BLOCK_P)
    valid = inside[:, None] & (i < num_points)[None, :]
    q = tl.load(q_ptr + i, mask=i < num_points, other=0.0)[None, :]
    w = tl.load(w_ptr + c, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=inside, other=0.0).to(tl.float32)
    pw = tl.load(pw_ptr + c, mask=inside, other=0.0).to(tl.float32)
    pb = tl.load(pb_ptr + c, mask=inside, other=0.0).to(tl.float32)
    h = b[:, None] + w[:, None] * (pb[:, None] + (1.0 + pw)[:, None] * q)
    p = _activate(h, ACTIVATION, negative_slope, ON_CUDA)
    inv_n = 1.0 / num_points
    if BACKWARD:
        mu = tl.load(mu_ptr + c, mask=inside, other=0.0)
        inv_std = tl.load(inv_ptr + c, mask=inside, other=0.0)
        grad_mu = tl.load(grad_mu_ptr + c, mask=inside, other=0.0)
        grad_inv = tl.load(grad_inv_ptr + c, mask=inside, other=0.0)
        coef = grad_inv * inv_std * inv_std * inv_std * -inv_n
        grad_p = (grad_mu * inv_n - coef * mu)[:, None] + p * coef[:, None]
        grad_h = tl.where(valid, _activation_grad(grad_p, h, ACTIVATION, negative_slope), 0.0)
        # Identity: only mu~ sees beta and beta~, so S0 is G_mu exactly (see _proxy_statistics_grads).
        if ACTIVATION == 0:
            s0 = grad_mu
        else:
            s0 = tl.sum(grad_h, axis=1)
        s1 = tl.sum(grad_h * q, axis=1)
        tl.store(out_ptr + c, pb * s0 + (1.0 + pw) * s1, mask=inside)
        tl.store(out_ptr + channels + c, s0, mask=inside)
        tl.store(out_ptr + 2 * channels + c, w * s1, mask=inside)
        tl.store(out_ptr + 3 * channels + c, w * s0, mask=inside)
    else:
        mean = tl.sum(tl.where(valid, p, 0.0), axis=1) * inv_n
        centered = tl.where(valid, p - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) * inv_n
        tl.store(out_ptr + c, mean, mask=inside)
        tl.store(out_ptr + channels + c, 1.0 / tl.sqrt(var + eps), mask=inside)


def _proxy_launch(params, q, stats_and_grads, activation: int, negative_slope: float, eps: float) -> torch.Tensor:
    weight = params[0]
    channels, num_points = weight.numel(), q.numel()
    backward = stats_and_grads is not None
    out = torch.empty(4 if backward else 2, channels, dtype=torch.float32, device=weight.device)
    block_p = _next_power_of_2(num_points)
    block_c = max(1, _PROXY_TILE // block_p)
    _proxy_statistics_kernel[(_cdiv(channels, block_c),)](
        *params, q, *(stats_and_grads if backward else (out, out, out, out)), out, channels, num_points,
        negative_slope, eps,
        ACTIVATION=activation, BACKWARD=backward, ON_CUDA=weight.is_cuda, BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


def proxy_statistics(params, q, activation: int, negative_slope: float, eps: float) -> torch.Tensor:
    """graphpass.proxy_norm.proxy_statistics as a (2, C) float32 table (mu~, 1/std~); ``params`` =
    (gamma, beta, gamma~, beta~), C each; ``q``: the N <= MAX_PROXY_POINTS float32 quantiles."""
    return _proxy_launch(params, q, None, activation, negative_slope, eps)


def proxy_statistics_grads(params, q, mu, inv_std, grad_mu, grad_inv_std, activation: int, negative_slope: float) -> torch.Tensor:
    """graphpass.proxy_norm._proxy_statistics_grads as a (4, C) float32 table; ``mu``, ``inv_std`` and
    their gradients: C float32 each."""
    return _proxy_launch(params, q, (mu, inv_std, grad_mu, grad_inv_std), activation, negative_slope, 0.0)


# ----------------------------------------------------------------------------- 1-bit mask


@direct_launch
@triton.jit
def _mask_pack_kernel(m_ptr, codes_ptr, numel, BLOCK: tl.constexpr, WIDE: tl.constexpr, FROM_FLOAT: tl.constexpr):
    _, byte, lane, offs = _block_offsets(1, BLOCK, WIDE)
    value = tl.load(m_ptr + offs, mask=offs < numel, other=0)
    if FROM_FLOAT:  # graphpass.quantize.pack_positive_mask: ~(x <= 0), NaN included
        bit = tl.where(value <= 0, 0, 1)
    else:
        bit = (value != 0).to(tl.int32)
    tl.store(codes_ptr + byte, tl.sum(bit << lane[None, :], axis=1).to(tl.uint8), mask=byte * 8 < numel)


@direct_launch
@triton.jit
def _mask_unpack_kernel(codes_ptr, m_ptr, numel, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    _, byte, lane, offs = _block_offsets(1, BLOCK, WIDE)
    packed = tl.load(codes_ptr + byte, mask=byte * 8 < numel, other=0).to(tl.int32)
    # Through float32: the interpreter converts int32 to bfloat16 by its bits.
    bit = ((packed[:, None] >> lane[None, :]) & 1).to(tl.float32)
    tl.store(m_ptr + offs, bit.to(m_ptr.dtype.element_ty), mask=offs < numel)


def mask_pack(flat: torch.Tensor) -> torch.Tensor:
    """Bits of a bool tensor, or of ``~(flat <= 0)`` for a floating-point one."""
    numel = flat.numel()
    codes = torch.empty(_cdiv(numel, 8), dtype=torch.uint8, device=flat.device)
    from_float = flat.is_floating_point()
    _mask_pack_kernel[(_cdiv(numel, _MASK_TILE),)](
        flat if from_float else flat.view(torch.uint8), codes, numel,
        BLOCK=_MASK_TILE, WIDE=_wide(numel), FROM_FLOAT=from_float, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return codes


def mask_unpack(codes: torch.Tensor, numel: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The bits as bool, or as 0/1 in ``dtype``."""
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    _mask_unpack_kernel[(_cdiv(numel, _MASK_TILE),)](
        codes, out.view(torch.uint8) if dtype == torch.bool else out, numel,
        BLOCK=_MASK_TILE, WIDE=_wide(numel), num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out
