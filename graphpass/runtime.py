"""Runtime of compressed saved activations: autograd keeps K-bit copies, the forward stays exact.

``passes.insert_quantize_on_save`` puts six kinds of compression point into a forward graph. All
are ``call_function`` nodes that return their first argument unchanged (see :data:`COMPRESSION_OPS`):

- :func:`compress_saved` (after the first input) opens a *session* for one forward pass: it pushes
  ``saved_tensors_hooks`` so that every tensor autograd saves from here on goes through
  :meth:`_Session.pack`. Nothing happens in ``eval()`` or under ``torch.no_grad()``. The graph's
  inputs themselves are saved as they are: the caller holds them anyway.
- :func:`layer_input` (before a norm) and :func:`quantize_layer` (after it, before the activation)
  bracket one Conv -> Norm -> Act layer (BLPA, papers.md section 1). ``quantize_layer`` keeps ONE
  K-bit copy of the layer: the pre-activation ``y`` on the zero-anchored grid of
  :func:`graphpass.quantize.pack_anchored` with mean ``beta`` and std ``|gamma|`` (the batch
  statistics of ``y`` that BatchNorm itself imposes, so no reduction), or, with no activation, the
  norm input ``x`` with the norm's own batch mean and std. GroupNorm-type layers (GroupNorm,
  ScaledGroupNorm, ProxyNormAct, whose normalized pre-activation is materialised once) measure
  per-channel statistics instead: group statistics say little about one channel. Every tensor of
  the layer that autograd saves (norm input, pre-activation, activation output, the next op's
  input) is handed a reference to that copy and rebuilt from it in backward with exact per-channel
  floats, so PyTorch's own backward formulas run unchanged. The ReLU sign is exact because 0 is a bin boundary.
  The norm's own backward is replaced (:class:`_NormFromCopy`, papers.md 1.5 step 7): it reads the
  copy directly, two passes without a full-size rebuild of the norm input (nor, for ProxyNormAct, of
  the pre-activation it would compute again from that). A large
  convolution right before the norm (its input over ``2 * CONV_CHUNK_BYTES``) gets its backward
  replaced too (:class:`_ConvFromCopy`, steps 1-2): batch chunks, each rebuilding only its rows.
- :func:`pool_input` (before a max-pool) and :func:`pool_output` (after it) bracket the op that
  saves int64 indices into one input plane: they are kept, exactly, in the narrowest integer type
  that holds the plane's element count (uint8, int16 or int32), a quarter or less of their bytes.
- :func:`compress_saved_end` (on the output) closes the session.

Everything else autograd saves (generic mode) is packed per tensor: floats in groups with their
own scales (:func:`graphpass.quantize.pack_groups`), the result a ReLU saves for itself and bool
tensors in one bit per element, other integer tensors, parameters (and their autocast copies),
statistics and tiny tensors as they are. A tensor saved by several ops is stored once.

Tensor identity: a bare ``data_ptr`` is reused by the caching allocator, so saved tensors are
matched by Python object (one per TensorImpl) through a weak reference, plus the version counter
(an in-place op such as ``relu_`` makes the same object a different value). Activation outputs are
recognised when first saved by their autograd node, whose first input is the norm's node.

Every pack reports what it stores through :func:`graphpass.save_recorder.record_pack`, and all of
it runs on fake and meta tensors, so saved-tensor discovery sees the compressed sizes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.autograd.function import once_differentiable
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from graphpass.quantize import (
    DEFAULT_GROUP_SIZE,
    FLAG_BLOCK,
    Activation,
    Packed,
    aligned_rows,
    apply_epilogue,
    batch_norm_backward,
    group_norm_backward,
    group_norm_reads,
    layer_tables,
    pack_anchored,
    pack_groups,
    pack_mask,
    pack_positive_mask,
    unpack,
    without_grad,
)
from graphpass import proxy_norm
from graphpass.errors import UnsupportedError
from graphpass.save_recorder import record_pack

__all__ = [
    "COMPRESSION_OPS",
    "ACTIVATIONS",
    "NORMS",
    "STATE_NAME",
    "CompressionState",
    "QuantFormat",
    "compress_saved",
    "compress_saved_end",
    "layer_input",
    "pool_input",
    "pool_output",
    "quantize_layer",
    "is_compression_node",
    "quantization_disabled",
]

log = logging.getLogger(__name__)

STATE_NAME = "graphpass_compression"  # attribute of the GraphModule holding its CompressionState
ACTIVATIONS = ("relu", "relu6", "leaky_relu", "silu", "gelu", "hardswish", "mish", "none")
NORMS = ("batch_norm", "group_norm", "proxy_norm")
MIN_PACKED_NUMEL = 4096  # smaller saved tensors are not worth a kernel launch
MAX_STATISTIC_NUMEL = 1 << 16  # saved tensors without autograd history up to this size (norm
# statistics, per-token means) stay exact: backward formulas divide by them

# Autograd nodes that save their own output, first, where the backward only needs ``result > 0``.
_MASK_SAVERS = frozenset({"ReluBackward0", "LeakyReluBackward1"})
# Autograd node of each activation's output (in-place forms included).
_ACTIVATION_NODES = {
    "relu": frozenset({"ReluBackward0"}),
    "relu6": frozenset({"HardtanhBackward0", "HardtanhBackward1"}),
    "leaky_relu": frozenset({"LeakyReluBackward0", "LeakyReluBackward1"}),
    "silu": frozenset({"SiluBackward0"}),
    "gelu": frozenset({"GeluBackward0"}),
    "hardswish": frozenset({"HardswishBackward0"}),
    "none": frozenset(),
}
# In-place activations that need their input save a clone of the pre-activation first.
_CLONE_NODE = "CloneBackward0"

_QUANTIZE: contextvars.ContextVar[bool] = contextvars.ContextVar("graphpass_quantize", default=True)


@contextlib.contextmanager
def quantization_disabled() -> Iterator[None]:
    """Sessions opened inside keep exact copies but take every other step of the compressed path.

    With it, gradients must equal plain autograd: it tests the reconstruction formulas.
    """
    token = _QUANTIZE.set(False)
    try:
        yield
    finally:
        _QUANTIZE.reset(token)


@dataclass(frozen=True)
class QuantFormat:
    """``node.meta["graphpass.quant"]`` of a compression point."""

    point: str  # "begin" | "layer_input" | "layer" | "pool_input" | "pool_output" | "end"
    bits: int
    layout: str  # what is stored: "group" (generic, begin), "anchored" (layer); "" for markers
    rounding: str = "nearest"
    layer: int | None = None
    norm: str = ""  # "batch_norm" | "group_norm" (layer points)
    activation: str = ""  # one of ACTIVATIONS (layer points)
    stored: str = ""  # layer: "pre_activation" (y) or "norm_input" (x, when no activation follows)


class CompressionState(nn.Module):
    """Holds one forward pass's session; its ``training`` flag (set by ``.train()``/``.eval()`` on the
    GraphModule) decides whether compression runs. No parameters, nothing in the state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.session: _Session | None = None

    def __deepcopy__(self, memo: dict) -> "CompressionState":
        copy = CompressionState()
        copy.train(self.training)
        return copy


