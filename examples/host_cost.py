"""Host work of graphpass's CUDA code path, measured without a GPU.

    PYTHONPATH=. python examples/host_cost.py [--model torchvision:resnet50] [--batch 2] [--image 16]
                                              [--bits 4] [--steps 40] [--json FILE]

On a fast GPU a transformed training step is bound by the host: Python hooks, eager ops and
Triton launches, not kernels (see ``examples/profile_step.py``). This script runs the same host
code on the CPU: tensors stay on the CPU and the runtime takes its CUDA path (the Triton wrappers,
their argument work and allocations). Each Triton launch runs Triton's own launch work for real
(``JITFunction.run``: binding and specializing the arguments, the cache key, the lookup) against a
stub driver for an H100 target, and stops where the compiled kernel would reach the driver: it
counts itself instead. Where this Triton's internals differ from what the stub needs, launches
are counted no-ops and their work is left out (the output says which). Tiny inputs keep the CPU's
own compute small; saved tensors down to 64 elements are packed, as the full-size step packs them.
It reports:

- microseconds per call of the runtime's per-layer functions, their launches included;
- per training step (SGD with momentum): Triton launches by kernel, eager ops dispatched and Python
  function calls (cProfile's count, builtins included), plain against graphpass. These counts do
  not vary between runs;
- step time, plain against graphpass, interleaved; the difference is the host work graphpass
  adds. It varies by several milliseconds from run to run on a shared machine: compare versions
  in alternating runs.
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
except ImportError:  # the CUDA path needs the Triton wrappers, if not their launches
    sys.exit("host_cost.py needs triton installed (its kernels are not launched)")

LAUNCHES: collections.Counter[str] = collections.Counter()


class _CountedLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` counts and returns."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            LAUNCHES[self.name] += 1

        return launch


class _StubDriver:
    """Triton's active driver on a machine without a GPU: device 0, stream 0, an H100's target."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


class _StubKernel:
    """A compiled kernel in a JITFunction's cache whose launch counts itself instead of calling the driver."""

    function = None
    packed_metadata = None

    def __init__(self, name: str) -> None:
        self.name = name

    def launch_metadata(self, grid, stream, *args) -> None:
        return None

    def run(self, *args) -> None:
        LAUNCHES[self.name] += 1


def _stub_launched(kernel, name: str):
    """``kernel`` (a JITFunction, or the interpreter's stand-in for one) as a JITFunction whose
    compiles put a :class:`_StubKernel` in its cache, so every launch runs Triton's launch work."""
    if isinstance(kernel, triton.runtime.interpreter.InterpretedFunction):
        kernel = triton.runtime.JITFunction(kernel.fn, **kernel.kwargs)

    def compile_stub(key, signature, device, *args, **kwargs):
        stub = kernel.device_caches[device][0][key] = _StubKernel(name)
        return stub

    kernel._do_compile = compile_stub
    return kernel


def take_cuda_path_on_cpu() -> str:
    """Route the runtime's CUDA path onto CPU tensors; returns how launches are handled."""
    kernel_types = (triton.runtime.JITFunction, triton.runtime.interpreter.InterpretedFunction)
    names = [name for name in dir(kernels) if isinstance(getattr(kernels, name), kernel_types)]
    mode = "Triton's launch work, no driver call"
    try:
        triton.runtime.driver.set_active(_StubDriver())
        stubbed = {name: _stub_launched(getattr(kernels, name), _label(name)) for name in names}
        if not all(hasattr(k, "device_caches") and hasattr(k, "_do_compile") for k in stubbed.values()):
            raise AttributeError("JITFunction.device_caches/_do_compile")
    except (AttributeError, ImportError, TypeError) as e:
        print(f"this Triton's launch internals differ ({e}): launches are counted no-ops", file=sys.stderr)
        stubbed = {name: _CountedLaunch(_label(name)) for name in names}
        mode = "counted no-ops (launch work excluded)"
    for name, kernel in stubbed.items():
        setattr(kernels, name, kernel)
    quantize._kernels_for = _cuda_path
    runtime.MIN_PACKED_NUMEL = 64  # tiny tensors take the paths full-size ones take
    return mode


