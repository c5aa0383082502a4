"""Measured peak memory of one real training step (forward, loss, backward, SGD step).

- CUDA: the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: a tracker of live tensor storage bytes. A TorchDispatchMode sees every tensor an operator
  returns; the first time a storage appears its bytes are added and a finalizer on the storage
  subtracts them when the storage is really freed (storage finalizers fire when the StorageImpl
  dies, so tensors that autograd keeps for backward stay counted after Python drops them).
  Parameters, buffers and inputs are counted from the start. Scratch memory that a kernel
  allocates and frees inside one operator is not a tensor storage and is not counted.

The loss is ``sum(out.float().square().mean())`` over the model's floating-point outputs: its
gradient with respect to each output is a tensor of the output's size, as with a real loss.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from graphpass.errors import InputError
from graphpass.ir import flatten_tensors

__all__ = ["training_loss", "measure_training_step", "StorageTracker"]


def training_loss(out: Any) -> torch.Tensor:
    """The scalar loss a measured step backpropagates from (see module docstring)."""
    losses = [t.float().square().mean() for t in flatten_tensors(out) if t.is_floating_point() and t.requires_grad]
    if not losses:
        raise InputError("the model returns no floating-point tensor that requires grad: nothing to train")
    return torch.stack(losses).sum()


class StorageTracker(TorchDispatchMode):
    """Live bytes of tensor storages created while the mode is active, and their peak."""

    def __init__(self, existing: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # StorageImpl address -> bytes
        self.current = 0
        self.peak = 0
        for t in existing:
            self._add(t, finalize=False)

    def _add(self, t: torch.Tensor, *, finalize: bool = True) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # sparse or other storage-less layouts
        key = storage._cdata
        if key in self.live:
            return
        nbytes = storage.nbytes()
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        if finalize:
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in flatten_tensors(out):
            self._add(t)
        return out


def measure_training_step(model: nn.Module, inputs: Sequence[Any], *, device: str = "cpu") -> int:
    """Peak bytes of one training step of ``model`` on ``device``, parameters and inputs included.

    ``inputs`` are moved to ``device``; meta tensors are replaced by random ones of their shape.
    The model is moved to ``device``, put in train mode and trained one SGD step.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available; use --device cpu")
    model.to(device).train()
    real = [
        (torch.randn(x.shape, dtype=x.dtype, device=device) if x.is_meta else x.to(device))
        if isinstance(x, torch.Tensor) else x
        for x in inputs
    ]
    for p in model.parameters():
        p.grad = None
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        out = model(*real)
        loss = training_loss(out)
        loss.backward()
        optimizer.step()
        del out, loss

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        existing = [*model.parameters(), *model.buffers(), *(x for x in real if isinstance(x, torch.Tensor))]
        tracker = StorageTracker(existing)
        with tracker:
            step()
        peak = tracker.peak
    for p in model.parameters():
        p.grad = None
    return int(peak)
