"""Analysis pass: live ranges of every tensor of a training step (see graphpass.liveness).

Requires: gm.meta["graphpass.saved_tensors"] from passes.discover_saved_tensors.
Writes: node.meta["graphpass.live"] (LiveRange of each node's output storage);
gm.meta["graphpass.liveness"] (the Liveness record that plan_memory reads).
"""

from __future__ import annotations

import torch.fx

from graphpass.errors import MissingAnalysisError
from graphpass.liveness import compute_liveness
from graphpass.pass_base import PassKind, PassResult, graph_pass
from passes.discover_saved_tensors import GM_SAVED

__all__ = ["annotate_liveness", "GM_LIVENESS"]

GM_LIVENESS = "graphpass.liveness"


@graph_pass(kind=PassKind.ANALYSIS)
def annotate_liveness(gm: torch.fx.GraphModule) -> PassResult:
    if GM_SAVED not in gm.meta:
        raise MissingAnalysisError(
            f"{type(gm).__name__} has no {GM_SAVED!r} record; run passes.discover_saved_tensors first"
        )
    live = compute_liveness(gm, gm.meta[GM_SAVED])
    gm.meta[GM_LIVENESS] = live
    stats = {"steps": len(live.steps), "forward_steps": live.num_forward_steps, "tensors": len(live.tensors)}
    return PassResult(gm, False, stats, live)
