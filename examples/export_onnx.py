"""Rewrite a torchvision model for memory-lean training, then export it for inference, checked.

    python examples/export_onnx.py --model resnet50 --out-dir out/

writes out/<model>-opset21.onnx (GroupNormalization-21), out/<model>-opset17.onnx (GroupNorm
decomposed for older runtimes), out/<model>-train-annotated.onnx (the training forward graph with
each quantize-on-save point marked, for Netron) and out/<model>-plan.html (the memory plan).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import graphpass as gp
from graphpass.onnx_export import export_training_graph


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="torchvision model name")
    parser.add_argument("--image", type=int, default=64, help="image side (vit_* needs 224)")
    parser.add_argument("--bits", type=int, default=4, choices=(8, 4, 2))
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    args = parser.parse_args()

    model = gp.load_model(f"torchvision:{args.model}")
    inputs = gp.example_inputs(2, args.image)
    gm = gp.transform(model, inputs, bits=args.bits, norm="gn+pn")
    plan = gp.plan(model, gp.example_inputs(2, args.image, device="meta"), bits=args.bits, norm="gn+pn")

    for opset in (21, 17):
        report = gp.export_onnx(gm, inputs, args.out_dir / f"{args.model}-opset{opset}.onnx", opset=opset, plan=plan)
        print(report.summary())
    annotated = export_training_graph(gm, inputs, args.out_dir / f"{args.model}-train-annotated.onnx")
    print(annotated.summary())
    gp.draw(plan, args.out_dir / f"{args.model}-plan.html")
    print(plan.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
