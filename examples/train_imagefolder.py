"""Train on your own images (a torchvision ImageFolder), exactly and with graphpass, and compare.

ROOT holds one folder per class (``ROOT/cat/x.png``, ``ROOT/dog/y.jpg``); if it has ``train/``
and ``val/`` subfolders those are the split, otherwise ``--val-fraction`` of each epoch's data is
held out by a fixed random split. Images are resized to ``--image`` pixels. The methods and
options are those of ``train_digits.py``::

    python examples/train_imagefolder.py ~/data/flowers --image 64 --batch 32 --methods exact,4bit
    python examples/train_imagefolder.py ~/data/flowers --model torchvision:resnet18 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Data, PreActResNet, add_training_args, run_all  # noqa: E402


class FolderData(Data):
    """ImageFolder splits streamed by DataLoaders (random flips on the training side)."""

    def __init__(self, root: Path, *, image: int, val_fraction: float, workers: int, limit: int) -> None:
        from torchvision import datasets, transforms

        if not root.is_dir():
            raise SystemExit(f"{root}: no such folder (expected ROOT/<class>/<image files>)")
        norm = transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        train_tf = transforms.Compose(
            [transforms.Resize((image, image)), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]
        )
        test_tf = transforms.Compose([transforms.Resize((image, image)), transforms.ToTensor(), norm])
        if (root / "train").is_dir() and (root / "val").is_dir():
            train: Dataset = datasets.ImageFolder(root / "train", train_tf)
            test: Dataset = datasets.ImageFolder(root / "val", test_tf)
            classes = train.classes
        else:
            train_all = datasets.ImageFolder(root, train_tf)
            test_all = datasets.ImageFolder(root, test_tf)
            order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(0)).tolist()
            n_test = max(1, int(len(order) * val_fraction))
            train, test = Subset(train_all, order[n_test:]), Subset(test_all, order[:n_test])
            classes = train_all.classes
        if limit:
            train = Subset(train, range(min(limit, len(train))))
            test = Subset(test, range(min(limit, len(test))))
        self.train, self.test = train, test
        self.num_classes = len(classes)
        self.workers = workers
        self.description = f"ImageFolder {root} ({self.num_classes} classes) at {image}x{image}"

    def example(self, batch: int) -> torch.Tensor:
        return next(iter(DataLoader(self.train, batch_size=batch)))[0]

    def train_batches(self, batch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        loader = DataLoader(
            self.train,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=self.workers,
            generator=torch.Generator().manual_seed(seed),
        )
        torch.manual_seed(seed)  # the random flips of the main process (workers are seeded by the loader)
        yield from loader

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from DataLoader(self.test, batch_size=256, num_workers=self.workers)

    def sizes(self) -> tuple[int, int]:
        return len(self.train), len(self.test)


def build_model(spec: str, num_classes: int):  # noqa: ANN201
    if spec == "small":
        return PreActResNet(3, num_classes)
    source, _, name = spec.partition(":")
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise SystemExit(f"--model {spec!r}: use small, torchvision:NAME or timm:NAME")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="ImageFolder root: one folder per class, or train/ and val/")
    add_training_args(p, epochs=10, lr=0.05)
    p.add_argument("--model", default="small", help="small (a CIFAR-style pre-activation ResNet), torchvision:NAME or timm:NAME")
    p.add_argument("--image", type=int, default=32, help="images are resized to IMAGE x IMAGE")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = p.parse_args(argv)
    data = FolderData(
        args.root, image=args.image, val_fraction=args.val_fraction, workers=args.workers, limit=args.limit
    )
    return run_all(args, lambda: build_model(args.model, data.num_classes), data)


if __name__ == "__main__":
    main()
