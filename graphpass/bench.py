"""``graphpass bench``: peak memory and step time of one model trained several ways, in one process.

Every method trains the same model (same seed, same weights) on the same synthetic batch with
SGD and cross-entropy:

- ``plain``: the model as written;
- ``amp`` (CUDA): the same under ``torch.autocast`` in bfloat16;
- ``checkpoint``: ``torch.utils.checkpoint`` (non-reentrant) around every block (see
  :func:`checkpoint_blocks`);
- ``graphpass``: ``gp.transform(model, x, bits=K)`` at the requested bits (the document's
  ``bits``), and ``graphpass+gn+pn`` with ``norm="gn+pn"`` (and ``graphpass+amp`` on CUDA).

Peak memory is that of one warm training step, parameters, optimizer state and the batch
included (CUDA: the caching allocator's ``max_memory_allocated``; CPU: live tensor storage bytes).
Step time is the median of warm steps. A method that fails (out of memory included) is reported
and the others still run.

With ``cuda_graph`` (CUDA only) every method's whole step is captured in a CUDA graph
(:func:`graphpass.cuda_graph.capture_step`) and replayed: step times are then those of the GPU
work alone, without the host's per-op cost, for every method alike. The peak is then that of the
captured step (allocations during capture come from the graph's pool, as large as that peak).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from graphpass.errors import InputError
from graphpass.files import atomic_output
from graphpass.measure import StorageTracker
from graphpass.tracing import load_model

__all__ = ["BenchRun", "bench_command", "checkpoint_blocks", "run_bench", "largest_batch", "format_table"]

log = logging.getLogger(__name__)

MIB = 2**20
WARMUP_STEPS = 2  # the first step allocates gradients and momentum; the second runs warm
MAX_BATCH_TRIALS = 24


@dataclass
class BenchRun:
    """One method's measurement; ``error`` is set (and the figures are None) when it failed."""

    method: str
    batch: int
    peak_bytes: int | None = None
    step_ms: float | None = None
    step_ms_all: list[float] = field(default_factory=list)
    persistent_bytes: int | None = None  # parameters, optimizer state and the batch, held between steps
    peak_vs_plain: float | None = None
    time_vs_plain: float | None = None
    max_batch: int | None = None
    max_batch_predicted: bool | None = None  # True: extrapolated from this run's peak (CPU)
    error: str | None = None


@dataclass(frozen=True)
class Method:
    name: str
    bits: int | None = None
    norm: str = "keep"
    autocast: bool = False
    checkpoint: bool = False
    graphpass: bool = False


def methods_for(device: torch.device, bits: int | None) -> list[Method]:
    with_amp = device.type == "cuda"  # AMP is part of every CUDA comparison; on the CPU it is not measured
    gp_name = "graphpass"  # the DESIGN contract's method name; the bits are the document's "bits"
    out = [Method("plain")]
    if with_amp:
        out.append(Method("amp", autocast=True))
    out.append(Method("checkpoint", checkpoint=True))
    out.append(Method(gp_name, bits=bits, graphpass=True))
    out.append(Method(f"{gp_name}+gn+pn", bits=bits, norm="gn+pn", graphpass=True))
    if with_amp:
        out.append(Method(f"{gp_name}+amp", bits=bits, autocast=True, graphpass=True))
    return out


# ----------------------------------------------------------------------------- checkpointing


class CheckpointedBlock(nn.Module):
    """Runs ``block`` under non-reentrant ``torch.utils.checkpoint``: only its inputs are kept."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.block(*args, **kwargs)
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def _is_container(m: nn.Module) -> bool:
    # Exact types only: torchvision's Conv2dNormActivation subclasses Sequential and is a block.
    return type(m) in (nn.Sequential, nn.ModuleList)


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap every block of ``model`` in :class:`CheckpointedBlock`, in place; return how many.

    A block is a child of a plain ``nn.Sequential``/``nn.ModuleList`` that is itself neither a
    plain container nor a single layer, and has parameters: the residual blocks of ResNets, the
    inverted residuals of MobileNets and EfficientNets, the blocks of ConvNeXt and Swin stages,
    the encoder layers of ViT. Containers nested in containers are searched; other modules are
    searched for containers. A lone layer is left alone: checkpointing it would keep its input
    all the same.
    """

    def is_block(m: nn.Module) -> bool:
        return not _is_container(m) and any(True for _ in m.children()) and any(True for _ in m.parameters())

    def visit(module: nn.Module) -> int:
        count = 0
        for name, child in module.named_children():
            if _is_container(module) and is_block(child):
                setattr(module, name, CheckpointedBlock(child))
                count += 1
            else:
                count += visit(child)
        return count

    return visit(model)


