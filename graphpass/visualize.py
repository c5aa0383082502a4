"""Pictures of a MemoryPlan: where the bytes of one training step go, against the lower bound.

``draw(plan, path)`` writes, by suffix, a PNG or SVG (matplotlib, Agg backend) or one
self-contained HTML file (inline script and style, no network) with four parts:

1. memory over the training step, forward then backward, for the plan and its baseline, with the
   arena lower bound, the planned arena and the predicted peak;
2. the buffer chart: every arena tensor a rectangle at its byte offset over its live range
   ``[start, end)``, coloured by kind; bytes reused by several tensors over time are the shared
   buffers (the HTML highlights every tensor sharing bytes with the one under the pointer, and
   the PNG/SVG shows the interference-graph colouring's buffers beside the arena);
3. the largest tensors live at the peak, with the module that made them;
4. a one-line summary of peak, bound, arena, saved bytes and savings.

The data behind each picture comes from plain functions (``memory_series``, ``buffer_rectangles``,
``largest_at_peak``, ``summary_line``, ``chart_data``) that the tests check directly.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphpass.errors import InputError
from graphpass.files import atomic_output
from graphpass.memory_plan import ARENA_KINDS, MemoryPlan, PlannedTensor, live_bytes

__all__ = [
    "KIND_COLOURS",
    "Rect",
    "aligned_steps",
    "memory_series",
    "buffer_rectangles",
    "largest_at_peak",
    "peak_step",
    "summary_line",
    "chart_data",
    "draw",
    "figure",
]

SUFFIXES = (".png", ".svg", ".html")
MIB = 1 << 20

KIND_COLOURS = {
    "activation": "#4e79a7",  # full-precision activation
    "saved": "#f28e2b",  # full-precision copy kept for backward
    "compressed": "#59a14f",  # compressed copy kept for backward
    "unpacked": "#8cd17d",  # full-size tensor rebuilt from a compressed copy while its backward runs
    "internal": "#b07aa1",
    "activation_grad": "#e15759",
    "param_grad": "#9c755f",
    "parameter": "#bab0ac",
    "input": "#76b7b2",
}


@dataclass(frozen=True)
class Rect:
    """One arena tensor in the buffer chart: bytes [offset, offset + nbytes) over steps [start, end)."""

    name: str
    node: str
    module: str
    kind: str
    start: int
    end: int
    offset: int
    nbytes: int


def _plan_series(plan: MemoryPlan) -> dict[str, Any]:
    arena = [t for t in plan.tensors if t.kind in ARENA_KINDS]
    return {
        "model": plan.model,
        "total": [int(v) for v in plan.memory_profile()],
        "arena": [int(v) for v in live_bytes(arena, len(plan.steps))],
        "num_forward_steps": plan.num_forward_steps,
        "lower_bound_bytes": plan.lower_bound_bytes,
        "planned_bytes": plan.planned_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "measured_peak_bytes": plan.measured_peak_bytes,
    }


def aligned_steps(num_steps: int, num_forward: int, onto_steps: int, onto_forward: int) -> list[float]:
    """x positions that stretch a step axis piecewise onto another so both forward/backward
    boundaries coincide: the baseline usually has fewer steps than the transformed graph."""
    def stretch(i: int, n: int, onto: int, shift: int, offset: float) -> float:
        return offset + (i - shift + 0.5) * onto / n - 0.5 if n else offset

    backward = num_steps - num_forward
    return [
        stretch(i, num_forward, onto_forward, 0, 0.0)
        if i < num_forward
        else stretch(i, backward, onto_steps - onto_forward, num_forward, float(onto_forward))
        for i in range(num_steps)
    ]


def memory_series(plan: MemoryPlan) -> dict[str, Any]:
    """Per-step total and arena live bytes of the plan (and of ``plan.baseline`` if present).

    The baseline's ``x`` places its steps on the plan's step axis (forward onto forward,
    backward onto backward), so the two curves can be drawn on one axis.
    """
    base = None
    if plan.baseline is not None:
        base = _plan_series(plan.baseline)
        base["x"] = aligned_steps(
            len(plan.baseline.steps), plan.baseline.num_forward_steps, len(plan.steps), plan.num_forward_steps
        )
    return {"plan": _plan_series(plan), "baseline": base}


def buffer_rectangles(plan: MemoryPlan) -> list[Rect]:
    """One rectangle per planned tensor that has an arena offset, in plan order."""
    return [
        Rect(t.name, t.node, t.module, t.kind, t.start, t.end, t.offset, t.nbytes)
        for t in plan.tensors
        if t.offset is not None
    ]


def peak_step(plan: MemoryPlan) -> int:
    """The step at which the total live bytes are largest (the first one on ties)."""
    profile = plan.memory_profile()
    return int(np.argmax(profile)) if profile else 0


def largest_at_peak(plan: MemoryPlan, n: int = 12) -> list[PlannedTensor]:
    """The ``n`` largest tensors live at the peak step, largest first."""
    step = peak_step(plan)
    live = [t for t in plan.tensors if t.start <= step < t.end]
    return sorted(live, key=lambda t: (-t.nbytes, t.name))[:n]


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.1f} MiB"


def summary_line(plan: MemoryPlan) -> str:
    """Peak, lower bound, arena, saved bytes and the savings against the baseline, on one line."""
    ratio = plan.planned_bytes / plan.lower_bound_bytes if plan.lower_bound_bytes else 1.0
    parts = [
        f"{plan.model} (bits={plan.bits or 'none'}, norm={plan.norm}):",
        f"peak {_mib(plan.predicted_peak_bytes)}",
        f"lower bound {_mib(plan.lower_bound_bytes)}",
        f"arena {_mib(plan.planned_bytes)} ({ratio:.3f}x bound)",
        f"saved for backward {_mib(plan.saved_bytes)}",
    ]
    if plan.measured_peak_bytes is not None:
        parts.append(f"measured peak {_mib(plan.measured_peak_bytes)}")
    base = plan.baseline
    if base is not None and base.predicted_peak_bytes:
        saved = base.predicted_peak_bytes - plan.predicted_peak_bytes
        factor = base.predicted_peak_bytes / plan.predicted_peak_bytes if plan.predicted_peak_bytes else float("inf")
        parts.append(
            f"savings {_mib(saved)} vs baseline peak {_mib(base.predicted_peak_bytes)} ({factor:.2f}x less)"
        )
    else:
        parts.append("savings n/a (no baseline)")
    return parts[0] + " " + ", ".join(parts[1:])


def chart_data(plan: MemoryPlan, *, top: int = 12) -> dict[str, Any]:
    """Everything the HTML page draws, as plain JSON."""
    rects = buffer_rectangles(plan)
    return {
        "summary": summary_line(plan),
        "series": memory_series(plan),
        "steps": list(plan.steps),
        "baseline_steps": list(plan.baseline.steps) if plan.baseline is not None else None,
        # columns instead of objects: a third of the size for plans with thousands of tensors
        "rects": {
            "name": [r.name for r in rects],
            "node": [r.node for r in rects],
            "module": [r.module for r in rects],
            "kind": [r.kind for r in rects],
            "start": [r.start for r in rects],
            "end": [r.end for r in rects],
            "offset": [r.offset for r in rects],
            "nbytes": [r.nbytes for r in rects],
        },
        "buffers": list(plan.buffers),
        "peak_step": peak_step(plan),
        "largest": [asdict(t) for t in largest_at_peak(plan, top)],
        "colours": KIND_COLOURS,
    }


# ---------------------------------------------------------------------------------------------
# matplotlib (PNG, SVG)
# ---------------------------------------------------------------------------------------------


def figure(plan: MemoryPlan, *, top: int = 12) -> Any:
    """The matplotlib Figure of the plan (Agg backend; nothing is shown)."""
    # A bare Figure renders through Agg (PNG) or the SVG backend without touching pyplot's global
    # backend, so drawing never opens a window or changes the caller's matplotlib state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 13), dpi=100, layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=(1.0, 1.6, 0.9), width_ratios=(30, 1))
    _draw_memory(fig.add_subplot(grid[0, :]), plan)
    ax_rects = fig.add_subplot(grid[1, 0])
    _draw_rectangles(ax_rects, plan)
    _draw_buffers(fig.add_subplot(grid[1, 1], sharey=ax_rects), plan)
    _draw_largest(fig.add_subplot(grid[2, :]), plan, top)
    fig.suptitle(_wrap(summary_line(plan), 150), fontsize=10)
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _draw_memory(ax: Any, plan: MemoryPlan) -> None:
    series = memory_series(plan)
    mine, base = series["plan"], series["baseline"]
    if base is not None:
        label = f"baseline: total live ({len(base['total'])} steps, stretched onto this axis)"
        ax.plot(base["x"], np.array(base["total"]) / MIB, color="#999999", lw=1.2, label=label)
        ax.axhline(base["predicted_peak_bytes"] / MIB, color="#999999", ls=":", lw=1, label="baseline peak")
    x = np.arange(len(mine["total"]))
    ax.plot(x, np.array(mine["total"]) / MIB, color="#1f3b73", lw=1.6, label="total live (params included)")
    ax.fill_between(x, np.array(mine["arena"]) / MIB, color=KIND_COLOURS["activation"], alpha=0.25, label="arena tensors live")
    ax.axhline(plan.predicted_peak_bytes / MIB, color="#1f3b73", ls=":", lw=1, label="predicted peak")
    ax.axhline(plan.lower_bound_bytes / MIB, color="#2ca02c", ls="--", lw=1, label="arena lower bound")
    ax.axhline(plan.planned_bytes / MIB, color="#d62728", ls="-.", lw=1, label="planned arena")
    if plan.measured_peak_bytes is not None:
        ax.axhline(plan.measured_peak_bytes / MIB, color="black", lw=1, label="measured peak")
    ax.axvspan(plan.num_forward_steps - 0.5, max(len(x) - 0.5, plan.num_forward_steps), color="#f3f3f3", zorder=0)
    ax.axvline(plan.num_forward_steps - 0.5, color="black", ls="--", lw=0.8)
    on_x = ax.get_xaxis_transform()  # x in steps, y in axes fraction
    ax.text(plan.num_forward_steps / 2, 0.03, "forward", ha="center", transform=on_x, fontsize=9)
    ax.text((plan.num_forward_steps + len(x)) / 2, 0.03, "backward", ha="center", transform=on_x, fontsize=9)
    ax.set_xlim(-0.5, max(len(x), 1) - 0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("MiB")
    ax.set_title("(1) memory over one training step", loc="left", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=2)


def _draw_rectangles(ax: Any, plan: MemoryPlan) -> None:
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    rects = buffer_rectangles(plan)
    kinds = [k for k in KIND_COLOURS if any(r.kind == k for r in rects)]
    for kind in kinds:
        # one PolyCollection per kind: thousands of bar() patches take seconds to lay out
        verts = [
            [(r.start, r.offset / MIB), (r.end, r.offset / MIB), (r.end, (r.offset + r.nbytes) / MIB), (r.start, (r.offset + r.nbytes) / MIB)]
            for r in rects
            if r.kind == kind
        ]
        ax.add_collection(PolyCollection(verts, facecolors=KIND_COLOURS[kind], edgecolors="white", linewidths=0.2))
    ax.axhline(plan.planned_bytes / MIB, color="#d62728", ls="-.", lw=1)
    ax.axhline(plan.lower_bound_bytes / MIB, color="#2ca02c", ls="--", lw=1)
    ax.axvline(plan.num_forward_steps, color="black", ls="--", lw=0.8)
    ax.set_xlim(0, max(len(plan.steps), 1))
    ax.set_ylim(0, max(plan.planned_bytes, 1) * 1.03 / MIB)
    ax.set_xlabel("step (forward | backward)")
    ax.set_ylabel("arena offset (MiB)")
    ax.set_title(
        f"(2) buffer chart: {len(rects)} arena tensors at their offsets over their live ranges "
        f"({plan.algorithm}); red = arena, green = lower bound",
        loc="left",
        fontsize=10,
    )
    ax.legend(handles=[Patch(color=KIND_COLOURS[k], label=k) for k in kinds], fontsize=8, loc="upper right")


def _draw_buffers(ax: Any, plan: MemoryPlan) -> None:
    """The interference-graph colouring's shared buffers, stacked, beside the arena."""
    sizes = np.asarray(plan.buffers, dtype=np.float64) / MIB
    bottoms = np.concatenate(([0.0], np.cumsum(sizes)[:-1]))
    from matplotlib.collections import PolyCollection

    verts = [[(0, b), (1, b), (1, b + h), (0, b + h)] for b, h in zip(bottoms, sizes)]
    colours = ["#cccccc" if i % 2 else "#888888" for i in range(len(sizes))]
    ax.add_collection(PolyCollection(verts, facecolors=colours, edgecolors="white", linewidths=0.2))
    ax.set_xlim(0, 1)
    ax.set_xticks([0.5])
    ax.set_xticklabels([f"{len(plan.buffers)}\nbuffers"], fontsize=7)
    ax.tick_params(axis="y", labelleft=False)
    ax.set_title("shared", fontsize=8)


