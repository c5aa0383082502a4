"""The protocol between code that stores tensors for backward and saved-tensor discovery.

Discovery (``graphpass.saved_tensors``) installs a recorder while it runs a graph once. Any
pack hook that stores something for backward in its own format (the compression runtime) calls
:func:`record_pack` so the bytes it really keeps are attributed to the running node. Outside
discovery no recorder is installed and the call costs one context-variable read.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

__all__ = ["record_pack", "recording", "Recorder"]

# Recorder(original tensor, bytes actually stored, format name such as "full", "q4-layer", "mask1")
Recorder = Callable[[torch.Tensor, int, str], None]

_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("graphpass_recorder", default=None)


def record_pack(original: torch.Tensor, stored_nbytes: int, fmt: str) -> None:
    """Report that a pack hook keeps ``stored_nbytes`` for ``original`` (0 if it shares a copy)."""
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder(original, stored_nbytes, fmt)


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    token = _RECORDER.set(recorder)
    try:
        yield
    finally:
        _RECORDER.reset(token)