# ----------------------------------------------------------------------------- one method


class _Data:
    """The synthetic batch, identical for every method: images and labels from a fixed seed."""

    def __init__(self, batch: int, image: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(batch, 3, image, image, generator=g).to(device)
        # Reduced modulo the model's class count at the first step, so any head size works.
        self.raw_labels = torch.randint(0, 2**30, (batch,), generator=g).to(device)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]  # (main, aux) outputs of GoogLeNet and Inception in training mode


class _Trainer:
    """A model prepared for one method, its optimizer and a training step."""

    def __init__(self, spec: str, method: Method, data: _Data, device: torch.device, cuda_graph: bool = False) -> None:
        torch.manual_seed(0)  # identical initial weights for every method
        model = load_model(spec).to(device).train()
        if method.checkpoint:
            if checkpoint_blocks(model) == 0:
                raise InputError(
                    f"{spec}: no blocks to checkpoint (no nn.Sequential/nn.ModuleList of modules with parameters)"
                )
        if method.graphpass:
            import graphpass as gp

            model = gp.transform(model, (data.x,), bits=method.bits, norm=method.norm)
        self.model = model
        self.data = data
        self.method = method
        self.device = device
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.labels: torch.Tensor | None = None
        self.cuda_graph = cuda_graph
        self.replay: Callable[[], None] | None = None  # the captured step, once captured

    def step(self) -> None:
        if self.replay is not None:
            self.replay()
            return
        self.opt.zero_grad(set_to_none=True)
        ctx = (
            # A captured step may not keep autocast's cast cache (it outlives the capture).
            torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cuda_graph)
            if self.method.autocast
            else contextlib.nullcontext()
        )
        with ctx:
            logits = _logits(self.model(self.data.x))
            if self.labels is None:
                self.labels = self.data.raw_labels % logits.shape[-1]
            loss = F.cross_entropy(logits.float(), self.labels)
        loss.backward()
        self.opt.step()

    def persistent_tensors(self) -> list[torch.Tensor]:
        """What lives between steps: parameters, buffers, optimizer state and the batch."""
        state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return [*self.model.parameters(), *self.model.buffers(), *state, self.data.x, self.data.raw_labels]

    def persistent_bytes(self) -> int:
        return StorageTracker(self.persistent_tensors()).current


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measured_step(trainer: _Trainer) -> int:
    """Peak bytes of one step, parameters, optimizer state and the batch included. With a CUDA
    graph, the step measured is the captured one, after which :meth:`_Trainer.step` replays it."""
    device = trainer.device
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        if trainer.cuda_graph:
            from graphpass.cuda_graph import capture_step

            trainer.replay = capture_step(trainer.step, warmup_steps=1, device=device)
        else:
            trainer.step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device)
    tracker = StorageTracker(trainer.persistent_tensors())
    with tracker:
        trainer.step()
    return tracker.peak


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (oom and isinstance(e, oom)) or "out of memory" in str(e).lower()


