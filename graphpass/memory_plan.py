"""The memory plan of one training step: tensors with live ranges, offsets in one shared arena,
the lower bound, a verifier, and the shared-buffer view from interference-graph colouring.

Live-range convention (the only one graphpass uses): a tensor is live on the steps
``start <= step < end`` -- ``start`` is the step that allocates it (inclusive), ``end`` is one past
the last step that reads it (exclusive), so ``start < end``. Steps are the forward nodes in graph
order, then their backward steps in reverse order.

Parameters and inputs live outside the arena (``offset is None``): the user allocates them and
they outlive the step. Everything else (activations, saved and compressed tensors, internal
tensors, activation and parameter gradients) is placed in the arena. Offsets are exact byte
offsets; no alignment padding is added, so the arena can be compared with the lower bound.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from graphpass.errors import PlanError

__all__ = [
    "KINDS",
    "ARENA_KINDS",
    "SAVED_KINDS",
    "PlannedTensor",
    "MemoryPlan",
    "ALGORITHMS",
    "live_bytes",
    "lower_bound",
    "assign_offsets",
    "shared_buffers",
    "build_plan",
    "verify_plan",
]

KINDS = (
    "input", "parameter", "activation", "saved", "compressed", "unpacked", "activation_grad", "param_grad", "internal",
)  # fmt: skip
ARENA_KINDS = frozenset(KINDS) - {"input", "parameter"}
# What autograd holds for backward beyond parameters and inputs.
SAVED_KINDS = frozenset({"saved", "compressed", "internal"})

MIB = 1 << 20


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # unique within the plan
    node: str  # fx node name that produced it ("" if none)
    module: str  # qualified module path that produced it
    kind: str  # one of KINDS
    nbytes: int
    start: int  # first step at which it is live (inclusive)
    end: int  # one past its last step (exclusive); start < end
    offset: int | None  # byte offset in the shared arena; None for tensors outside the arena

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PlanError(f"tensor {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.nbytes < 0:
            raise PlanError(f"tensor {self.name!r}: nbytes {self.nbytes} is negative")
        if not self.start < self.end:
            raise PlanError(f"tensor {self.name!r}: live range [{self.start}, {self.end}) is empty")


@dataclass
class MemoryPlan:
    model: str  # description, e.g. "torchvision:resnet50 batch 32 224px"
    tensors: list[PlannedTensor]
    steps: list[str]  # one label per step: forward steps then backward steps
    num_forward_steps: int  # steps[:num_forward_steps] are forward, the rest backward
    lower_bound_bytes: int  # max over steps of the live bytes of arena tensors
    planned_bytes: int  # arena size
    predicted_peak_bytes: int  # peak of one training step, parameters and everything included
    saved_bytes: int  # bytes autograd holds for backward at the end of forward
    parameter_bytes: int
    algorithm: str  # name of the offset-assignment heuristic that won
    bits: int | None
    norm: str
    buffers: list[int]  # sizes of shared buffers from networkx interference-graph colouring
    baseline: MemoryPlan | None = None  # same figures for the untransformed model
    measured_peak_bytes: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # extra figures, e.g. planning seconds

    def memory_profile(self) -> list[int]:
        """Total live bytes per step, parameters and inputs included."""
        return live_bytes(self.tensors, len(self.steps)).tolist()

    def summary(self) -> str:
        """A text table: the headline figures (with the baseline beside them) and where bytes go."""
        rows: list[tuple[str, str, str]] = []

        def figure(label: str, attr: str) -> None:
            value = getattr(self, attr)
            base = getattr(self.baseline, attr) if self.baseline is not None else None
            rows.append((label, _mib(value), _mib(base) if base is not None else ""))

        figure("lower bound (arena)", "lower_bound_bytes")
        figure("planned arena", "planned_bytes")
        figure("saved for backward", "saved_bytes")
        figure("parameters", "parameter_bytes")
        figure("predicted peak", "predicted_peak_bytes")
        if self.measured_peak_bytes is not None:
            figure("measured peak", "measured_peak_bytes")
        ratio = self.planned_bytes / self.lower_bound_bytes if self.lower_bound_bytes else 1.0
        title = f"{self.model}  bits={self.bits or 'none'} norm={self.norm}"
        lines = [title, "=" * len(title)]
        head = ("figure", "MiB", "baseline MiB" if self.baseline is not None else "")
        width = max(len(r[0]) for r in (*rows, head))
        for label, value, base in (head, *rows):
            lines.append(f"{label:<{width}}  {value:>12}  {base:>12}".rstrip())
        lines.append(
            f"arena/lower bound {ratio:.4f} ({self.algorithm}); {len(self.buffers)} shared buffers "
            f"totalling {_mib(sum(self.buffers))} MiB; {len(self.steps)} steps "
            f"({self.num_forward_steps} forward)"
        )
        lines.append("")
        lines.append(f"{'kind':<16}{'tensors':>8}{'MiB':>12}{'MiB at peak':>14}")
        profile = live_bytes(self.tensors, len(self.steps))
        peak_step = int(profile.argmax()) if len(profile) else 0
        for kind in KINDS:
            of_kind = [t for t in self.tensors if t.kind == kind]
            if not of_kind:
                continue
            at_peak = sum(t.nbytes for t in of_kind if t.start <= peak_step < t.end)
            lines.append(
                f"{kind:<16}{len(of_kind):>8}{_mib(sum(t.nbytes for t in of_kind)):>12}{_mib(at_peak):>14}"
            )
        if self.steps:
            lines.append(f"peak at step {peak_step}: {self.steps[peak_step]}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON dict of every figure and tensor; ``baseline`` nested, ``measured_peak_bytes`` if known."""
        out: dict[str, Any] = {
            "model": self.model,
            "bits": self.bits,
            "norm": self.norm,
            "lower_bound_bytes": self.lower_bound_bytes,
            "planned_bytes": self.planned_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "saved_bytes": self.saved_bytes,
            "parameter_bytes": self.parameter_bytes,
            "algorithm": self.algorithm,
            "buffers": list(self.buffers),
            "num_forward_steps": self.num_forward_steps,
            "steps": list(self.steps),
            "memory_profile": self.memory_profile(),
            "tensors": [asdict(t) for t in self.tensors],
            "stats": dict(self.stats),
        }
        if self.measured_peak_bytes is not None:
            out["measured_peak_bytes"] = self.measured_peak_bytes
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MemoryPlan:
        """Inverse of :meth:`to_json` (the derived ``memory_profile`` is recomputed, not read)."""
        baseline = data.get("baseline")
        return cls(
            model=data["model"],
            tensors=[PlannedTensor(**t) for t in data["tensors"]],
            steps=list(data["steps"]),
            num_forward_steps=data["num_forward_steps"],
            lower_bound_bytes=data["lower_bound_bytes"],
            planned_bytes=data["planned_bytes"],
            predicted_peak_bytes=data["predicted_peak_bytes"],
            saved_bytes=data["saved_bytes"],
            parameter_bytes=data["parameter_bytes"],
            algorithm=data["algorithm"],
            bits=data["bits"],
            norm=data["norm"],
            buffers=list(data["buffers"]),
            baseline=cls.from_json(baseline) if baseline is not None else None,
            measured_peak_bytes=data.get("measured_peak_bytes"),
            stats=dict(data.get("stats", {})),
        )


