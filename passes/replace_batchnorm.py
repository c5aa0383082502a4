"""Rewrite: BatchNorm -> GroupNorm + Proxy Normalization (batch-independent, memory-lean).

Before / after, for a BatchNorm followed by an activation, and for one that is not::

    conv -> bn -> relu -> ...        conv -> ProxyNormAct(groups, "relu") -> ...
    conv -> bn -> add                conv -> ScaledGroupNorm(groups) -> add

ProxyNormAct is GroupNorm without affine (``groups=1`` is LayerNorm) then PN-Act
``(act(gamma * y + beta) - mu~) / sqrt(sigma~^2 + 0.03)`` with proxy statistics from 200 Gaussian
quantiles (math in graphpass/proxy_norm.py). It is one fused autograd node that keeps only its
input, so the rewritten model keeps no more bytes for backward than the BatchNorm model.

What carries over: convolution weights are untouched; the BatchNorm affine (gamma, beta) becomes
PN-Act's gamma, beta (ScaledGroupNorm keeps only gamma). BatchNorm running statistics do NOT carry
over: GroupNorm uses per-sample statistics, so a pretrained network computes a different function
after the rewrite and needs training.

Rules:

- Matched: call_module nodes of any BatchNorm1d/2d/3d, SyncBatchNorm or subclass whose forward is
  the standard one, and timm's BatchNormAct2d / SyncBatchNormAct (norm, drop, activation in one
  module; an Identity ``drop`` is required). The activation that follows is folded in when the
  norm's output feeds only it: ReLU, ReLU6, LeakyReLU, SiLU, GELU (exact), Hardswish, Mish as
  modules, functionals, Tensor methods or in-place forms.
- ``groups`` not dividing a layer's channel count: that layer uses the divisor of its channel
  count nearest to ``groups`` (the smaller on a tie), with a warning naming the layer.
  ``groups <= 0`` or larger than a layer's channel count raises InputError naming the layer.
- A BatchNorm in eval mode with running statistics (frozen statistics, as when fine-tuning a
  pretrained network) is left unchanged by default: it is already batch-independent, and
  converting it would throw away the statistics it was trained with. The reason is logged and
  counted in ``stats["bn_frozen_kept"]``. ``convert_frozen=True`` converts it anyway.

Requires: nothing. The BatchNorm node is kept (same name and target, module swapped), so its
``graphpass.tensor``/``val`` stay valid; a folded activation node is erased.
Writes: ``graphpass.norm`` (a :class:`graphpass.proxy_norm.NormRecord`) and ``graphpass.from_pass``
on every rewritten node.
Invalidates: ``graphpass.saved``.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from graphpass.errors import InputError
from graphpass.ir import FUNCTION_ACTIVATIONS, METHOD_ACTIVATIONS, MODULE_ACTIVATIONS, call_arg, is_norm_act, module_of, replace_submodule
from graphpass.meta import META_FROM_PASS, META_MODULE, META_NORM, META_SAVED, set_meta
from graphpass.pass_base import PassKind, PassResult, graph_pass
from graphpass.proxy_norm import NormRecord, ProxyNormAct, ScaledGroupNorm

__all__ = ["replace_batchnorm", "effective_groups"]

log = logging.getLogger(__name__)

PASS_NAME = "replace_batchnorm"



def _timm_activations() -> dict[type, str]:
    """timm's own activation classes (used by its create_act when torch's are not picked)."""
    try:
        from timm.layers import activations as timm_act
    except ImportError:
        return {}
    names = {"Swish": "silu", "Mish": "mish", "HardSwish": "hardswish", "GELU": "gelu"}
    return {getattr(timm_act, n): kind for n, kind in names.items() if hasattr(timm_act, n)}


@dataclass(frozen=True)
class _Activation:
    kind: str
    negative_slope: float = 0.01


def _module_activation(m: nn.Module) -> _Activation | str:
    """The activation a module computes, or a reason string why it cannot be folded."""
    kinds = {**MODULE_ACTIVATIONS, **_timm_activations()}
    kind = kinds.get(type(m))
    if kind is None:
        return f"{type(m).__name__} is not a supported activation"
    if kind == "gelu" and getattr(m, "approximate", "none") != "none":
        return f"GELU(approximate={m.approximate!r}) is not supported (only the exact GELU)"
    return _Activation(kind, float(getattr(m, "negative_slope", 0.01)))


def _node_activation(gm: torch.fx.GraphModule, node: torch.fx.Node, source: torch.fx.Node) -> _Activation | str:
    """The activation ``node`` applies to ``source``, or a reason string."""
    if call_arg(node, 0, "input", None) is not source:
        return f"{node.name} does not take the norm output as its input"
    if node.op == "call_module":
        return _module_activation(module_of(gm, node))
    if node.op == "call_function" and node.target in FUNCTION_ACTIVATIONS:
        kind = FUNCTION_ACTIVATIONS[node.target]
        if kind == "gelu" and call_arg(node, 1, "approximate", "none") != "none":
            return "gelu with approximate='tanh' is not supported (only the exact GELU)"
        slope = call_arg(node, 1, "negative_slope", 0.01) if kind == "leaky_relu" else 0.01
        if not isinstance(slope, (int, float)):
            return f"{node.name}: negative_slope is not a constant"
        return _Activation(kind, float(slope))
    if node.op == "call_method" and node.target in METHOD_ACTIVATIONS:
        return _Activation(METHOD_ACTIVATIONS[str(node.target)])
    return f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)}) is not a supported activation"


def _has_standard_forward(bn: _BatchNorm) -> bool:
    return type(bn).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)


@dataclass(frozen=True)
class _Match:
    node: torch.fx.Node  # the BatchNorm call_module node
    module: _BatchNorm
    activation: _Activation | None  # None: no activation follows, becomes ScaledGroupNorm
    activation_node: torch.fx.Node | None  # separate activation node folded in (None if inside the module)


def _match(gm: torch.fx.GraphModule, node: torch.fx.Node, bn: _BatchNorm) -> _Match | str:
    """Classify one BatchNorm node; a string is the reason it is left alone."""
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        return "lazy BatchNorm without materialized parameters"
    if is_norm_act(bn):
        if not isinstance(bn.drop, nn.Identity):
            return f"{type(bn).__name__} has a {type(bn.drop).__name__} between norm and activation"
        if not isinstance(bn.act, nn.Identity):
            inner = _module_activation(bn.act)
            return inner if isinstance(inner, str) else _Match(node, bn, inner, None)
    elif not _has_standard_forward(bn):
        return f"{type(bn).__name__} overrides forward; its semantics are unknown"
    users = list(node.users)
    if len(users) == 1:
        act = _node_activation(gm, users[0], node)
        if isinstance(act, _Activation):
            return _Match(node, bn, act, users[0])
        log.debug("%s: %s is followed by no foldable activation: %s", PASS_NAME, node.name, act)
    else:
        log.debug("%s: %s has %d users; no activation folded", PASS_NAME, node.name, len(users))
    return _Match(node, bn, None, None)


def _check(match: _Match, convert_frozen: bool) -> str | None:
    bn = match.module
    if not bn.training and bn.track_running_stats and bn.running_mean is not None and not convert_frozen:
        return "eval mode with frozen running statistics (pass convert_frozen=True to convert anyway)"
    return None


def effective_groups(num_channels: int, groups: int, layer: str) -> int:
    """The GroupNorm groups a layer gets: ``groups`` or the divisor of ``num_channels`` nearest to it."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise InputError(f"replace_batchnorm: groups must be a positive integer (1 = LayerNorm), got {groups!r} (layer {layer!r})")
    if groups > num_channels:
        raise InputError(
            f"replace_batchnorm: groups={groups} exceeds the {num_channels} channels of layer {layer!r}; "
            f"use groups <= {num_channels}"
        )
    if num_channels % groups == 0:
        return groups
    divisors = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
    chosen = min(divisors, key=lambda d: (abs(d - groups), d))
    warnings.warn(
        f"replace_batchnorm: layer {layer!r} has {num_channels} channels, not divisible by groups={groups}; "
        f"using {chosen} groups",
        stacklevel=3,
    )
    return chosen


