"""How close compressed training's gradients are to exact training's, on any model.

    PYTHONPATH=. python examples/gradient_fidelity.py [--model torchvision:resnet50] [--batch 8]
                                                      [--image 96] [--bits 8,4,2] [--seed 0]
                                                      [--top 5] [--json FILE]

One cross-entropy step (random images and labels, the model's own random initialization under
``--seed``) runs exactly and through ``gp.transform(model, x, bits=K)`` for each K. The forward
outputs must be equal (graphpass never changes the forward pass); the script reports the cosine
similarity of all parameter gradients together to the exact ones, and the parameters that carry
the largest share of the squared difference, which is where to look when a model's figure is low.
The model is in training mode, as it trains; dropout and stochastic depth draw the same numbers in
every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
import torch.nn.functional as F

import graphpass as gp
from graphpass.files import atomic_output


def parameter_gradients(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, seed: int):
    """(output, {name: gradient}) of one cross-entropy step; parameters without a gradient left out."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in every run
    out = model(x)
    F.cross_entropy(out, labels).backward()
    return out.detach(), {n: p.grad.double().flatten() for n, p in model.named_parameters() if p.grad is not None}


def compare(exact: dict[str, torch.Tensor], got: dict[str, torch.Tensor], top: int) -> dict[str, object]:
    if set(got) != set(exact):
        raise RuntimeError(f"gradients of different parameters: {sorted(set(got) ^ set(exact))[:5]}")
    ref = torch.cat(list(exact.values()))
    new = torch.cat([got[n] for n in exact])
    squared = {n: (got[n] - g).square().sum().item() for n, g in exact.items()}
    total = sum(squared.values()) or 1.0
    worst = sorted(squared, key=squared.get, reverse=True)[:top]
    return {
        "cosine": F.cosine_similarity(new, ref, dim=0).item(),
        "relative error": ((new - ref).norm() / ref.norm()).item(),
        "largest error shares": {n: squared[n] / total for n in worst},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=96)
    parser.add_argument("--bits", default="8,4,2", help="comma-separated bit widths (8, 4, 2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model's initialization and the data")
    parser.add_argument("--top", type=int, default=5, help="parameters listed per bit width")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    try:
        bit_widths = [int(b) for b in args.bits.split(",")]
    except ValueError:
        parser.error(f"--bits: {args.bits!r} is not a comma-separated list of integers")
    json_out = atomic_output(args.json, suffixes=(".json",)) if args.json else contextlib.nullcontext()
    with json_out as tmp:
        torch.manual_seed(args.seed)
        model = gp.load_model(args.model).train()
        x = torch.randn(args.batch, 3, args.image, args.image)
        with torch.no_grad():
            classes = model(x).shape[1]
        labels = torch.randint(0, classes, (args.batch,))
        out, exact = parameter_gradients(model, x, labels, args.seed)
        print(f"{args.model}, batch {args.batch}, {args.image} px, seed {args.seed}: {len(exact)} parameter gradients")
        results = {}
        for bits in bit_widths:
            compressed = gp.transform(model, (x,), bits=bits)
            out_c, got = parameter_gradients(compressed, x, labels, args.seed)
            if not torch.equal(out_c, out):
                raise RuntimeError(f"{bits}-bit: the forward output differs from the model's")
            result = results[bits] = compare(exact, got, args.top)
            print(f"  {bits}-bit: cosine {result['cosine']:.4f}, relative error {result['relative error']:.4f}; largest shares:")
            for name, share in result["largest error shares"].items():
                print(f"      {share:6.1%}  {name}")
        if tmp is not None:
            tmp.write_text(json.dumps({**vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
