"""graphpass: torch.fx passes that make PyTorch training use far less memory.

Public API (see DESIGN contract)::

    gm = gp.transform(model, example_inputs, bits=4, norm="keep", groups=8)
    plan = gp.plan(model, example_inputs, bits=None, norm="keep")
    gp.verify_plan(plan)
    gp.export_onnx(gm, example_inputs, "model.onnx", opset=21)
    gp.draw(plan, "plan.html")
    replay = gp.capture_step(train_step)  # a whole training step as one CUDA graph

Heavy optional pieces (onnx, matplotlib, triton) load only when their function is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from graphpass.api import TransformConfig, transform
from graphpass.errors import (
    ExportError,
    GraphpassError,
    InputError,
    MissingAnalysisError,
    ModelSpecError,
    PassError,
    PlanError,
    TraceError,
    UnsupportedError,
)
from graphpass.pass_base import PassKind, PassResult, graph_pass
from graphpass.pass_manager import PassManager
from graphpass.tracing import example_inputs, load_model, trace

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access.
_LAZY = {
    "plan": "graphpass.planning",
    "MemoryPlan": "graphpass.memory_plan",
    "PlannedTensor": "graphpass.memory_plan",
    "verify_plan": "graphpass.memory_plan",
    "export_onnx": "graphpass.onnx_export",
    "draw": "graphpass.visualize",
    "ProxyNormAct": "graphpass.proxy_norm",
    "proxy_norm_param_groups": "graphpass.proxy_norm",
    "capture_step": "graphpass.cuda_graph",
}

__all__ = [
    "__version__",
    "transform",
    "TransformConfig",
    "trace",
    "load_model",
    "example_inputs",
    "PassManager",
    "PassResult",
    "PassKind",
    "graph_pass",
    "GraphpassError",
    "ModelSpecError",
    "TraceError",
    "InputError",
    "PassError",
    "MissingAnalysisError",
    "PlanError",
    "UnsupportedError",
    "ExportError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'graphpass' has no attribute {name!r}")