# ----------------------------------------------------------------------------- the graph ops


def compress_saved(x: Any, state: CompressionState, *inputs: Any, bits: int, rounding: str = "nearest") -> Any:
    """From here to :func:`compress_saved_end`, autograd keeps ``bits``-bit copies of what it saves.

    ``x`` and ``inputs`` are the graph's inputs. What autograd saves of them (or of views of them
    without autograd history) is kept as it is: the caller holds them through the step anyway (the
    batch of a training loop), so a copy would cost memory on top and put error into the first
    layer's weight gradient (BLPA keeps the image too).
    """
    if state.session is not None:  # the previous forward raised before reaching its end point
        state.session.close()
        state.session = None
    if state.training and torch.is_grad_enabled():
        if rounding == "stochastic" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise UnsupportedError(
                "stochastic rounding under CUDA graph capture: its seed is drawn on the host, so every replay "
                "would reuse the captured one; transform with rounding='nearest' to capture the step"
            )
        state.session = _Session(bits if _QUANTIZE.get() else None, rounding == "stochastic")
        for t in tree_leaves((x, inputs)):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                state.session.input_storages[ref.cdata] = ref
    return x


def compress_saved_end(out: Any, state: CompressionState) -> Any:
    if state.session is not None:
        state.session.close()
        state.session = None
    return out


def layer_input(
    x: torch.Tensor,
    state: CompressionState,
    conv_input: torch.Tensor | None = None,
    conv_weight: torch.Tensor | None = None,
    conv_bias: torch.Tensor | None = None,
    *,
    layer: int,
    conv: tuple | None = None,
) -> torch.Tensor:
    """Mark ``x`` as the input of layer ``layer``'s norm: what the norm saves of it shares the layer copy.

    When ``x`` is a convolution's output (``conv`` = (stride, padding, dilation, groups) of the
    convolution of ``conv_input`` by ``conv_weight``, ``conv_bias``) whose input is large, the
    convolution's backward is taken over: it runs in batch chunks (:class:`_ConvFromCopy`)."""
    session = state.session
    if session is not None and isinstance(x, torch.Tensor):
        if conv is not None and isinstance(conv_input, torch.Tensor):
            x = session.take_over_conv(x, conv_input, conv_weight, conv_bias, conv)
        session.open_layer(layer, x)
    return x


def quantize_layer(
    y: torch.Tensor,
    state: CompressionState,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    layer: int,
    bits: int,
    norm: str,
    activation: str,
    negative_slope: float = 0.01,
    approximate: str = "none",
) -> torch.Tensor:
    """Keep one ``bits``-bit copy of layer ``layer``: ``y`` is the norm's output before its
    activation, or for ``norm="proxy_norm"`` the output of ProxyNormAct, whose activation and proxy
    normalization are rebuilt with the proxy statistics its autograd node keeps."""
    session = state.session
    if session is not None:
        return session.quantize_layer(
            layer, y, weight, bias, bits=bits, norm=norm, activation=Activation(activation, negative_slope, approximate)
        )
    return y


