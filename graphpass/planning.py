"""``gp.plan`` and ``graphpass plan``: the memory plan of one training step, with its baseline."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from graphpass.api import TransformConfig
from graphpass.files import atomic_output
from graphpass.liveness import compute_liveness
from graphpass.memory_plan import MemoryPlan, build_plan, verify_plan
from graphpass.saved_tensors import discover_saved_tensors, meta_copy
from graphpass.tracing import example_inputs as make_inputs
from graphpass.tracing import load_model, trace

__all__ = ["plan", "plan_graph", "plan_command"]

log = logging.getLogger(__name__)


def plan_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    model: str = "",
    bits: int | None = None,
    norm: str = "keep",
) -> MemoryPlan:
    """Discover saved tensors, compute liveness and assign offsets for a traced GraphModule."""
    t0 = time.perf_counter()
    saved = discover_saved_tensors(gm, example_inputs)
    t1 = time.perf_counter()
    live = compute_liveness(gm, saved)
    t2 = time.perf_counter()
    result = build_plan(model or type(gm).__name__, live.tensors, live.steps, live.num_forward_steps, bits=bits, norm=norm)
    t3 = time.perf_counter()
    result.stats.update(
        discover_seconds=round(t1 - t0, 3), liveness_seconds=round(t2 - t1, 3), assign_seconds=round(t3 - t2, 3)
    )
    log.info(
        "%s: arena %.1f MiB vs lower bound %.1f MiB (%s), predicted peak %.1f MiB",
        result.model, result.planned_bytes / 2**20, result.lower_bound_bytes / 2**20,
        result.algorithm, result.predicted_peak_bytes / 2**20,
    )
    return result


def plan(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    bits: int | None = None,
    norm: str = "keep",
    groups: int = 8,
    leaf_modules: Sequence[type] = (),
    description: str | None = None,
) -> MemoryPlan:
    """Memory plan of one training step of ``model`` (transformed when ``bits``/``norm`` ask for it).

    ``plan.baseline`` holds the plan of the untransformed model. Example inputs may be meta
    tensors: discovery runs on fake tensors, so nothing of the activations' size is allocated.
    ``model`` is not modified.
    """
    config = TransformConfig(bits=bits, norm=norm, groups=groups)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    name = description or type(model).__name__
    t0 = time.perf_counter()
    # A meta copy (no parameter data copied), traced without shape propagation: discovery runs
    # the graph on meta tensors anyway, so planning a large model at a large batch is fast.
    baseline = plan_graph(trace(meta_copy(model), leaf_modules=leaf_modules), inputs, model=name)
    baseline.stats["plan_seconds"] = round(time.perf_counter() - t0, 3)
    if config.bits is None and config.norm == "keep":
        return replace(baseline, baseline=replace(baseline))
    from graphpass.api import transform

    t0 = time.perf_counter()
    gm = transform(model, inputs, bits=config.bits, norm=config.norm, groups=config.groups, leaf_modules=leaf_modules)
    result = plan_graph(gm, inputs, model=name, bits=config.bits, norm=config.norm)
    result.stats["plan_seconds"] = round(time.perf_counter() - t0, 3)
    result.baseline = baseline
    return result


def _progress(message: str) -> None:
    print(f"graphpass plan: {message}", file=sys.stderr, flush=True)


def plan_command(args: argparse.Namespace) -> int:
    """``graphpass plan``: text table to stdout, optional JSON and chart files, optional measurement."""
    charts = [(p, s) for p, s in ((args.html, ".html"), (args.png, ".png"), (args.svg, ".svg")) if p]
    with contextlib.ExitStack() as stack:
        # Enter every output first: a bad path fails before any work and no partial file remains.
        json_tmp = stack.enter_context(atomic_output(args.json, suffixes=(".json",))) if args.json else None
        chart_tmps = [stack.enter_context(atomic_output(p, suffixes=(s,))) for p, s in charts]
        description = f"{args.model} batch {args.batch} {args.image}px"
        _progress(f"loading {args.model}")
        model = _load(args.model, meta=not args.measure and args.bits is None and args.norm == "keep")
        inputs = make_inputs(args.batch, args.image, device="meta")
        _progress(f"planning {description} (bits={args.bits}, norm={args.norm})")
        result = plan(model, inputs, bits=args.bits, norm=args.norm, groups=args.groups, description=description)
        verify_plan(result)
        if result.baseline is not None:
            verify_plan(result.baseline)
        _progress(f"plan verified in {result.stats.get('plan_seconds', 0):.2f} s")
        if args.measure:
            result.measured_peak_bytes = _measure(model, args, result)
        print(result.summary())
        if json_tmp is not None:
            json_tmp.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        if chart_tmps:
            from graphpass.visualize import draw

            for tmp in chart_tmps:
                draw(result, tmp)
    for path in [args.json, *(p for p, _ in charts)]:
        if path:
            _progress(f"wrote {Path(path)}")
    return 0


def _load(spec: str, *, meta: bool) -> nn.Module:
    """Build the model; on the meta device (no weight initialisation) when nothing needs real weights."""
    if meta:
        try:
            with torch.device("meta"):
                return load_model(spec)
        except Exception as e:  # an initialiser that reads tensor data; the real build reports real errors
            log.info("building %s on the meta device failed (%s); building it on the CPU", spec, e)
    return load_model(spec)


def _measure(model: nn.Module, args: argparse.Namespace, result: MemoryPlan) -> int:
    from graphpass.measure import measure_training_step

    _progress(f"measuring one training step on {args.device}")
    inputs = make_inputs(args.batch, args.image, device=args.device)
    if result.bits is None and result.norm == "keep":
        target: nn.Module = model
    else:
        from graphpass.api import transform

        target = transform(model, inputs, bits=result.bits, norm=result.norm, groups=args.groups)
    return measure_training_step(target, inputs, device=args.device)
