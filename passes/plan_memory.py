"""Analysis pass: offsets in one shared arena, lower bound and shared buffers (graphpass.memory_plan).

Requires: gm.meta["graphpass.liveness"] from passes.annotate_liveness.
Writes: gm.meta["graphpass.plan"] (the verified MemoryPlan, also returned as the analysis).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx

from graphpass.errors import MissingAnalysisError
from graphpass.memory_plan import build_plan, verify_plan
from graphpass.pass_base import PassKind, PassResult, graph_pass
from passes.annotate_liveness import GM_LIVENESS

__all__ = ["plan_memory", "GM_PLAN"]

GM_PLAN = "graphpass.plan"


@graph_pass(kind=PassKind.ANALYSIS)
def plan_memory(
    gm: torch.fx.GraphModule,
    *,
    model: str = "",
    bits: int | None = None,
    norm: str = "keep",
    algorithms: Sequence[str] | None = None,
) -> PassResult:
    if GM_LIVENESS not in gm.meta:
        raise MissingAnalysisError(f"{type(gm).__name__} has no {GM_LIVENESS!r} record; run passes.annotate_liveness first")
    live = gm.meta[GM_LIVENESS]
    plan = build_plan(
        model or type(gm).__name__, live.tensors, live.steps, live.num_forward_steps,
        bits=bits, norm=norm, algorithms=algorithms,
    )
    verify_plan(plan)
    gm.meta[GM_PLAN] = plan
    stats = {"lower_bound_bytes": plan.lower_bound_bytes, "planned_bytes": plan.planned_bytes, "buffers": len(plan.buffers)}
    return PassResult(gm, False, stats, plan)
