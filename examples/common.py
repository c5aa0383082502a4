"""What the training examples share: the methods compared, a small ResNet, the training loop and
the accuracy table. Each method is the same model trained the same way (same seed, same batches);
only ``gp.transform``'s arguments differ.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import graphpass as gp
from graphpass.files import atomic_output

# method name -> gp.transform arguments (None: the model as written, exact BatchNorm training)
METHODS: dict[str, dict | None] = {
    "exact": None,
    "8bit": {"bits": 8, "norm": "keep"},
    "4bit": {"bits": 4, "norm": "keep"},
    "2bit": {"bits": 2, "norm": "keep"},
    "gn+pn": {"bits": None, "norm": "gn+pn"},
    "gn+pn+4bit": {"bits": 4, "norm": "gn+pn"},
}
DEFAULT_METHODS = ("exact", "8bit", "4bit", "2bit", "gn+pn")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


def stages(block: Callable[[int, int, int], nn.Module], widths: Sequence[int], blocks: int) -> nn.Sequential:
    """``blocks`` blocks per width; the first block of every stage after the first halves the size."""
    layers: list[nn.Module] = []
    cin = widths[0]
    for i, width in enumerate(widths):
        for j in range(blocks):
            layers.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
            cin = width
    return nn.Sequential(*layers)


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet with BatchNorm: a stem and one or more BasicBlocks per stage."""

    def __init__(
        self, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64), blocks: int = 1
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        self.layers = stages(BasicBlock, widths, blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class PreActBlock(nn.Module):
    """A pre-activation block (ResNet v2): every norm is followed by its activation."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn1(x))
        y = self.conv2(self.relu(self.bn2(self.conv1(a))))
        return y + (x if self.shortcut is None else self.shortcut(a))


class PreActResNet(nn.Module):
    """SmallResNet's pre-activation twin (ResNet v2), the design Proxy Norm was published on.

    In a post-activation ResNet (v1) the ReLU after each residual add has no norm in front of it,
    so ``norm="gn+pn"`` cannot centre it: those uncentred outputs feed every next block, and with
    GroupNorm, which unlike BatchNorm does not remove each channel's mean, training is slow. Here
    every BatchNorm is followed by its ReLU and becomes GroupNorm + PN-Act.
    """

    def __init__(
        self, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64), blocks: int = 1
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.layers = stages(PreActBlock, widths, blocks)
        cin = widths[-1]
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.layers(self.stem(x))))), 1))


ARCHITECTURES: dict[str, type[nn.Module]] = {"preact": PreActResNet, "v1": SmallResNet}


class Data:
    """A data set as the training loop sees it: seeded training batches and test batches."""

    num_classes: int
    description: str

    def example(self, batch: int) -> torch.Tensor:
        """A training batch of this size, to trace the model with."""
        raise NotImplementedError

    def train_batches(self, batch: int, generator: torch.Generator) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch in an order drawn from ``generator``, full batches only."""
        raise NotImplementedError

    def test_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def sizes(self) -> tuple[int, int]:
        """(training samples, test samples)."""
        raise NotImplementedError


class TensorData(Data):
    """Images held in memory, with random-translation augmentation of the training batches."""

    def __init__(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        *,
        num_classes: int,
        description: str,
        max_shift: int = 2,
    ) -> None:
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.num_classes = num_classes
        self.description = description
        self.max_shift = max_shift

    def example(self, batch: int) -> torch.Tensor:
        return self.x_train[:batch]

    def train_batches(self, batch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x_train), generator=generator)
        for i in range(len(order) // batch):
            idx = order[i * batch : (i + 1) * batch]
            yield _shift(self.x_train[idx], self.max_shift, generator), self.y_train[idx]

    def test_batches(self, batch: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.x_test), batch):
            yield self.x_test[i : i + batch], self.y_test[i : i + batch]

    def sizes(self) -> tuple[int, int]:
        return len(self.x_train), len(self.x_test)


def prepare(model: nn.Module, method: str, example: torch.Tensor, groups: int) -> nn.Module:
    """The model as ``method`` trains it: itself, or gp.transform's rewritten copy."""
    config = METHODS[method]
    if config is None:
        return model
    return gp.transform(model, (example,), groups=groups, **config)


