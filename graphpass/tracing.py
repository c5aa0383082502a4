"""Model loading, torch.fx tracing and shape propagation on fake tensors.

Shapes are propagated under FakeTensorMode, so planning ResNet-152 at batch 256 allocates
nothing: example inputs may be meta tensors (see :func:`example_inputs`).
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import linecache
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphpass.errors import InputError, ModelSpecError, TraceError
from graphpass.meta import META_MODULE, META_TENSOR, TensorInfo, set_meta

__all__ = ["load_model", "example_inputs", "trace", "propagate_shapes", "fake_inputs", "check_input_count"]


def load_model(spec: str) -> nn.Module:
    """Build an untrained model from ``torchvision:NAME``, ``timm:NAME`` or ``path/file.py:FACTORY``."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ModelSpecError(
            f"MODEL {spec!r} is not of the form torchvision:NAME, timm:NAME or path/to/file.py:FACTORY"
        )
    if source == "torchvision":
        import torchvision

        available = torchvision.models.list_models()
        if name not in available:
            raise ModelSpecError(f"unknown torchvision model {name!r}{_did_you_mean(name, available)}")
        kwargs: dict[str, Any] = {"weights": None}
        if name in ("googlenet", "inception_v3"):
            kwargs["init_weights"] = True  # silences torchvision's future-default warning
        return torchvision.models.get_model(name, **kwargs)
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise ModelSpecError("timm models need timm: pip install 'graphpass[timm]'") from None
        available = timm.list_models()
        if name not in available:
            raise ModelSpecError(f"unknown timm model {name!r}{_did_you_mean(name, available)}")
        return timm.create_model(name, pretrained=False)
    return _load_factory(Path(source), name, spec)


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _load_factory(path: Path, factory: str, spec: str) -> nn.Module:
    if path.suffix != ".py":
        raise ModelSpecError(
            f"MODEL {spec!r}: source {str(path)!r} is neither 'torchvision', 'timm' nor a .py file"
        )
    if not path.is_file():
        raise ModelSpecError(f"MODEL {spec!r}: file {str(path)!r} does not exist")
    module_name = f"graphpass_user_{path.stem}"
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[module_name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise ModelSpecError(f"MODEL {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ModelSpecError(f"MODEL {spec!r}: {path} has no callable {factory!r}{_did_you_mean(factory, names)}")
    try:
        model = fn()
    except Exception as e:
        raise ModelSpecError(f"MODEL {spec!r}: factory {factory}() raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"MODEL {spec!r}: {factory}() returned {type(model).__name__}, not an nn.Module")
    return model


def example_inputs(batch: int = 4, image: int = 224, *, device: str | torch.device = "cpu") -> tuple[torch.Tensor]:
    """One image batch ``(batch, 3, image, image)``; ``device="meta"`` allocates nothing."""
    if batch < 0:
        raise InputError(f"--batch must be >= 0, got {batch}")
    if image <= 0:
        raise InputError(f"--image must be > 0, got {image}")
    return (torch.randn(batch, 3, image, image, device=device),)


class _Tracer(torch.fx.Tracer):
    """fx tracer that records which module's forward created each node and honours leaf types."""

    def __init__(self, leaf_types: tuple[type, ...], autowrap_functions: tuple = ()) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaf_types = leaf_types + _default_leaves()
        self.gp_module_stack: list[str] = [""]
        self.failed_module: str | None = None  # innermost module whose forward raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.gp_module_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.gp_module_stack[-1]
            raise
        finally:
            self.gp_module_stack.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        module = node.target if node.op == "call_module" else self.gp_module_stack[-1]
        node.meta[META_MODULE] = module
        return node


def _default_leaves() -> tuple[type, ...]:
    """Modules that always stay opaque calls.

    graphpass's own norm modules, so re-tracing a transformed model keeps them as modules (export
    and compression find them by type); and modules whose forward branches on ``self.training``:
    traced inline, the branch taken at trace time would be baked into the graph (random drops even
    in eval).
    """
    from graphpass.proxy_norm import ProxyNormAct, ScaledGroupNorm

    leaves: list[type] = [ProxyNormAct, ScaledGroupNorm]
    try:
        from torchvision.ops import StochasticDepth

        leaves.append(StochasticDepth)
    except ImportError:
        pass
    try:
        from timm.layers import DropPath

        leaves.append(DropPath)
    except ImportError:
        pass
    return tuple(leaves)


def _timm_tracer_config(model: nn.Module) -> tuple[tuple[type, ...], tuple]:
    """timm marks modules and functions that fx cannot trace; reuse its lists for timm models."""
    if not type(model).__module__.startswith("timm."):
        return (), ()
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return (), ()
    leaves = tuple(getattr(timm_fx, "_leaf_modules", ()))
    functions = tuple(getattr(timm_fx, "_autowrap_functions", ()))
    return leaves, functions


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    leaf_modules: Sequence[type] = (),
) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` (not copied: callers pass a copy they own).

    With ``example_inputs``, shapes are propagated on fake tensors into ``graphpass.tensor``.
    Raises TraceError naming the module and source line of data-dependent control flow.
    """
    timm_leaves, timm_functions = _timm_tracer_config(model)
    tracer = _Tracer(tuple(leaf_modules) + timm_leaves, timm_functions)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise _trace_error(model, tracer, e) from e
    name = type(model).__name__
    gm = torch.fx.GraphModule(tracer.root, graph, name)
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    return gm


def _trace_error(model: nn.Module, tracer: _Tracer, error: Exception) -> TraceError:
    module_path = tracer.failed_module or ""
    module = model.get_submodule(module_path) if module_path else model
    where = _user_frame(error)
    location = f" at {where}" if where else ""
    what = f"module {module_path!r} ({type(module).__name__})" if module_path else f"model {type(model).__name__}"
    hint = (
        f"mark it as a leaf so it runs opaquely: gp.transform(..., leaf_modules=[{type(module).__name__}])"
        if module_path
        else "move the data-dependent part into a submodule and pass it as leaf_modules"
    )
    return TraceError(f"cannot trace {what}{location}: {type(error).__name__}: {error}; {hint}")


def _user_frame(error: Exception) -> str | None:
    """The innermost traceback frame outside torch and graphpass, as 'file:line: source'."""
    torch_dir = str(Path(torch.__file__).parent)
    own_dir = str(Path(__file__).parent)
    found = None
    for frame in traceback.extract_tb(error.__traceback__):
        if frame.filename.startswith((torch_dir, own_dir)) or frame.filename.startswith("<"):
            continue
        found = frame
    if found is None:
        return None
    line = (found.line or linecache.getline(found.filename, found.lineno)).strip()
    return f"{found.filename}:{found.lineno}: `{line}`"


def fake_inputs(mode: FakeTensorMode, inputs: Sequence[Any], device: torch.device | None = None) -> list[Any]:
    """Fake copies of ``inputs`` (real or meta tensors) that allocate nothing.

    ``device`` places them beside the model's parameters (a meta input for a CPU model becomes a
    fake CPU tensor; any input for a meta model a fake meta tensor).
    """
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            target = device or (torch.device("cpu") if x.is_meta else x.device)
            with mode:
                out.append(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=target))
        else:
            out.append(x)
    return out


def _parameter_device(gm: torch.fx.GraphModule) -> torch.device | None:
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return None


def check_input_count(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """InputError unless ``example_inputs`` fill the graph's required inputs and no more."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders with args carry a default
    if not len(required) <= len(example_inputs) <= len(placeholders):
        raise InputError(
            f"{type(gm).__name__} takes {len(required)} to {len(placeholders)} input(s) "
            f"({', '.join(n.name for n in placeholders)}) but {len(example_inputs)} example input(s) were given"
        )


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run the graph on fake tensors and record a TensorInfo for every node."""
    check_input_count(gm, example_inputs)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    prop = _NamedFakeTensorProp(gm, mode)
    with buffers_kept(gm):
        prop.propagate_dont_convert_inputs(*fake_inputs(mode, example_inputs, _parameter_device(gm)))
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        set_meta(node, META_TENSOR, _info(val))


@contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Restore the real buffers that a fake-tensor run changed in place. Under FakeTensorMode with
    real inputs allowed, BatchNorm's ``num_batches_tracked.add_(1)`` reaches the real counter: every
    shape propagation counted a training step."""
    kept = [(b, b._version, b.detach().clone()) for b in module.buffers() if not b.is_meta]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, version, value in kept:
                if buffer._version != version:
                    buffer.copy_(value)


class _NamedFakeTensorProp(FakeTensorProp):
    """FakeTensorProp whose errors name the node, its module and the input shapes."""

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as e:
            args = [a.meta.get("val") for a in n.all_input_nodes]
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            module = n.meta.get(META_MODULE, "")
            raise InputError(
                f"node {n.name} ({n.op} {_target_name(n)}) in module {module!r} fails on inputs of shape "
                f"[{shapes}]: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                "check the example inputs' shape (--batch/--image) against what the model expects"
            ) from e


def _target_name(n: torch.fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    return getattr(n.target, "__name__", str(n.target))


def _info(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return TensorInfo.of(val)
    if isinstance(val, (tuple, list)):
        return tuple(_info(v) for v in val)
    return None