def _mib(nbytes: int | None) -> str:
    return "" if nbytes is None else f"{nbytes / MIB:,.1f}"


def live_bytes(tensors: Sequence[PlannedTensor], num_steps: int) -> np.ndarray:
    """Bytes live at each step (int64 array of length ``num_steps``)."""
    starts = np.fromiter((t.start for t in tensors), np.int64, len(tensors))
    ends = np.fromiter((t.end for t in tensors), np.int64, len(tensors))
    sizes = np.fromiter((t.nbytes for t in tensors), np.int64, len(tensors))
    if len(tensors) and (starts.min() < 0 or ends.max() > num_steps):
        raise PlanError(f"a live range lies outside steps [0, {num_steps})")
    return _profile(starts, ends, sizes, num_steps)


def _profile(starts: np.ndarray, ends: np.ndarray, sizes: np.ndarray, num_steps: int) -> np.ndarray:
    delta = np.zeros(num_steps + 1, dtype=np.int64)
    np.add.at(delta, starts, sizes)
    np.add.at(delta, ends, -sizes)
    return np.cumsum(delta[:-1])


def lower_bound(tensors: Sequence[PlannedTensor], num_steps: int) -> int:
    """Max over steps of the bytes live in the arena: no assignment can use less."""
    arena = [t for t in tensors if t.kind in ARENA_KINDS]
    profile = live_bytes(arena, num_steps)
    return int(profile.max()) if len(profile) else 0