def make_optimizer(model: nn.Module, norm: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; for norm="gn+pn" with Proxy Norm's parameter groups."""
    if norm == "gn+pn":
        # Proxy Norm's own recipe: decay on the proxy parameters, none on the norm affines.
        params = gp.proxy_norm_param_groups(model, weight_decay, other_weight_decay=weight_decay)
    else:
        params = model.parameters()
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def lr_schedule(opt: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from lr/warmup_steps to lr, then cosine decay to 0 at ``total_steps``."""
    warmup_steps = min(warmup_steps, total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padding): cheap augmentation."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    correct = total = 0
    device = next(model.parameters()).device
    for x, y in batches:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    model.train()
    return 100.0 * correct / max(1, total)


def train(
    build: Callable[[], nn.Module],
    method: str,
    data: Data,
    *,
    seed: int,
    batch: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    groups: int,
    device: torch.device,
    log: Callable[[str], None],
    warmup_epochs: int = 0,
) -> float:
    """Train one (method, seed) and return the final test accuracy in percent.

    The seed fixes the initial weights, the batch order and the augmentation, identically for
    every method. The learning rate rises linearly over ``warmup_epochs``, then follows a cosine
    schedule; partial last batches are dropped so BatchNorm never sees a batch of one.
    """
    n_train, _ = data.sizes()
    steps_per_epoch = n_train // batch
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch {batch} is larger than the training set ({n_train} samples)")
    torch.manual_seed(seed)
    model = prepare(build().to(device), method, data.example(batch).to(device), groups).train()
    opt = make_optimizer(model, (METHODS[method] or {}).get("norm", "keep"), lr, weight_decay)
    sched = lr_schedule(opt, steps_per_epoch * warmup_epochs, steps_per_epoch * epochs)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        total = 0.0
        for x, y in data.train_batches(batch, gen):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.item()
            if not math.isfinite(value):
                log(f"{method} seed {seed}: loss is {value} at epoch {epoch + 1}; stopping this run")
                return float("nan")
            total += value
        log(
            f"{method} seed {seed} epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    return accuracy(model, data.test_batches())


def add_training_args(p: argparse.ArgumentParser, *, epochs: int, lr: float, warmup: int = 0) -> None:
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds averaged per method")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST_SEED, FIRST_SEED+1, ...")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (cosine schedule)")
    p.add_argument("--warmup", type=int, default=warmup, help="epochs of linear learning-rate warm-up")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--groups", type=int, default=8, help="GroupNorm groups for gn+pn")
    p.add_argument("--limit", type=int, default=0, help="use only this many training and test samples (smoke tests)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (data stays on the CPU, batches move)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", metavar="F", help="write the per-seed accuracies as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress on stderr")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    return methods


def run_all(args: argparse.Namespace, build: Callable[[], nn.Module], data: Data) -> dict:
    """Train every method for every seed; print the accuracy table; write --json if asked."""
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = parse_methods(args.methods)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    results: dict[str, list[float]] = {}
    for method in methods:
        results[method] = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            acc = train(
                build,
                method,
                data,
                seed=seed,
                batch=args.batch,
                epochs=args.epochs,
                lr=args.lr,
                weight_decay=args.weight_decay,
                groups=args.groups,
                device=torch.device(args.device),
                log=log,
                warmup_epochs=args.warmup,
            )
            results[method].append(acc)
            log(f"{method} seed {seed}: test accuracy {acc:.2f}%")
    doc = {
        "description": data.description,
        "batch": args.batch,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "lr": args.lr,
        "warmup_epochs": args.warmup,
        "weight_decay": args.weight_decay,
        "train_samples": data.sizes()[0],
        "test_samples": data.sizes()[1],
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "results": {
            m: {"accuracy": accs, "mean": statistics.fmean(accs), "std": statistics.pstdev(accs)}
            for m, accs in results.items()
        },
    }
    print(format_table(doc))
    if args.json:
        with atomic_output(args.json, suffixes=(".json",)) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def format_table(doc: dict) -> str:
    results = doc["results"]
    ref = results.get("exact", {}).get("mean")
    lines = [
        f"{doc['description']}: batch {doc['batch']}, {doc['epochs']} epochs, {doc['seeds']} seeds, "
        f"{doc['train_samples']} train / {doc['test_samples']} test samples",
        f"{'method':<12} {'test acc % (mean)':>18} {'std':>6} {'vs exact':>9}   per seed",
    ]
    for m, r in results.items():
        delta = f"{r['mean'] - ref:+.2f}" if ref is not None else "-"
        seeds = " ".join(f"{a:.2f}" for a in r["accuracy"])
        lines.append(f"{m:<12} {r['mean']:>18.2f} {r['std']:>6.2f} {delta:>9}   {seeds}")
    return "\n".join(lines)
