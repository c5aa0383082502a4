"""GroupNorm + Proxy Normalization (Labatie et al., NeurIPS 2021), fused so it keeps only its input.

PN-Act, per channel c, on ``y = GroupNorm(x)`` computed without affine::

    z_c   = act(gamma_c * y_c + beta_c)
    Y~_c  ~ N(beta~_c, (1 + gamma~_c)^2)                 the proxy variable
    mu~_c = E[act(gamma_c * Y~_c + beta_c)]              N = 200 quadrature points
    s~2_c = Var[act(gamma_c * Y~_c + beta_c)]            biased variance
    out_c = (z_c - mu~_c) / sqrt(s~2_c + proxy_eps)      proxy_eps = 0.03

The expectation and variance use the fixed quantiles ``q_i = Phi^-1((i + 1/2) / N)``, so
``Y~_{c,i} = beta~_c + (1 + gamma~_c) q_i``; no sampling. The proxy statistics are computed in at
least float32 (also for fp16/bf16 models) and gradients flow through them into all four parameters,
as in the official Graphcore code (see shared/reference/papers.md section 2).

Memory: BN -> ReLU -> Conv keeps two full tensors for backward (the BN input and the ReLU output,
which is also the next convolution's input). A naive GroupNorm -> PN-Act keeps three. The fused
:class:`torch.autograd.Function` here saves only its input ``x`` (through ``ctx.save_for_backward``,
so saved-tensor hooks such as compression see it), the per-(sample, group) mean and 1/std and the
parameters, and recomputes everything else in backward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from graphpass import quantize
from graphpass.errors import InputError
from graphpass.quantize import Activation

__all__ = [
    "ACTIVATIONS",
    "NormRecord",
    "ProxyNormAct",
    "ScaledGroupNorm",
    "proxy_norm_act",
    "proxy_statistics",
    "proxy_norm_param_groups",
]

log = logging.getLogger(__name__)

ACTIVATIONS = ("relu", "relu6", "leaky_relu", "silu", "gelu", "hardswish", "mish", "identity")
DEFAULT_NUM_POINTS = 200
DEFAULT_PROXY_EPS = 0.03


@dataclass(frozen=True)
class NormRecord:
    """What ``replace_batchnorm`` did at one node; stored in ``node.meta["graphpass.norm"]``."""

    kind: str  # "gn+pn" (norm followed by an activation) or "scaled_gn" (no activation follows)
    original: str  # class name of the replaced BatchNorm module
    activation: str  # PN-Act's activation ("identity" for scaled_gn)
    groups: int
    num_channels: int
    activation_node: str  # name of the activation node folded into PN-Act ("" if none)


_QUANTILES: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _quantiles(num_points: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi^-1((i + 1/2) / N), as (N,) and as an (N, 1) column. Cached outside any module, so
    ``model.half()`` cannot degrade it; built afresh for fake, meta and inference-mode tensors and
    while a CUDA graph is captured."""
    key = (num_points, device, dtype)
    q = _QUANTILES.get(key)
    if q is None:
        i = torch.arange(num_points, device=device, dtype=dtype)
        row = torch.special.ndtri((i + 0.5) / num_points)
        q = (row, row.view(-1, 1))
        if _cacheable(row):
            _QUANTILES[key] = q
    return q


def _cacheable(t: torch.Tensor) -> bool:
    if type(t) is not torch.Tensor or t.device.type == "meta" or t.is_inference():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: the official code computes proxy statistics and means in float32. (Not
    ``torch.promote_types``: an op dispatch, three times per layer and step.)"""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _proxy_points(
    weight: torch.Tensor, bias: torch.Tensor, proxy_weight: torch.Tensor, proxy_bias: torch.Tensor, num_points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, h): the N quantiles and h[i, c] = gamma_c * (beta~_c + (1 + gamma~_c) q_i) + beta_c, (N, C),
    >= float32. Points along dim 0, so the (C,) parameters broadcast without a view each."""
    dtype = _stats_dtype(weight.dtype)
    q, q_column = _quantiles(num_points, weight.device, dtype)
    proxy = torch.addcmul(proxy_bias.to(dtype), 1 + proxy_weight.to(dtype), q_column)
    return q, torch.addcmul(bias.to(dtype), weight.to(dtype), proxy)