def _cuda_path(t: torch.Tensor, backend: str | None):
    """quantize._kernels_for as on a CUDA device: the kernels, except for the fake tensors of gp.transform's
    discovery run (and backend="torch")."""
    if backend == "torch" or (type(t) not in (torch.Tensor, torch.nn.Parameter) and quantize._is_fake(t)):
        return None
    return kernels


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
    tables = quantize.batch_norm_grad_tables(packed, grad, floats[2:])
    relu = quantize.Activation("relu")
    calls = {
        "layer_tables": lambda: quantize.layer_tables(mean, rstd, weight, bias, bits=bits, store_output=True),
        "pack_anchored": lambda: quantize.pack_anchored(y, bits, grid=grid),
        "unpack (ReLU epilogue)": lambda: quantize.unpack(packed, activation=relu, scale=floats[0], shift=floats[1]),
        "batch_norm_grad_tables": lambda: quantize.batch_norm_grad_tables(packed, grad, floats[2:]),
        "fused_norm_grad": lambda: quantize.fused_norm_grad(
            packed, grad, scale=tables[2], shift=tables[3], grad_scale=floats[2]
        ),
        "batch_norm_backward (the two above, as the runtime calls them)": lambda: quantize.batch_norm_backward(
            packed, grad, floats[2:]
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


def per_step(spec: str, batch: int, image: int, bits: int, steps: int) -> dict[str, object]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, image, image)
    labels = torch.randint(0, 10, (batch,))
    plain = gp.load_model(spec).train()
    steppers = {"plain": _trainer(plain, x, labels), "graphpass": _trainer(gp.transform(plain, (x,), bits=bits), x, labels)}
    ops, launches, calls = {}, {}, {}
    for name, step in steppers.items():
        for _ in range(2):
            step()
        LAUNCHES.clear()
        with _OpCount() as count:
            step()
        ops[name], launches[name] = count.ops, dict(LAUNCHES)
        profiler = cProfile.Profile()
        profiler.runcall(step)
        calls[name] = pstats.Stats(profiler).total_calls
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for i in range(steps):
        for name, step in steppers.items():
            start = time.thread_time()
            step()
            times[name].append((time.thread_time() - start) * 1e3)
        if sys.stderr.isatty():
            print(f"\rtimed {i + 1}/{steps} step pairs", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return {
        "eager ops per step": ops,
        "Python function calls per step": calls,
        "Triton launches per step": launches,
        "step ms (min)": {name: min(t) for name, t in times.items()},
        "graphpass adds ms (median of paired differences)": statistics.median(
            g - p for p, g in zip(times["plain"], times["graphpass"])
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="interleaved step pairs timed")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    # Opened first, like graphpass bench's: a bad path fails before the minute of measuring.
    json_out = atomic_output(args.json, suffixes=(".json",)) if args.json else contextlib.nullcontext()
    with json_out as tmp:
        torch.set_num_threads(1)
        launch_mode = take_cuda_path_on_cpu()
        print(f"Triton launches: {launch_mode}")
        per_call = per_call_us(args.bits)
        print(f"host us per call ({args.bits}-bit, 8x64x16x16 float32):")
        for name, us in per_call.items():
            print(f"  {us:7.1f}  {name}")
        step = per_step(args.model, args.batch, args.image, args.bits, args.steps)
        launches = step["Triton launches per step"]["graphpass"]
        ops = step["eager ops per step"]
        calls = step["Python function calls per step"]
        times = step["step ms (min)"]
        print(f"{args.model}, batch {args.batch}, {args.image} px, one CPU thread, per training step:")
        print(f"  eager ops: plain {ops['plain']}, graphpass {ops['graphpass']}")
        print(f"  Python function calls: plain {calls['plain']}, graphpass {calls['graphpass']}")
        print(f"  Triton launches: {sum(launches.values())} ({', '.join(f'{k} {v}' for k, v in sorted(launches.items()))})")
        print(f"  step ms (min): plain {times['plain']:.1f}, graphpass {times['graphpass']:.1f}")
        print(f"  graphpass adds {step['graphpass adds ms (median of paired differences)']:.1f} ms of host work")
        if tmp is not None:
            tmp.write_text(json.dumps({"per call us": per_call, "launches": launch_mode, **vars(args), **step}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
