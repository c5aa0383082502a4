"""Liveness of one whole training step: forward in graph order, then backward in reverse.

Steps: one forward step per computing node (graph order), then one backward step per node that
has a backward (its outputs need a gradient or it saved something), in reverse graph order.

Live ranges follow :mod:`graphpass.memory_plan`'s convention: ``start`` is the step that
allocates the tensor (inclusive), ``end`` one past the last step that reads it (exclusive).

- inputs, parameters and buffers: the whole step.
- an activation (one storage; in-place results and views share their source's storage):
  from its producer's forward step to one past its last forward reader; if backward keeps it
  (:mod:`graphpass.saved_tensors`), to one past the backward step of the last node (in backward
  order) that saved it. Graph outputs live to the end (the loss and the caller hold them).
- internal and compressed tensors: from the forward step of the node that made them to one past
  the backward step of the node that saved them.
- what backward rebuilds from a compressed copy (kind "unpacked"): the full-size tensor, during
  the backward step of each node that saved it (autograd unpacks when the node runs). Not for a
  norm whose layer holds a copy: its backward reads the copy directly; a large convolution
  before a norm rebuilds one batch chunk at a time (``runtime.conv_rebuild_bytes``).
- the gradient of a node's output: from the backward step of its first consumer in backward
  order (the first backward step for graph outputs, where the loss's gradient arrives) to one
  past the node's own backward step, which consumes it. Views and tuple items pass their
  gradient through without new memory, so their consumers count for their source.
- a parameter's gradient: from the backward step of the first node (in backward order) that
  uses the parameter to the end of the step (it stays for the optimizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx

from graphpass.memory_plan import PlannedTensor
from graphpass.meta import set_meta
from graphpass.runtime import conv_rebuild_bytes, is_compression_node, layer_input, quantize_layer
from graphpass.saved_tensors import SavedTensors

__all__ = ["META_LIVE", "LiveRange", "Liveness", "compute_liveness"]

META_LIVE = "graphpass.live"  # LiveRange of the storage a node's first output lives in

_STORAGE_KINDS = {
    "input": "input",
    "parameter": "parameter",
    "buffer": "parameter",  # model state outside the arena, like parameters
    "internal": "internal",
    "compressed": "compressed",
}


@dataclass(frozen=True)
class LiveRange:
    start: int  # inclusive
    end: int  # exclusive


@dataclass
class Liveness:
    tensors: list[PlannedTensor]  # offsets unset (None)
    steps: list[str]
    num_forward_steps: int


def _norm_reads_copy(node: torch.fx.Node) -> bool:
    """Whether ``node`` is the norm of a compressed layer (its output goes to quantize_layer): its
    backward reads the layer's copy instead of a rebuilt input."""
    return any(u.target is quantize_layer for u in node.users)


def compute_liveness(gm: torch.fx.GraphModule, saved: SavedTensors) -> Liveness:
    """Live range of every tensor of a training step; writes ``graphpass.live`` on each node."""
    forward = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    records = saved.nodes
    fwd = {n.name: i for i, n in enumerate(forward)}
    backward = [n for n in reversed(forward) if records[n.name].grad_nbytes or records[n.name].saved]
    nf = len(forward)
    bwd = {n.name: nf + i for i, n in enumerate(backward)}
    steps = [f"forward {n.name}" for n in forward] + [f"backward {n.name}" for n in backward]
    num_steps = len(steps)

    # Storage live ranges.
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    for info in saved.storages.values():
        if info.kind in ("input", "parameter", "buffer"):
            start[info.id], end[info.id] = 0, num_steps
        elif info.owner in fwd:
            start[info.id] = fwd[info.owner]
            end[info.id] = fwd[info.owner] + 1
    for n in forward:
        for arg in n.all_input_nodes:
            if arg.name in records:
                for sid in records[arg.name].outputs:
                    if sid in end:
                        end[sid] = max(end[sid], fwd[n.name] + 1)
    for sid in saved.graph_outputs:
        if sid in end:
            end[sid] = num_steps
    kept_for_backward: set[int] = set()
    for n in backward:
        for s in records[n.name].saved:
            if s.storage in end:
                end[s.storage] = max(end[s.storage], bwd[n.name] + 1)
                kept_for_backward.add(s.storage)

    tensors: list[PlannedTensor] = []
    names: dict[str, int] = {}

    def unique(name: str) -> str:
        count = names.get(name, 0)
        names[name] = count + 1
        return name if count == 0 else f"{name}#{count}"

    module_of = {n.name: records[n.name].module for n in forward}
    for info in saved.storages.values():
        if info.id not in start:
            continue  # never reached by a forward step (e.g. an input that feeds only the output)
        if info.kind == "activation":
            kind = "saved" if info.id in kept_for_backward else "activation"
            name = info.owner
        else:
            kind = _STORAGE_KINDS[info.kind]
            name = info.owner if info.kind in ("input", "parameter", "buffer") else f"{info.owner}:{info.kind}"
        node = info.owner if info.kind not in ("parameter", "buffer") else ""
        tensors.append(
            PlannedTensor(unique(name), node, module_of.get(info.owner, ""), kind, info.nbytes,
                          start[info.id], end[info.id], None)
        )

    for n in backward:
        if is_compression_node(n):
            continue  # its record is the copy it made, not a save that its (identity) backward reads
        reads_copy = _norm_reads_copy(n)
        in_chunks = any(u.target is layer_input and u.kwargs.get("conv") and u.args[0] is n for u in n.users)
        for s in records[n.name].saved:
            if s.kind == "compressed" and not (reads_copy and s.fmt.endswith("-layer")):
                nbytes = math.prod(s.shape) * s.dtype.itemsize
                if in_chunks:
                    nbytes = conv_rebuild_bytes(s.shape, s.dtype.itemsize, s.fmt)
                step = bwd[n.name]
                tensors.append(
                    PlannedTensor(unique(f"{n.name}:unpacked"), n.name, module_of[n.name], "unpacked", nbytes, step, step + 1, None)
                )

    # Activation gradients, walking the graph backwards so consumers are resolved first.
    grad_start: dict[str, int] = {}
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    for n in reversed(forward):
        first = min(
            (grad_start[u.name] if records[u.name].grad_is_alias else bwd[u.name]
             for u in n.users if u.name in bwd and (u.name in grad_start or not records[u.name].grad_is_alias)),
            default=None,
        )
        if output_node in n.users:
            first = nf if first is None else min(first, nf)
        if first is None or not records[n.name].grad_nbytes:
            continue
        grad_start[n.name] = first
        if records[n.name].grad_is_alias:
            continue
        tensors.append(
            PlannedTensor(unique(f"grad:{n.name}"), n.name, module_of[n.name], "activation_grad",
                          records[n.name].grad_nbytes, first, bwd[n.name] + 1, None)
        )

    # Parameter gradients.
    first_use: dict[str, int] = {}
    for n in backward:
        for p in records[n.name].parameters:
            first_use.setdefault(p, bwd[n.name])
    for p, step in first_use.items():
        info = saved.storages[saved.parameters[p]]
        if info.requires_grad:
            tensors.append(PlannedTensor(unique(f"grad:{p}"), "", "", "param_grad", info.nbytes, step, num_steps, None))

    for n in forward:
        outs = records[n.name].outputs
        if outs and outs[0] in start:
            set_meta(n, META_LIVE, LiveRange(start[outs[0]], end[outs[0]]))
    return Liveness(tensors, steps, nf)
