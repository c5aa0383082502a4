"""Where one training step's memory and time go, plain against graphpass, on one machine.

    PYTHONPATH=. python examples/profile_step.py [--model torchvision:resnet50] [--batch 128] [--image 224]
                                                 [--bits 4] [--device cuda] [--steps 10] [--table 30]

For each method (the model as written, then ``gp.transform(model, x, bits=K)``), after 3 warm
steps of SGD with momentum on one synthetic batch:

- peak memory of the forward pass and of the backward pass (CUDA: ``max_memory_allocated``);
- step time, median and minimum of ``--steps`` steps, each timed from a synchronized start to a
  synchronized end;
- host time of one step: the same step with no synchronization at its end, so it measures how long
  Python and the launches keep the host busy. When it is close to the step time, the host is the
  bottleneck;
- GPU kernel time of one step: the sum of the self CUDA time of the device-side events that
  torch.profiler records (its table's "Self CUDA time total"); ``--table N`` prints that table's
  top N rows by self device time for each method.

It complements ``graphpass bench`` (peak and step time of several methods in one run), which is
the command the README's tables come from. On the CPU the memory and GPU figures are 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import graphpass as gp

MIB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else 0.0


def profile_method(
    model: torch.nn.Module, x: torch.Tensor, raw_labels: torch.Tensor, steps: int, table_rows: int
) -> dict[str, float]:
    device = x.device
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, raw_labels % logits.shape[-1])  # any head size

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    opt.zero_grad(set_to_none=True)
    _peak_reset(device)
    loss = loss_of(model(x))
    _sync(device)
    forward_peak = _peak(device)
    _peak_reset(device)
    loss.backward()
    _sync(device)
    backward_peak = _peak(device)
    opt.step()
    del loss

    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    _sync(device)
    start = time.perf_counter()
    step()
    host = (time.perf_counter() - start) * 1e3
    _sync(device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    # As the profiler table's "Self CUDA time total": device-side events only (their launching ops
    # report the same time again).
    kernels = sum(
        getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
        for e in prof.key_averages()
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    )
    if table_rows:
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=table_rows, max_name_column_width=60))
    return {
        "forward peak MiB": forward_peak,
        "backward peak MiB": backward_peak,
        "step ms (median)": statistics.median(times),
        "step ms (min)": min(times),
        "host ms": host,
        "GPU kernel ms": kernels / 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--table", type=int, default=0, metavar="N", help="print the profiler's top N rows per method")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image, args.image, device=device)
    raw_labels = torch.randint(0, 2**30, (args.batch,), device=device)
    results = {}
    for name in ("plain", f"graphpass {args.bits}-bit"):
        torch.manual_seed(0)  # the same initial weights for both
        model = gp.load_model(args.model).to(device).train()
        if name != "plain":
            model = gp.transform(model, (x,), bits=args.bits)
        print(f"profiling {name} ...", file=sys.stderr, flush=True)
        results[name] = profile_method(model, x, raw_labels, args.steps, args.table)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    figures = list(next(iter(results.values())))
    print(f"{args.model}, batch {args.batch}, {args.image} px, {device}, SGD with momentum")
    print(f"{'':22}" + "".join(f"{name:>18}" for name in results))
    for figure in figures:
        print(f"{figure:22}" + "".join(f"{r[figure]:>18.1f}" for r in results.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