def _draw_largest(ax: Any, plan: MemoryPlan, top: int) -> None:
    largest = largest_at_peak(plan, top)[::-1]
    labels = [f"{t.name} [{t.kind}] {t.module or '-'}" for t in largest]
    ax.barh(range(len(largest)), [t.nbytes / MIB for t in largest], color=[KIND_COLOURS[t.kind] for t in largest])
    ax.set_yticks(range(len(largest)))
    ax.set_yticklabels([label if len(label) <= 90 else label[:87] + "..." for label in labels], fontsize=7)
    ax.set_xlabel("MiB")
    step = peak_step(plan)
    label = plan.steps[step] if plan.steps else ""
    ax.set_title(f"(3) largest tensors live at the peak (step {step}: {label})", loc="left", fontsize=10)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>graphpass memory plan: __TITLE__</title>
<style>
body{font:13px system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:15px;margin:0 0 4px} .sum{background:#f4f6fa;border:1px solid #dde;padding:6px 8px;margin:6px 0 12px}
.panel{position:relative;margin-bottom:16px} canvas{border:1px solid #ccc;display:block;width:100%}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #888;padding:4px 6px;font-size:12px;
 display:none;max-width:480px;white-space:pre-line;box-shadow:0 2px 6px #0003;z-index:9}
#detail{font-family:monospace;font-size:12px;white-space:pre-wrap;background:#fafafa;border:1px solid #ddd;padding:6px;min-height:3em}
.legend span{display:inline-block;margin-right:12px;cursor:pointer;user-select:none} .legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-2px}
.legend .off{opacity:.3} table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:2px 6px;text-align:left} td.n{text-align:right}
.hint{color:#666;font-size:12px}
</style></head><body>
<h1>graphpass memory plan</h1>
<div class="sum" id="summary"></div>
<div class="panel"><b>(1) memory over one training step</b> <span class="hint">forward, then backward (shaded); hover for values</span>
<div class="legend" id="memlegend"></div>
<canvas id="mem" height="260"></canvas></div>
<div class="panel"><b>(2) buffer chart</b> <span class="hint">each arena tensor at its offset over its live range; hover for details,
click to pin and highlight every tensor sharing its bytes, drag to zoom into steps, double-click to reset; click a kind to hide it</span>
<div class="legend" id="legend"></div>
<canvas id="buf" height="460"></canvas>
<div id="detail">click a tensor</div></div>
<div class="panel"><b>(3) largest tensors live at the peak</b> <span id="peak" class="hint"></span>
<table id="largest"><thead><tr><th>tensor</th><th>kind</th><th>module</th><th>node</th><th>MiB</th><th>steps</th></tr></thead><tbody></tbody></table></div>
<div id="tip"></div>
<script id="plan-data" type="application/json">__DATA__</script>
<script>
"use strict";
window.addEventListener("error", function (e) {
  document.documentElement.setAttribute("data-errors", (document.documentElement.getAttribute("data-errors") || "") + e.message + ";");
});
(function () {
const D = JSON.parse(document.getElementById("plan-data").textContent);
const R = D.rects, N = R.name.length, MIB = 1048576, S = D.series.plan, B = D.series.baseline;
const mib = v => (v / MIB).toLocaleString(undefined, {maximumFractionDigits: 2}) + " MiB";
const hidden = new Set(); let pinned = -1, view = [0, Math.max(D.steps.length, 1)];
document.getElementById("summary").textContent = D.summary;
const tip = document.getElementById("tip");
function showTip(ev, text) { tip.textContent = text; tip.style.display = "block";
  tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 10) + "px"; }
function hideTip() { tip.style.display = "none"; }
function setup(c) { const r = window.devicePixelRatio || 1, w = c.clientWidth || 1000, h = c.height;
  if (!c.dataset.h) c.dataset.h = h; const hh = +c.dataset.h;
  c.width = w * r; c.height = hh * r; c.style.height = hh + "px"; const g = c.getContext("2d"); g.setTransform(r, 0, 0, r, 0, 0);
  return {g: g, w: w, h: hh}; }
const PAD = {l: 70, r: 12, t: 20, b: 28};
function axes(g, w, h, x0, x1, ymax, ylab) {
  g.strokeStyle = "#999"; g.fillStyle = "#444"; g.font = "11px sans-serif"; g.lineWidth = 1;
  g.beginPath(); g.moveTo(PAD.l, PAD.t); g.lineTo(PAD.l, h - PAD.b); g.lineTo(w - PAD.r, h - PAD.b); g.stroke();
  for (let i = 0; i <= 4; i++) { const v = ymax * i / 4, y = h - PAD.b - (h - PAD.t - PAD.b) * i / 4;
    g.fillText((v / MIB).toFixed(v / MIB < 10 ? 2 : 0), 4, y + 4); }
  for (let i = 0; i <= 8; i++) { const s = x0 + (x1 - x0) * i / 8, x = PAD.l + (w - PAD.l - PAD.r) * i / 8;
    g.fillText(String(Math.round(s)), x - 8, h - 8); }
  g.fillText(ylab, 4, 11); }

// (1) memory profile
const mem = document.getElementById("mem");
function drawMem() {
  const {g, w, h} = setup(mem); g.clearRect(0, 0, w, h);
  const n = Math.max(S.total.length, 1);
  let ymax = Math.max(S.predicted_peak_bytes, S.planned_bytes, B ? B.predicted_peak_bytes : 0, S.measured_peak_bytes || 0, 1) * 1.08;
  const X = s => PAD.l + (w - PAD.l - PAD.r) * (s + 0.5) / n, Y = v => h - PAD.b - (h - PAD.t - PAD.b) * v / ymax;
  g.fillStyle = "#f1f1f1"; g.fillRect(X(S.num_forward_steps - 0.5), PAD.t, X(S.total.length - 0.5) - X(S.num_forward_steps - 0.5), h - PAD.t - PAD.b);
  axes(g, w, h, 0, n, ymax, "MiB");
  function line(vals, colour, width, xs) { g.strokeStyle = colour; g.lineWidth = width; g.beginPath();
    vals.forEach((v, i) => { const x = X(xs ? xs[i] : i); i ? g.lineTo(x, Y(v)) : g.moveTo(x, Y(v)); }); g.stroke(); }
  const keys = [];
  function hline(v, colour, dash, label) { g.setLineDash(dash); g.strokeStyle = colour; g.lineWidth = 1;
    g.beginPath(); g.moveTo(PAD.l, Y(v)); g.lineTo(w - PAD.r, Y(v)); g.stroke(); g.setLineDash([]);
    keys.push([colour, label + " " + mib(v)]); }
  if (B) keys.push(["#aaa", "baseline total live (" + B.model + ", " + B.total.length + " steps stretched onto this axis)"]);
  keys.push(["#1f3b73", "total live, parameters included"], ["rgba(78,121,167,.5)", "arena tensors live"]);
  if (B) { line(B.total, "#aaa", 1.2, B.x); hline(B.predicted_peak_bytes, "#888", [2, 3], "baseline peak"); }
  g.fillStyle = "rgba(78,121,167,.25)"; g.beginPath(); g.moveTo(X(0), Y(0));
  S.arena.forEach((v, i) => g.lineTo(X(i), Y(v))); g.lineTo(X(S.arena.length - 1), Y(0)); g.fill();
  line(S.total, "#1f3b73", 1.6);
  hline(S.predicted_peak_bytes, "#1f3b73", [2, 3], "predicted peak");
  hline(S.lower_bound_bytes, "#2ca02c", [6, 3], "arena lower bound");
  hline(S.planned_bytes, "#d62728", [8, 3, 2, 3], "planned arena");
  if (S.measured_peak_bytes) hline(S.measured_peak_bytes, "#000", [], "measured peak");
  const lg = document.getElementById("memlegend"); lg.textContent = "";
  keys.forEach(([c, t]) => { const s = document.createElement("span"); s.innerHTML = "<i></i>"; s.firstChild.style.background = c;
    s.appendChild(document.createTextNode(t)); lg.appendChild(s); });
  g.fillStyle = "#333"; g.fillText("forward", X(S.num_forward_steps / 2), PAD.t + 12);
  g.fillText("backward", X((S.num_forward_steps + S.total.length) / 2), PAD.t + 12);
  mem.onmousemove = ev => { const r = mem.getBoundingClientRect(), x = ev.clientX - r.left;
    const s = Math.round((x - PAD.l) / (w - PAD.l - PAD.r) * n - 0.5);
    if (s < 0 || s >= S.total.length) { hideTip(); return; }
    let t = "step " + s + (s < S.num_forward_steps ? " (forward): " : " (backward): ") + D.steps[s] +
      "\\ntotal live " + mib(S.total[s]) + ", arena tensors " + mib(S.arena[s]);
    if (B) { let k = 0; while (k + 1 < B.x.length && B.x[k + 1] <= s) k++;
      t += "\\nbaseline step " + k + " (" + D.baseline_steps[k] + "): " + mib(B.total[k]); }
    showTip(ev, t); };
  mem.onmouseleave = hideTip;
}

// (2) buffer chart
const buf = document.getElementById("buf"), legend = document.getElementById("legend");
const kinds = Object.keys(D.colours).filter(k => R.kind.indexOf(k) >= 0);
kinds.forEach(k => { const s = document.createElement("span"); s.innerHTML = "<i></i>"; s.firstChild.style.background = D.colours[k];
  s.appendChild(document.createTextNode(k));
  s.onclick = () => { hidden.has(k) ? hidden.delete(k) : hidden.add(k); s.classList.toggle("off"); drawBuf(); }; legend.appendChild(s); });
function shares(i, j) { return R.offset[i] < R.offset[j] + R.nbytes[j] && R.offset[j] < R.offset[i] + R.nbytes[i]; }
let geom = null, drag = null;
const YMAX = Math.max(S.planned_bytes, 1) * 1.03;
function drawBuf() {
  const {g, w, h} = setup(buf); g.clearRect(0, 0, w, h);
  const ymax = YMAX;
  const [x0, x1] = view, X = s => PAD.l + (w - PAD.l - PAD.r) * (s - x0) / (x1 - x0), Y = v => h - PAD.b - (h - PAD.t - PAD.b) * v / ymax;
  geom = {X: X, Y: Y, w: w, h: h, x0: x0, x1: x1};
  g.fillStyle = "#f6f6f6"; const fb = Math.max(X(S.num_forward_steps), PAD.l);
  if (fb < w - PAD.r) g.fillRect(fb, PAD.t, w - PAD.r - fb, h - PAD.t - PAD.b);
  axes(g, w, h, x0, x1, ymax, "offset MiB");
  g.save(); g.beginPath(); g.rect(PAD.l, PAD.t, w - PAD.l - PAD.r, h - PAD.t - PAD.b); g.clip();
  for (let i = 0; i < N; i++) {
    if (hidden.has(R.kind[i]) || R.end[i] <= x0 || R.start[i] >= x1) continue;
    const dim = pinned >= 0 && i !== pinned && !shares(i, pinned);
    g.globalAlpha = dim ? 0.15 : 1; g.fillStyle = D.colours[R.kind[i]] || "#777";
    const xa = X(R.start[i]), xb = X(R.end[i]), ya = Y(R.offset[i] + R.nbytes[i]), yb = Y(R.offset[i]);
    g.fillRect(xa, ya, Math.max(xb - xa, 0.5), Math.max(yb - ya, 0.5));
    if (xb - xa > 3 && yb - ya > 3) { g.strokeStyle = "rgba(255,255,255,.7)"; g.lineWidth = 0.5; g.strokeRect(xa, ya, xb - xa, yb - ya); }
  }
  g.globalAlpha = 1;
  if (pinned >= 0) { g.strokeStyle = "#000"; g.lineWidth = 2;
    g.strokeRect(X(R.start[pinned]), Y(R.offset[pinned] + R.nbytes[pinned]), X(R.end[pinned]) - X(R.start[pinned]), Y(R.offset[pinned]) - Y(R.offset[pinned] + R.nbytes[pinned])); }
  g.setLineDash([8, 3, 2, 3]); g.strokeStyle = "#d62728"; g.beginPath(); g.moveTo(PAD.l, Y(S.planned_bytes)); g.lineTo(w - PAD.r, Y(S.planned_bytes)); g.stroke();
  g.setLineDash([6, 3]); g.strokeStyle = "#2ca02c"; g.beginPath(); g.moveTo(PAD.l, Y(S.lower_bound_bytes)); g.lineTo(w - PAD.r, Y(S.lower_bound_bytes)); g.stroke();
  g.setLineDash([]);
  if (drag && drag.x1 !== undefined) { g.fillStyle = "rgba(0,0,0,.1)"; g.fillRect(Math.min(drag.x0, drag.x1), PAD.t, Math.abs(drag.x1 - drag.x0), h - PAD.t - PAD.b); }
  g.restore();
}
function hit(ev) { const r = buf.getBoundingClientRect(), x = ev.clientX - r.left, y = ev.clientY - r.top, G = geom;
  const s = G.x0 + (x - PAD.l) / (G.w - PAD.l - PAD.r) * (G.x1 - G.x0);
  const ymax = YMAX, v = (G.h - PAD.b - y) / (G.h - PAD.t - PAD.b) * ymax;
  let best = -1;
  for (let i = 0; i < N; i++) if (!hidden.has(R.kind[i]) && R.start[i] <= s && s < R.end[i] && R.offset[i] <= v && v < R.offset[i] + R.nbytes[i]) { best = i; break; }
  return {i: best, x: x}; }
function describe(i) { let n = 0; for (let j = 0; j < N; j++) if (j !== i && shares(i, j)) n++;
  return R.name[i] + "  [" + R.kind[i] + "]  " + mib(R.nbytes[i]) + "\\nmodule " + (R.module[i] || "-") + ", node " + (R.node[i] || "-") +
    "\\nsteps [" + R.start[i] + ", " + R.end[i] + "): " + D.steps[R.start[i]] + " .. " + D.steps[R.end[i] - 1] +
    "\\nbytes [" + R.offset[i] + ", " + (R.offset[i] + R.nbytes[i]) + ") shared over time with " + n + " other tensor(s)"; }
buf.onmousedown = ev => { drag = {x0: ev.clientX - buf.getBoundingClientRect().left}; };
buf.onmousemove = ev => { if (drag) { drag.x1 = ev.clientX - buf.getBoundingClientRect().left; if (Math.abs(drag.x1 - drag.x0) > 4) { hideTip(); drawBuf(); return; } }
  const h = hit(ev); if (h.i < 0) hideTip(); else showTip(ev, describe(h.i)); };
buf.onmouseup = ev => { const d = drag; drag = null;
  if (d && d.x1 !== undefined && Math.abs(d.x1 - d.x0) > 4) { const G = geom, f = x => G.x0 + (x - PAD.l) / (G.w - PAD.l - PAD.r) * (G.x1 - G.x0);
    const a = Math.max(0, f(Math.min(d.x0, d.x1))), b = Math.min(D.steps.length, f(Math.max(d.x0, d.x1))); if (b - a >= 1) view = [a, b]; drawBuf(); return; }
  const h = hit(ev); pinned = h.i === pinned ? -1 : h.i;
  document.getElementById("detail").textContent = pinned >= 0 ? describe(pinned) : "click a tensor"; drawBuf(); };
buf.onmouseleave = () => { hideTip(); if (drag) { drag = null; drawBuf(); } };
buf.ondblclick = () => { view = [0, Math.max(D.steps.length, 1)]; drawBuf(); };

// (3) largest at the peak
document.getElementById("peak").textContent = "step " + D.peak_step + ": " + (D.steps[D.peak_step] || "");
const body = document.querySelector("#largest tbody");
D.largest.forEach(t => { const tr = document.createElement("tr");
  [t.name, t.kind, t.module || "-", t.node || "-", (t.nbytes / MIB).toFixed(2), "[" + t.start + ", " + t.end + ")"].forEach((v, k) => {
    const td = document.createElement("td"); td.textContent = v; if (k === 4) td.className = "n"; tr.appendChild(td); });
  body.appendChild(tr); });

function drawAll() { drawMem(); drawBuf(); }
window.addEventListener("resize", drawAll);
drawAll();
document.documentElement.setAttribute("data-rendered", String(N));
})();
</script></body></html>
"""


def _html(plan: MemoryPlan) -> str:
    # "</" inside the JSON would end the script element early.
    data = json.dumps(chart_data(plan), separators=(",", ":")).replace("</", "<\\/")
    return _HTML.replace("__TITLE__", html.escape(plan.model)).replace("__DATA__", data)


def draw(plan: MemoryPlan, path: str | Path) -> Path:
    """Write the plan's pictures to ``path``: .png or .svg (matplotlib) or .html (self-contained)."""
    if not isinstance(plan, MemoryPlan):
        raise InputError(f"draw() takes a MemoryPlan (from gp.plan), got {type(plan).__name__}")
    target = Path(path)
    with atomic_output(target, suffixes=SUFFIXES) as tmp:
        suffix = target.suffix.lower()
        if suffix == ".html":
            tmp.write_text(_html(plan), encoding="utf-8")
        else:
            fig = figure(plan)
            fig.savefig(tmp, format=suffix[1:])
    return target