def proxy_statistics(
    weight: torch.Tensor,
    bias: torch.Tensor,
    proxy_weight: torch.Tensor,
    proxy_bias: torch.Tensor,
    *,
    activation: str,
    negative_slope: float = 0.01,
    proxy_eps: float = DEFAULT_PROXY_EPS,
    num_points: int = DEFAULT_NUM_POINTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mu~, 1/sqrt(sigma~^2 + proxy_eps))`` of the proxy, differentiable, >= float32."""
    _, h = _proxy_points(weight, bias, proxy_weight, proxy_bias, num_points)
    var, mean = torch.var_mean(Activation(activation, negative_slope)(h), dim=0, correction=0)
    return mean, torch.rsqrt(var + proxy_eps)


def _proxy_kernels(params: tuple[torch.Tensor, ...], activation: str, negative_slope: float, num_points: int, backend: str | None):
    """(graphpass's Triton kernels, the activation's code, the quantiles) where the kernels compute
    the proxy statistics of ``params``: float32 statistics on a kernel device, an activation they
    have a form of, at most their number of points; else None (eager ops). The quantiles decide the
    device (:func:`graphpass.quantize._kernels_for`): under FakeTensorMode they are fake, the
    parameters not."""
    weight = params[0]
    if _stats_dtype(weight.dtype) != torch.float32 or not all(t.is_contiguous() for t in params):
        return None
    q, _ = _quantiles(num_points, weight.device, torch.float32)
    kernels = quantize._kernels_for(q, backend)
    if kernels is None or num_points > kernels.MAX_PROXY_POINTS:
        return None
    code = kernels.activation_code(Activation(activation, negative_slope))
    return None if code is None else (kernels, code, q)


def _statistics(
    params: tuple[torch.Tensor, ...], *, activation: str, negative_slope: float, proxy_eps: float, num_points: int,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`proxy_statistics` of ``params`` (gamma, beta, gamma~, beta~) without autograd history:
    one launch on CUDA, the eager ops elsewhere."""
    found = _proxy_kernels(params, activation, negative_slope, num_points, backend)
    if found is None:
        return proxy_statistics(
            *params, activation=activation, negative_slope=negative_slope, proxy_eps=proxy_eps, num_points=num_points
        )
    kernels, code, q = found
    mu, inv_std = kernels.proxy_statistics(params, q, code, negative_slope, proxy_eps).unbind(0)
    return mu, inv_std


