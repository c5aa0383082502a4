"""Typed errors. Everything a user can cause raises a :class:`GraphpassError` subclass whose
message names the module, node or argument at fault and says what to do."""

from __future__ import annotations

__all__ = [
    "GraphpassError",
    "ModelSpecError",
    "TraceError",
    "InputError",
    "PassError",
    "MissingAnalysisError",
    "PlanError",
    "UnsupportedError",
    "ExportError",
]


class GraphpassError(Exception):
    """Base class of every error graphpass raises on bad input or an impossible request."""


class ModelSpecError(GraphpassError):
    """A MODEL string (``torchvision:NAME``, ``timm:NAME``, ``file.py:FACTORY``) cannot be resolved."""


class TraceError(GraphpassError):
    """torch.fx cannot trace the model (data-dependent control flow, unsupported Python)."""


class InputError(GraphpassError):
    """Example inputs do not fit the model, or an argument is out of range."""


class PassError(GraphpassError):
    """A pass failed; the message names it and the passes that ran before it."""


class MissingAnalysisError(GraphpassError):
    """Node metadata that an analysis pass writes is absent."""


class PlanError(GraphpassError):
    """A memory plan is unsound: two tensors overlap in both time and space."""


class UnsupportedError(GraphpassError):
    """The graph contains something a pass cannot handle."""


class ExportError(GraphpassError):
    """ONNX export or its check failed."""
