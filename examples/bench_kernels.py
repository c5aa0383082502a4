"""Time graphpass's pack/unpack kernels against a plain copy on CUDA.

    PYTHONPATH=. python examples/bench_kernels.py [--shape 128 256 56 56] [--bits 8 4 2] [--dtype float32]

The default shape is a ResNet-50 activation at batch 128 (layer1, 256 channels at 56x56). "GPU ms" is
the median over 5 CUDA-event timings of back-to-back calls queued behind a sleep kernel (device time
only); "host ms" is the Python + launch time per call; GB/s counts bytes read plus bytes written.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from graphpass.quantize import pack_anchored, pack_groups, pack_mask, unpack


def _time_ms(fn, iters: int) -> tuple[float, float]:
    """(GPU ms per call, host ms per call). The GPU figure is taken behind a sleep kernel, so the
    launches queue up first and host overhead does not show in it, as in a training step where the
    host runs ahead of the GPU."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu = []
    for _ in range(5):
        torch.cuda._sleep(50_000_000)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / iters)
    host_start = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - host_start) * 1e3 / iters
    torch.cuda.synchronize()
    return statistics.median(gpu), host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[128, 256, 56, 56])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--channels-last", action="store_true", help="time a channels_last input (4-D shapes)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: CUDA is not available here; nothing to time.")
        return 0

    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.shape, device="cuda", dtype=dtype)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    channel_dims = [d for d in range(x.dim()) if d != 1]
    std, mean = torch.std_mean(x.float(), channel_dims)
    in_bytes = x.numel() * x.element_size()

    rows = []  # (what, (GPU ms, host ms), bytes moved, stored bytes)
    out = torch.empty_like(x)
    rows.append(("plain copy", _time_ms(lambda: out.copy_(x), args.iters), 2 * in_bytes, in_bytes))
    for bits in args.bits:
        cases = {
            f"anchored {bits}-bit": lambda b=bits: pack_anchored(x, b, mean=mean, std=std),
            f"group {bits}-bit": lambda b=bits: pack_groups(x, b),
        }
        for name, pack in cases.items():
            packed = pack()
            moved = in_bytes + packed.nbytes
            rows.append((f"{name} pack", _time_ms(pack, args.iters), moved, packed.nbytes))
            rows.append((f"{name} unpack", _time_ms(lambda p=packed: unpack(p), args.iters), moved, packed.nbytes))
    mask = x > 0
    packed = pack_mask(mask)
    moved = mask.numel() + packed.nbytes
    rows.append(("mask 1-bit pack", _time_ms(lambda: pack_mask(mask), args.iters), moved, packed.nbytes))
    rows.append(("mask 1-bit unpack", _time_ms(lambda: unpack(packed), args.iters), moved, packed.nbytes))

    layout = "channels_last" if args.channels_last else "contiguous"
    print(f"{torch.cuda.get_device_name()}  input {tuple(x.shape)} {args.dtype} {layout}, {in_bytes / 2**20:.0f} MiB")
    print(f"{'kernel':<24}{'GPU ms':>9}{'GB/s':>7}{'host ms':>9}{'stored MiB':>12}{'ratio':>7}")
    for name, (ms, host_ms), moved, stored in rows:
        print(
            f"{name:<24}{ms:>9.3f}{moved / ms / 1e6:>7.0f}{host_ms:>9.3f}{stored / 2**20:>12.1f}{in_bytes / stored:>7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
