"""Packing formats of graphpass.quantize: error bounds, exact sign, NaN/Inf, edge cases, and the
Triton kernels (run by the interpreter on the CPU) against the PyTorch path."""

import math
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import graphpass.quantize as quantize_module
from graphpass.errors import InputError
from graphpass.quantize import (
    FLAG_BLOCK,
    WINDOW_STDS,
    Activation,
    Packed,
    anchored_grid,
    batch_norm_backward,
    batch_norm_grad_tables,
    channel_sums,
    fused_norm_grad,
    group_norm_backward,
    layer_tables,
    pack_anchored,
    pack_groups,
    pack_mask,
    pack_positive_mask,
    triton_available,
    unpack,
)

BITS = (2, 4, 8)


def _group_steps(p, numel):
    """Per-element step of the group each element belongs to."""
    return p.scales[:, 1].repeat_interleave(p.group_size)[:numel]


def _channel_stats(v, channel_dim=1):
    dims = [d for d in range(v.dim()) if d != channel_dim]
    if v.numel() == 0:
        return torch.zeros(v.shape[channel_dim]), torch.ones(v.shape[channel_dim])
    return v.mean(dims), v.std(dims, correction=0)


def _window(v, p, channel_dim=1):
    """Per-element step, and whether the element lies inside the channel's representable range."""
    n = 1 << p.bits
    step, shift = p.grid[:, 0], p.grid[:, 2]
    view = [1] * v.dim()
    view[channel_dim] = -1
    step, shift = step.view(view), shift.view(view)
    inside = (v > -shift * step) & (v <= (n - shift) * step)
    return step.expand_as(v), inside


# ----------------------------------------------------------------------------- group layout


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [4, 64, 256])
def test_group_round_to_nearest_within_half_step(bits, group_size):
    x = torch.randn(3, 7, 29) * torch.logspace(-3, 3, 29)  # groups with very different ranges; numel not a multiple
    p = pack_groups(x, bits, group_size=group_size)
    y = unpack(p)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = (x - y).abs().reshape(-1)
    bound = _group_steps(p, x.numel()) * 0.5 * (1 + 1e-5) + 1e-6 * x.abs().reshape(-1)
    assert (err <= bound).all(), (err - bound).max()
    groups = -(-x.numel() // group_size)
    assert p.nbytes == groups * group_size * bits // 8 + groups * 8 + groups


@pytest.mark.parametrize("bits", BITS)
def test_group_stochastic_rounding_is_unbiased(bits):
    # 4000 identical groups: each has the same grid, so averaging over groups averages over draws.
    row = torch.rand(64)
    row[0], row[-1] = 0.0, 1.0  # fixes the grid: step 1 / (2**bits - 1)
    x = row.repeat(4000)
    p = pack_groups(x, bits, group_size=64, stochastic=True)
    y = unpack(p).view(4000, 64)
    step = 1.0 / ((1 << bits) - 1)
    assert ((y - row).abs() <= step * (1 + 1e-5)).all()
    bias = (y.mean(0) - row).abs().max().item()
    assert bias < 0.05 * step, bias
    deterministic_bias = (unpack(pack_groups(row, bits, group_size=64)) - row).abs().max().item()
    assert deterministic_bias > 0.2 * step  # the test would notice rounding to nearest


@pytest.mark.parametrize("bits", BITS)
def test_group_constant_and_all_nonfinite_groups(bits):
    x = torch.cat([torch.full((64,), 3.25), torch.zeros(64), torch.full((64,), math.nan)])
    y = unpack(pack_groups(x, bits, group_size=64))
    assert torch.equal(y[:128], x[:128])  # constant groups are exact
    assert torch.isnan(y[128:]).all()


# ----------------------------------------------------------------------------- anchored layout


def _signed_test_tensor():
    """Channels whose mean/std ratio spans both shift clamps, plus values at and near zero."""
    v = torch.randn(4, 6, 5, 7)
    ratio = torch.tensor([-5.0, -3.5, -0.5, 0.0, 1.0, 5.0])  # mean in units of std
    v = v + ratio.view(1, -1, 1, 1)
    flat = v.view(-1)
    flat[:8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45, 1e-7, -1e-7])
    return v


@pytest.mark.parametrize("bits", BITS)
def test_anchored_sign_is_exact(bits):
    v = _signed_test_tensor()
    mean, std = _channel_stats(v)
    p = pack_anchored(v, bits, mean=mean, std=std)
    y = unpack(p)
    assert torch.equal(y > 0, v > 0)
    assert (y != 0).all()  # midpoints: a value <= 0 comes back strictly negative
    shift = p.grid[:, 2]
    assert torch.equal(p.grid, torch.stack(anchored_grid(mean, std, bits), 1))
    assert ((shift >= 1) & (shift <= (1 << bits) - 1)).all()


