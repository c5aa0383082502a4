"""Rewrite: a norm-and-activation module (timm's BatchNormAct2d, SyncBatchNormAct) becomes its norm
and its activation as separate graph nodes, so compression sees the layer.

Before / after::

    conv -> bn_act (BatchNormAct2d: norm, drop, act)      conv -> bn_act (BatchNorm2d) -> bn_act.act

timm traces these modules as leaves, so the norm's output (the pre-activation) never appears in the
graph: ``insert_quantize_on_save`` found a norm with no activation after it whose output was the
activation's, and the runtime fell back to compressing each saved tensor on its own. After the
split the layer keeps one copy of its pre-activation, as torchvision's Conv-BN-activation layers do.

Rules:

- Matched: call_module nodes of a BatchNorm subclass that has ``drop`` and ``act`` submodules and
  whose ``forward`` is the standard norm followed by ``drop`` and ``act`` (timm's BatchNormAct2d
  and SyncBatchNormAct; others are left alone with a debug log).
- The module is swapped for a plain ``nn.BatchNorm2d`` (``nn.SyncBatchNorm``) holding the same
  parameter and buffer objects, with ``drop`` and ``act`` as its children: the state-dict keys,
  the running statistics and their updates are unchanged. A ``drop`` that is not Identity becomes
  a node of its own between them; an Identity ``act`` adds no node.

Requires: nothing. The norm node is kept (same name and target); ``graphpass.tensor``/``val``
stay valid, and the new nodes copy them.
Writes: ``graphpass.from_pass`` on every new node.
Invalidates: ``graphpass.saved``.
"""

from __future__ import annotations

import logging

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from graphpass.ir import call_module_nodes, copy_meta, is_norm_act, replace_submodule
from graphpass.meta import META_SAVED, META_TENSOR
from graphpass.pass_base import PassKind, PassResult, graph_pass

__all__ = ["expand_norm_act"]

log = logging.getLogger(__name__)

PASS_NAME = "expand_norm_act"
_STANDARD_NORM_ACT = ("timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct")


def _plain_norm(norm_act: _BatchNorm) -> _BatchNorm:
    """The norm alone, sharing ``norm_act``'s parameters, buffers and children."""
    cls = nn.SyncBatchNorm if isinstance(norm_act, nn.SyncBatchNorm) else nn.BatchNorm2d
    plain = cls(
        norm_act.num_features, eps=norm_act.eps, momentum=norm_act.momentum, affine=norm_act.affine,
        track_running_stats=norm_act.track_running_stats, device="meta",
    )  # fmt: skip
    plain._parameters = dict(norm_act._parameters)
    plain._buffers = dict(norm_act._buffers)
    plain._non_persistent_buffers_set = set(norm_act._non_persistent_buffers_set)
    plain._modules = dict(norm_act._modules)
    if isinstance(plain, nn.SyncBatchNorm):
        plain.process_group = norm_act.process_group
    return plain.train(norm_act.training)


@graph_pass(kind=PassKind.REWRITE, invalidates=(META_SAVED,))
def expand_norm_act(gm: torch.fx.GraphModule) -> PassResult:
    """Split norm-and-activation modules into a norm node and an activation node; see the module doc.

    Returns:
        PassResult with stat ``norm_act_expanded`` (call sites split; left out when zero).
    """
    expanded = 0
    plain: dict[str, _BatchNorm] = {}  # one swapped module per target, however many call sites
    for node, module in list(call_module_nodes(gm, _BatchNorm)):
        target = str(node.target)
        if target not in plain:
            if not is_norm_act(module):
                continue
            name = f"{type(module).__module__}.{type(module).__qualname__}"
            if name not in _STANDARD_NORM_ACT:
                log.debug("%s: %s (%s) left alone: its forward is not known to be norm, drop, act", PASS_NAME, target, name)
                continue
            plain[target] = _plain_norm(module)
        last = node
        users = list(node.users)
        for child in ("drop", "act"):
            if isinstance(getattr(plain[target], child), nn.Identity):
                continue
            with gm.graph.inserting_after(last):
                new = gm.graph.call_module(f"{target}.{child}", (last,))
            new.meta.update({k: v for k, v in node.meta.items() if k in (META_TENSOR, "val")})
            copy_meta(node, new, from_pass=PASS_NAME)
            last = new
        for user in users:
            user.replace_input_with(node, last)
        expanded += 1
    for target, module in plain.items():
        replace_submodule(gm, target, module)
    if expanded:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(expanded), {"norm_act_expanded": expanded} if expanded else {})
