"""Host work of graphpass's CUDA code path, measured without a GPU.

    PYTHONPATH=. python examples/host_cost.py [--model torchvision:resnet50] [--batch 2] [--image 16]
                                              [--bits 4] [--norm keep|gn+pn] [--steps 40] [--json FILE]
                                              [--compile-for-h100]

On a fast GPU a transformed training step is bound by the host: Python hooks, eager ops and
Triton launches, not kernels (see ``examples/profile_step.py``). This script runs the same host
code on the CPU: tensors stay on the CPU and the runtime takes its CUDA path (the Triton wrappers,
their argument work and allocations). Each Triton launch does its host work for real, against a
stub driver for an H100 target (:mod:`graphpass.triton_launch`), and stops where the compiled
kernel would reach the driver: it counts itself instead. That work is graphpass's direct launch
once checked, as on a GPU, or with ``GRAPHPASS_DIRECT_LAUNCH=0`` Triton's own ``JITFunction.run``
(binding and specializing the arguments, the cache key, the lookup). Where this Triton's internals
differ from what the stub needs, launches are counted no-ops and their work is left out (the
output says which). Tiny inputs keep the CPU's
own compute small; saved tensors down to 64 elements are packed, as the full-size step packs them.
It reports:

- microseconds per call of the runtime's per-layer functions, their launches included;
- per training step (SGD with momentum): Triton launches by kernel, eager ops dispatched and Python
  function calls (cProfile's count, builtins included), plain against graphpass. These counts do
  not vary between runs;
- step time, plain against graphpass, interleaved; the difference is the host work graphpass
  adds. It varies by several milliseconds from run to run on a shared machine: compare versions
  in alternating runs;
- the host time inside Triton launches per step, graphpass's direct launches against the same
  model's steps launching through ``JITFunction.run``, interleaved with the others: their paired
  difference is what direct launches save.

``--compile-for-h100`` first compiles every kernel specialization the run asks for, for real, for
the stub's H100 target (Triton's compiler and the ptxas it bundles; no GPU): a kernel that would not
build on the GPU fails the run. It needs ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import json
import pstats
import statistics
import sys
import time
import timeit

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import graphpass as gp
import graphpass.quantize as quantize
import graphpass.runtime as runtime
from graphpass.files import atomic_output

try:
    import triton
    import triton.runtime.interpreter

    import graphpass.triton_kernels as kernels
    import graphpass.triton_launch as triton_launch
except ImportError:  # the CUDA path needs the Triton wrappers, if not their launches
    sys.exit("host_cost.py needs triton installed (its kernels are not launched)")

LAUNCHES: collections.Counter[str] = collections.Counter()
COMPILED: list = []  # the stubbed JITFunctions, whose caches hold one entry per specialization compiled


class _CountedLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` counts and returns."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            LAUNCHES[self.name] += 1

        return launch


THROUGH_TRITON = "graphpass, launches through Triton"
KERNEL_TABLES: dict[str, dict[str, object]] = {}  # per graphpass stepper: the kernels module's launchers
LAUNCH_SECONDS = [0.0]  # host time inside kernel[grid](...) since last reset


class _TimedLaunch:
    """``kernel[grid](...)`` adding its host time to LAUNCH_SECONDS."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def timed(*args, **kwargs) -> None:
            start = time.perf_counter()
            launch(*args, **kwargs)
            LAUNCH_SECONDS[0] += time.perf_counter() - start

        return timed