@pytest.mark.parametrize("bits", BITS)
def test_anchored_within_half_step_inside_window(bits):
    v = _signed_test_tensor()
    mean, std = _channel_stats(v)
    p = pack_anchored(v, bits, mean=mean, std=std)
    step, inside = _window(v, p)
    err = (unpack(p) - v).abs()
    assert inside.float().mean() > 0.8  # the window covers most of each channel
    assert (err[inside] <= step[inside] * 0.5 * (1 + 1e-5)).all()
    assert p.nbytes == -(-v.numel() * bits // 8) + 6 * 12 + -(-v.numel() // FLAG_BLOCK)


def _far_window_tensor(half: float):
    """Values spread over mean +- half std (std 1), for means from -40 to 40 std: per channel."""
    ratio = torch.tensor([-40.0, -10.0, -5.0, -3.0, -1.0, 0.0, 2.0, 3.5, 6.0, 40.0])
    u = torch.linspace(-half, half, 121)[1:]  # the window, its top edge included
    return u.view(-1, 1) + ratio, ratio, torch.ones_like(ratio)


@pytest.mark.parametrize("bits", BITS)
def test_anchored_window_is_not_clipped_far_from_zero(bits):
    """|mean| > w std: BLPA's grid would clip the window's far side; this one widens its step just
    enough for the bins on the mean's side of zero to reach it, and keeps the sign exact."""
    half = WINDOW_STDS[bits]
    v, mean, std = _far_window_tensor(half)
    p = pack_anchored(v, bits, mean=mean, std=std, channel_dim=1)
    n = 1 << bits
    step = p.grid[:, 0]
    widest = torch.maximum(2 * half * std / n, (mean.abs() + half * std) / (n - 1))
    assert (step <= widest * (1 + 1e-6)).all()
    near = mean.abs() <= 1
    assert torch.equal(step[near], 2 * half * std[near] / n)  # near zero: the window's own step
    # Where the mean is w std or more from zero the whole window fits; elsewhere the grid is
    # anchored at 0, not at the mean, so an edge of the window may miss up to one step.
    inside = ((v - mean).abs() <= half - step) | (mean.abs() >= half)
    err = (unpack(p) - v).abs()
    bound = step * 0.5 * (1 + 1e-5) + 1e-6 * v.abs()  # float rounding of v / step, v far from zero
    assert (err[inside] <= bound[inside]).all()
    assert torch.equal(unpack(p) > 0, v > 0)


@pytest.mark.parametrize("bits", BITS)
def test_centred_grid_keeps_its_step_far_from_zero(bits):
    """anchored=False: the window mean +- w std in steps of 2 w std / 2**bits wherever the mean is."""
    half = WINDOW_STDS[bits]
    v, mean, std = _far_window_tensor(half)
    p = pack_anchored(v, bits, mean=mean, std=std, channel_dim=1, anchored=False)
    n = 1 << bits
    assert torch.equal(p.grid, torch.stack(anchored_grid(mean, std, bits, anchored=False), 1))
    assert torch.allclose(p.grid[:, 0], 2 * half * std / n)
    inside = v < mean + half - 2 * half / n  # centred to within a step: its top bin may fall short
    err = (unpack(p) - v).abs()
    assert (err[inside] <= ((half / n) * (1 + 1e-5) + 1e-6 * v.abs())[inside]).all()


@pytest.mark.parametrize("anchored", [True, False])
@pytest.mark.parametrize("bits,bound", [(8, 0.011), (4, 0.12)])
def test_window_error_on_gaussian_channels(bits, bound, anchored):
    """Root-mean-square error over std on Gaussian channels: 8 bits near the least a uniform grid
    of 256 steps reaches (0.010); BLPA's +-3 std window gave 0.022 (the clipped tails). 4 bits
    keeps that window (0.114)."""
    v = torch.randn(8, 64, 16, 16, generator=torch.Generator().manual_seed(0))
    mean, std = _channel_stats(v)
    err = unpack(pack_anchored(v, bits, mean=mean, std=std, anchored=anchored)) - v
    assert err.pow(2).mean().sqrt() / v.std() < bound


JUMP_CASES = [("relu6", (6.0,)), ("hardswish", (-3.0, 3.0))]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("activation,jumps", JUMP_CASES)
def test_anchored_grid_keeps_each_value_on_its_side_of_a_jump(bits, activation, jumps):
    """The derivative of relu6 / hardswish jumps at 6 / +-3: a value rebuilt across a jump would get
    the wrong one. Channels whose window ends at, before or across a jump, some far from it."""
    assert Activation(activation).jumps == jumps
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([0.0, 0.0, 0.0, 2.0, 4.5, 6.0, -2.0, 1.0, 30.0])
    std = torch.tensor([1.0, 0.8, 1.3, 1.5, 0.5, 2.0, 0.7, 4.0, 1.0])
    v = mean + std * torch.randn(4000, 9, generator=g) * 1.5  # tails past the +-3 std window
    p = pack_anchored(v, bits, mean=mean, std=std, jumps=jumps, channel_dim=1)
    assert torch.equal(p.grid, torch.stack(anchored_grid(mean, std, bits, jumps=jumps), 1))
    y = unpack(p)
    near = torch.stack([(j - mean).abs() < 5 * std for j in jumps]).any(0)
    for j in jumps:
        assert torch.equal((y > j)[:, near], (v > j)[:, near]), j
    assert torch.equal(y > 0, v > 0)
    act = Activation(activation)
    grad = torch.ones_like(v)
    # Between the jumps the derivative's slope is 0 (relu6) or 1/3 (hardswish): half a step apart.
    slope = 1.0 / 3.0 if activation == "hardswish" else 0.0
    err = (act.backward(grad, y) - act.backward(grad, v)).abs()
    assert (err[:, near] <= (slope * 0.5 * p.grid[:, 0] * (1 + 1e-5))[near] + 1e-6).all()
    # Without the jumps, BLPA's window edge at 3 std crosses hardswish's jump where std = 1.
    plain = unpack(pack_anchored(v, bits, mean=mean, std=std, channel_dim=1))
    if activation == "hardswish":
        assert not torch.equal(plain > 3.0, v > 3.0)


def test_jumps_must_be_one_magnitude_in_order():
    for bad in [(3.0, -3.0), (0.0,), (-2.0, 3.0), (1.0, 2.0, 3.0)]:
        with pytest.raises(InputError, match="jumps"):
            anchored_grid(torch.zeros(1), torch.ones(1), 4, jumps=bad)


def test_centred_grid_of_an_infinite_mean_stays_finite():
    step, inv, shift = anchored_grid(torch.tensor([math.inf, -math.inf, 1e30]), torch.ones(3), 4, anchored=False)
    assert torch.isfinite(shift).all() and (shift.abs() <= 2**24).all()


@pytest.mark.parametrize("bits", BITS)
def test_anchored_stochastic_rounding_is_unbiased(bits):
    n = 1 << bits
    step = 2 * WINDOW_STDS[bits] / n
    # Away from zero, inside the window.
    row = WINDOW_STDS[bits] * torch.tensor([-0.77, -0.37, 0.23, 0.43, 0.7]) + 0.3 * step
    row = row[(row.abs() > step) & (row > -n // 2 * step) & (row < (n // 2 - 1) * step)]
    v = row.view(1, 1, -1).expand(20000, 1, -1).contiguous()
    p = pack_anchored(v, bits, mean=torch.zeros(1), std=torch.ones(1), stochastic=True)
    y = unpack(p).view(20000, -1)
    assert torch.equal(y > 0, v.view(20000, -1) > 0)
    bias = (y.mean(0) - row).abs().max().item()
    assert bias < 0.05 * step, bias


@pytest.mark.parametrize("bits", BITS)
def test_anchored_constant_channels_give_no_nan(bits):
    v = torch.empty(2, 3, 4)
    v[:, 0], v[:, 1], v[:, 2] = 2.5, 0.0, -1.0
    mean, std = _channel_stats(v)
    assert torch.equal(std, torch.zeros(3))
    y = unpack(pack_anchored(v, bits, mean=mean, std=std))
    assert torch.isfinite(y).all()
    assert torch.equal(y > 0, v > 0)
    assert ((y - v).abs() <= v.abs() / (1 << bits) + 1e-20).all()


@pytest.mark.parametrize("channel_dim", [0, 1, -1])
def test_anchored_any_rank_and_channel_dim(channel_dim):
    v = torch.randn(5, 6, 7)
    mean, std = _channel_stats(v, channel_dim % 3)
    y = unpack(pack_anchored(v, 4, mean=mean, std=std, channel_dim=channel_dim))
    assert torch.equal(y > 0, v > 0)
    step, inside = _window(v, pack_anchored(v, 4, mean=mean, std=std, channel_dim=channel_dim), channel_dim % 3)
    assert ((y - v).abs()[inside] <= step[inside] * 0.5 * (1 + 1e-5)).all()


def test_channels_last_is_read_in_place_and_keeps_its_layout():
    v = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    mean, std = _channel_stats(v)
    p = pack_anchored(v, 4, mean=mean, std=std)
    assert p.perm == (0, 2, 3, 1)  # memory order: no copy into NCHW
    y = unpack(p)
    assert y.stride() == v.stride()
    contiguous = pack_anchored(v.contiguous(), 4, mean=mean, std=std)
    assert torch.equal(y, unpack(contiguous))
    g = unpack(pack_groups(v, 4))
    assert g.stride() == v.stride()


# ----------------------------------------------------------------------------- shared edge cases


def _pack(layout, x, bits, **kw):
    if layout == "group":
        return pack_groups(x, bits, **kw)
    mean, std = _channel_stats(torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0))
    return pack_anchored(x, bits, mean=mean, std=std, **kw)


@pytest.mark.parametrize("layout", ["group", "anchored"])
@pytest.mark.parametrize("bits", BITS)
def test_nan_and_inf_survive(layout, bits):
    x = torch.randn(2, 3, 300)
    specials = {(0, 0, 5): math.nan, (0, 1, 7): math.inf, (1, 2, 299): -math.inf, (1, 0, 0): math.nan}
    for index, value in specials.items():
        x[index] = value
    y = unpack(_pack(layout, x, bits))
    for index, value in specials.items():
        assert y[index].item() == value or (math.isnan(value) and math.isnan(y[index].item()))
    finite = torch.isfinite(x)
    assert torch.isfinite(y[finite]).all()
    assert ((y - x).abs()[finite] <= 2 * (x[finite].max() - x[finite].min())).all()
    if layout == "anchored" and bits > 2:
        assert torch.equal(y > 0, x > 0)  # also next to NaN/Inf


@pytest.mark.parametrize("layout", ["group", "anchored"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_round_trip_through_float32(layout, dtype):
    x = torch.randn(2, 4, 9, 9).to(dtype)
    y = unpack(_pack(layout, x, 8))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, unpack(_pack(layout, x.float(), 8)).to(dtype))


@pytest.mark.parametrize("layout", ["group", "anchored", "mask"])
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (1, 4, 3, 3), (1, 4, 1, 1)])
def test_empty_and_batch_one(layout, shape):
    x = torch.randn(shape)
    p = pack_mask(x > 0) if layout == "mask" else _pack(layout, x, 4)
    y = unpack(p)
    assert y.shape == x.shape
    if layout == "mask":
        assert torch.equal(y, x > 0)
    else:
        assert torch.isfinite(y).all() and y.dtype == x.dtype
    if layout == "anchored":
        assert torch.equal(y > 0, x > 0)


@pytest.mark.parametrize("shape", [(13,), (3, 5, 7), (2, 3, 4, 5)])
def test_mask_round_trip(shape):
    m = torch.rand(shape) > 0.5
    p = pack_mask(m)
    assert p.nbytes == -(-m.numel() // 8)
    assert torch.equal(unpack(p), m)
    cl = (torch.rand(2, 3, 4, 5) > 0.5).to(memory_format=torch.channels_last)
    assert torch.equal(unpack(pack_mask(cl)), cl)


def _relu_result(shape):
    """A ReLU's output with zeros, NaN and +-Inf: its mask is ~(x <= 0), NaN counting as positive."""
    x = torch.randn(shape).relu_()
    x.view(-1)[:3] = torch.tensor([math.nan, math.inf, -math.inf])
    return x


@pytest.mark.parametrize("shape", [(13,), (2, 3, 4, 5)])
def test_positive_mask_is_what_relu_backward_reads(shape):
    x = _relu_result(shape)
    p = pack_positive_mask(x)
    assert p.nbytes == -(-x.numel() // 8)
    assert torch.equal(unpack(p), ~(x <= 0))
    assert torch.equal(unpack(p, dtype=torch.float16), (~(x <= 0)).half())
    with pytest.raises(InputError, match="floating-point"):
        pack_positive_mask(x > 0)


@pytest.mark.parametrize("device", ["meta", "fake"])
def test_shape_only_tensors(device):
    """Saved-tensor discovery runs on fake/meta tensors: same shapes, dtypes and nbytes."""
    real = torch.randn(2, 8, 5, 5)
    real_sizes = {
        "group": pack_groups(real, 4).nbytes,
        "anchored": _pack("anchored", real, 2).nbytes,
        "mask": pack_mask(real > 0).nbytes,
    }
    mode = FakeTensorMode() if device == "fake" else None
    with mode or torch.device("meta"):
        x = torch.empty(2, 8, 5, 5, dtype=torch.bfloat16)
        packs = {
            "group": pack_groups(x, 4, stochastic=True),
            "anchored": pack_anchored(x, 2, mean=torch.zeros(8), std=torch.ones(8)),
            "mask": pack_mask(x > 0),
        }
        for name, p in packs.items():
            y = unpack(p)
            assert y.shape == x.shape and p.nbytes == real_sizes[name]
            assert y.dtype == (torch.bool if name == "mask" else torch.bfloat16)


def test_bad_arguments_are_clear_errors():
    x = torch.randn(2, 3)
    with pytest.raises(InputError, match="bits=3"):
        pack_groups(x, 3)
    with pytest.raises(InputError, match="group_size"):
        pack_groups(x, 4, group_size=100)
    with pytest.raises(InputError, match="floating-point"):
        pack_groups(torch.ones(3, dtype=torch.int64), 4)
    with pytest.raises(InputError, match="mean must be a tensor of 3"):
        pack_anchored(x, 4, mean=torch.zeros(2), std=torch.ones(3))
    with pytest.raises(InputError, match="channel_dim"):
        pack_anchored(x, 4, mean=torch.zeros(3), std=torch.ones(3), channel_dim=2)
    with pytest.raises(InputError, match="bool"):
        pack_mask(x)


# ----------------------------------------------------------------------------- fused epilogue

EPILOGUE_ACTIVATIONS = {
    "none": None, "relu": Activation("relu"), "relu6": Activation("relu6"),
    "leaky_relu": Activation("leaky_relu", 0.2), "hardswish": Activation("hardswish"), "silu": Activation("silu"),
    "gelu": Activation("gelu"), "gelu_tanh": Activation("gelu", approximate="tanh"), "mish": Activation("mish"),
}  # fmt: skip
EPILOGUE_LAYOUTS = ["nchw", "channels_last", "batch_inside", "channel_last_dim"]


def _epilogue_case(layout, device="cpu"):
    """A packed tensor of three flag blocks (NaN/Inf in the first only), its channel dim, and tables:
    none, per channel (C,), per sample and channel (N, C)."""
    if layout == "batch_inside":  # memory order (channel, sample, position): the sample is not outermost
        v, channel_dim = torch.randn(6, 4, 99, device=device).permute(1, 0, 2), 1
    elif layout == "channel_last_dim":
        v, channel_dim = torch.randn(4, 99, 6, device=device), 2
    else:
        v, channel_dim = torch.randn(4, 6, 9, 11, device=device) * 2, 1
        if layout == "channels_last":
            v = v.to(memory_format=torch.channels_last)
    mean, std = _channel_stats(v, channel_dim)
    in_memory_order = v.permute(sorted(range(v.dim()), key=lambda d: -v.stride(d)))
    in_memory_order.view(-1)[[3, 5, 7]] = v.new_tensor([math.nan, math.inf, -math.inf])
    p = pack_anchored(v, 4, mean=mean, std=std, channel_dim=channel_dim)
    n, c = v.shape[0], v.shape[channel_dim]
    tables = [None] + [tuple(torch.randn(shape, device=device) for _ in range(2)) for shape in [(c,), (n, c)]]
    return p, channel_dim, tables


def _unpack_then_ops(p, channel_dim, activation, tables, dtype=torch.float32):
    """The unfused reference: unpack, activation, multiply-add with the tables broadcast by hand."""
    v = unpack(p, backend="torch").float()
    if activation is not None:
        v = activation(v)
    if tables is not None:
        scale, shift = tables
        view = [1] * v.dim()
        view[channel_dim] = v.shape[channel_dim]
        if scale.dim() == 2:
            view[0] = v.shape[0]
        v = torch.addcmul(shift.reshape(view), v, scale.reshape(view), out=torch.empty_like(v))  # v's layout
    return v.to(dtype)


@pytest.mark.parametrize("layout", EPILOGUE_LAYOUTS)
@pytest.mark.parametrize("activation", list(EPILOGUE_ACTIVATIONS))
def test_epilogue_equals_unpack_then_ops(layout, activation):
    """PyTorch path: bit for bit what unpacking and then applying the ops gives, in the input's layout."""
    act = EPILOGUE_ACTIVATIONS[activation]
    p, channel_dim, tables = _epilogue_case(layout)
    for t in tables:
        for dtype in (torch.float32, torch.bfloat16):
            scale, shift = t if t is not None else (None, None)
            got = unpack(p, activation=act, scale=scale, shift=shift, dtype=dtype, backend="torch")
            _assert_same_values(got, _unpack_then_ops(p, channel_dim, act, t, dtype))


def _norm_backward_reference(p, channel_dim, grad, center, tables):
    """channel_sums and fused_norm_grad computed from a full unpack, in float64."""
    v = unpack(p, backend="torch").double()
    dims = [d for d in range(v.dim()) if d != channel_dim]
    view = [1] * v.dim()
    view[channel_dim] = -1
    g = grad.double()
    sums = g.sum(dims), (g * (v - center.double().view(view))).sum(dims)
    scale, shift, grad_scale = (t.double().view(view) for t in tables)
    return sums, v * scale + shift + g * grad_scale


def _norm_backward_case(layout, device="cpu"):
    if layout == "rows_of_a_flag_block":  # (sample, channel, plane) rows of FLAG_BLOCK elements: chunks of rows
        v = torch.randn(8, 4, 16, 16, device=device)
        v.view(-1)[[3 * FLAG_BLOCK + 5, 5 * FLAG_BLOCK + 7]] = v.new_tensor([math.nan, -math.inf])
        mean, std = _channel_stats(v.nan_to_num(0, 0, 0))
        p, channel_dim = pack_anchored(v, 4, mean=mean, std=std), 1
    else:
        p, channel_dim, _ = _epilogue_case(layout, device)
    c = p.shape[channel_dim]
    grad = torch.randn(p.shape, device=device)
    tables = [torch.randn(c, device=device) for _ in range(3)]
    return p, channel_dim, grad, torch.randn(c, device=device), tables


def _check_norm_backward(p, channel_dim, grad, center, tables, backend):
    (ref_g, ref_gv), ref_out = _norm_backward_reference(p, channel_dim, grad, center, tables)
    sum_g, sum_gv = channel_sums(p, grad, center, backend=backend)
    assert sum_g.dtype == sum_gv.dtype == torch.float32
    torch.testing.assert_close(sum_g.double().cpu(), ref_g.cpu(), rtol=1e-5, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(sum_gv.double().cpu(), ref_gv.cpu(), rtol=1e-5, atol=1e-4, equal_nan=True)
    out = fused_norm_grad(p, grad, scale=tables[0], shift=tables[1], grad_scale=tables[2], backend=backend)
    assert out.shape == p.shape and out.dtype == grad.dtype
    assert out.stride() == unpack(p, backend="torch").stride()  # the copy's memory layout
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("layout", [*EPILOGUE_LAYOUTS, "rows_of_a_flag_block"])
@pytest.mark.parametrize("chunk", [FLAG_BLOCK, 2**17])
def test_norm_backward_from_the_copy_equals_a_full_unpack(layout, chunk, monkeypatch):
    """PyTorch path, in chunks of the copy (NaN/Inf in the first block included) and in one piece."""
    monkeypatch.setattr(quantize_module, "TORCH_CHUNK", chunk)
    _check_norm_backward(*_norm_backward_case(layout), backend="torch")


def test_norm_backward_reads_a_grad_in_another_layout():
    p, channel_dim, grad, center, tables = _norm_backward_case("channels_last")
    _check_norm_backward(p, channel_dim, grad.contiguous(), center, tables, backend="torch")
    # and the other way round: a contiguous copy, a channels_last gradient (not the one-view case)
    p, channel_dim, grad, center, tables = _norm_backward_case("nchw")
    _check_norm_backward(p, channel_dim, grad.contiguous(memory_format=torch.channels_last), center, tables, backend="torch")


def test_norm_backward_bad_arguments_are_clear_errors():
    v = torch.randn(2, 3, 4)
    p = pack_anchored(v, 4, mean=torch.zeros(3), std=torch.ones(3))
    with pytest.raises(InputError, match="anchored layout"):
        channel_sums(pack_groups(v, 4), v, torch.zeros(3))
    with pytest.raises(InputError, match="shape"):
        channel_sums(p, torch.randn(2, 3, 5), torch.zeros(3))
    with pytest.raises(InputError, match="center must have 3"):
        channel_sums(p, v, torch.zeros(4))
    with pytest.raises(InputError, match="3 elements"):
        fused_norm_grad(p, v, scale=torch.ones(3), shift=torch.ones(3), grad_scale=torch.ones(2))


def test_epilogue_bad_arguments_are_clear_errors():
    v = torch.randn(2, 3, 4)
    p = pack_anchored(v, 4, mean=torch.zeros(3), std=torch.ones(3))
    with pytest.raises(InputError, match="anchored layout"):
        unpack(pack_groups(v, 4), activation=Activation("relu"))
    with pytest.raises(InputError, match="scale and shift"):
        unpack(p, scale=torch.ones(3))
    with pytest.raises(InputError, match="3 or 6 elements"):
        unpack(p, scale=torch.ones(4), shift=torch.ones(4))
    with pytest.raises(InputError, match="floating-point"):
        unpack(p, dtype=torch.int32)


# ----------------------------------------------------------------------------- Triton kernels


def _interpreter_problem():
    """Why the Triton kernels cannot run on this CPU, or None when they can."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET=1 is not set (tests/conftest.py sets it before triton is imported)"
    if not triton_available():
        return "triton cannot be imported here"
    try:
        unpack(pack_mask(torch.ones(3, dtype=torch.bool), backend="triton"), backend="triton")
    except Exception as e:  # report the interpreter's own failure as the skip reason
        return f"the Triton interpreter cannot run here: {type(e).__name__}: {e}"
    return None


def _layer_case(case, channels=6, device="cpu"):
    """(mean, rstd, gamma, beta) of a BatchNorm layer; "tiny" has a gamma that cannot be inverted;
    "far": means and beta / gamma up to 20 std from zero, so both grids leave BLPA's."""
    g = torch.Generator().manual_seed(0)
    mean, rstd = torch.randn(channels, generator=g), torch.rand(channels, generator=g) + 0.5
    gamma, beta = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    if case == "tiny":
        gamma[1] = 1e-13
    if case == "far":
        mean, beta = mean * 10, beta * gamma.abs() * 10
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return to(mean), to(rstd), to(gamma if case != "no_affine" else None), to(beta if case != "no_affine" else None)


LAYER_CASES = ["affine", "no_affine", "tiny", "far"]


@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("store_output", [True, False])
def test_layer_tables_map_between_the_roles(case, store_output):
    """In float64: the stored role maps to the other, x_hat and the grid follow the norm's statistics."""
    mean, rstd, gamma, beta = _layer_case(case)
    grid, floats = layer_tables(mean, rstd, gamma, beta, bits=4, store_output=store_output)
    assert floats.shape == (6, 6) and floats.dtype == torch.float32 and grid.shape == (6, 3)
    scale, shift, grad_scale, a, center, h_shift = floats.double()
    gamma = torch.ones(6) if gamma is None else gamma
    beta = torch.zeros(6) if beta is None else beta
    x = torch.randn(5, 6).double()
    x_hat = (x - mean.double()) * rstd.double()
    h = x_hat * gamma.double() + beta.double()
    stored, other = (h, x) if store_output else (x, h)
    invertible = gamma.abs() > 1e-12
    if store_output:  # x is rebuilt only where gamma can be inverted (else as the channel mean)
        other = torch.where(invertible, other, mean.double())
    torch.testing.assert_close(stored * scale + shift, other, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(((stored - center) * a)[:, invertible], x_hat[:, invertible], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_scale, (gamma * rstd).double())
    torch.testing.assert_close(x * grad_scale + h_shift, h, rtol=1e-5, atol=1e-5)
    stats = (beta, gamma.abs()) if store_output else (mean, 1.0 / rstd)
    assert torch.equal(grid, torch.stack(anchored_grid(*stats, 4, anchored=store_output), 1))
    assert layer_tables(mean, rstd, gamma, beta, bits=None, store_output=store_output)[0] is None


def _group_case(case, samples=3, groups=2, channels=6):
    """(mean, rstd) per (sample, group) of a GroupNorm layer, with the affine parameters of ``case``."""
    g = torch.Generator().manual_seed(1)
    mean, rstd = torch.randn(samples, groups, generator=g), torch.rand(samples, groups, generator=g) + 0.5
    return (mean, rstd, *_layer_case(case, channels)[2:])


@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("store_output", [True, False])
def test_layer_tables_per_sample_are_each_samples_channel_tables(case, store_output):
    """GroupNorm statistics (N, G): entry (n, c) is the per-channel table of sample n with its group's
    statistics, bit for bit."""
    mean, rstd, gamma, beta = _group_case(case)
    grid, floats = layer_tables(mean, rstd, gamma, beta, bits=None, store_output=store_output, channels=6)
    assert grid is None and floats.shape == (6, 3 * 6)
    for n in range(3):
        per_channel = (t[n].repeat_interleave(3) for t in (mean, rstd))
        expected = layer_tables(*per_channel, gamma, beta, bits=None, store_output=store_output)[1]
        assert torch.equal(floats.view(6, 3, 6)[:, n], expected)


def _bn_backward_case(layout, device="cpu"):
    p, channel_dim, grad, center, _ = _norm_backward_case(layout, device)
    c = p.shape[channel_dim]
    floats = torch.stack([torch.rand(c) + 0.5, torch.rand(c) + 0.5, torch.randn(c)]).to(device)
    return p, channel_dim, grad, floats


def _check_bn_backward(stored, channel_dim, grad, floats, backend=None):
    """batch_norm_grad_tables and fused_norm_grad against BatchNorm's backward formula, in float64."""
    v = (unpack(stored, backend="torch") if isinstance(stored, Packed) else stored).double()
    view = [1] * v.dim()
    view[channel_dim] = -1
    dims = [d for d in range(v.dim()) if d != channel_dim]
    grad_scale, a, center = (t.double().view(view) for t in floats)
    x_hat, g = (v - center) * a, grad.double()
    mean = lambda t: t.mean(dims, keepdim=True)  # noqa: E731
    expected_input = grad_scale * (g - mean(g) - x_hat * mean(g * x_hat))
    tables = batch_norm_grad_tables(stored, grad, floats, backend=backend)
    assert tables.shape == (4, v.shape[channel_dim]) and tables.dtype == torch.float32
    if isinstance(stored, Packed):
        got = fused_norm_grad(stored, grad, scale=tables[2], shift=tables[3], grad_scale=floats[0], backend=backend)
    else:
        got = stored * tables[2].view(view) + tables[3].view(view) + grad * floats[0].view(view)
    # batch_norm_backward, the runtime's one call per layer, is exactly these two steps.
    grad_x, grad_weight, grad_bias = batch_norm_backward(stored, grad, floats, backend=backend)
    _assert_same_values(grad_x, got)
    _assert_same_values(grad_weight, tables[0])
    _assert_same_values(grad_bias, tables[1])
    assert batch_norm_backward(stored, grad, floats, need_input_grad=False, backend=backend)[0] is None
    # A channel holding NaN/Inf has no finite sums; its input gradient must not come out finite.
    finite = torch.isfinite(v).all(dims).cpu()
    close = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tables[0].double().cpu()[finite], (g * x_hat).sum(dims).cpu()[finite], **close)
    torch.testing.assert_close(tables[1].double().cpu()[finite], g.sum(dims).cpu()[finite], **close)
    got, expected_input = got.double().movedim(channel_dim, 0).cpu(), expected_input.movedim(channel_dim, 0).cpu()
    torch.testing.assert_close(got[finite], expected_input[finite], rtol=1e-4, atol=1e-5)
    assert not torch.isfinite(got[~finite]).any()


@pytest.mark.parametrize("layout", [*EPILOGUE_LAYOUTS, "rows_of_a_flag_block"])
@pytest.mark.parametrize("chunk", [FLAG_BLOCK, 2**17])
def test_batch_norm_grad_tables_give_batch_norm_backward(layout, chunk, monkeypatch):
    """PyTorch path from the copy, in chunks and in one piece; and from an exact tensor."""
    monkeypatch.setattr(quantize_module, "TORCH_CHUNK", chunk)
    p, channel_dim, grad, floats = _bn_backward_case(layout)
    _check_bn_backward(p, channel_dim, grad, floats, backend="torch")
    if channel_dim == 1:
        _check_bn_backward(unpack(p).nan_to_num(0, 0, 0), 1, grad, floats)


GN_ACTIVATIONS = ["none", "relu", "leaky_relu", "relu6", "silu", "gelu", "hardswish", "mish"]


def _gn_backward_case(layout, activation="none", store_output=True, device="cpu", samples=3, seed=0):
    """A GroupNorm layer (4 groups of 2 channels) with its exact stored tensor (the pre-activation h,
    or with ``store_output`` False the input x), the floats group_norm_backward takes, the output
    map and the autograd reference in float64: (stored, grad, floats, params, groups, act, map, ref)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    n, c, groups = samples, 8, 4
    x, grad = rand(n, c, 5, 7) * 2 + 1, rand(n, c, 5, 7)
    weight, bias = torch.rand(c, generator=gen) + 0.5, rand(c) * 0.5
    mu, inv = rand(c) * 0.1, torch.rand(c, generator=gen) + 0.5
    act = Activation(activation, 0.2)
    ref = [t.double().requires_grad_() for t in (x, weight, bias, mu, inv)]
    h = torch.nn.functional.group_norm(ref[0], groups, ref[1], ref[2], 1e-5)
    ((act(h) - ref[3].view(1, -1, 1, 1)) * ref[4].view(1, -1, 1, 1)).backward(grad.double())
    per_group = x.double().reshape(n, groups, -1)
    mean, rstd = per_group.mean(2).float(), (per_group.var(2, correction=0) + 1e-5).rsqrt().float()
    floats = layer_tables(mean, rstd, weight, bias, bits=None, store_output=store_output, channels=c)[1][2:5]
    stored = h.detach().float() if store_output else x
    if layout == "channels_last":
        stored, grad = (t.contiguous(memory_format=torch.channels_last) for t in (stored, grad))
    expected = [t.grad for t in ref]
    on = lambda t: t.to(device)  # noqa: E731
    return on(stored), on(grad), on(floats), (on(weight), on(bias)), groups, act, (on(mu), on(inv)), expected


def _check_gn_backward(stored, grad, floats, params, groups, act, output_map, backend=None):
    """group_norm_backward's input gradient and rows against those of the same tensor's values
    through the PyTorch path: a copy's values are what an exact tensor holds."""
    got = group_norm_backward(stored, grad, floats, *params, groups=groups, activation=act, output_map=output_map, backend=backend)
    values = unpack(stored, backend="torch") if isinstance(stored, Packed) else stored
    ref = group_norm_backward(values, grad, floats, *params, groups=groups, activation=act, output_map=output_map, backend="torch")
    assert got[0].shape == grad.shape and got[0].dtype == grad.dtype and got[1].shape == (4, grad.shape[1])
    if isinstance(stored, Packed):
        assert got[0].stride() == values.stride()  # the copy's memory layout
    torch.testing.assert_close(got[0].cpu(), ref[0].cpu(), rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got[1].cpu(), ref[1].cpu(), rtol=1e-5, atol=1e-5, equal_nan=True)
    return got


@pytest.mark.parametrize("activation", GN_ACTIVATIONS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_backward_equals_autograd(activation, layout):
    """From an exact stored pre-activation: the input gradient and the gradients of weight, bias and
    the output map equal autograd through GroupNorm, the activation and the map (float64), 1e-5."""
    stored, grad, floats, params, groups, act, output_map, expected = _gn_backward_case(layout, activation)
    grad_x, rows = group_norm_backward(stored, grad, floats, *params, groups=groups, activation=act, output_map=output_map)
    for got, ref in zip([grad_x, *rows], expected):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert group_norm_backward(stored, grad, floats, *params, groups=groups, activation=act, need_input_grad=False)[0] is None


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_backward_from_a_stored_input_equals_autograd(layout):
    """A GroupNorm that no activation follows stores its input: per-(sample, channel) a and center."""
    stored, grad, floats, params, groups, act, output_map, expected = _gn_backward_case(layout, store_output=False)
    grad_x, rows = group_norm_backward(stored, grad, floats, *params, groups=groups, output_map=output_map)
    for got, ref in zip([grad_x, *rows], expected):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "silu", "none"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("chunk", [FLAG_BLOCK, 2**17])
def test_group_norm_backward_from_the_copy_equals_from_its_values(activation, layout, chunk, monkeypatch):
    """PyTorch path on a 4-bit copy, in chunks of the copy (a channels_last chunk ends inside a
    sample) and in one piece, against the exact tensor of the values it holds."""
    monkeypatch.setattr(quantize_module, "TORCH_CHUNK", chunk)
    stored, grad, floats, params, groups, act, output_map, _ = _gn_backward_case(layout, activation, samples=40)
    p = pack_anchored(stored, 4, mean=stored.mean((0, 2, 3)), std=stored.std((0, 2, 3)))
    _check_gn_backward(p, grad, floats, params, groups, act, output_map, backend="torch")


def test_group_norm_backward_keeps_nan_in_its_group():
    """A NaN in the copy spoils its (sample, group) input gradient, never silently finite; the other
    groups of that sample stay finite."""
    stored, grad, floats, params, groups, act, output_map, _ = _gn_backward_case("nchw", "relu")
    stored[1, 2, 3, 4] = math.nan  # sample 1, group 1 (channels 2 and 3)
    p = pack_anchored(stored, 4, mean=torch.zeros(8), std=torch.ones(8))
    grad_x, _ = group_norm_backward(p, grad, floats, *params, groups=groups, activation=act, output_map=output_map)
    spoiled = torch.zeros_like(grad_x, dtype=torch.bool)
    spoiled[1, 2:4] = True
    assert not torch.isfinite(grad_x[spoiled]).any() and torch.isfinite(grad_x[~spoiled]).all()


def test_group_norm_backward_of_an_empty_batch():
    p = pack_anchored(torch.randn(0, 8, 5, 5), 4, mean=torch.zeros(8), std=torch.ones(8))
    grad_x, rows = group_norm_backward(p, torch.randn(0, 8, 5, 5), torch.ones(3, 0), None, None, groups=4, activation=Activation("relu"))
    assert grad_x.shape == (0, 8, 5, 5) and torch.equal(rows, torch.zeros(4, 8))


def test_group_norm_backward_bad_arguments_are_clear_errors():
    stored, grad, floats, params, groups, act, output_map, _ = _gn_backward_case("nchw")
    with pytest.raises(InputError, match="groups=3"):
        group_norm_backward(stored, grad, floats, *params, groups=3)
    with pytest.raises(InputError, match="floats must be a"):
        group_norm_backward(stored, grad, floats[:, :8], *params, groups=groups)
    with pytest.raises(InputError, match="bias must have 8"):
        group_norm_backward(stored, grad, floats, params[0], params[1][:3], groups=groups)
    with pytest.raises(InputError, match="shape"):
        group_norm_backward(stored, grad[:2], floats, *params, groups=groups)
    inside = pack_anchored(torch.randn(6, 4, 9).permute(1, 0, 2), 4, mean=torch.zeros(6), std=torch.ones(6))
    with pytest.raises(InputError, match="samples outermost"):
        group_norm_backward(inside, torch.randn(4, 6, 9), torch.zeros(3, 24), None, None, groups=2)


def test_layer_tables_bad_arguments_are_clear_errors():
    mean, rstd = torch.zeros(3), torch.ones(3)
    with pytest.raises(InputError, match="gamma must have 3"):
        layer_tables(mean, rstd, torch.ones(4), None, bits=4, store_output=True)
    with pytest.raises(InputError, match="bits=3"):
        layer_tables(mean, rstd, None, None, bits=3, store_output=True)
    with pytest.raises(InputError, match="shape"):
        layer_tables(mean, torch.ones(2, 3), None, None, bits=None, store_output=True)
    with pytest.raises(InputError, match="multiple of G=3"):
        layer_tables(torch.zeros(2, 3), torch.ones(2, 3), None, None, bits=None, store_output=True, channels=4)
    with pytest.raises(InputError, match="per channel"):
        layer_tables(torch.zeros(2, 3), torch.ones(2, 3), None, None, bits=4, store_output=True, channels=6)
    v = torch.randn(2, 3, 4)
    p = pack_anchored(v, 4, mean=mean, std=rstd)
    with pytest.raises(InputError, match=r"\(3, 3\) table"):
        batch_norm_grad_tables(p, v, torch.ones(5, 3))
    with pytest.raises(InputError, match="not both"):
        pack_anchored(v, 4, mean=mean, std=rstd, grid=p.grid)
    with pytest.raises(InputError, match=r"float32 \(3, 3\) table"):
        pack_anchored(v, 4, grid=p.grid[:2])
    with pytest.raises(InputError, match="anchored and jumps"):
        pack_anchored(v, 4, grid=p.grid, anchored=False)


_PROBLEM = _interpreter_problem()
needs_interpreter = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


@pytest.fixture
def few_sum_programs(monkeypatch):
    """The interpreter runs programs one by one: aim the channel sums at 64 (still several splits
    of the rows per channel) instead of a GPU's thousands."""
    from graphpass import triton_kernels

    monkeypatch.setattr(triton_kernels, "_SUMS_PROGRAMS", 64)


def _with_specials(x):
    flat = x.view(-1)
    flat[[3, flat.numel() // 2, flat.numel() - 1]] = torch.tensor([math.nan, math.inf, -math.inf], dtype=x.dtype, device=x.device)
    return x


def _assert_same_values(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.skipif(not triton_available(), reason="triton cannot be imported here")
def test_channel_index_division_is_exact_over_int32():
    """The kernels find an element's channel with multiply-high division; emulate it in Python."""
    import random

    from graphpass.triton_kernels import _magic

    rng = random.Random(0)
    for d in [*range(1, 200), 3136, 50176, 2**20 + 1, 2**30 - 1, 2**31 - 1]:
        m, s = _magic(d)
        assert 0 < m < 2**32
        top = (2**31 - 1) // d * d
        for n in [0, 1, d - 1, d, d + 1, top - 1, top, 2**31 - 1, *(rng.randrange(2**31) for _ in range(50))]:
            if n >= 0:
                assert ((2 * n * m) >> 32) >> s == n // d, (n, d)


@pytest.mark.skipif(not triton_available(), reason="triton cannot be imported here")
def test_host_integer_helpers_match_triton():
    """The wrappers size their launches with plain-Python stand-ins for triton.cdiv and
    triton.next_power_of_2 (cheaper to call from the host): they must agree with Triton's."""
    import triton

    from graphpass.triton_kernels import _cdiv, _next_power_of_2

    for n in [1, 2, 3, 4, 5, 7, 8, 9, 1023, 1024, 1025, 3136, 2**31 - 1, 2**31, 2**40 + 3]:
        assert _next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in [1, 2, 3, 8, 1024, 4096]:
            assert _cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert _cdiv(0, 7) == 0


# Without NaN/Inf the PyTorch path on a real CPU tensor skips its special-value steps; both forms
# must give the kernels' codes.
@needs_interpreter
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [4, 64])
@pytest.mark.parametrize("specials", [True, False])
def test_triton_group_kernels_match_pytorch(bits, group_size, specials):
    x = torch.randn(3, 5, 7, 11)
    x = (_with_specials(x) if specials else x).to(memory_format=torch.channels_last)
    ref = pack_groups(x, bits, group_size=group_size, backend="torch")
    tri = pack_groups(x, bits, group_size=group_size, backend="triton")
    assert torch.equal(tri.codes, ref.codes)
    assert torch.equal(tri.scales, ref.scales) and torch.equal(tri.flags, ref.flags)
    assert tri.perm == ref.perm and tri.nbytes == ref.nbytes
    _assert_same_values(unpack(ref, backend="triton"), unpack(ref, backend="torch"))


@needs_interpreter
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("specials", [True, False])
@pytest.mark.parametrize("anchored,jumps", [(True, ()), (False, ()), (True, (-3.0, 3.0)), (True, (6.0,))])
def test_triton_anchored_kernels_match_pytorch(bits, channels_last, specials, anchored, jumps):
    v = _signed_test_tensor()
    mean, std = _channel_stats(v)
    v = _with_specials(v) if specials else v
    v = v.to(memory_format=torch.channels_last) if channels_last else v
    v = torch.cat([v, v[:, :, :1]], 2)  # numel not a multiple of FLAG_BLOCK or of 8
    mean, std = (mean, std) if not jumps else (mean * 2, std * 1.5)  # jumps near the windows
    ref = pack_anchored(v, bits, mean=mean, std=std, anchored=anchored, jumps=jumps, backend="torch")
    tri = pack_anchored(v, bits, mean=mean, std=std, anchored=anchored, jumps=jumps, backend="triton")
    assert torch.equal(tri.grid, ref.grid)
    assert torch.equal(tri.codes, ref.codes) and torch.equal(tri.flags, ref.flags)
    _assert_same_values(unpack(ref, backend="triton"), unpack(ref, backend="torch"))


def _assert_epilogue_close(got, ref, product, ulps):
    """Same NaN/Inf, finite values within ``ulps`` float32 ulps of ``product`` (|activation * scale|,
    see the caller) + |result|: the interpreter rounds the product before adding (compiled Triton and
    torch.addcmul fuse it)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.stride() == ref.stride()
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    finite = torch.isfinite(ref)
    assert torch.equal(got[~finite].nan_to_num(), ref[~finite].nan_to_num())
    bound = ulps * 2.0**-23 * (product + ref.abs() + got.abs())[finite]
    assert ((got - ref).abs()[finite] <= bound).all()


def _epilogue_against_pytorch(p, channel_dim, act, tables, backend):
    """Runs the epilogue on ``backend`` and checks it against the PyTorch path (see the tests)."""
    name = act.name if act is not None else "none"
    transcendental = name in ("silu", "gelu") and act.approximate == "none"
    in_pytorch = name == "mish" or (name == "gelu" and act.approximate != "none")  # no Triton form
    for t in tables:
        scale, shift = t if t is not None else (None, None)
        got = unpack(p, activation=act, scale=scale, shift=shift, backend=backend)
        ref = unpack(p, activation=act, scale=scale, shift=shift, backend="torch")
        if (t is None and not transcendental) or in_pytorch:
            _assert_same_values(got, ref)
        else:
            scaled = None if t is None else (scale, torch.zeros_like(shift))
            product = _unpack_then_ops(p, channel_dim, act, scaled).abs()
            if transcendental:  # gelu's 1 + erf(v) cancels for v << 0: its error scales with |v|
                product += _unpack_then_ops(p, channel_dim, None, scaled).abs()
            _assert_epilogue_close(got.cpu(), ref.cpu(), product.cpu(), 4 if transcendental else 1)


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy: -inf * 0 in silu/hardswish is meant
@pytest.mark.parametrize("layout", EPILOGUE_LAYOUTS)
@pytest.mark.parametrize("activation", list(EPILOGUE_ACTIVATIONS))
def test_triton_epilogue_matches_pytorch(layout, activation):
    """Piecewise-linear activations alone are bit-identical; with scale and shift the interpreter's
    unfused multiply-add may differ by one rounding; silu and gelu (exp/erf of numpy against PyTorch's)
    by a few ulps; mish and tanh-gelu run in PyTorch after the kernel, bit-identical."""
    p, channel_dim, tables = _epilogue_case(layout)
    _epilogue_against_pytorch(p, channel_dim, EPILOGUE_ACTIVATIONS[activation], tables, "triton")


@needs_interpreter
@pytest.mark.parametrize("layout", [*EPILOGUE_LAYOUTS, "rows_of_a_flag_block"])
def test_triton_norm_backward_matches_a_full_unpack(layout, few_sum_programs):
    _check_norm_backward(*_norm_backward_case(layout), backend="triton")


@needs_interpreter
@pytest.mark.parametrize("activation", GN_ACTIVATIONS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_group_norm_backward_matches_pytorch(activation, layout):
    """Sums, tables and input gradient in three launches (mish: the PyTorch path), against the
    PyTorch path on the copy's values; a stored input without bias and output map too."""
    from graphpass import triton_kernels

    case = _gn_backward_case(layout, activation)
    stored = case[0]
    p = pack_anchored(stored, 4, mean=stored.mean((0, 2, 3)), std=stored.std((0, 2, 3)))
    launches = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("group_norm_sums", "group_norm_tables"):
            fn = getattr(triton_kernels, name)
            mp.setattr(triton_kernels, name, lambda *a, _fn=fn, _name=name: launches.append(_name) or _fn(*a))
        _check_gn_backward(p, *case[1:7], backend="triton")
    assert launches == ([] if activation == "mish" else ["group_norm_sums", "group_norm_tables"])
    if activation == "none":  # a stored input, no bias, no output map (the kernel's defaults)
        stored, grad, floats, (weight, _), groups, act = _gn_backward_case(layout, store_output=False)[:6]
        p = pack_anchored(stored, 8, mean=stored.mean((0, 2, 3)), std=stored.std((0, 2, 3)))
        _check_gn_backward(p, grad, floats, (weight, None), groups, act, None, backend="triton")


@needs_interpreter
@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("store_output", [True, False])
@pytest.mark.parametrize("bits", [2, 8, None])
@pytest.mark.parametrize("jumps", [(), (-3.0, 3.0)])
def test_triton_layer_tables_match_pytorch(case, store_output, bits, jumps):
    args = _layer_case(case, channels=1500)  # two programs
    ref = layer_tables(*args, bits=bits, store_output=store_output, jumps=jumps, backend="torch")
    tri = layer_tables(*args, bits=bits, store_output=store_output, jumps=jumps, backend="triton")
    assert torch.equal(tri[1], ref[1])
    assert (tri[0] is None and ref[0] is None) or torch.equal(tri[0], ref[0])


@needs_interpreter
@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("store_output", [True, False])
def test_triton_per_sample_layer_tables_match_pytorch(case, store_output):
    args = _group_case(case, samples=5, groups=4, channels=320)  # 1,600 entries: two programs
    ref = layer_tables(*args, bits=None, store_output=store_output, channels=320, backend="torch")
    tri = layer_tables(*args, bits=None, store_output=store_output, channels=320, backend="triton")
    assert torch.equal(tri[1], ref[1])


@needs_interpreter
@pytest.mark.parametrize("layout", EPILOGUE_LAYOUTS)
def test_triton_batch_norm_grad_tables_give_batch_norm_backward(layout, few_sum_programs):
    from graphpass import triton_kernels

    _check_bn_backward(*_bn_backward_case(layout), backend="triton")  # several launches: each needs zeroed counters
    # The last program of each channel zeroed its arrival counter again, so no launch fills them.
    counters = triton_kernels._arrival_counters(torch.device("cpu"), 1)
    assert counters.numel() >= 1024 and not counters.any()


@needs_interpreter
@pytest.mark.parametrize("shape", [(13,), (2, 3, 50, 9)])
def test_triton_mask_kernels_match_pytorch(shape):
    m = torch.rand(shape) > 0.5
    ref, tri = pack_mask(m, backend="torch"), pack_mask(m, backend="triton")
    assert torch.equal(tri.codes, ref.codes)
    assert torch.equal(unpack(tri, backend="triton"), m)
    x = _relu_result(shape)
    ref, tri = pack_positive_mask(x, backend="torch"), pack_positive_mask(x, backend="triton")
    assert torch.equal(tri.codes, ref.codes)
    for dtype in (torch.float32, torch.bfloat16):  # what a ReLU's backward multiplies by
        assert torch.equal(unpack(tri, dtype=dtype, backend="triton"), (~(x <= 0)).to(dtype))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_dtypes(dtype):
    x = torch.randn(2, 4, 9, 9).to(dtype)
    ref = pack_groups(x, 8, backend="torch")
    assert torch.equal(pack_groups(x, 8, backend="triton").codes, ref.codes)
    tri = unpack(ref, backend="triton")
    assert tri.dtype == dtype
    # The interpreter truncates float32 -> bfloat16 where compiled Triton rounds to nearest: allow one ulp.
    exact = unpack(ref, backend="torch").float()
    assert ((tri.float() - exact).abs() <= exact.abs() * 2.0**-7).all()


@needs_interpreter
def test_triton_stochastic_rounding_is_unbiased():
    row = torch.rand(64)
    row[0], row[-1] = 0.0, 1.0
    p = pack_groups(row.repeat(1000), 4, group_size=64, stochastic=True, backend="triton")
    step = 1.0 / 15
    y = unpack(p, backend="triton").view(1000, 64)
    assert ((y - row).abs() <= step * (1 + 1e-5)).all()
    assert (y.mean(0) - row).abs().max() < 0.1 * step

    v = torch.tensor([-1.9, -0.8, 0.6, 1.7]).view(1, 1, 4).expand(1024, 1, 4).contiguous()
    q = unpack(pack_anchored(v, 4, mean=torch.zeros(1), std=torch.ones(1), stochastic=True, backend="triton"))
    assert torch.equal(q > 0, v > 0)
    assert (q.view(1024, 4).mean(0) - v[0, 0]).abs().max() < 0.1 * 6 / 16


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_cuda_uses_triton_and_keeps_the_guarantees(bits):
    """Compiled kernels (run with TRITON_INTERPRET=0): same codes as the PyTorch path, same layout."""
    plain = torch.randn(4, 64, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    special = _with_specials(torch.randn(4, 64, 16, 16, device="cuda")).to(memory_format=torch.channels_last)
    mean, std = _channel_stats(plain)
    for x in (plain, special):
        a = pack_anchored(x, bits, mean=mean, std=std)
        y = unpack(a)
        assert y.stride() == x.stride()
        assert torch.equal(y.isnan(), x.isnan()) and torch.equal(y.isinf(), x.isinf())
        assert torch.equal(a.codes, pack_anchored(x, bits, mean=mean, std=std, backend="torch").codes)
        if bits > 2 or x is plain:
            assert torch.equal(y > 0, x > 0)
        g = pack_groups(x, bits)
        ref = pack_groups(x, bits, backend="torch")
        assert torch.equal(g.codes, ref.codes) and torch.equal(g.scales, ref.scales)
        # Codes agree bit for bit; rebuilt values may differ in the last bit where the GPU fuses an FMA.
        torch.testing.assert_close(unpack(g).cpu(), unpack(ref, backend="torch").cpu(), rtol=1e-6, atol=1e-6, equal_nan=True)
    m = plain > 0
    assert torch.equal(unpack(pack_mask(m)), m)
    assert torch.equal(unpack(pack_positive_mask(special)), ~(special <= 0))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [*EPILOGUE_LAYOUTS, "rows_of_a_flag_block"])
def test_cuda_norm_backward_matches_a_full_unpack(layout):
    """Compiled kernels: the channel sums and the fused input gradient."""
    _check_norm_backward(*_norm_backward_case(layout, device="cuda"), backend=None)


@pytest.mark.gpu
@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("store_output", [True, False])
def test_cuda_layer_tables_and_batch_norm_backward(case, store_output):
    """Compiled kernels: the layer tables round as the PyTorch path (no FMA contraction), and the
    backward tables give BatchNorm's backward."""
    args = _layer_case(case, channels=64)
    ref = layer_tables(*args, bits=4, store_output=store_output)
    got = layer_tables(*(t.cuda() if t is not None else None for t in args), bits=4, store_output=store_output)
    assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])
    for layout in EPILOGUE_LAYOUTS:
        _check_bn_backward(*_bn_backward_case(layout, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", GN_ACTIVATIONS)
def test_cuda_group_norm_backward_matches_pytorch(activation):
    """Compiled kernels: GroupNorm's backward from a copy, against the PyTorch path."""
    for layout in ("nchw", "channels_last"):
        stored, *rest = _gn_backward_case(layout, activation, device="cuda")[:7]
        p = pack_anchored(stored, 4, mean=stored.mean((0, 2, 3)), std=stored.std((0, 2, 3)))
        _check_gn_backward(p, *rest)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", list(EPILOGUE_ACTIVATIONS))
def test_cuda_epilogue_matches_pytorch(activation):
    """Compiled kernel (fused multiply-add, the GPU's exp and erf) against the PyTorch path."""
    for layout in EPILOGUE_LAYOUTS:
        p, channel_dim, tables = _epilogue_case(layout, device="cuda")
        _epilogue_against_pytorch(p, channel_dim, EPILOGUE_ACTIVATIONS[activation], tables, None)


@pytest.mark.parametrize("channels_last", [False, True])
def test_rows_of_a_copy_unpack_to_the_slices_of_the_whole(channels_last):
    v = torch.randn(8, 4, 16, 16)  # a sample is 1,024 elements: every layout cuts at every row
    if channels_last:
        v = v.to(memory_format=torch.channels_last)
    mean, std = _channel_stats(v)
    for p in (pack_anchored(v, 4, mean=mean, std=std), pack_groups(v, 2), pack_mask(v > 0)):
        whole = unpack(p)
        assert p.row_step == 1
        for start, stop in [(0, 3), (3, 8), (5, 5)]:
            part = unpack(p.rows(start, stop))
            assert torch.equal(part, whole[start:stop]) and part.stride()[1:] == whole.stride()[1:], (p.layout, start)
    odd = pack_anchored(torch.randn(6, 3, 5, 7), 4, mean=torch.zeros(3), std=torch.ones(3))
    assert odd.row_step == 1024  # 105 elements a sample: only whole flag blocks of 1,024 cut
    with pytest.raises(InputError, match="multiples of 1024"):
        odd.rows(1, 6)
    inside = pack_groups(torch.randn(6, 4, 99).permute(1, 0, 2), 4)  # the sample is not outermost
    assert inside.row_step == 0
    with pytest.raises(InputError, match="rows"):
        inside.rows(0, 2)
