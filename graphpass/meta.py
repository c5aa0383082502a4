"""Namespaced node metadata: the keys graphpass writes and typed accessors for them.

PyTorch's own keys (``val``, ``tensor_meta``, ``stack_trace``) are read, never written by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from graphpass.errors import MissingAnalysisError

__all__ = [
    "META_TENSOR",
    "META_MODULE",
    "META_SAVED",
    "META_QUANT",
    "META_NORM",
    "META_FROM_PASS",
    "KEY_PRODUCERS",
    "TensorInfo",
    "tensor_info",
    "get_meta",
    "set_meta",
    "clear_meta",
]

META_TENSOR = "graphpass.tensor"  # TensorInfo, or a tuple of TensorInfo|None for tuple outputs
META_MODULE = "graphpass.module"  # qualified name of the module whose forward created the node
META_SAVED = "graphpass.saved"  # tuple of saved-tensor records (graphpass.saved_tensors)
META_QUANT = "graphpass.quant"  # compression format of a quantize-on-save point
META_NORM = "graphpass.norm"  # record of a BatchNorm -> GroupNorm + Proxy Norm rewrite
META_FROM_PASS = "graphpass.from_pass"  # name of the pass that created the node

# Which pass writes each key: named in MissingAnalysisError so the fix is obvious.
KEY_PRODUCERS = {
    META_TENSOR: "graphpass.tracing.propagate_shapes",
    META_MODULE: "graphpass.tracing.trace",
    META_SAVED: "passes.discover_saved_tensors",
}


@dataclass(frozen=True)
class TensorInfo:
    """Shape and size of one tensor value, learned by shape propagation on fake tensors."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorInfo":
        return cls(tuple(t.shape), t.dtype, t.numel() * t.element_size())


def get_meta(node: torch.fx.Node, key: str) -> Any:
    """Return ``node.meta[key]``; raise MissingAnalysisError naming the producing pass if absent."""
    try:
        return node.meta[key]
    except KeyError:
        producer = KEY_PRODUCERS.get(key, "the pass that writes it")
        raise MissingAnalysisError(
            f"node {node.format_node()} has no {key!r} metadata; run {producer} first"
        ) from None


def set_meta(node: torch.fx.Node, key: str, value: Any) -> None:
    if not key.startswith("graphpass."):
        raise ValueError(f"graphpass writes only namespaced keys, got {key!r}")
    node.meta[key] = value


def clear_meta(graph: torch.fx.Graph, keys: tuple[str, ...] | frozenset[str]) -> None:
    for node in graph.nodes:
        for key in keys:
            node.meta.pop(key, None)


def tensor_info(node: torch.fx.Node) -> TensorInfo | None:
    """The TensorInfo of a node with a single tensor output, None for non-tensor outputs."""
    info = get_meta(node, META_TENSOR)
    return info if isinstance(info, TensorInfo) else None