def take_cuda_path_on_cpu(compile_for_h100: bool = False) -> str:
    """Route the runtime's CUDA path onto CPU tensors; returns how launches are handled. Fills
    KERNEL_TABLES: "graphpass" launches as graphpass does on a GPU (directly, once checked), and
    THROUGH_TRITON, when direct launches are on, through Triton's JITFunction.run every time.
    ``compile_for_h100``: each specialization is compiled for an H100 before its stub takes over
    (:func:`graphpass.triton_launch.stub_compiles`); its compiles are counted in COMPILED."""
    kernel_types = (
        triton.runtime.JITFunction, triton.runtime.interpreter.InterpretedFunction, triton_launch.DirectLaunch
    )  # fmt: skip
    names = [n for n in dir(kernels) if n.endswith("_kernel") and isinstance(getattr(kernels, n), kernel_types)]
    if compile_for_h100 and any(isinstance(getattr(kernels, n), triton.runtime.interpreter.InterpretedFunction) for n in names):
        sys.exit("host_cost.py --compile-for-h100: the kernels are interpreted (TRITON_INTERPRET=1); unset it")
    mode = "Triton's launch work, no driver call"
    try:
        triton.runtime.driver.set_active(triton_launch.StubDriver())
        stubbed = {
            name: triton_launch.stub_compiles(getattr(kernels, name), _counter(_label(name)), compile_for_target=compile_for_h100)
            for name in names
        }
        COMPILED.extend(stubbed.values())
        KERNEL_TABLES["graphpass"] = {name: triton_launch.direct_launch(k) for name, k in stubbed.items()}
        if triton_launch.ENABLED:
            KERNEL_TABLES[THROUGH_TRITON] = stubbed
    except (AttributeError, ImportError, TypeError) as e:
        if compile_for_h100:
            sys.exit(f"host_cost.py --compile-for-h100: this Triton's launch internals differ ({e})")
        print(f"this Triton's launch internals differ ({e}): launches are counted no-ops", file=sys.stderr)
        KERNEL_TABLES["graphpass"] = {name: _CountedLaunch(_label(name)) for name in names}
        mode = "counted no-ops (launch work excluded)"
    _use_kernels("graphpass")
    quantize.KERNEL_DEVICES = ("cuda", "cpu")  # as on a GPU: kernels for real tensors, not for fake ones
    runtime.MIN_PACKED_NUMEL = 64  # tiny tensors take the paths full-size ones take
    return mode


def _counter(name: str):
    def count(stub, call) -> None:
        LAUNCHES[name] += 1

    return count


def _use_kernels(table: str, timed: bool = False) -> None:
    for name, kernel in KERNEL_TABLES[table].items():
        setattr(kernels, name, _TimedLaunch(kernel) if timed else kernel)


def _label(kernel_name: str) -> str:
    return kernel_name.strip("_").removesuffix("_kernel")


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def per_call_us(bits: int) -> dict[str, float]:
    """Host microseconds per call of the per-layer functions (their launches included), on one
    BatchNorm layer's tensors."""
    torch.manual_seed(0)
    channels = 64
    y = torch.randn(8, channels, 16, 16)
    mean, rstd = torch.randn(channels), torch.rand(channels) + 0.5
    weight, bias = torch.rand(channels), torch.randn(channels)
    grid, floats = quantize.layer_tables(mean, rstd, weight, bias, bits=bits, store_output=True)
    packed = quantize.pack_anchored(y, bits, grid=grid)
    grad = torch.randn_like(y)
    tables = quantize.batch_norm_grad_tables(packed, grad, floats[2:5])
    relu = quantize.Activation("relu")
    calls = {
        "layer_tables": lambda: quantize.layer_tables(mean, rstd, weight, bias, bits=bits, store_output=True),
        "pack_anchored": lambda: quantize.pack_anchored(y, bits, grid=grid),
        "unpack (ReLU epilogue)": lambda: quantize.unpack(packed, activation=relu, scale=floats[0], shift=floats[1]),
        "batch_norm_grad_tables": lambda: quantize.batch_norm_grad_tables(packed, grad, floats[2:5]),
        "fused_norm_grad": lambda: quantize.fused_norm_grad(
            packed, grad, scale=tables[2], shift=tables[3], grad_scale=floats[2]
        ),
        "batch_norm_backward (the two above, as the runtime calls them)": lambda: quantize.batch_norm_backward(
            packed, grad, floats[2:5]
        ),
        "pack_groups": lambda: quantize.pack_groups(y, bits, group_size=256),
        "pack_positive_mask": lambda: quantize.pack_positive_mask(y),
    }
    with torch.no_grad():  # as the runtime calls them
        return {name: min(timeit.repeat(fn, number=2000, repeat=3)) / 2000 * 1e6 for name, fn in calls.items()}


def _trainer(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels % 10).backward()
        opt.step()

    return step