def pool_input(x: torch.Tensor, state: CompressionState, *, dims: int) -> torch.Tensor:
    """Mark ``x`` as a max-pool's input: the indices the pool saves address one of its planes (the
    last ``dims`` dimensions), so they fit an integer type sized by the plane's element count."""
    session = state.session
    if session is not None and isinstance(x, torch.Tensor):
        session.index_bound = math.prod(x.shape[-dims:])
    return x


def pool_output(y: torch.Tensor, state: CompressionState) -> torch.Tensor:
    """The max-pool before has run: integer tensors saved from here on are not its indices."""
    session = state.session
    if session is not None:
        session.index_bound = None
    return y


COMPRESSION_OPS: frozenset[Callable[..., Any]] = frozenset(
    {compress_saved, compress_saved_end, layer_input, quantize_layer, pool_input, pool_output}
)


def is_compression_node(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a compression point (forward value: its first argument)."""
    return node.op == "call_function" and node.target in COMPRESSION_OPS


# ----------------------------------------------------------------------------- handles
# What autograd stores instead of a tensor; ``_unpack`` rebuilds the tensor in backward.


class _Quantized:
    __slots__ = ("packed",)

    def __init__(self, packed: Packed) -> None:
        self.packed = packed

    @property
    def format(self) -> str:
        return f"q{self.packed.bits}-group"

    def unpack(self) -> torch.Tensor:
        return unpack(self.packed)

    @property
    def row_step(self) -> int:
        return self.packed.row_step

    def unpack_rows(self, start: int, stop: int) -> torch.Tensor:
        return unpack(self.packed.rows(start, stop))


class _Mask:
    """``result > 0`` of a ReLU's own saved output: 1 bit, rebuilt as 0/1 in the original dtype."""

    __slots__ = ("packed", "dtype")

    def __init__(self, packed: Packed, dtype: torch.dtype) -> None:
        self.packed, self.dtype = packed, dtype

    format = "mask1"

    def unpack(self) -> torch.Tensor:
        return unpack(self.packed, dtype=self.dtype)


class _Narrowed:
    """Indices known to lie in [0, bound), in the narrowest integer type that holds them: exact."""

    __slots__ = ("values", "dtype")

    def __init__(self, values: torch.Tensor, dtype: torch.dtype) -> None:
        self.values, self.dtype = values, dtype

    @property
    def format(self) -> str:
        return f"index-{str(self.values.dtype).removeprefix('torch.')}"

    def unpack(self) -> torch.Tensor:
        return self.values.to(self.dtype)


def _index_dtype(bound: int) -> torch.dtype:
    """The narrowest integer type holding 0 .. bound - 1."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if bound - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


class _LayerRef:
    """One role of a layer's tensors: "input" (norm input), "output" (pre-activation), "activation"."""

    __slots__ = ("layer", "role", "dtype")

    def __init__(self, layer: "_Layer", role: str, dtype: torch.dtype) -> None:
        self.layer, self.role, self.dtype = layer, role, dtype

    @property
    def format(self) -> str:
        return self.layer.format

    def unpack(self) -> torch.Tensor:
        return self.layer.rebuild(self.role, self.dtype)

    @property
    def row_step(self) -> int:
        return self.layer.row_step(self.role)

    def unpack_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.layer.rebuild(self.role, self.dtype, rows=(start, stop))


def _row_step(handle: Any) -> int:
    """Rows (leading dimension) at whose multiples ``handle`` can be rebuilt in part; 0: only whole
    (handles that can define ``row_step`` and ``unpack_rows``)."""
    return 1 if isinstance(handle, torch.Tensor) else getattr(handle, "row_step", 0)


def _rebuild_rows(handle: Any, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of what ``handle`` stands for (``start`` a multiple of its row step)."""
    if isinstance(handle, torch.Tensor):
        return handle[start:stop]
    return without_grad(handle.unpack_rows, start, stop)


CONV_CHUNK_BYTES = 64 * 2**20  # a convolution backward rebuilds its input in batch chunks of about this


def conv_chunk_rows(rows: int, row_bytes: int, row_step: int) -> int:
    """Rows per chunk of a convolution backward whose input has ``rows`` rows of ``row_bytes``
    (rebuildable at multiples of ``row_step``); 0: in one piece (up to two chunks' worth: chunks
    cost host time, which the step is short of; or no row can be cut)."""
    if rows * row_bytes <= 2 * CONV_CHUNK_BYTES or row_step <= 0:
        return 0
    per_chunk = max(row_step, CONV_CHUNK_BYTES // row_bytes // row_step * row_step)
    return per_chunk if per_chunk < rows else 0


def conv_rebuild_bytes(shape: tuple[int, ...], itemsize: int, fmt: str) -> int:
    """Bytes a taken-over convolution backward rebuilds at a time from an input copy of format ``fmt``
    (as the save recorder names it): what :class:`_ConvFromCopy` does, for the memory plan."""
    rows = shape[0] if shape else 1
    row_elements = math.prod(shape[1:])
    unit = FLAG_BLOCK if fmt.endswith("-layer") and fmt != "exact-layer" else DEFAULT_GROUP_SIZE if fmt.endswith("-group") else 1
    per_chunk = conv_chunk_rows(rows, row_elements * itemsize, aligned_rows(row_elements, unit) if row_elements else 0)
    return (per_chunk or rows) * row_elements * itemsize


def _unpack(handle: Any) -> torch.Tensor:
    if isinstance(handle, torch.Tensor):
        return handle
    return without_grad(handle.unpack)


# ----------------------------------------------------------------------------- layers


class _Layer:
    """One Conv -> Norm -> Act layer: its single stored copy and the per-channel floats to rebuild
    every role from it in one unpack pass, as ``activation(stored) * scale + shift`` (see _epilogue)."""

    def __init__(self, index: int, x: torch.Tensor) -> None:
        self.index = index
        self.format = "full"  # as reported to the save recorder: "q4-layer", "exact-layer", or a fallback format
        self.input: torch.Tensor | None = x  # held only between layer_input and quantize_layer
        self.activation = Activation("none")
        self.stored_role = ""  # "output" (pre-activation) or "input"
        self.stored: Packed | torch.Tensor | None = None  # a tensor when quantization is disabled
        self.other_role = ""  # the role rebuilt by the affine map from the stored one
        self.scale: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.post_scale: torch.Tensor | None = None  # Proxy Norm: activation -> (act - mu~) * inv_std~
        self.post_shift: torch.Tensor | None = None
        self.fallback: dict[str, Any] = {}  # role -> generic handle, when layer mode did not apply
        # layer_tables' float32 (6, E) rows (LAYER_TABLE_ROWS), per channel or per (sample, channel):
        # scale, shift (the other role's map), then grad_scale (gamma * rstd), a, center with
        # x_hat = (stored - center) * a for the norm's backward
        self.norm_floats: torch.Tensor | None = None
        self.norm = ""  # "batch_norm", "group_norm" or "proxy_norm" (see norm_backward)
        self.groups = 0  # GroupNorm's
        # ProxyNormAct: its proxy statistics (mu~, 1/std~) and its function's config, for its backward
        self.proxy: tuple[tuple[torch.Tensor, torch.Tensor], tuple] | None = None
        self.cache: tuple[str, torch.Tensor] | None = None  # the last rebuilt non-input role

    def rebuild(self, role: str, dtype: torch.dtype, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor of ``role``, or its leading-dimension ``rows`` (start, stop): those are not cached."""
        if self.input is not None and role == "input":  # read during quantize_layer, before packing
            return self.input if rows is None else self.input[rows[0] : rows[1]]
        if role in self.fallback:
            return _unpack(self.fallback[role]) if rows is None else _rebuild_rows(self.fallback[role], *rows)
        if rows is not None:
            epilogue = {k: _row_table(v, rows) for k, v in self._epilogue(role).items()}
            if isinstance(self.stored, Packed):
                return unpack(self.stored.rows(*rows), dtype=dtype, **epilogue)
            v = self.stored[rows[0] : rows[1]].to(torch.float32, copy=True)  # the epilogue runs in place
            return apply_epilogue(v, **epilogue, inplace=True).to(dtype)
        if self.cache is not None and self.cache[0] == role and self.cache[1].dtype == dtype:
            return self.cache[1]
        # The norm input is the layer's last role in backward: drop the cache before rebuilding it.
        self.cache = None
        epilogue = self._epilogue(role)
        if isinstance(self.stored, Packed):
            out = unpack(self.stored, dtype=dtype, **epilogue)  # one pass straight into the final tensor
        else:
            v = self.stored.float()
            out = apply_epilogue(v, **epilogue, inplace=v is not self.stored).to(dtype)
        # The activation output is often unpacked twice in a row (the next conv, then the ReLU).
        if role != "input":
            self.cache = (role, out)
        return out

    def row_step(self, role: str) -> int:
        """Rows at whose multiples ``role`` can be rebuilt in part (see :meth:`rebuild`)."""
        if role in self.fallback:
            return _row_step(self.fallback[role])
        return self.stored.row_step if isinstance(self.stored, Packed) else 1

    def norm_backward(self, grad: torch.Tensor, need_input_grad: bool, input_dtype: torch.dtype, params: tuple):
        """The norm's backward from the stored copy, its input never rebuilt: (input grad or None, then
        the gradients of ``params``, float32 where the norm's own are; see :class:`_NormFromCopy`)."""
        self.cache = None  # the activation output's backward ran before this one: nothing reads it again
        floats = self.norm_floats[2:5]  # grad_scale, a, center
        if self.norm == "batch_norm":
            return batch_norm_backward(self.stored, grad, floats, need_input_grad=need_input_grad, dtype=input_dtype)
        if self.norm == "group_norm":  # its activation, if any, is a node of its own
            grad_x, rows = group_norm_backward(
                self.stored, grad, floats, *params, groups=self.groups, need_input_grad=need_input_grad, dtype=input_dtype
            )
            return grad_x, rows[0], rows[1]
        (mu, inv_std), config = self.proxy
        grad_x, rows = group_norm_backward(
            self.stored, grad, floats, params[0], params[1], groups=self.groups, activation=Activation(config[1], config[2]),
            output_map=(mu, inv_std), need_input_grad=need_input_grad, dtype=input_dtype,
        )  # fmt: skip
        return (grad_x, *proxy_norm.parameter_grads(params, mu, inv_std, rows.unbind(0), config))

    def _epilogue(self, role: str) -> dict[str, Any]:
        """How ``role`` follows from the stored tensor: activation(stored) * scale + shift."""
        if role == "activation":
            return {"activation": self.activation, "scale": self.post_scale, "shift": self.post_shift}
        if role == self.other_role:
            if self.scale is None and self.norm_floats is not None:  # a BatchNorm's: rarely rebuilt, so cut on use
                self.scale, self.shift = self.norm_floats[0], self.norm_floats[1]
            return {"scale": self.scale, "shift": self.shift}
        return {}


def _row_table(table: Any, rows: tuple[int, int]) -> Any:
    """A per-sample epilogue table (N, C, 1, ...) cut to ``rows``; per-channel ones stay whole."""
    if isinstance(table, torch.Tensor) and table.dim() > 1 and table.shape[0] > 1:
        return table[rows[0] : rows[1]]
    return table


def _norm_statistics(y: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The norm's own batch (mean, 1/std) from its autograd node, or None where layer mode cannot
    apply (no history, eval-mode BatchNorm, an unknown kernel)."""
    node = y.grad_fn
    if node is None or y.dim() < 2:
        return None
    try:
        if norm == "proxy_norm":  # ProxyNormAct's function keeps them beside its output map, read by _fill_layer
            mean, rstd = node.group_stats
        else:
            mean, rstd = node._saved_result1, node._saved_result2
    except (AttributeError, RuntimeError, ValueError):
        return None
    if not getattr(node, "_saved_training", True):
        return None
    channels = y.shape[1]
    if norm == "batch_norm":
        ok = mean.shape == (channels,) and rstd.shape == (channels,)
    else:
        ok = mean.dim() == 2 and mean.shape[0] == y.shape[0] and mean.shape[1] > 0 and channels % mean.shape[1] == 0
    return (mean.float(), rstd.float()) if ok and rstd.shape == mean.shape else None


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skips the dispatch of a no-op .to


def _keeps_graph() -> bool:
    """Whether the running backward was called with retain_graph=True (False where torch cannot tell)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(keep_graph()) if keep_graph is not None else False


class _NormFromCopy(torch.autograd.Function):
    """Stands in for a norm's autograd node (training-mode BatchNorm, GroupNorm, ProxyNormAct) once
    its layer holds a copy.

    Forward returns the norm's output (already computed, exactly as the model computes it) as a
    new tensor whose backward is :meth:`_Layer.norm_backward`, which reads the copy where the
    norm's own backward would read its input rebuilt at full size; the original node, with what it
    saved, is dropped. Inputs: ``(y detached, x, layer, *parameters)``: weight and bias (None where
    the norm has none), and for ProxyNormAct gamma~ and beta~ after them.
    """

    @staticmethod
    def forward(ctx, y, x, layer, *params):
        ctx.layer, ctx.input_dtype = layer, x.dtype
        ctx.params = params  # the module's parameters, alive anyway; their gradients are all it needs
        return y.detach()  # an alias, not a view: the activation after it may run in place

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        layer = ctx.layer
        if layer is None:
            raise RuntimeError(
                "graphpass: a second backward through a compressed normalized layer; this torch cannot tell "
                "that the first one used retain_graph=True, so the layer's copy was already freed"
            )
        # Autograd frees what a node saved once its backward ran; an attribute of ctx it does not:
        # drop the layer (its copy) here, unless the graph is kept for another backward.
        if not _keeps_graph():
            ctx.layer = None
        grad_x, *param_grads = layer.norm_backward(grad, ctx.needs_input_grad[1], ctx.input_dtype, ctx.params)
        needs = ctx.needs_input_grad[3:]
        return None, grad_x, None, *(
            _as_dtype(g, p.dtype) if need else None for g, p, need in zip(param_grads, ctx.params, needs)
        )


class _ConvFromCopy(torch.autograd.Function):
    """Stands in for a convolution's autograd node when its input is large (BLPA 1.5 steps 1-2);
    only for a weight that needs its gradient (otherwise the convolution keeps no input).

    Backward runs in batch chunks: each rebuilds its rows of the input from the copy autograd kept
    (or slices the input kept as it is) for the weight gradient, and writes its rows of the input
    gradient. So neither a full-size rebuilt input nor a full-batch convolution workspace (cuDNN's
    layout transposes of gradient and input) is ever live. Inputs: ``(output detached, input,
    weight, bias, handle, (stride, padding, dilation, groups), rows per chunk)``.
    """

    @staticmethod
    def forward(ctx, out, inp, weight, bias, handle, params, rows):
        ctx.handle, ctx.params, ctx.rows = handle, params, rows
        ctx.input_geometry = (inp.shape, inp.stride(), inp.dtype)
        ctx.weight = weight
        return out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        handle, weight = ctx.handle, ctx.weight
        if handle is None:
            raise RuntimeError(
                "graphpass: a second backward through a taken-over convolution; this torch cannot tell "
                "that the first one used retain_graph=True, so the input's copy was already freed"
            )
        if not _keeps_graph():
            ctx.handle = ctx.weight = None
        stride, padding, dilation, groups = ctx.params
        shape, strides, dtype = ctx.input_geometry
        need_input, need_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[3]  # the weight's: always
        grad_input = torch.empty_strided(shape, strides, dtype=dtype, device=grad.device) if need_input else None
        grad_weight = None
        for start in range(0, shape[0], ctx.rows):
            stop = min(start + ctx.rows, shape[0])
            rows = _rebuild_rows(handle, start, stop)
            part_input, part_weight, _ = torch.ops.aten.convolution_backward(
                grad[start:stop], rows, weight, None, stride, padding, dilation, False,
                [0] * len(stride), groups, [need_input, True, False],
            )  # fmt: skip
            del rows
            if need_input:
                grad_input[start:stop].copy_(part_input)
            grad_weight = part_weight if grad_weight is None else grad_weight.add_(part_weight)
            del part_input, part_weight  # before the next chunk allocates its own
        grad_bias = grad.sum([0, *range(2, grad.dim())]) if need_bias else None
        return None, grad_input, grad_weight, grad_bias, None, None, None


# ----------------------------------------------------------------------------- the session


class _Entry:
    """A saved (tensor object, version) seen before, and what it was stored as."""

    __slots__ = ("ref", "version", "values", "mask")

    def __init__(self, t: torch.Tensor, values: Any = None, mask: Any = None) -> None:
        self.ref = weakref.ref(t)
        self.version = t._version
        self.values, self.mask = values, mask


class _Session:
    """State of one forward pass: which tensors are layer roles, and one handle per saved tensor."""

    def __init__(self, bits: int | None, stochastic: bool) -> None:
        self.bits, self.stochastic = bits, stochastic
        self.entries: dict[int, _Entry] = {}
        self.layers: dict[int, _Layer] = {}
        self.awaiting: dict[Any, _Layer] = {}  # norm's autograd node -> layer whose activation follows
        self.index_bound: int | None = None  # set between pool_input and pool_output
        # The graph inputs' storages (held by the caller), weakly: a weak reference also stops the
        # address, which is the key, from being reused by another storage while the session lives.
        self.input_storages: dict[int, StorageWeakRef] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)
        self.hooks.__enter__()

    def close(self) -> None:
        for layer in self.layers.values():
            if layer.input is not None:  # quantize_layer never ran for it
                self._fall_back(layer)
        self.hooks.__exit__(None, None, None)
        self.entries.clear()
        self.layers.clear()
        self.awaiting.clear()
        self.input_storages.clear()

    # -- layer mode

    def take_over_conv(self, out, inp, weight, bias, params) -> torch.Tensor:
        """``out`` under a :class:`_ConvFromCopy` node when its input is worth rebuilding in chunks."""
        node = out.grad_fn
        if node is None or type(node).__name__ != "ConvolutionBackward0" or out.dtype != inp.dtype:
            return out  # no history, another kernel, or autocast (the node saved a cast copy of inp)
        if inp.dim() < 2 or not inp.shape[0] or weight is None or weight.dtype != inp.dtype or not weight.requires_grad:
            return out  # a frozen kernel's backward keeps no input: nothing to rebuild
        batch, row_bytes = inp.shape[0], inp.numel() // inp.shape[0] * inp.element_size()
        if not conv_chunk_rows(batch, row_bytes, 1):
            return out  # too small for any row step (most convolutions): skip finding what is stored
        handle = self._stored(inp)
        rows = conv_chunk_rows(batch, row_bytes, _row_step(handle))
        if not rows:
            return out
        self.pack(inp)  # reports the save (of the convolution's copy: 0 bytes) to discovery
        return _ConvFromCopy.apply(out.detach(), inp, weight, bias, handle, params, rows)

    def _stored(self, t: torch.Tensor) -> Any:
        """What autograd already keeps for ``t`` (a handle, or ``t`` itself), without storing anything."""
        entry = self._entry(t)
        if entry is not None and entry.values is not None:
            return entry.values
        return t if self._is_graph_input(t) else None

    def open_layer(self, index: int, x: torch.Tensor) -> None:
        layer = _Layer(index, x)
        layer.format = f"q{self.bits}-layer" if self.bits else "exact-layer"
        self.layers[index] = layer
        self._register(x, _LayerRef(layer, "input", x.dtype))

    def quantize_layer(
        self, index: int, y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
        *, bits: int, norm: str, activation: Activation,
    ) -> torch.Tensor:  # fmt: skip
        """Make layer ``index``'s copy; return the tensor the graph continues with: ``y`` under a
        :class:`_NormFromCopy` node (``y`` itself where the copy's layout does not allow that)."""
        layer = self.layers.get(index)
        if layer is None or layer.input is None:
            return y
        stats = _norm_statistics(y, norm) if layer.input.shape == y.shape else None
        x, layer.input = layer.input, None
        if stats is None:
            log.debug("layer %d: norm statistics unavailable; its tensors are stored per tensor", index)
            self._fall_back(layer, x)
            return y
        without_grad(
            self._fill_layer, layer, x, y, weight, bias, stats, bits=bits, norm=norm, activation=activation
        )
        params = (weight, bias)
        if norm == "proxy_norm":
            node = y.grad_fn
            params, layer.proxy = node.parameters, (node.proxy_stats, node.config)
        if norm == "batch_norm" or group_norm_reads(layer.stored):
            y = _NormFromCopy.apply(y.detach(), x, layer, *params)
        if norm == "proxy_norm":  # y is already the activation output
            self._register(y, _LayerRef(layer, "activation", y.dtype))
            return y
        self._register(y, _LayerRef(layer, "output", y.dtype))
        if activation.name != "none":
            self.awaiting[y.grad_fn] = layer
        return y

    def _fill_layer(self, layer, x, y, weight, bias, stats, *, bits, norm, activation) -> None:
        mean, rstd = stats
        layer.activation, layer.norm = activation, norm
        # With an activation, store the pre-activation h on a grid anchored at 0 (exact activation
        # sign); without one, store x (a zero-initialised gamma cannot lose it) on a grid centred
        # on its mean (no sign to keep).
        store_output = activation.name not in ("none", "identity") or norm == "proxy_norm"
        layer.stored_role, layer.other_role = ("output", "input") if store_output else ("input", "output")
        jumps = activation.jumps if store_output else ()  # the stored pre-activation's grid keeps them
        if norm == "batch_norm":  # per-channel tables, in one launch on CUDA
            table, floats = layer_tables(mean, rstd, weight, bias, bits=self.bits, store_output=store_output, jumps=jumps)
            grid = {"grid": table}
            target = y if store_output else x
        else:  # GroupNorm: statistics per (sample, group), tables per (sample, channel), one launch on CUDA
            table_shape = (y.shape[0], y.shape[1]) + (1,) * (y.dim() - 2)
            _, floats = layer_tables(mean, rstd, weight, bias, bits=None, store_output=store_output, channels=y.shape[1])
            layer.scale, layer.shift, h_scale, _, _, h_shift = floats.view(6, *table_shape).unbind(0)
            layer.groups = mean.shape[1]
            target = y
            if norm == "proxy_norm":
                # ProxyNormAct keeps h inside its fused function: materialise it once to store it.
                layer.post_scale, layer.post_shift = (_as_dtype(t, torch.float32) for t in y.grad_fn.output_map)
                layer.activation = Activation(activation.name if activation.name != "identity" else "none", activation.negative_slope)
                target = torch.addcmul(h_shift, x, h_scale)
            elif not store_output:
                target = x
            # Group statistics say little about single channels: measure them (one extra read).
            var, grid_mean = torch.var_mean(target, dim=[0, *range(2, target.dim())], correction=0)
            grid = {"mean": grid_mean.float(), "std": var.float().sqrt(), "anchored": store_output, "jumps": jumps}
        layer.norm_floats = floats  # the other role's map and what its backward needs (_Layer.norm_backward)
        if self.bits is None:
            layer.stored = target.detach().clone()
            layer.format = "exact-layer"
            nbytes = _nbytes(layer.stored)
        else:
            layer.stored = pack_anchored(target, bits, **grid, stochastic=self.stochastic)
            layer.format = f"q{bits}-layer"
            nbytes = layer.stored.nbytes
        record_pack(target, nbytes, layer.format)

    def _fall_back(self, layer: _Layer, x: torch.Tensor | None = None) -> None:
        """Layer mode did not apply: the handles already given out for its input get a generic copy."""
        x = layer.input if x is None else x
        layer.input = None
        if x is not None:
            handle = self._generic(x)
            layer.fallback["input"] = handle
            layer.format = handle.format if not isinstance(handle, torch.Tensor) else "full"

    # -- the pack hook

    def pack(self, t: torch.Tensor) -> Any:
        if t.numel() < MIN_PACKED_NUMEL or _is_parameter(t):  # most calls: no grad-mode switch
            return _store_as_is(t)
        return without_grad(self._pack, t)

    def _entry(self, t: torch.Tensor) -> "_Entry | None":
        """The entry of ``t`` as it is now (same object, same version), or None."""
        entry = self.entries.get(id(t))
        return entry if entry is not None and entry.ref() is t and entry.version == t._version else None

    def _is_graph_input(self, t: torch.Tensor) -> bool:
        """A graph input, or a history-less view of one: the caller holds it through the step."""
        return t.grad_fn is None and t.untyped_storage()._cdata in self.input_storages

    def _pack(self, t: torch.Tensor) -> Any:
        entry = self._entry(t)
        if entry is not None and entry.values is not None:
            values = entry.values
            record_pack(t, _nbytes(t), "full") if isinstance(values, torch.Tensor) else record_pack(t, 0, values.format)
            return values
        if self.index_bound is not None and t.dtype == torch.int64:
            return self._indices(t, self.index_bound)
        if _keep_as_is(t) or self._is_graph_input(t):
            return _store_as_is(t)
        node = t.grad_fn
        if entry is None and node is not None and self.awaiting:
            ref = self._layer_role(t, node)
            if ref is not None:
                self._register(t, ref)
                record_pack(t, 0, ref.format)
                return ref
        if self.bits is not None and entry is None:
            if t.dtype == torch.bool:
                return self._mask(t, pack_mask(t))
            if node is not None and type(node).__name__ in _MASK_SAVERS:
                return self._mask(t, pack_positive_mask(t))
        handle = self._generic(t)
        if entry is not None:
            entry.values = handle
        else:
            self.entries[id(t)] = _Entry(t, values=handle)
        return handle

    def _mask(self, t: torch.Tensor, packed: Packed) -> _Mask:
        handle = _Mask(packed, t.dtype)
        self.entries[id(t)] = _Entry(t, mask=handle)
        record_pack(t, handle.packed.nbytes, handle.format)
        return handle

    def _indices(self, t: torch.Tensor, bound: int) -> _Narrowed:
        handle = _Narrowed(t.to(_index_dtype(bound)), t.dtype)
        self.entries[id(t)] = _Entry(t, values=handle)
        record_pack(t, _nbytes(handle.values), handle.format)
        return handle

    def _layer_role(self, t: torch.Tensor, node: Any) -> _LayerRef | None:
        """The role of ``t`` if its autograd node's first input is an awaiting layer's norm."""
        parents = node.next_functions
        layer = self.awaiting.get(parents[0][0]) if parents else None
        if layer is None or layer.stored is None:
            return None
        name = type(node).__name__
        if name == _CLONE_NODE:
            return _LayerRef(layer, "output", t.dtype)
        if name in _ACTIVATION_NODES[layer.activation.name]:
            return _LayerRef(layer, "activation", t.dtype)
        return None

    def _generic(self, t: torch.Tensor) -> Any:
        if self.bits is None or not t.is_floating_point():
            return _store_as_is(t)
        handle = _Quantized(pack_groups(t, self.bits, group_size=DEFAULT_GROUP_SIZE, stochastic=self.stochastic))
        record_pack(t, handle.packed.nbytes, handle.format)
        return handle

    def _register(self, t: torch.Tensor, ref: _LayerRef) -> None:
        self.entries[id(t)] = _Entry(t, values=ref)


def _store_as_is(t: torch.Tensor) -> torch.Tensor:
    """Store ``t`` as it is (and report so), without its autograd history. A node that saves its own
    output (a ReLU's result, GroupNorm's statistics) would otherwise hold, through the hook, the
    tensor that holds the node: a cycle through C++ that the garbage collector cannot see, so the
    step's autograd graph outlives it. Under CUDA graph capture the next step then reuses the old
    graph's gradient accumulators, whose stream is the default one of an eager step, and the
    capture fails."""
    record_pack(t, _nbytes(t), "full")
    return t.detach() if t.grad_fn is not None else t


def _is_parameter(t: torch.Tensor) -> bool:
    # nn.Parameter's isinstance goes through a Python metaclass hook: skip it for plain tensors.
    return type(t) is nn.Parameter or (type(t) is not torch.Tensor and isinstance(t, nn.Parameter))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _keep_as_is(t: torch.Tensor) -> bool:
    """Parameters and their autocast copies, integers, statistics and tiny tensors stay exact."""
    numel = t.numel()
    if numel < MIN_PACKED_NUMEL or _is_parameter(t):
        return True
    if t.dtype == torch.bool:
        return False
    if not t.is_floating_point():
        return True
    node = t.grad_fn
    if node is None:
        return numel <= MAX_STATISTIC_NUMEL and not t.requires_grad
    # One op away from a parameter: a transposed weight (linear), autocast's cast of it.
    parents = node.next_functions
    return len(parents) == 1 and isinstance(getattr(parents[0][0], "variable", None), nn.Parameter)
