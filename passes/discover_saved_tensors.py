"""Analysis pass: which tensors each node's backward keeps (see graphpass.saved_tensors).

Requires: nothing but the graph and example inputs (it runs the graph on meta/fake tensors).
Writes: node.meta["graphpass.saved"] on every node; gm.meta["graphpass.saved_tensors"] (the
SavedTensors record that annotate_liveness reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx

from graphpass import saved_tensors
from graphpass.pass_base import PassKind, PassResult, graph_pass

__all__ = ["discover_saved_tensors", "GM_SAVED"]

GM_SAVED = "graphpass.saved_tensors"


@graph_pass(kind=PassKind.ANALYSIS)
def discover_saved_tensors(gm: torch.fx.GraphModule, *, example_inputs: Sequence[Any]) -> PassResult:
    record = saved_tensors.discover_saved_tensors(gm, example_inputs)
    gm.meta[GM_SAVED] = record
    stats = {
        "nodes_saving": sum(1 for r in record.nodes.values() if r.saved),
        "saved_tensors": sum(len(r.saved) for r in record.nodes.values()),
        "saved_bytes": record.saved_bytes(),
    }
    return PassResult(gm, False, stats, record)
