"""Rewrite: explicit quantize-on-save points, so autograd keeps K-bit copies (BLPA, papers.md 1).

Before / after (``bits=4``)::

    conv1 = self.conv1(x)                     x = compress_saved(x, graphpass_compression, bits=4, rounding='nearest')
    bn1 = self.bn1(conv1)                     conv1 = self.conv1(x)
    relu = self.relu(bn1)                     layer_input = layer_input(conv1, graphpass_compression, x, conv1_weight,
    ...                                           None, layer=0, conv=((2, 2), (3, 3), (1, 1), 1))
                                              bn1 = self.bn1(layer_input)
    return fc                                 quantize_layer = quantize_layer(bn1, graphpass_compression, bn1_weight,
                                                  bn1_bias, layer=0, bits=4, norm='batch_norm', activation='relu')
                                              relu = self.relu(quantize_layer)
                                              ...
                                              return compress_saved_end(fc, graphpass_compression)

A norm fed by an nn.Conv1d/2d/3d (zero padding given as numbers) gets the convolution's input,
weight, bias and geometry at its ``layer_input``, so the runtime can run a large convolution's
backward in batch chunks. Every point returns its first argument (as a value), so the forward
pass computes exactly what it computed before; what changes is what autograd keeps
(graphpass/runtime.py): one anchored K-bit copy per Conv -> Norm -> Act layer, and per-group K-bit
copies, 1-bit masks or exact copies of everything else autograd saves between ``compress_saved``
and ``compress_saved_end``, except the graph's inputs, which the caller holds anyway and which are
kept as they are.

Layers: a norm node (BatchNorm1d/2d/3d or SyncBatchNorm module, GroupNorm module, ScaledGroupNorm,
``F.batch_norm``, ``F.group_norm``; or a ProxyNormAct module, whose activation is inside it, stored as
its normalized pre-activation) and, when the norm's output feeds only it, one activation:
ReLU, ReLU6, LeakyReLU, SiLU, GELU or Hardswish as a module, a functional, a Tensor method or an
in-place form. Any other user means activation "none". A norm that turns out not to be in
training mode at run time (a frozen BatchNorm) is compressed per tensor instead.

Max-pools (MaxPool1d/2d/3d and AdaptiveMaxPool1d/2d/3d modules of exactly those types, their
functionals; not with ``return_indices``) get ``pool_input``/``pool_output`` around them: the int64
indices they save for backward are kept in the narrowest integer type that holds one input plane.

Requires: nothing. Writes: ``graphpass.quant`` (a :class:`graphpass.runtime.QuantFormat`) on
every new node. Invalidates: ``graphpass.saved``. A graph that already has compression points is
left alone (``modified=False``).
"""

from __future__ import annotations

import logging

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from graphpass import runtime
from graphpass.errors import InputError
from graphpass.ir import FUNCTION_ACTIVATIONS, METHOD_ACTIVATIONS, MODULE_ACTIVATIONS, call_arg, copy_meta, module_of
from graphpass.meta import META_FROM_PASS, META_QUANT, META_SAVED, set_meta
from graphpass.pass_base import PassKind, PassResult, graph_pass
from graphpass import proxy_norm
from graphpass.proxy_norm import ProxyNormAct, ScaledGroupNorm
from graphpass.quantize import SUPPORTED_BITS

__all__ = ["insert_quantize_on_save"]

log = logging.getLogger(__name__)

PASS_NAME = "insert_quantize_on_save"
ROUNDINGS = ("nearest", "stochastic")

# Max-pools whose saved indices address one plane of their input: target -> (pooled dimensions,
# position of ``return_indices``). Exact module types: a subclass may pad its input first (timm's
# MaxPool2dSame), and its indices would then address a larger plane.
_MAX_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}  # fmt: skip
_MAX_POOL_FUNCTIONS = {
    F.max_pool1d: (1, 6), F.max_pool2d: (2, 6), F.max_pool3d: (3, 6),
    torch.max_pool1d: (1, None), torch.max_pool2d: (2, None), torch.max_pool3d: (3, None),
    F.adaptive_max_pool1d: (1, 2), F.adaptive_max_pool2d: (2, 2), F.adaptive_max_pool3d: (3, 2),
}  # fmt: skip

# Mish is folded into ProxyNormAct by replace_batchnorm but not compressed as a standalone activation.
_UNSUPPORTED_ACTIVATIONS = frozenset({"mish"})


