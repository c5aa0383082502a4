"""Compressed saved activations on real models: exact forward, and the bytes autograd keeps."""

import copy
import gc

import pytest
import torch
import torchvision
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from graphpass.tracing import trace
from passes.insert_quantize_on_save import insert_quantize_on_save

pytestmark = pytest.mark.slow

# name -> (constructor arguments, image size): small inputs keep the CPU time down.
MODELS = {
    "resnet18": ({}, 32),
    "resnet50": ({}, 32),
    "mobilenet_v3_large": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "densenet121": ({}, 32),
    "vit_b_16": ({"image_size": 32}, 32),
    "swin_t": ({}, 32),
}


def transformed(model: torch.nn.Module, example, bits: int) -> torch.fx.GraphModule:
    gm = trace(copy.deepcopy(model), example)
    insert_quantize_on_save(gm, bits=bits)
    gm.recompile()
    return gm


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_is_identical_and_backward_runs(name):
    kwargs, image = MODELS[name]
    model = torchvision.models.get_model(name, weights=None, **kwargs).train()
    x = torch.randn(2, 3, image, image)
    gm = transformed(model, (x,), bits=4)
    torch.manual_seed(1)  # stochastic depth and dropout draw the same numbers in both runs
    expected = model(x)
    torch.manual_seed(1)
    out = gm(x)
    assert torch.equal(out, expected)
    out.square().sum().backward()
    grads = [p.grad for p in gm.parameters() if p.grad is not None]
    assert len(grads) == len([p for p in gm.parameters() if p.requires_grad])
    assert all(torch.isfinite(g).all() for g in grads)


class _NewStorages(TorchDispatchMode):
    """Remembers (weakly) every storage an operator creates."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        return out


def bytes_held_after_forward(model: torch.nn.Module, batch: int, image: int, device: str) -> int:
    """Bytes of storages created during one training forward (the input included) that are still
    alive once the caller has dropped the input: what autograd keeps for backward. The output and
    the parameters and buffers are left out. Independent of graphpass's own accounting."""
    tracker = _NewStorages()
    with tracker:
        x = torch.randn(batch, 3, image, image, device=device)
        out = model(x)
    del x
    gc.collect()
    excluded = {out.untyped_storage()._cdata}
    excluded |= {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    return sum(n for key, (ref, n) in tracker.storages.items() if not ref.expired() and key not in excluded)


def test_resnet50_saved_bytes_at_8_4_2_bits():
    """Batch 8, 224x224. Meta tensors: the sizes are those of a real run, without the compute."""
    model = torchvision.models.resnet50(weights=None).train().to("meta")
    plain = bytes_held_after_forward(model, 8, 224, "meta")
    assert 640 * 2**20 < plain < 670 * 2**20  # about 656 MiB
    for bits, max_fraction in ((8, 1 / 3.5), (4, 1 / 7), (2, 1 / 12)):
        gm = transformed(model, None, bits=bits)
        held = bytes_held_after_forward(gm, 8, 224, "meta")
        # The README's figures (pytest -s).
        print(f"{bits} bits: {held / 2**20:.1f} MiB of {plain / 2**20:.1f} MiB (1/{plain / held:.2f})")
        assert held <= plain * max_fraction, f"{bits} bits: {held / 2**20:.1f} MiB of {plain / 2**20:.1f} MiB"


def test_saved_bytes_on_cpu_match_meta():
    """The meta measurement above is what a real run keeps (small ResNet-18 on the CPU)."""
    model = torchvision.models.resnet18(weights=None).train()
    gm = transformed(model, (torch.randn(2, 3, 32, 32),), bits=4)
    cpu = bytes_held_after_forward(gm, 2, 32, "cpu")
    meta = bytes_held_after_forward(copy.deepcopy(gm).to("meta"), 2, 32, "meta")
    assert cpu == meta
