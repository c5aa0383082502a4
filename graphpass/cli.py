"""The ``graphpass`` command: plan, export, bench.

MODEL = torchvision:NAME | timm:NAME | path/to/file.py:FACTORY
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from graphpass.errors import GraphpassError

__all__ = ["main", "build_parser"]

# subcommand -> "module:function" taking the parsed arguments and returning an exit code
_COMMANDS = {
    "plan": "graphpass.planning:plan_command",
    "export": "graphpass.onnx_export:export_command",
    "bench": "graphpass.bench:bench_command",
}


def _bits(text: str) -> int | None:
    if text.lower() in ("none", "32", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be 8, 4, 2 or none; got {text!r}") from None
    if value not in (8, 4, 2):
        raise argparse.ArgumentTypeError(f"--bits must be 8, 4, 2 or none; got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser, *, batch: int, image: int) -> None:
    p.add_argument("model", metavar="MODEL", help="torchvision:NAME | timm:NAME | path/to/file.py:FACTORY")
    p.add_argument("--batch", type=_positive, default=batch, help=f"batch size (default {batch})")
    p.add_argument("--image", type=_positive, default=image, help=f"image side in pixels (default {image})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphpass", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log pass progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="memory plan of one training step")
    _add_model_args(p, batch=32, image=224)
    p.add_argument("--bits", type=_bits, default=None, help="compress saved activations to 8, 4 or 2 bits")
    p.add_argument("--norm", choices=("keep", "gn+pn"), default="keep")
    p.add_argument("--groups", type=_positive, default=8, help="GroupNorm groups for --norm gn+pn")
    p.add_argument("--json", metavar="F", help="write the plan (and the baseline) as JSON")
    p.add_argument("--html", metavar="F", help="write an interactive chart of the plan")
    p.add_argument("--png", metavar="F", help="write the chart as PNG")
    p.add_argument("--svg", metavar="F", help="write the chart as SVG")
    p.add_argument("--measure", action="store_true", help="also run one real training step and measure its peak")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device for --measure")

    p = sub.add_parser("export", help="export the rewritten model to ONNX, checked")
    _add_model_args(p, batch=1, image=224)
    p.add_argument("-o", "--output", required=True, metavar="F.onnx")
    p.add_argument("--norm", choices=("keep", "gn+pn"), default="keep")
    p.add_argument("--groups", type=_positive, default=8)
    p.add_argument("--bits", type=_bits, default=None, help="compression points (vanish in export)")
    p.add_argument("--opset", type=int, default=21)

    p = sub.add_parser("bench", help="peak memory and step time: plain vs checkpoint vs graphpass")
    _add_model_args(p, batch=32, image=224)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if _cuda() else "cpu")
    p.add_argument("--bits", type=_bits, default=4)
    p.add_argument("--amp", action="store_true", help="also run under torch.autocast")
    p.add_argument("--steps", type=_positive, default=10, help="timed steps per method (median reported)")
    p.add_argument(
        "--cuda-graph", action="store_true", help="capture every method's whole training step in a CUDA graph (gp.capture_step)"
    )
    p.add_argument("--max-batch", type=_positive, metavar="MIB", help="find the largest batch fitting MIB of memory")
    p.add_argument("--json", metavar="F")
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr
    )
    module_name, _, func = _COMMANDS[args.command].partition(":")
    try:
        command = getattr(importlib.import_module(module_name), func)
        return int(command(args) or 0)
    except GraphpassError as e:
        print(f"graphpass {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"graphpass {args.command}: interrupted", file=sys.stderr)
        return 130
