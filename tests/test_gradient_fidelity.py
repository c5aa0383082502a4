"""Gradient fidelity of compressed saved activations on ResNet-50 against exact training, and the
gap to a naive per-tensor quantizer of everything autograd saves (the issue's done-when check)."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from graphpass.tracing import trace
from passes.insert_quantize_on_save import insert_quantize_on_save


def parameter_gradients(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """All parameter gradients of one cross-entropy step, concatenated."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), labels).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def naive_per_tensor_hooks(bits: int) -> torch.autograd.graph.saved_tensors_hooks:
    """Quantize every float tensor autograd saves with one min/max scale per tensor."""
    levels = 2**bits - 1

    def pack(t):
        if not t.is_floating_point() or isinstance(t, torch.nn.Parameter):
            return t
        low = t.min()
        step = (t.max() - low).clamp_min(1e-12) / levels
        return torch.round((t - low) / step).to(torch.uint8), low, step, t.dtype

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        codes, low, step, dtype = packed
        return (codes.float() * step + low).to(dtype)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


@pytest.mark.slow
def test_resnet50_gradient_cosine_8_and_4_bits_and_the_naive_gap():
    model = torchvision.models.resnet50(weights=None).train()
    x = torch.randn(8, 3, 96, 96)
    labels = torch.randint(0, 1000, (8,))
    exact = parameter_gradients(model, x, labels)
    cosines = {}
    for bits in (8, 4, 2):
        gm = trace(copy.deepcopy(model))
        insert_quantize_on_save(gm, bits=bits)
        gm.recompile()
        cosines[bits] = F.cosine_similarity(parameter_gradients(gm, x, labels), exact, dim=0).item()
    with naive_per_tensor_hooks(4):
        naive = F.cosine_similarity(parameter_gradients(copy.deepcopy(model), x, labels), exact, dim=0).item()
    print(f"gradient cosine to exact: {cosines}, naive 4-bit {naive:.4f}")  # the README's figures (pytest -s)
    assert cosines[8] >= 0.99, cosines
    assert cosines[4] >= 0.97, cosines
    assert naive < 0.6 and cosines[4] - naive > 0.3, (naive, cosines)
    assert cosines[8] > cosines[4] > cosines[2] > naive, (naive, cosines)