def per_step(spec: str, batch: int, image: int, bits: int, norm: str, steps: int) -> dict[str, object]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, image, image)
    labels = torch.randint(0, 10, (batch,))
    plain = gp.load_model(spec).train()
    graphpass_step = _trainer(gp.transform(plain, (x,), bits=bits, norm=norm), x, labels)
    steppers = {"plain": _trainer(plain, x, labels)}
    timed = [False]  # launches time themselves in the timing rounds only, not in the counts
    for table in KERNEL_TABLES:  # the same model, launching as graphpass does or through Triton

        def step(table: str = table) -> None:
            _use_kernels(table, timed[0])
            graphpass_step()

        steppers[table] = step
    ops, launches, calls = {}, {}, {}
    for name in ("plain", "graphpass"):
        step = steppers[name]
        for _ in range(2):
            step()
        LAUNCHES.clear()
        with _OpCount() as count:
            step()
        ops[name], launches[name] = count.ops, dict(LAUNCHES)
        profiler = cProfile.Profile()
        profiler.runcall(step)
        calls[name] = pstats.Stats(profiler).total_calls
    timed[0] = True
    times: dict[str, list[float]] = {name: [] for name in steppers}
    in_launches: dict[str, list[float]] = {name: [] for name in KERNEL_TABLES}
    for i in range(steps):
        for name, step in steppers.items():
            LAUNCH_SECONDS[0] = 0.0
            start = time.thread_time()
            step()
            times[name].append((time.thread_time() - start) * 1e3)
            if name in in_launches:
                in_launches[name].append(LAUNCH_SECONDS[0] * 1e3)
        if sys.stderr.isatty():
            print(f"\rtimed {i + 1}/{steps} rounds of {len(steppers)} steps", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    _use_kernels("graphpass")
    result = {
        "eager ops per step": ops,
        "Python function calls per step": calls,
        "Triton launches per step": launches,
        "step ms (min)": {name: min(t) for name, t in times.items()},
        "graphpass adds ms (median of paired differences)": _paired(times["plain"], times["graphpass"]),
        "ms per step inside Triton launches (median)": {name: statistics.median(t) for name, t in in_launches.items()},
    }
    if THROUGH_TRITON in times:
        result["direct launches save ms (median of paired differences)"] = {
            "inside launches": _paired(in_launches["graphpass"], in_launches[THROUGH_TRITON]),
            "whole step": _paired(times["graphpass"], times[THROUGH_TRITON]),
        }
    return result


def _paired(first: list[float], second: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(first, second))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--norm", choices=("keep", "gn+pn"), default="keep")
    parser.add_argument("--steps", type=int, default=40, help="rounds of interleaved steps timed")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument(
        "--compile-for-h100", action="store_true",
        help="compile every kernel specialization for an H100 (no GPU needed): checks that each builds",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # Opened first, like graphpass bench's: a bad path fails before the minute of measuring.
    json_out = atomic_output(args.json, suffixes=(".json",)) if args.json else contextlib.nullcontext()
    with json_out as tmp:
        torch.set_num_threads(1)
        launch_mode = take_cuda_path_on_cpu(args.compile_for_h100)
        direct = "on" if triton_launch.ENABLED else "off (GRAPHPASS_DIRECT_LAUNCH=0)"
        print(f"Triton launches: {launch_mode}; direct launches {direct}")
        per_call = per_call_us(args.bits)
        print(f"host us per call ({args.bits}-bit, 8x64x16x16 float32):")
        for name, us in per_call.items():
            print(f"  {us:7.1f}  {name}")
        step = per_step(args.model, args.batch, args.image, args.bits, args.norm, args.steps)
        launches = step["Triton launches per step"]["graphpass"]
        ops = step["eager ops per step"]
        calls = step["Python function calls per step"]
        times = step["step ms (min)"]
        norm = ", gn+pn" if args.norm == "gn+pn" else ""
        print(f"{args.model}{norm}, batch {args.batch}, {args.image} px, one CPU thread, per training step:")
        print(f"  eager ops: plain {ops['plain']}, graphpass {ops['graphpass']}")
        print(f"  Python function calls: plain {calls['plain']}, graphpass {calls['graphpass']}")
        print(f"  Triton launches: {sum(launches.values())} ({', '.join(f'{k} {v}' for k, v in sorted(launches.items()))})")
        print(f"  step ms (min): plain {times['plain']:.1f}, graphpass {times['graphpass']:.1f}")
        print(f"  graphpass adds {step['graphpass adds ms (median of paired differences)']:.1f} ms of host work")
        inside = step["ms per step inside Triton launches (median)"]
        print(f"  ms per step inside Triton launches: {', '.join(f'{k} {v:.1f}' for k, v in inside.items())}")
        saved = step.get("direct launches save ms (median of paired differences)")
        if saved:
            print(f"  direct launches save {saved['inside launches']:.1f} ms inside launches, {saved['whole step']:.1f} ms of the step")
        compiled = {}
        if args.compile_for_h100:
            compiled = {jit.fn.__name__: len(jit.device_caches[0][0]) for jit in COMPILED if jit.device_caches[0][0]}
            print(f"  compiled for an H100 (sm_90): {sum(compiled.values())} specializations of {len(compiled)} kernels")
        if tmp is not None:
            doc = {"per call us": per_call, "launches": launch_mode, "direct launches": triton_launch.ENABLED, **vars(args), **step}
            if args.compile_for_h100:
                doc["specializations compiled for an H100"] = compiled
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