def _proxy_statistics_grads(
    params: tuple[torch.Tensor, ...], mu: torch.Tensor, inv_std: torch.Tensor, grad_mu: torch.Tensor,
    grad_inv_std: torch.Tensor, *, activation: str, negative_slope: float, num_points: int, backend: str | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Gradients of :func:`proxy_statistics` for ``params`` (gamma, beta, gamma~, beta~) in closed form,
    given its outputs ``mu``/``inv_std`` and their gradients: one pass over the (N, C) points instead
    of autograd recomputing and differentiating them.

    With p_i = act(h_i), mu = mean(p), inv = (var(p) + eps)^-1/2: dL/dp_i = G_mu / N - G_inv inv^3
    (p_i - mu) / N; h_i = gamma (beta~ + (1 + gamma~) q_i) + beta, so with S0 = sum_i dL/dh_i and
    S1 = sum_i dL/dh_i q_i the gradients are beta~ S0 + (1 + gamma~) S1, S0, gamma S1, gamma S0.
    One launch on CUDA (float32 statistics), the eager ops elsewhere.
    """
    found = _proxy_kernels(params, activation, negative_slope, num_points, backend)
    stats = (mu, inv_std, grad_mu, grad_inv_std)
    if found is not None and all(t.dtype == torch.float32 and t.is_contiguous() for t in stats):
        kernels, code, q = found
        return tuple(kernels.proxy_statistics_grads(params, q, *stats, code, negative_slope).unbind(0))
    weight, bias, proxy_weight, proxy_bias = params
    q, h = _proxy_points(weight, bias, proxy_weight, proxy_bias, num_points)
    act = Activation(activation, negative_slope)
    p = act(h)
    coef = grad_inv_std * inv_std.pow(3) * (-1.0 / num_points)
    grad_p = torch.addcmul((grad_mu * (1.0 / num_points) - coef * mu).to(q.dtype), p, coef.to(q.dtype))
    grad_h = act.backward(grad_p, h)
    # Identity: beta and beta~ shift every point alike, so only mu~ sees them and S0 is G_mu exactly; a
    # sum over the points would leave rounding where the runtime's beta gradient must cancel to zero.
    s0 = grad_mu if activation == "identity" else grad_h.sum(0)
    s1 = q @ grad_h
    dtype = q.dtype
    gamma = weight.to(dtype)
    grad_gamma = torch.addcmul(proxy_bias.to(dtype) * s0, 1 + proxy_weight.to(dtype), s1)
    return grad_gamma, s0, gamma * s1, gamma * s0


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _sizes(x: torch.Tensor) -> tuple[int, int, int]:
    """(N, C, prod(spatial)) as the native group-norm kernels take them."""
    if x.dim() < 2:
        raise InputError(f"ProxyNormAct expects an input of shape (N, C, *), got {tuple(x.shape)}")
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def _affine_from_stats(
    mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) scale and shift with ``gamma * groupnorm(x) + beta == x * scale + shift``,
    viewed as ``shape`` (N, C, 1, ...). Computed as (N, G, C/G), where the (N, G) statistics and the
    (C,) parameters broadcast without copies."""
    samples, groups = mean.shape
    scale = rstd.view(samples, groups, 1) * weight.view(groups, -1)
    shift = bias.view(groups, -1) - mean.view(samples, groups, 1) * scale
    return scale.view(shape), shift.view(shape)


class _ProxyNormActFunction(torch.autograd.Function):
    """GroupNorm (no affine) + affine + activation + proxy normalization in one autograd node.

    Full-size passes: forward 3 (group norm with affine, activation, proxy normalization), in one
    buffer besides the input (gelu, which has no in-place form: two);
    backward 4 for ReLU and LeakyReLU (recompute the pre-activation, one sum, activation
    backward, native group-norm backward), 6 for the other activations.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, proxy_weight, proxy_bias, groups, eps, activation, negative_slope, proxy_eps, num_points):  # type: ignore[override]
        dtype = _stats_dtype(x.dtype)
        n, c, hw = _sizes(x)
        h, mean, rstd = torch.native_group_norm(x.to(dtype), weight.to(dtype), bias.to(dtype), n, c, hw, groups, eps)
        mu, inv_std = _statistics(
            (weight, bias, proxy_weight, proxy_bias),
            activation=activation, negative_slope=negative_slope, proxy_eps=proxy_eps, num_points=num_points,
        )  # fmt: skip
        nd = x.dim()
        output_map = (_channel_view(inv_std, nd), _channel_view(-mu * inv_std, nd))
        # In place on h (the forward's only full-size temporary): the step holds x and one tensor here.
        out = Activation(activation, negative_slope)(h, inplace=True)
        out = torch.addcmul(output_map[1], out, output_map[0], out=out)
        # Only x and per-(sample, group) statistics: everything else is rebuilt in backward. The
        # proxy statistics (C floats each, depending on the parameters only) are kept as they are:
        # backward reads them instead of computing them again, graphpass's layer mode reads them and
        # the map act(h) -> out. The layer mode also reads the group statistics here: through
        # saved_tensors it would unpack all seven.
        ctx.save_for_backward(x, mean, rstd, weight, bias, proxy_weight, proxy_bias)
        ctx.parameters = (weight, bias, proxy_weight, proxy_bias)  # for the layer mode's backward from its copy
        ctx.proxy_stats = (mu, inv_std)
        ctx.output_map = output_map
        ctx.group_stats = (mean, rstd)
        ctx.config = (groups, activation, negative_slope, num_points)
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, mean, rstd, weight, bias, proxy_weight, proxy_bias = ctx.saved_tensors
        groups, activation, negative_slope, num_points = ctx.config
        mu, inv = ctx.proxy_stats
        dtype = mean.dtype
        n, c, hw = _sizes(x)
        nd = x.dim()
        reduce_dims = [0, *range(2, nd)]
        xc = x.to(dtype)
        g = grad_out.to(dtype)
        # once_differentiable runs this under no_grad: nothing here records history, no detach needed.
        w = weight.to(dtype)
        b = bias.to(dtype)
        scale, shift = _affine_from_stats(mean, rstd, w, b, (n, c) + (1,) * (nd - 2))
        h = torch.addcmul(shift, xc, scale)
        # For identity grad_h_raw is g: reuse the group-norm kernel's sum (saves a pass, and the
        # beta gradient, exactly zero in theory, then cancels exactly).
        grad_sum = None if activation == "identity" else g.sum(reduce_dims)
        # grad_h_raw = dL/dz * act'(h) without the 1/std~ factor, which rides on the group-norm weight.
        act = Activation(activation, negative_slope)
        grad_h_raw = act.backward(g, h)
        if not act.homogeneous:
            grad_z_dot_z = (g * act(h)).sum(reduce_dims)
        del g, h
        grad_x, grad_w_raw, grad_b_raw = torch.ops.aten.native_group_norm_backward(
            grad_h_raw, xc, mean, rstd, w * inv, n, c, hw, groups, [True, True, True]
        )
        if act.homogeneous:
            # act(h) = h * act'(h), so sum(dL/dz * z) = sum(grad_h_raw * (w * y + b)): no extra pass.
            grad_z_dot_z = w * grad_w_raw + b * grad_b_raw
        if grad_sum is None:
            grad_sum = grad_b_raw
        grads = (inv * grad_w_raw, inv * grad_b_raw, -inv * grad_sum, grad_z_dot_z - mu * grad_sum)
        params = (weight, bias, proxy_weight, proxy_bias)
        return (grad_x.to(x.dtype), *parameter_grads(params, mu, inv, grads, ctx.config), None, None, None, None, None, None)


def parameter_grads(
    params: tuple[torch.Tensor, ...], mu: torch.Tensor, inv_std: torch.Tensor, grads: tuple[torch.Tensor, ...], config: tuple
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """PN-Act's gradients of ``params`` (gamma, beta, gamma~, beta~), in their dtypes, from the four
    per-channel gradients its backward reduces to (the rows of
    :func:`graphpass.quantize.group_norm_backward`): of gamma and beta through the normalized
    pre-activation, and of the proxy statistics mu~ and 1/std~, which pass theirs on to all four.
    ``config``: the fused function's (groups, activation, negative_slope, num_points)."""
    _, activation, negative_slope, num_points = config
    grad_weight, grad_bias, grad_mu, grad_inv = grads
    proxy_grads = _proxy_statistics_grads(
        params, mu, inv_std, grad_mu, grad_inv, activation=activation, negative_slope=negative_slope, num_points=num_points
    )
    weight, bias, proxy_weight, proxy_bias = params
    return (
        (grad_weight + proxy_grads[0]).to(weight.dtype),
        (grad_bias + proxy_grads[1]).to(bias.dtype),
        proxy_grads[2].to(proxy_weight.dtype),
        proxy_grads[3].to(proxy_bias.dtype),
    )


def proxy_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    proxy_weight: torch.Tensor,
    proxy_bias: torch.Tensor,
    *,
    groups: int,
    eps: float,
    activation: str,
    negative_slope: float = 0.01,
    proxy_eps: float = DEFAULT_PROXY_EPS,
    num_points: int = DEFAULT_NUM_POINTS,
) -> torch.Tensor:
    """Functional GroupNorm + PN-Act on ``x`` of shape (N, C, *); see the module docstring.

    With autograd recording, runs the fused function (keeps only ``x``); otherwise the plain ops,
    which exporters and inference see.
    """
    tensors = (x, weight, bias, proxy_weight, proxy_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _ProxyNormActFunction.apply(
            x, weight, bias, proxy_weight, proxy_bias, groups, eps, activation, negative_slope, proxy_eps, num_points
        )
    dtype = _stats_dtype(x.dtype)
    mu, inv_std = proxy_statistics(
        weight, bias, proxy_weight, proxy_bias,
        activation=activation, negative_slope=negative_slope, proxy_eps=proxy_eps, num_points=num_points,
    )
    nd = x.dim()
    h = F.group_norm(x.to(dtype), groups, weight.to(dtype), bias.to(dtype), eps)
    z = Activation(activation, negative_slope)(h)
    return ((z - _channel_view(mu, nd)) * _channel_view(inv_std, nd)).to(x.dtype)


# Re-tracing a rewritten model keeps PN-Act as one call instead of tracing into the autograd.Function.
torch.fx.wrap("proxy_norm_act")


def _check_groups(num_channels: int, groups: int, what: str) -> None:
    if num_channels <= 0:
        raise InputError(f"{what}: num_channels must be positive, got {num_channels}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0 or groups > num_channels:
        raise InputError(f"{what}: groups must be an integer in 1..{num_channels} (the channel count), got {groups!r}")
    if num_channels % groups:
        raise InputError(f"{what}: groups={groups} does not divide num_channels={num_channels}")


class ProxyNormAct(nn.Module):
    """GroupNorm without affine (``groups=1`` is LayerNorm) followed by PN-Act, fused.

    Args:
        num_channels: channels C of the input (N, C, *).
        groups: GroupNorm groups; must divide ``num_channels``.
        eps: GroupNorm epsilon.
        activation: one of :data:`ACTIVATIONS`.
        negative_slope: slope for ``leaky_relu``.
        proxy_eps: added to the proxy variance (0.03 in the official code).
        num_points: quadrature points of the proxy distribution (200 in the official code).

    Parameters ``weight`` (gamma, init 1), ``bias`` (beta, 0), ``proxy_weight`` (gamma~, 0) and
    ``proxy_bias`` (beta~, 0), each of shape (C,). Training and evaluation compute the same
    function; nothing depends on the batch. Give the proxy parameters weight decay with
    :func:`proxy_norm_param_groups`.
    """

    def __init__(
        self,
        num_channels: int,
        groups: int = 8,
        *,
        eps: float = 1e-5,
        activation: str = "relu",
        negative_slope: float = 0.01,
        proxy_eps: float = DEFAULT_PROXY_EPS,
        num_points: int = DEFAULT_NUM_POINTS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_groups(num_channels, groups, "ProxyNormAct")
        if activation not in ACTIVATIONS:
            raise InputError(f"ProxyNormAct: activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        if num_points <= 1:
            raise InputError(f"ProxyNormAct: num_points must be at least 2, got {num_points}")
        self.num_channels = num_channels
        self.groups = groups
        self.eps = eps
        self.activation = activation
        self.negative_slope = negative_slope
        self.proxy_eps = proxy_eps
        self.num_points = num_points
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_channels, **factory))
        self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        self.proxy_weight = nn.Parameter(torch.zeros(num_channels, **factory))
        self.proxy_bias = nn.Parameter(torch.zeros(num_channels, **factory))

    def proxy_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu~, 1/sqrt(sigma~^2 + proxy_eps))`` per channel, in at least float32."""
        return proxy_statistics(
            self.weight, self.bias, self.proxy_weight, self.proxy_bias,
            activation=self.activation, negative_slope=self.negative_slope,
            proxy_eps=self.proxy_eps, num_points=self.num_points,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return proxy_norm_act(
            x, self.weight, self.bias, self.proxy_weight, self.proxy_bias,
            groups=self.groups, eps=self.eps, activation=self.activation, negative_slope=self.negative_slope,
            proxy_eps=self.proxy_eps, num_points=self.num_points,
        )

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return (
            f"{self.num_channels}, groups={self.groups}, eps={self.eps}, activation={self.activation}{slope}, "
            f"proxy_eps={self.proxy_eps}, num_points={self.num_points}"
        )


class ScaledGroupNorm(nn.Module):
    """GroupNorm with a per-channel scale and no shift: a BatchNorm that no activation follows.

    As in the official code, PN cannot apply without an activation, and dropping the shift
    reduces the "denormalisation" of the residual branch.
    """

    def __init__(
        self,
        num_channels: int,
        groups: int = 8,
        *,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_groups(num_channels, groups, "ScaledGroupNorm")
        self.num_channels = num_channels
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.groups, self.weight, None, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.groups}, eps={self.eps}"


def _unique(params: Iterator[nn.Parameter], seen: set[int]) -> list[nn.Parameter]:
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def proxy_norm_param_groups(model: nn.Module, weight_decay: float, *, other_weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups with weight decay on the proxy parameters gamma~, beta~.

    Returns up to three groups, empty ones left out: every ProxyNormAct's ``proxy_weight`` and
    ``proxy_bias`` with ``weight_decay`` (it pulls the proxy towards N(0, 1)); the PN-Act and
    ScaledGroupNorm affine parameters with no decay, as in the official code; all other
    parameters with ``other_weight_decay`` (0 by default; the official ImageNet recipe decays the
    convolution weights too, so pass the same value there to reproduce it). Works on any module,
    GraphModules from ``gp.transform`` included::

        opt = torch.optim.SGD(gp.proxy_norm_param_groups(gm, 5e-5), lr=0.1, momentum=0.9)
    """
    if weight_decay < 0 or other_weight_decay < 0:
        raise InputError(f"weight decay must be >= 0, got {weight_decay} and other_weight_decay={other_weight_decay}")
    seen: set[int] = set()
    proxy: list[nn.Parameter] = []
    affine: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, ProxyNormAct):
            proxy += _unique(iter((m.proxy_weight, m.proxy_bias)), seen)
            affine += _unique(iter((m.weight, m.bias)), seen)
        elif isinstance(m, ScaledGroupNorm):
            affine += _unique(iter((m.weight,)), seen)
    if not proxy:
        log.info("proxy_norm_param_groups: %s has no ProxyNormAct; no parameter gets proxy weight decay", type(model).__name__)
    other = _unique(model.parameters(), seen)
    groups = [
        {"params": proxy, "weight_decay": weight_decay},
        {"params": affine, "weight_decay": 0.0},
        {"params": other, "weight_decay": other_weight_decay},
    ]
    return [g for g in groups if g["params"]]
