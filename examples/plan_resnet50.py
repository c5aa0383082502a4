"""Where a ResNet-50 training step's memory goes, and what 4-bit saved activations change.

    python examples/plan_resnet50.py                       # batch 32, 224 px, plans only
    python examples/plan_resnet50.py --batch 4 --image 64 --measure   # also one real CPU step

Prints the plan of the plain model and of the 4-bit rewrite, the largest tensors autograd keeps
for backward, and with --measure the measured peak of one real training step next to the
prediction.
"""

from __future__ import annotations

import argparse
import sys

import torch

import graphpass as gp
from graphpass.measure import measure_training_step

MIB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--bits", type=int, default=4, choices=(8, 4, 2))
    parser.add_argument("--measure", action="store_true", help="run one real training step on the CPU")
    args = parser.parse_args()

    model = gp.load_model("torchvision:resnet50")
    # Meta inputs: the plan is computed from shapes alone, whatever the batch size.
    inputs = gp.example_inputs(args.batch, args.image, device="meta")
    plan = gp.plan(model, inputs, bits=args.bits, description=f"resnet50 batch {args.batch} {args.image}px")
    gp.verify_plan(plan)
    print(plan.summary())

    reference = plan.baseline
    kept = sorted(
        (t for t in reference.tensors if t.kind in ("saved", "internal") and t.start < reference.num_forward_steps < t.end),
        key=lambda t: -t.nbytes,
    )
    print("\nlargest tensors the plain model keeps for backward:")
    for t in kept[:8]:
        print(f"  {t.nbytes / MIB:9.1f} MiB  {t.kind:9} {t.name}  ({t.module})")

    if args.measure:
        real = gp.example_inputs(args.batch, args.image)
        measured = measure_training_step(model, real)
        print(
            f"\nplain model, one CPU training step: predicted {reference.predicted_peak_bytes / MIB:.1f} MiB, "
            f"measured {measured / MIB:.1f} MiB ({reference.predicted_peak_bytes / measured - 1:+.1%})"
        )
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