def _new_module(match: _Match, groups: int) -> nn.Module:
    bn = match.module
    ref = next(iter(bn.parameters()), None)
    if ref is None:
        ref = bn.running_mean if bn.running_mean is not None else torch.empty(0)
    factory = {"device": ref.device, "dtype": ref.dtype}
    if match.activation is None:
        new: nn.Module = ScaledGroupNorm(bn.num_features, groups, eps=bn.eps, **factory)
    else:
        new = ProxyNormAct(
            bn.num_features, groups, eps=bn.eps, activation=match.activation.kind,
            negative_slope=match.activation.negative_slope, **factory,
        )
    if bn.affine:
        with torch.no_grad():
            new.weight.copy_(bn.weight)
            if match.activation is not None:
                new.bias.copy_(bn.bias)
    new.train(bn.training)
    return new


def _rewrite(gm: torch.fx.GraphModule, match: _Match, groups: int) -> str:
    """Swap the module behind the BatchNorm node and fold the activation node into it.

    The node itself stays (same target, name and position), so its shape metadata stays valid:
    the activation preserves shape and dtype.
    """
    node = match.node
    replace_submodule(gm, str(node.target), _new_module(match, groups))
    act = match.activation_node
    act_name = act.name if act is not None else ""
    if act is not None:
        act.replace_all_uses_with(node)
        gm.graph.erase_node(act)
    kind = "scaled_gn" if match.activation is None else "gn+pn"
    set_meta(node, META_FROM_PASS, PASS_NAME)
    set_meta(
        node,
        META_NORM,
        NormRecord(
            kind=kind,
            original=type(match.module).__name__,
            activation=match.activation.kind if match.activation else "identity",
            groups=groups,
            num_channels=match.module.num_features,
            activation_node=act_name,
        ),
    )
    return kind