# Offset-assignment orderings. Every one places tensors in its order at the best-fitting gap
# (the smallest hole between tensors already placed that overlap it in time), else on top.
# An ordering maps the arena's (starts, ends, sizes) arrays to the order of placement.
Ordering = Callable[[np.ndarray, np.ndarray, np.ndarray], list[int]]
SortKey = Callable[[int, int, int, int], tuple]


def _by_key(key: SortKey) -> Ordering:
    """An ordering by a key of (nbytes, start, end, index); ties break deterministically by index."""

    def order(starts: np.ndarray, ends: np.ndarray, sizes: np.ndarray) -> list[int]:
        return sorted(range(len(sizes)), key=lambda j: key(int(sizes[j]), int(starts[j]), int(ends[j]), j))

    return order


def _peak_first(starts: np.ndarray, ends: np.ndarray, sizes: np.ndarray) -> list[int]:
    """Tensors live at the peak step first (largest first), then the rest by size.

    The arena reaches the lower bound only if the tensors live at the peak are stacked without
    gaps; placing them first does that. In compressed graphs greedy-by-size fails here: large
    short-lived forward activations go first and push the small long-lived compressed copies,
    which are live at a backward peak, up above them.
    """
    if not len(sizes):
        return []
    peak = int(_profile(starts, ends, sizes, int(ends.max())).argmax())
    at_peak = (starts <= peak) & (peak < ends)
    return sorted(range(len(sizes)), key=lambda j: (not at_peak[j], -int(sizes[j]), -int(ends[j] - starts[j]), j))


def _by_pressure(starts: np.ndarray, ends: np.ndarray, sizes: np.ndarray) -> list[int]:
    """Tensors whose live range meets the most live bytes first, larger first among equals.

    A generalisation of peak-first: every local peak gets its tensors stacked before tensors that
    only live through quieter steps fill the holes.
    """
    if not len(sizes):
        return []
    profile = _profile(starts, ends, sizes, int(ends.max()))
    pressure = [int(profile[s:e].max()) for s, e in zip(starts.tolist(), ends.tolist())]
    return sorted(range(len(sizes)), key=lambda j: (-pressure[j], -int(sizes[j]), -int(ends[j] - starts[j]), j))


ALGORITHMS: dict[str, Ordering] = {
    # Pisarchyk & Lee's greedy-by-size: large tensors first leave small ones to fill the holes.
    "greedy_by_size": _by_key(lambda size, start, end, i: (-size, -(end - start), start, i)),
    # Longest-lived first: saved activations nest like a stack between forward and backward.
    "greedy_by_length": _by_key(lambda size, start, end, i: (-(end - start), -size, start, i)),
    # Largest time-space rectangle first.
    "greedy_by_area": _by_key(lambda size, start, end, i: (-size * (end - start), -size, start, i)),
    # Allocation order, as a caching allocator sees the step.
    "greedy_by_start": _by_key(lambda size, start, end, i: (start, -size, i)),
    # Tensors live at the peak step stacked first: compressed graphs' small long-lived copies.
    "peak_first": _peak_first,
    # Tensors through the most crowded steps first.
    "greedy_by_pressure": _by_pressure,
}