def _describe(e: BaseException) -> str:
    if _is_oom(e):
        return "out of memory"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, one line per method otherwise."""

    def __init__(self, total_methods: int, stream: TextIO | None = None) -> None:
        self.total = total_methods
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def update(self, index: int, method: str, done: int, total: int) -> None:
        if not self.tty:
            return
        width = 24
        filled = int(width * done / max(total, 1))
        self.stream.write(
            f"\r[{index}/{self.total}] {method:<24} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} steps"
        )
        self.stream.flush()

    def finish(self, index: int, run: BenchRun) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        if run.error:
            result = f"failed: {run.error}"
        else:
            result = f"peak {run.peak_bytes / MIB:,.1f} MiB, step {run.step_ms:.1f} ms"
        self.stream.write(f"bench [{index}/{self.total}] {run.method}: {result}\n")
        self.stream.flush()


def measure_method(
    spec: str,
    method: Method,
    batch: int,
    image: int,
    device: torch.device,
    steps: int,
    on_step: Callable[[int, int], None] = lambda done, total: None,
    cuda_graph: bool = False,
) -> BenchRun:
    """Warm up, measure the peak of one step, then time ``steps`` steps; never raises on failure.

    The batch is made afresh (from the same seed) so that nothing of a method outlives it.
    """
    run = BenchRun(method=method.name, batch=batch)
    total = WARMUP_STEPS + 1 + steps
    trainer = None
    try:
        trainer = _Trainer(spec, method, _Data(batch, image, device), device, cuda_graph)
        for i in range(WARMUP_STEPS):
            trainer.step()
            on_step(i + 1, total)
        run.peak_bytes = _measured_step(trainer)
        run.persistent_bytes = trainer.persistent_bytes()
        on_step(WARMUP_STEPS + 1, total)
        for i in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            trainer.step()
            _sync(device)
            run.step_ms_all.append((time.perf_counter() - t0) * 1e3)
            on_step(WARMUP_STEPS + 2 + i, total)
        run.step_ms = statistics.median(run.step_ms_all)
    except Exception as e:  # one method's failure (OOM, unsupported model) must not end the bench
        log.debug("method %s failed", method.name, exc_info=True)
        run.error = _describe(e)
        run.peak_bytes = run.step_ms = run.persistent_bytes = None
        run.step_ms_all = []
    finally:
        del trainer
        _free(device)
    return run


# ----------------------------------------------------------------------------- largest batch


def _fits(spec: str, method: Method, batch: int, image: int, device: torch.device, budget: int) -> bool:
    trainer = None
    try:
        trainer = _Trainer(spec, method, _Data(batch, image, device), device)
        trainer.step()
        return _measured_step(trainer) <= budget
    except Exception as e:
        if not _is_oom(e):
            raise
        return False
    finally:
        del trainer
        _free(device)


def largest_batch(
    spec: str, method: Method, run: BenchRun, image: int, device: torch.device, budget: int
) -> tuple[int, bool]:
    """Largest batch whose training step peaks within ``budget`` bytes; (batch, predicted).

    The guess extrapolates this run's peak linearly in the batch. On the CPU that guess is the
    answer; on CUDA it starts a search (doubling or halving, then bisection to 1%) in which each
    trial trains one real step and an out-of-memory error counts as not fitting.
    """
    assert run.peak_bytes is not None and run.persistent_bytes is not None
    per_sample = max(1.0, (run.peak_bytes - run.persistent_bytes) / run.batch)
    guess = max(0, math.floor((budget - run.persistent_bytes) / per_sample))
    if device.type != "cuda":
        return guess, True
    lo, hi = 0, None  # lo fits (0: none found yet), hi does not
    batch = max(1, guess)
    for _ in range(MAX_BATCH_TRIALS):
        if _fits(spec, method, batch, image, device, budget):
            lo = batch
        else:
            hi = batch
        if hi is None:
            batch = lo * 2
        elif lo == 0:
            batch = hi // 2
            if batch == 0:
                break
        elif hi - lo <= max(1, lo // 100):
            break
        else:
            batch = (lo + hi) // 2
    return lo, False


# ----------------------------------------------------------------------------- the command


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(name)


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def run_bench(
    spec: str,
    *,
    batch: int,
    image: int,
    device: str = "cpu",
    bits: int | None = 4,
    amp: bool = False,
    steps: int = 10,
    max_batch_mib: int | None = None,
    progress: Progress | None = None,
    cuda_graph: bool = False,
) -> dict:
    """Measure every method; return the JSON document of ``graphpass bench``."""
    dev = _device(device)
    if cuda_graph and dev.type != "cuda":
        raise InputError("--cuda-graph: CUDA graphs need --device cuda")
    load_model(spec)  # a bad MODEL is a clear error before any measurement
    methods = methods_for(dev, bits)
    progress = progress or Progress(len(methods))
    runs: list[BenchRun] = []
    for index, method in enumerate(methods, 1):
        run = measure_method(
            spec, method, batch, image, dev, steps,
            on_step=lambda d, t: progress.update(index, method.name, d, t), cuda_graph=cuda_graph,
        )  # fmt: skip
        if max_batch_mib and run.error is None:
            try:
                run.max_batch, run.max_batch_predicted = largest_batch(
                    spec, method, run, image, dev, max_batch_mib * MIB
                )
            except Exception as e:
                log.warning("largest batch of %s: %s", method.name, _describe(e))
        runs.append(run)
        progress.finish(index, run)
    plain = runs[0]
    for run in runs:
        if run.error is None and plain.error is None:
            run.peak_vs_plain = run.peak_bytes / plain.peak_bytes
            run.time_vs_plain = run.step_ms / plain.step_ms
    if amp and dev.type != "cuda":
        log.warning("--amp: AMP is measured on CUDA only; skipped on the CPU")
    return {
        "device": _device_label(dev),
        "model": spec,
        "batch": batch,
        "image": image,
        "bits": bits,
        "dtype": "float32",
        "optimizer": "SGD(lr=0.01, momentum=0.9)",
        "warmup_steps": WARMUP_STEPS,
        "timed_steps": steps,
        "cuda_graph": cuda_graph,
        "max_batch_budget_bytes": max_batch_mib * MIB if max_batch_mib else None,
        "torch": torch.__version__,
        "runs": [asdict(r) for r in runs],
    }


def format_table(doc: dict) -> str:
    budget = doc["max_batch_budget_bytes"]
    head = (
        f"graphpass bench: {doc['model']}, batch {doc['batch']}, {doc['image']}x{doc['image']}, "
        f"{doc['device']}, {doc['dtype']}, {doc['optimizer']}, graphpass bits={doc['bits'] or 'none'}, "
        f"median of {doc['timed_steps']} warm steps"
        + (", each a CUDA graph replay" if doc.get("cuda_graph") else "")
    )
    cols = ["method", "peak MiB", "vs plain", "step ms", "vs plain"]
    if budget:
        cols.append(f"max batch @ {budget // MIB} MiB")
    rows = []
    for r in doc["runs"]:
        if r["error"]:
            rows.append([r["method"], f"failed: {r['error']}"])
            continue
        row = [
            r["method"],
            f"{r['peak_bytes'] / MIB:,.1f}",
            f"{r['peak_vs_plain']:.2f}x" if r["peak_vs_plain"] is not None else "-",
            f"{r['step_ms']:.1f}",
            f"{r['time_vs_plain']:.2f}x" if r["time_vs_plain"] is not None else "-",
        ]
        if budget:
            mb = r["max_batch"]
            row.append("-" if mb is None else f"{mb}{' (predicted)' if r['max_batch_predicted'] else ''}")
        rows.append(row)
    widths = [max(len(cols[i]), *(len(row[i]) for row in rows if len(row) == len(cols))) for i in range(len(cols))]
    lines = [head, "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    for row in rows:
        if len(row) != len(cols):
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
        else:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    """``graphpass bench``: exit 0 when plain and every graphpass method ran, 1 when one failed."""
    json_out = atomic_output(args.json, suffixes=(".json",)) if args.json else contextlib.nullcontext()
    with json_out as tmp:  # a missing output folder is an error before a long benchmark, not after
        doc = run_bench(
            args.model,
            batch=args.batch,
            image=args.image,
            device=args.device,
            bits=args.bits,
            amp=args.amp,
            steps=args.steps,
            max_batch_mib=args.max_batch,
            cuda_graph=args.cuda_graph,
        )
        if tmp is not None:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    print(format_table(doc))
    failed = [r["method"] for r in doc["runs"] if r["error"] and (r["method"] == "plain" or "graphpass" in r["method"])]
    if failed:
        print(f"graphpass bench: {', '.join(failed)} failed (see the table)", file=sys.stderr)
        return 1
    return 0