def _norm_of(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """(norm kind, input node, weight, bias) where weight/bias are nodes, "module" or None; else None."""
    module = module_of(gm, node)
    if module is not None:
        if isinstance(module, _BatchNorm):
            kind = "batch_norm"
        elif isinstance(module, (nn.GroupNorm, ScaledGroupNorm)):
            kind = "group_norm"
        elif isinstance(module, ProxyNormAct):
            kind = "proxy_norm"
        else:
            return None
        return kind, call_arg(node, 0, "input"), "module", "module"
    if node.op == "call_function" and node.target is F.batch_norm:
        return "batch_norm", call_arg(node, 0, "input"), call_arg(node, 3, "weight"), call_arg(node, 4, "bias")
    if node.op == "call_function" and node.target is F.group_norm:
        return "group_norm", call_arg(node, 0, "input"), call_arg(node, 2, "weight"), call_arg(node, 3, "bias")
    if node.op == "call_function" and node.target is proxy_norm.proxy_norm_act:
        return "proxy_norm", call_arg(node, 0, "x"), call_arg(node, 1, "weight"), call_arg(node, 2, "bias")
    return None


def _proxy_norm_activation(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict:
    """Activation arguments of a ProxyNormAct module or ``proxy_norm_act`` call (the runtime reads its
    proxy statistics from the call's autograd node)."""
    if node.op == "call_module":
        pna = gm.get_submodule(str(node.target))
        name, slope = pna.activation, pna.negative_slope
    else:
        name, slope = node.kwargs.get("activation"), node.kwargs.get("negative_slope", 0.01)
    act = {"activation": "none" if name == "identity" else name}
    if name == "leaky_relu":
        act["negative_slope"] = float(slope)
    return act


def _activation_of(gm: torch.fx.GraphModule, norm: torch.fx.Node) -> dict:
    """Keyword arguments describing the activation that alone consumes ``norm``'s output."""
    none = {"activation": "none"}
    if len(norm.users) != 1:
        return none
    (user,) = norm.users
    if call_arg(user, 0, "input") is not norm:
        return none
    module = module_of(gm, user)
    if module is not None:
        kind = MODULE_ACTIVATIONS.get(type(module))
        slope = getattr(module, "negative_slope", 0.01)
        approximate = getattr(module, "approximate", "none")
    elif user.op == "call_function" and user.target in FUNCTION_ACTIVATIONS:
        kind = FUNCTION_ACTIVATIONS[user.target]
        slope = call_arg(user, 1, "negative_slope", 0.01) if kind == "leaky_relu" else 0.01
        approximate = user.kwargs.get("approximate", "none") if kind == "gelu" else "none"
    elif user.op == "call_method" and user.target in METHOD_ACTIVATIONS:
        kind, slope, approximate = METHOD_ACTIVATIONS[str(user.target)], 0.01, "none"
    else:
        return none
    if kind is None or kind in _UNSUPPORTED_ACTIVATIONS:
        return none
    if not isinstance(slope, (int, float)) or not isinstance(approximate, str):
        return none
    described = {"activation": kind}
    if kind == "leaky_relu":
        described["negative_slope"] = float(slope)
    if kind == "gelu" and approximate != "none":
        described["approximate"] = approximate
    return described


def _max_pool_dims(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    """Pooled dimensions of a max-pool that returns only its values; 0 for any other node."""
    module = module_of(gm, node)
    if module is not None:
        return 0 if getattr(module, "return_indices", True) else _MAX_POOL_MODULES.get(type(module), 0)
    if node.op != "call_function" or node.target not in _MAX_POOL_FUNCTIONS:
        return 0
    dims, position = _MAX_POOL_FUNCTIONS[node.target]
    returns_indices = position is not None and call_arg(node, position, "return_indices", False)
    return 0 if returns_indices is not False else dims


def _conv_of(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """(input node, weight node, bias node or None, (stride, padding, dilation, groups)) when ``node``
    is an nn.Conv1d/2d/3d module call with zero padding given as numbers; else None."""
    module = module_of(gm, node)
    if type(module) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or module.padding_mode != "zeros":
        return None
    source = call_arg(node, 0, "input")
    if not isinstance(source, torch.fx.Node) or isinstance(module.padding, str):
        return None
    params = (tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.groups)
    return source, _param_node(gm, node, "module", "weight"), _param_node(gm, node, "module", "bias"), params


def _param_node(gm: torch.fx.GraphModule, user: torch.fx.Node, value, name: str) -> torch.fx.Node | None:
    """A get_attr node for the ``name`` parameter of ``user``'s (norm or conv) module (None if it has none)."""
    if value != "module":
        return value if isinstance(value, torch.fx.Node) else None
    if getattr(gm.get_submodule(str(user.target)), name, None) is None:
        return None
    with gm.graph.inserting_before(user):
        node = gm.graph.get_attr(f"{user.target}.{name}")
    copy_meta(user, node, from_pass=PASS_NAME)
    return node


def _add_point(graph: torch.fx.Graph, source: torch.fx.Node, target, args: tuple, kwargs: dict, fmt, name: str) -> torch.fx.Node:
    node = graph.create_node("call_function", target, args, kwargs, name=name)
    copy_meta(source, node, from_pass=PASS_NAME)
    for key in ("val", "tensor_meta"):
        if key in source.meta:
            node.meta[key] = source.meta[key]
    set_meta(node, META_QUANT, fmt)
    return node


@graph_pass(kind=PassKind.REWRITE, invalidates=(META_SAVED,), name=PASS_NAME)
def insert_quantize_on_save(gm: torch.fx.GraphModule, *, bits: int, rounding: str = "nearest") -> PassResult:
    """Insert quantize-on-save points so training keeps ``bits``-bit copies for backward.

    Args:
        gm: a traced GraphModule (modified in place).
        bits: 8, 4 or 2.
        rounding: "nearest" (deterministic) or "stochastic" (unbiased) rounding of the copies.
    """
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise InputError(f"insert_quantize_on_save: bits must be one of 8, 4 or 2; got {bits!r}")
    if rounding not in ROUNDINGS:
        raise InputError(f"insert_quantize_on_save: rounding must be 'nearest' or 'stochastic'; got {rounding!r}")
    graph = gm.graph
    if any(runtime.is_compression_node(n) for n in graph.nodes):
        return PassResult(gm, False, {})
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if not placeholders:
        return PassResult(gm, False, {})
    if hasattr(gm, runtime.STATE_NAME):
        raise InputError(f"{type(gm).__name__} already has an attribute {runtime.STATE_NAME!r}; rename it")

    norms = [(n, spec) for n in graph.nodes if (spec := _norm_of(gm, n)) is not None and isinstance(spec[1], torch.fx.Node)]
    gm.add_module(runtime.STATE_NAME, runtime.CompressionState())
    first = placeholders[0]
    with graph.inserting_after(placeholders[-1]):
        state = graph.get_attr(runtime.STATE_NAME)
    state.meta[META_FROM_PASS] = PASS_NAME
    with graph.inserting_after(state):
        fmt = runtime.QuantFormat("begin", bits, "group", rounding)
        args = (first, state, *placeholders[1:])
        begin = _add_point(graph, first, runtime.compress_saved, args, {"bits": bits, "rounding": rounding}, fmt, "compress_saved")
    first.replace_all_uses_with(begin, delete_user_cb=lambda user: user is not begin)

    activations: dict[str, int] = {}
    convs = 0
    for index, (norm, (kind, source, weight, bias)) in enumerate(norms):
        weight_node = _param_node(gm, norm, weight, "weight")
        bias_node = _param_node(gm, norm, bias, "bias")
        # ProxyNormAct's activation is inside it.
        act = _proxy_norm_activation(gm, norm) if kind == "proxy_norm" else _activation_of(gm, norm)
        args, kwargs = (source, state), {"layer": index}
        conv = _conv_of(gm, source)
        if conv is not None:  # the runtime may take over its backward (batch chunks from the copy)
            conv_input, conv_weight, conv_bias, kwargs["conv"] = conv
            args = (source, state, conv_input, conv_weight, conv_bias)
            convs += 1
        with graph.inserting_before(norm):
            fmt = runtime.QuantFormat("layer_input", bits, "", rounding, index, kind, act["activation"])
            mark = _add_point(graph, source, runtime.layer_input, args, kwargs, fmt, "layer_input")
        norm.replace_input_with(source, mark)
        with graph.inserting_after(norm):
            stored = "norm_input" if act["activation"] == "none" and kind != "proxy_norm" else "pre_activation"
            fmt = runtime.QuantFormat("layer", bits, "anchored", rounding, index, kind, act["activation"], stored)
            kwargs = {"layer": index, "bits": bits, "norm": kind, **act}
            point = _add_point(graph, norm, runtime.quantize_layer, (norm, state, weight_node, bias_node), kwargs, fmt, "quantize_layer")
        norm.replace_all_uses_with(point, delete_user_cb=lambda user: user is not point)
        activations[act["activation"]] = activations.get(act["activation"], 0) + 1

    pools = [
        (n, dims, source)
        for n in graph.nodes
        if (dims := _max_pool_dims(gm, n)) and isinstance(source := call_arg(n, 0, "input"), torch.fx.Node)
    ]
    for pool, dims, source in pools:
        with graph.inserting_before(pool):
            fmt = runtime.QuantFormat("pool_input", bits, "", rounding)
            mark = _add_point(graph, source, runtime.pool_input, (source, state), {"dims": dims}, fmt, "pool_input")
        pool.replace_input_with(source, mark)
        with graph.inserting_after(pool):
            fmt = runtime.QuantFormat("pool_output", bits, "", rounding)
            after = _add_point(graph, pool, runtime.pool_output, (pool, state), {}, fmt, "pool_output")
        pool.replace_all_uses_with(after, delete_user_cb=lambda user: user is not after)

    (result,) = output.args
    with graph.inserting_before(output):
        fmt = runtime.QuantFormat("end", bits, "", rounding)
        end = graph.create_node("call_function", runtime.compress_saved_end, (result, state), name="compress_saved_end")
        end.meta[META_FROM_PASS] = PASS_NAME
        set_meta(end, META_QUANT, fmt)
    output.args = (end,)
    stats = {"layers": len(norms), **{f"layers_{k}": v for k, v in sorted(activations.items())}}
    if convs:
        stats["layers_after_conv"] = convs
    if pools:
        stats["max_pools"] = len(pools)
    log.info(
        "insert_quantize_on_save: %d layers (%s), %d max-pools, %d-bit, %s rounding",
        len(norms), activations, len(pools), bits, rounding,
    )  # fmt: skip
    return PassResult(gm, True, stats)
