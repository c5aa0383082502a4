"""Small graph utilities shared by the passes."""

from __future__ import annotations

from collections.abc import Iterator

import torch.fx
from torch import nn

from graphpass.meta import META_FROM_PASS, META_MODULE

__all__ = ["module_of", "replace_submodule", "copy_meta", "call_module_nodes", "users_in_order"]


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