def _best_fit(order: Sequence[int], starts: np.ndarray, ends: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Offsets for tensors placed one by one in ``order``, each in the smallest gap that fits."""
    n = len(sizes)
    offsets = np.zeros(n, dtype=np.int64)
    p_start = np.empty(n, dtype=np.int64)
    p_end = np.empty(n, dtype=np.int64)
    p_off = np.empty(n, dtype=np.int64)
    p_top = np.empty(n, dtype=np.int64)
    k = 0
    for i in order:
        size = sizes[i]
        if size == 0:
            continue
        offset = 0
        if k:
            overlap = (p_start[:k] < ends[i]) & (starts[i] < p_end[:k])
            if overlap.any():
                lo = p_off[:k][overlap]
                hi = p_top[:k][overlap]
                by_offset = np.argsort(lo, kind="stable")
                lo, hi = lo[by_offset], hi[by_offset]
                covered = np.maximum.accumulate(hi)  # highest byte used by tensors at or below each
                gap_start = np.concatenate(([0], covered[:-1]))
                gap_size = lo - gap_start
                fits = np.flatnonzero(gap_size >= size)
                if len(fits):
                    best = fits[np.argmin(gap_size[fits])]
                    offset = int(gap_start[best])
                else:
                    offset = int(covered[-1])
        offsets[i] = offset
        p_start[k], p_end[k], p_off[k], p_top[k] = starts[i], ends[i], offset, offset + size
        k += 1
    return offsets


# Improvement rounds: the tensors that touch an arena's top move to the front of its ordering
# and everything is placed again, so they settle low and others fill in above them. On compressed
# graphs the gains came within 12 rounds per ordering (resnet50 4-bit: 1.019 -> 1.000 of the
# bound). Each round costs about n**2 tensor pairs, so big graphs get fewer rounds: with ~1,700
# arena tensors (resnet152, densenet121) about 14 runs in all, which keeps planning quick. ResNet-50
# 4-bit at batch 32 (917 arena tensors) needs 30 runs (greedy_by_pressure's fifth round): 1.0302 of
# the bound with the 23 runs that 20 million pairs gave it, 1.0017 now.
TOP_FIRST_ROUNDS = 12
TOP_FIRST_PAIR_BUDGET = 40_000_000
# An arena this close to the lower bound is not worth more rounds.
CLOSE_ENOUGH = 1e-4


def assign_offsets(
    tensors: Sequence[PlannedTensor], *, algorithms: Sequence[str] | None = None
) -> tuple[list[PlannedTensor], str, int]:
    """Place arena tensors with each algorithm and keep the smallest arena.

    After one placement per ordering, improvement rounds go round-robin over the orderings (at
    most ``TOP_FIRST_ROUNDS`` each, within ``TOP_FIRST_PAIR_BUDGET``); the search stops once an
    arena is within ``CLOSE_ENOUGH`` of the lower bound. Returns (tensors with offsets set; None
    for non-arena ones), the winning algorithm's name (with the rounds it took, if any), and the
    arena size in bytes. Ties go to the algorithm listed first.
    """
    names = list(algorithms) if algorithms is not None else list(ALGORITHMS)
    unknown = [a for a in names if a not in ALGORITHMS]
    if unknown or not names:
        raise PlanError(f"unknown offset-assignment algorithm(s) {unknown}; known: {', '.join(ALGORITHMS)}")
    arena = [i for i, t in enumerate(tensors) if t.kind in ARENA_KINDS]
    starts = np.array([tensors[i].start for i in arena], dtype=np.int64)
    ends = np.array([tensors[i].end for i in arena], dtype=np.int64)
    sizes = np.array([tensors[i].nbytes for i in arena], dtype=np.int64)
    bound = int(_profile(starts, ends, sizes, int(ends.max())).max()) if len(arena) else 0
    good_enough = bound + int(bound * CLOSE_ENOUGH)
    extra_runs = TOP_FIRST_PAIR_BUDGET // max(len(arena), 1) ** 2
    best: tuple[int, str, np.ndarray] | None = None
    orders = {name: ALGORITHMS[name](starts, ends, sizes) for name in names}
    for rounds in range(TOP_FIRST_ROUNDS + 1):
        for name in names:
            if rounds:
                if extra_runs <= 0:
                    break
                extra_runs -= 1
            offsets = _best_fit(orders[name], starts, ends, sizes)
            tops = offsets + sizes
            size = int(tops.max()) if len(arena) else 0
            if best is None or size < best[0]:
                best = (size, f"{name} + {rounds} top-first rounds" if rounds else name, offsets)
            if best[0] <= good_enough:
                break
            touching = tops == size
            orders[name] = [j for j in orders[name] if touching[j]] + [j for j in orders[name] if not touching[j]]
        if best is not None and best[0] <= good_enough:
            break
    assert best is not None
    arena_size, winner, offsets = best
    placed = [replace(t, offset=None) for t in tensors]
    for j, i in enumerate(arena):
        placed[i] = replace(tensors[i], offset=int(offsets[j]))
    return placed, winner, arena_size


def shared_buffers(tensors: Sequence[PlannedTensor]) -> list[int]:
    """Sizes of the shared buffers a buffer-per-colour allocator needs, largest first.

    Arena tensors that are live at the same time interfere; colouring the interference graph
    (networkx, largest tensors first) gives tensors of one colour one buffer, as large as the
    largest of them.
    """
    import networkx as nx

    arena = sorted(
        (i for i, t in enumerate(tensors) if t.kind in ARENA_KINDS and t.nbytes > 0),
        key=lambda i: tensors[i].start,
    )
    graph = nx.Graph()
    graph.add_nodes_from(arena)
    active: list[tuple[int, int]] = []  # heap of (end, index) of tensors live at the sweep point
    for i in arena:
        t = tensors[i]
        while active and active[0][0] <= t.start:
            heapq.heappop(active)
        graph.add_edges_from((i, j) for _, j in active)
        heapq.heappush(active, (t.end, i))

    def largest_first(g: Any, colors: Any) -> list[int]:
        return sorted(g, key=lambda i: (-tensors[i].nbytes, i))

    colouring = nx.greedy_color(graph, strategy=largest_first)
    sizes: dict[int, int] = {}
    for i, colour in colouring.items():
        sizes[colour] = max(sizes.get(colour, 0), tensors[i].nbytes)
    return sorted(sizes.values(), reverse=True)


def build_plan(
    model: str,
    tensors: Sequence[PlannedTensor],
    steps: Sequence[str],
    num_forward_steps: int,
    *,
    bits: int | None = None,
    norm: str = "keep",
    algorithms: Sequence[str] | None = None,
) -> MemoryPlan:
    """Assign offsets, colour buffers and compute every figure of a MemoryPlan from live ranges."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise PlanError(f"tensor names must be unique within a plan; repeated: {', '.join(dup)}")
    num_steps = len(steps)
    placed, algorithm, arena_size = assign_offsets(tensors, algorithms=algorithms)
    profile = live_bytes(placed, num_steps)
    boundary = num_forward_steps  # first backward step
    saved = sum(
        t.nbytes for t in placed if t.kind in SAVED_KINDS and t.start < boundary < t.end
    )
    return MemoryPlan(
        model=model,
        tensors=placed,
        steps=list(steps),
        num_forward_steps=num_forward_steps,
        lower_bound_bytes=lower_bound(placed, num_steps),
        planned_bytes=arena_size,
        predicted_peak_bytes=int(profile.max()) if len(profile) else 0,
        saved_bytes=saved,
        parameter_bytes=sum(t.nbytes for t in placed if t.kind == "parameter"),
        algorithm=algorithm,
        bits=bits,
        norm=norm,
        buffers=shared_buffers(placed),
    )


def verify_plan(plan: MemoryPlan) -> None:
    """Prove that no two arena tensors overlap in both time and space; raise PlanError otherwise.

    Also checks that every arena tensor has an offset inside ``[0, planned_bytes)``, that live
    ranges lie inside the step range, and that the arena is at least the lower bound.
    """
    num_steps = len(plan.steps)
    arena: list[PlannedTensor] = []
    for t in plan.tensors:
        if not 0 <= t.start < t.end <= num_steps:
            raise PlanError(f"tensor {t.name!r}: live range [{t.start}, {t.end}) outside steps [0, {num_steps})")
        if t.kind not in ARENA_KINDS:
            if t.offset is not None:
                raise PlanError(f"tensor {t.name!r} ({t.kind}) lies outside the arena but has offset {t.offset}")
            continue
        if t.offset is None:
            raise PlanError(f"arena tensor {t.name!r} ({t.kind}) has no offset")
        if t.offset < 0 or t.offset + t.nbytes > plan.planned_bytes:
            raise PlanError(
                f"tensor {t.name!r} at bytes [{t.offset}, {t.offset + t.nbytes}) leaves the arena "
                f"of {plan.planned_bytes} bytes"
            )
        if t.nbytes:
            arena.append(t)
    if plan.planned_bytes < plan.lower_bound_bytes:
        raise PlanError(f"arena of {plan.planned_bytes} bytes is below the lower bound {plan.lower_bound_bytes}")
    # Sweep over time; the tensors live at the sweep point never overlap each other in space,
    # so a new tensor need only be checked against its neighbours in offset order.
    arena.sort(key=lambda t: t.start)
    by_offset: list[tuple[int, int]] = []  # (offset, index into arena) of live tensors
    expiry: list[tuple[int, int]] = []  # heap of (end, index)
    for i, t in enumerate(arena):
        while expiry and expiry[0][0] <= t.start:
            _, j = heapq.heappop(expiry)
            del by_offset[bisect_left(by_offset, (arena[j].offset, j))]
        pos = bisect_left(by_offset, (t.offset, i))
        for k in (pos - 1, pos):
            if 0 <= k < len(by_offset):
                other = arena[by_offset[k][1]]
                if t.offset < other.offset + other.nbytes and other.offset < t.offset + t.nbytes:
                    raise PlanError(
                        f"tensors {other.name!r} (bytes [{other.offset}, {other.offset + other.nbytes}), "
                        f"steps [{other.start}, {other.end})) and {t.name!r} (bytes [{t.offset}, "
                        f"{t.offset + t.nbytes}), steps [{t.start}, {t.end})) overlap in time and space"
                    )
        insort(by_offset, (t.offset, i))
        heapq.heappush(expiry, (t.end, i))
