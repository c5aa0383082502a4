"""Train a small ResNet on real handwritten digits, exactly and with graphpass, and compare accuracy.

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, no download), upscaled to
32x32, a fixed stratified 80/20 split. Model: a small pre-activation BatchNorm ResNet (``--arch v1``
for the post-activation one). Methods (``--methods``): exact BatchNorm training, graphpass with 8-,
4- and 2-bit saved activations, and BatchNorm replaced by GroupNorm + Proxy Norm. Each method
trains from the same initial weights on the same batches per seed; the table gives the final test
accuracy, mean over seeds::

    python examples/train_digits.py --threads 1           # batch 128, 30 epochs, lr 0.05, 3 seeds, all methods
    python examples/train_digits.py --batch 4 --lr 0.01 --epochs 10 --methods exact,gn+pn --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ARCHITECTURES, TensorData, add_training_args, run_all  # noqa: E402


def load_digits_split(image: int = 32, limit: int = 0) -> TensorData:
    """Digits as (N, 1, image, image) float tensors normalized to zero mean and unit variance."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image, image), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=0, stratify=y.numpy()
    )
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train, y_test = y[idx_train], y[idx_test]
    if limit:
        x_train, y_train, x_test, y_test = x_train[:limit], y_train[:limit], x_test[:limit], y_test[:limit]
    return TensorData(
        x_train, y_train, x_test, y_test, num_classes=10, description=f"digits {image}x{image}"
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_args(p, epochs=30, lr=0.05)
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (doubled per stage)")
    p.add_argument(
        "--arch", choices=ARCHITECTURES, default="preact", help="pre-activation (v2) or post-activation (v1) ResNet"
    )
    args = p.parse_args(argv)
    data = load_digits_split(limit=args.limit)
    data.description += f", {args.arch} ResNet (BatchNorm)"
    widths = (args.width, 2 * args.width, 4 * args.width)
    return run_all(args, lambda: ARCHITECTURES[args.arch](1, data.num_classes, widths), data)


if __name__ == "__main__":
    main()
