"""A whole training step captured in one CUDA graph, so that replaying it costs the host nothing.

graphpass's runtime does per-layer work in Python (its saved-tensor hooks, the tables and
launches of each layer), which on a fast GPU can take longer than the step's kernels. A
transformed model never syncs with the host and allocates the same shapes every step, so its
whole training step (forward, backward, optimizer) can be captured once and replayed, as
PyTorch's "whole-network capture" recipe does for any model
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs)::

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(static_x), static_y).backward()
        optimizer.step()

    replay = gp.capture_step(step)
    for x, y in loader:
        static_x.copy_(x); static_y.copy_(y)
        replay()

The same rules as for any captured step apply: inputs are read from the tensors the step used
while it was captured (copy new batches into them), no host synchronisation inside the step,
autocast with ``cache_enabled=False``, and stochastic rounding is refused (its seed is drawn on
the host, so every replay would reuse it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from graphpass.errors import InputError, UnsupportedError

__all__ = ["capture_step", "DEFAULT_WARMUP_STEPS"]

DEFAULT_WARMUP_STEPS = 3  # eager steps on a side stream first: optimizer state, cuDNN plans, Triton compiles


def capture_step(
    step: Callable[[], Any], *, warmup_steps: int = DEFAULT_WARMUP_STEPS, device: torch.device | str | None = None
) -> Callable[[], None]:
    """Run ``step`` ``warmup_steps`` times eagerly (on a side stream, as the recipe asks), record one
    more run into a CUDA graph, and return the function that replays it: each call is one training
    step. Recording launches nothing, so the model has taken exactly ``warmup_steps`` steps when
    this returns. Memory that the step allocates comes from the graph's private pool, which stays
    reserved for the replays.
    """
    if not torch.cuda.is_available():
        raise InputError("capture_step: CUDA graphs need a CUDA device; none is available here")
    if warmup_steps < 1:
        raise InputError(f"capture_step: warmup_steps={warmup_steps} must be at least 1 (optimizer state is made eagerly)")
    device = torch.device("cuda") if device is None else torch.device(device)
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()
        except RuntimeError as e:  # torch's AcceleratorError and CUDA errors derive from it
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedError(
                f"capture_step: the step could not be recorded as a CUDA graph ({first}). An op in it synchronizes "
                "with the host, or autograd reuses a node made on the default stream by an earlier eager run; "
                "train it eagerly, in a fresh process: a failed capture can leave CUDA state unusable"
            ) from e
    return graph.replay
