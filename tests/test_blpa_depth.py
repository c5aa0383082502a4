"""The BLPA claim on a deep plain CNN (Conv-BN-ReLU stack): quantizing the forward activations
themselves makes the gradient error grow with depth, because every layer computes on perturbed
inputs and the errors compound; graphpass keeps the forward exact and compresses only the copies
saved for backward, so the error stays local to each layer and does not grow with depth.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import graphpass as gp

BITS = 4
DEPTHS = (2, 8, 16)


class NaiveQuant(nn.Module):
    """Per-tensor min/max K-bit quantization in the forward pass, straight-through in backward."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.min().detach(), x.max().detach()
        step = (hi - lo).clamp_min(1e-12) / (2**self.bits - 1)
        q = torch.round((x - lo) / step) * step + lo
        return x + (q - x).detach()


def plain_cnn(depth: int, width: int = 16, naive_bits: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(depth):
        layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        if naive_bits:
            layers.append(NaiveQuant(naive_bits))
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    pairs = zip((m for m in src.modules() if isinstance(m, kinds)), (m for m in dst.modules() if isinstance(m, kinds)))
    for s, d in pairs:
        d.load_state_dict(s.state_dict())


def conv_weight_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([m.weight.grad.flatten() for m in model.modules() if isinstance(m, nn.Conv2d)])


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def gradient_errors(depth: int) -> tuple[float, float]:
    """(naive, graphpass) relative error of all convolution weight gradients against exact training."""
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(depth)
    exact = plain_cnn(depth)
    naive = plain_cnn(depth, naive_bits=BITS)
    copy_weights(exact, naive)
    compressed = gp.transform(copy.deepcopy(exact), (x,), bits=BITS)
    reference = conv_weight_grads(exact, x, y)
    return (
        relative_error(conv_weight_grads(naive, x, y), reference),
        relative_error(conv_weight_grads(compressed, x, y), reference),
    )


def test_gradient_error_grows_with_depth_under_naive_quantization_but_not_with_graphpass():
    errors = {d: gradient_errors(d) for d in DEPTHS}
    naive = {d: e[0] for d, e in errors.items()}
    ours = {d: e[1] for d, e in errors.items()}
    shallow, deep = DEPTHS[0], DEPTHS[-1]
    report = f"naive {naive}, graphpass {ours}"
    # Measured (torch 2.14, CPU): naive 0.27 -> 0.91 -> 1.26, graphpass 0.11 -> 0.13 -> 0.13.
    assert naive[DEPTHS[1]] > naive[shallow] and naive[deep] >= 3 * naive[shallow], report
    assert ours[deep] <= 1.5 * ours[shallow], report
    assert all(e <= 0.25 for e in ours.values()), report
    assert ours[deep] * 4 <= naive[deep], report
