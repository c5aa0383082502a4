"""Test helpers: numerical equivalence of forward and gradients, node counts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from graphpass.ir import flatten_tensors

__all__ = ["assert_equivalent", "count_modules", "run_step"]


def _loss(out: Any) -> torch.Tensor:
    """A scalar that depends on every output element with distinct weights (so permutations show)."""
    if isinstance(out, torch.Tensor):
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float32).reshape(out.shape).to(out.device, out.dtype)
        return (out * w).sum()
    if isinstance(out, Mapping):
        return sum(_loss(v) for v in out.values())
    if isinstance(out, (tuple, list)):
        return sum(_loss(v) for v in out)
    if hasattr(out, "_asdict"):
        return _loss(tuple(out))
    raise TypeError(f"cannot build a loss from {type(out).__name__}")


def run_step(
    model: nn.Module, inputs: Sequence[torch.Tensor], loss_fn: Callable[[Any], torch.Tensor] = _loss
) -> tuple[Any, list[torch.Tensor | None], dict[str, torch.Tensor]]:
    """One forward and backward; returns outputs, input gradients and named parameter gradients."""
    model.zero_grad(set_to_none=True)
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = model(*xs)
    loss_fn(out).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, [x.grad for x in xs], grads


def assert_equivalent(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    rtol: float,
    atol: float,
    exact_forward: bool = False,
    param_names: Mapping[str, str] | None = None,
) -> None:
    """Outputs, input gradients and parameter gradients of ``candidate`` match ``reference``.

    Parameters are matched by name (``param_names`` maps candidate names to reference names where a
    rewrite renamed them); candidate parameters without a counterpart are ignored.
    """
    out_r, gin_r, g_r = run_step(reference, inputs)
    out_c, gin_c, g_c = run_step(candidate, inputs)
    flat_r, flat_c = list(flatten_tensors(out_r)), list(flatten_tensors(out_c))
    assert len(flat_r) == len(flat_c), f"{len(flat_c)} outputs, expected {len(flat_r)}"
    for i, (a, b) in enumerate(zip(flat_r, flat_c)):
        if exact_forward:
            assert torch.equal(a, b), f"output {i} differs: max abs diff {(a - b).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"output {i}: {m}")
    for i, (a, b) in enumerate(zip(gin_r, gin_c)):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"input {i} gradient: {m}")
    names = param_names or {n: n for n in g_c}
    compared = 0
    for cand_name, ref_name in names.items():
        if cand_name in g_c and ref_name in g_r:
            torch.testing.assert_close(
                g_c[cand_name], g_r[ref_name], rtol=rtol, atol=atol, msg=lambda m: f"gradient of {cand_name}: {m}"
            )
            compared += 1
    assert compared or not g_r, "no parameter gradients were compared; check param_names"


def count_modules(module: nn.Module, types: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, types) for m in module.modules())
