"""Small graph utilities shared by the passes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from graphpass.meta import META_FROM_PASS, META_MODULE

__all__ = [
    "module_of",
    "is_norm_act",
    "replace_submodule",
    "copy_meta",
    "call_module_nodes",
    "users_in_order",
    "call_arg",
    "flatten_tensors",
    "MODULE_ACTIVATIONS",
    "FUNCTION_ACTIVATIONS",
    "METHOD_ACTIVATIONS",
]

# The activations the rewrite passes recognise after a norm, in module, functional and method form
# (in-place variants included), by the name the runtime and ProxyNormAct use for them.
MODULE_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Hardswish: "hardswish",
    nn.Mish: "mish",
}
FUNCTION_ACTIVATIONS: dict[Any, str] = {
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu: "relu",
    F.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
    F.silu: "silu",
    F.gelu: "gelu",
    F.hardswish: "hardswish",
    F.mish: "mish",
}
METHOD_ACTIVATIONS: dict[str, str] = {"relu": "relu", "relu_": "relu"}


def call_arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of a call node, whether passed by position or as keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def module_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def call_module_nodes(gm: torch.fx.GraphModule, types: type | tuple[type, ...]) -> Iterator[tuple[torch.fx.Node, nn.Module]]:
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if m is not None and isinstance(m, types):
            yield node, m


def is_norm_act(module: nn.Module) -> bool:
    """timm's BatchNormAct2d / SyncBatchNormAct and their kind: a norm with ``drop`` and ``act``
    submodules that its forward applies after normalizing."""
    return isinstance(getattr(module, "act", None), nn.Module) and isinstance(getattr(module, "drop", None), nn.Module)


def replace_submodule(gm: torch.fx.GraphModule, target: str, new_module: nn.Module) -> None:
    """Swap the submodule at dotted path ``target`` for ``new_module``."""
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, new_module)


def copy_meta(src: torch.fx.Node, dst: torch.fx.Node, *, from_pass: str) -> None:
    """Give a node created by a rewrite the provenance of the node it replaces."""
    if META_MODULE in src.meta:
        dst.meta[META_MODULE] = src.meta[META_MODULE]
    if "stack_trace" in src.meta:
        dst.meta["stack_trace"] = src.meta["stack_trace"]
    dst.meta[META_FROM_PASS] = from_pass


def users_in_order(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users of ``node`` in graph order (``node.users`` is insertion-ordered, not graph-ordered)."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(node.users, key=order.__getitem__)


def flatten_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Tensors in a value (tuples, lists and dicts flattened), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from flatten_tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from flatten_tensors(v)