@graph_pass(kind=PassKind.REWRITE, invalidates=(META_SAVED,))
def replace_batchnorm(gm: torch.fx.GraphModule, *, groups: int = 8, convert_frozen: bool = False) -> PassResult:
    """Replace BatchNorm (+ activation) by GroupNorm + PN-Act, or by ScaledGroupNorm; see the module doc.

    Args:
        gm: traced model, rewritten in place.
        groups: GroupNorm groups (1 = LayerNorm); per layer, the nearest divisor of its channels.
        convert_frozen: also convert BatchNorms in eval mode with running statistics.

    Returns:
        PassResult with stats ``bn_to_gn_pn``, ``bn_to_scaled_gn`` and ``bn_frozen_kept`` (zeros left out).
    """
    stats = {"bn_to_gn_pn": 0, "bn_to_scaled_gn": 0, "bn_frozen_kept": 0}
    matches: list[tuple[_Match, int]] = []
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, _BatchNorm):
            continue
        if calls[node.target] > 1:
            # One module with one set of statistics used at several places: no single rewrite fits.
            log.warning("%s: BatchNorm %s left unchanged: called at %d places", PASS_NAME, node.target, calls[node.target])
            continue
        match = _match(gm, node, bn)
        if isinstance(match, str):
            log.warning("%s: BatchNorm %s (%s) left unchanged: %s", PASS_NAME, node.target, type(bn).__name__, match)
            continue
        reason = _check(match, convert_frozen)
        if reason is not None:
            log.debug("%s: BatchNorm %s left unchanged: %s", PASS_NAME, node.target, reason)
            stats["bn_frozen_kept"] += 1
            continue
        matches.append((match, effective_groups(bn.num_features, groups, str(node.target))))
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
            module = node.meta.get(META_MODULE, "")
            log.warning(
                "%s: batch_norm call %s in module %r was traced through, not called as a module; mark that "
                "module's type as a leaf when tracing (leaf_modules=[...]) so it can be replaced",
                PASS_NAME, node.name, module,
            )
    # Validate every layer before touching the graph, so an error leaves the model as it was.
    for match, layer_groups in matches:
        kind = _rewrite(gm, match, layer_groups)
        stats["bn_to_gn_pn" if kind == "gn+pn" else "bn_to_scaled_gn"] += 1
    if stats["bn_frozen_kept"]:
        log.info(
            "%s: kept %d BatchNorm layer(s) in eval mode with frozen statistics; put the model in train mode "
            "or pass convert_frozen=True to convert them",
            PASS_NAME, stats["bn_frozen_kept"],
        )
    modified = bool(matches)
    if modified:
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified, {k: v for k, v in stats.items() if v})
