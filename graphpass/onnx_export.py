"""Checked ONNX export of a (rewritten) model.

Training-only rewrites vanish at export: quantize-on-save points are identities in forward and are
removed; Proxy Norm folds into per-channel constants, since at inference PN-Act is
``(act(weight * gn(x) + bias) - mu~) * inv_std~`` = ``act(...) * s + t`` with ``s = inv_std~`` and
``t = -mu~ * inv_std~``. So the exported graph holds only standard ONNX ops:

* opset >= 21: ``GroupNormalization`` (per-channel scale and bias, the version-21 semantics);
* opset 17-20: its decomposition (Reshape, InstanceNormalization, Reshape, per-channel Mul/Add).
  Opset 18's GroupNormalization is never emitted: its scale is per *group* and ONNX 1.18
  deprecated it, so ``onnx.checker`` rejects it.

Every file is checked before it is moved into place: ``onnx.checker`` (full check), no
BatchNormalization after ``norm="gn+pn"``, no op outside the standard domain, the expected
GroupNorm form, and onnxruntime against PyTorch's eval output at the example batch and at another
batch (the batch axis is dynamic). The error reported is normwise:
``max |ort - torch| / max |torch|`` per output, which is meaningful for logits near zero where an
elementwise ratio is not.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import logging
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from graphpass.errors import ExportError, GraphpassError, InputError
from graphpass.files import atomic_output
from graphpass.ir import flatten_tensors, replace_submodule

__all__ = [
    "MIN_OPSET",
    "ExportReport",
    "LoweringStats",
    "export_onnx",
    "export_command",
    "export_training_graph",
    "SavePoint",
    "TrainingGraphReport",
    "lower_for_inference",
    "max_opset",
    "InferenceNormAct",
]

log = logging.getLogger(__name__)

MIN_OPSET = 17
GROUP_NORM_OPSET = 21  # first opset whose GroupNormalization has per-channel scale and bias
DYNAMO_MIN_OPSET = 18  # below it the dynamo exporter silently writes opset 18 instead
EXPORTERS = ("auto", "dynamo", "torchscript")
STANDARD_DOMAINS = ("", "ai.onnx")


# ---------------------------------------------------------------------------------------------
# Lowering to an inference module
# ---------------------------------------------------------------------------------------------


def _act(name: str, negative_slope: float) -> Any:
    table = {
        "relu": F.relu,
        "relu6": F.relu6,
        "leaky_relu": functools.partial(F.leaky_relu, negative_slope=negative_slope),
        "silu": F.silu,
        "gelu": F.gelu,
        "hardswish": F.hardswish,
        "mish": F.mish,
        "identity": None,
    }
    if name not in table:
        raise ExportError(f"activation {name!r} has no inference lowering; known: {', '.join(table)}")
    return table[name]


class InferenceNormAct(nn.Module):
    """GroupNorm with a per-channel affine, an activation, then a per-channel scale and shift.

    The inference form of ProxyNormAct (scale/shift = folded proxy statistics) and of
    ScaledGroupNorm (no activation, no scale/shift). Exports to plain ONNX ops.
    """

    def __init__(
        self,
        norm: nn.GroupNorm,
        activation: str = "identity",
        negative_slope: float = 0.01,
        post_scale: torch.Tensor | None = None,
        post_shift: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.norm = norm
        self.activation = activation
        self.negative_slope = negative_slope
        self._fn = _act(activation, negative_slope)
        self.register_buffer("post_scale", post_scale)
        self.register_buffer("post_shift", post_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if self._fn is not None:
            y = self._fn(y)
        if self.post_scale is not None:
            shape = (-1,) + (1,) * (y.dim() - 2)
            y = y * self.post_scale.view(shape) + self.post_shift.view(shape)
        return y


def _group_norm(num_channels: int, groups: int, eps: float, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.GroupNorm:
    gn = nn.GroupNorm(groups, num_channels, eps=eps, affine=True)
    with torch.no_grad():
        gn.weight.copy_(weight.detach().float())
        gn.bias.copy_(torch.zeros(num_channels) if bias is None else bias.detach().float())
    return gn


def _lower_proxy_norm_act(m: nn.Module) -> InferenceNormAct:
    with torch.no_grad():
        mu, inv_std = (t.detach().float().cpu() for t in m.proxy_stats())
    return InferenceNormAct(
        _group_norm(m.num_channels, m.groups, m.eps, m.weight, m.bias),
        m.activation,
        float(getattr(m, "negative_slope", 0.01)),
        post_scale=inv_std.clone(),
        post_shift=(-mu * inv_std).clone(),
    )


def _lower_scaled_group_norm(m: nn.Module) -> InferenceNormAct:
    return InferenceNormAct(_group_norm(m.num_channels, m.groups, m.eps, m.weight, None))


def _norm_lowerings() -> dict[type, tuple[Any, str]]:
    """Module type -> (its lowering, the LoweringStats counter it increments)."""
    from graphpass.proxy_norm import ProxyNormAct, ScaledGroupNorm

    return {
        ProxyNormAct: (_lower_proxy_norm_act, "proxy_norms_folded"),
        ScaledGroupNorm: (_lower_scaled_group_norm, "scaled_group_norms_lowered"),
    }


def _is_compression_node(node: torch.fx.Node) -> bool:
    from graphpass.runtime import is_compression_node

    return is_compression_node(node)


# Functions fx records as calls with the trace-time ``training`` flag baked in (torchvision's
# fx-wrapped stochastic_depth, F.dropout(..., training=True)), so eval() does not
# switch them off; at inference they are the identity on their first argument. (The StochasticDepth
# and DropPath modules stay opaque calls when traced, so eval() handles those.)
_TRAINING_ONLY_FUNCTIONS = frozenset(
    {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout}
)
_RANDOM_FUNCTIONS = frozenset({torch.bernoulli, torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.normal, torch.multinomial})
_RANDOM_METHODS = frozenset({"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_"})


def _is_training_only(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _TRAINING_ONLY_FUNCTIONS:
        return True
    return getattr(node.target, "__module__", "") == "torchvision.ops.stochastic_depth"


def _check_deterministic(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        random = (node.op == "call_function" and node.target in _RANDOM_FUNCTIONS) or (
            node.op == "call_method" and node.target in _RANDOM_METHODS
        )
        if random:
            module = node.meta.get("graphpass.module", "")
            raise ExportError(
                f"node {node.name} in module {module!r} draws random numbers, so the inference graph is not "
                "deterministic: fx traced a training-only branch (drop path, noise); trace that module as a leaf "
                "(leaf_modules=[...]) so eval() switches it off"
            )


@dataclass
class LoweringStats:
    """What the inference lowering changed."""

    compression_points_removed: int = 0
    proxy_norms_folded: int = 0
    scaled_group_norms_lowered: int = 0
    training_only_ops_removed: int = 0  # dropout / stochastic depth recorded with training=True
    group_norms: int = 0  # GroupNorm layers in the lowered module (decides the expected ONNX form)


def lower_for_inference(model: nn.Module, *, fold_norms: bool = True) -> tuple[nn.Module, LoweringStats]:
    """Return an eval-mode copy of ``model`` with only inference-exportable modules, and what changed.

    Compression points and training-only calls (dropout, stochastic depth) always go; with
    ``fold_norms=False`` the Proxy Norm modules stay, which gives the PyTorch reference output.
    """
    model = copy.deepcopy(model).eval()
    stats = LoweringStats()
    if isinstance(model, torch.fx.GraphModule):
        changed = False
        for node in list(model.graph.nodes):
            if _is_compression_node(node):
                stats.compression_points_removed += 1
            elif _is_training_only(node):
                stats.training_only_ops_removed += 1
            else:
                continue
            node.replace_all_uses_with(node.args[0])
            model.graph.erase_node(node)
            changed = True
        if changed:
            # their state arguments (get_attr of the compression state) are now unused
            model.graph.eliminate_dead_code()
            model.delete_all_unused_submodules()
            model.graph.lint()
            model.recompile()
        _check_deterministic(model)
    lowerings = _norm_lowerings() if fold_norms else {}
    for name, module in list(model.named_modules()):
        if type(module) not in lowerings:
            continue
        if not name:
            raise ExportError(f"the model itself is a {type(module).__name__}; wrap it in a container to export it")
        lower, counter = lowerings[type(module)]
        replace_submodule(model, name, lower(module).eval())
        setattr(stats, counter, getattr(stats, counter) + 1)
    stats.group_norms = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    if isinstance(model, torch.fx.GraphModule):
        stats.group_norms += sum(
            n.op == "call_function" and n.target in (F.group_norm, torch.group_norm) for n in model.graph.nodes
        )
    return model, stats


# ---------------------------------------------------------------------------------------------
# Opsets and exporters
# ---------------------------------------------------------------------------------------------


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _resolve_exporter(exporter: str, opset: int = GROUP_NORM_OPSET) -> str:
    if exporter not in EXPORTERS:
        raise InputError(f"exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}")
    if exporter == "auto":
        # torch.onnx.export defaults to the dynamo exporter from 2.9; before that, and for opsets
        # the dynamo exporter cannot write, the TorchScript exporter is the one that works.
        return "dynamo" if _torch_version() >= (2, 9) and opset >= DYNAMO_MIN_OPSET else "torchscript"
    return exporter


def max_opset(exporter: str = "auto") -> int:
    """Highest opset this torch's exporter and the installed onnx both support."""
    import onnx
    from torch.onnx import _constants

    if _resolve_exporter(exporter, GROUP_NORM_OPSET) == "dynamo":
        torch_max = getattr(_constants, "ONNX_MAX_OPSET", GROUP_NORM_OPSET)
    else:
        # TorchScript symbolics stop at 20; 21 only changes GroupNormalization, which we supply.
        torch_max = GROUP_NORM_OPSET
    return min(torch_max, onnx.defs.onnx_opset_version())


def _check_opset(opset: Any, exporter: str) -> int:
    top = max_opset(exporter)
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise InputError(f"--opset {opset!r} is not supported: choose an opset from {MIN_OPSET} to {top}")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise InputError(
            f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or later, not {opset}; "
            "use exporter='torchscript' (or 'auto', which picks it)"
        )
    return opset


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter chatter (progress prints, deprecation warnings, the optimizer's INFO log
    that ``graphpass -v`` would otherwise show); printed output goes to the debug log."""
    out = io.StringIO()
    chatty = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in chatty]
    for logger in chatty:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)
    if out.getvalue():
        log.debug("exporter output:\n%s", out.getvalue())


def _export_dynamo(module: nn.Module, inputs: tuple, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
    torch.onnx.export(module, inputs, str(path), dynamo=True, opset_version=opset, dynamic_shapes=dynamic)


def _group_norm_21(g: Any, x: Any, num_groups: Any, weight: Any, bias: Any, eps: Any, cudnn_enabled: Any) -> Any:
    """TorchScript symbolic: aten::group_norm -> GroupNormalization-21 (per-channel scale/bias)."""
    from torch.onnx import symbolic_helper as sh

    if sh._is_none(weight) or sh._is_none(bias):
        # (C,) from the runtime shape: the static channel count is not always known here
        channels = g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([1])), g.op("Constant", value_t=torch.tensor([2])))
        if sh._is_none(weight):
            weight = g.op("ConstantOfShape", channels, value_t=torch.tensor([1.0]))
        if sh._is_none(bias):
            bias = g.op("ConstantOfShape", channels, value_t=torch.tensor([0.0]))
    return g.op(
        "GroupNormalization",
        x,
        weight,
        bias,
        num_groups_i=sh._maybe_get_const(num_groups, "i"),
        epsilon_f=sh._maybe_get_const(eps, "f"),
    )


def _export_torchscript(module: nn.Module, inputs: tuple, path: Path, opset: int) -> None:
    names = [f"input{i}" for i in range(len(inputs))]
    with torch.no_grad():
        outputs = [f"output{i}" for i in range(len(_flatten(module(*inputs))))]
    kwargs: dict[str, Any] = {}
    if "dynamo" in _export_params():
        kwargs["dynamo"] = False
    registered = opset >= GROUP_NORM_OPSET
    if registered:
        torch.onnx.register_custom_op_symbolic("aten::group_norm", _group_norm_21, GROUP_NORM_OPSET)
    try:
        torch.onnx.export(
            module,
            inputs,
            str(path),
            opset_version=opset,
            input_names=names,
            output_names=outputs,
            dynamic_axes={n: {0: "batch"} for n in names + outputs},
            do_constant_folding=True,
            **kwargs,
        )
    finally:
        if registered:
            torch.onnx.unregister_custom_op_symbolic("aten::group_norm", GROUP_NORM_OPSET)


@functools.cache
def _export_params() -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(torch.onnx.export).parameters)


def _export_proto(module: nn.Module, inputs: tuple, opset: int, exporter: str, what: str) -> Any:
    """Run the exporter into a scratch folder and load the result as one in-memory ModelProto."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="graphpass-onnx-") as scratch:
        raw = Path(scratch) / "model.onnx"
        try:
            # grad stays enabled: under no_grad, eval-mode nn.MultiheadAttention takes its fused
            # fast path (aten::_native_multi_head_attention), which the TorchScript exporter lacks
            with _quiet():
                (_export_dynamo if exporter == "dynamo" else _export_torchscript)(module, inputs, raw, opset)
        except GraphpassError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(f"{exporter} ONNX export of {what} at opset {opset} failed: {type(e).__name__}: {first}") from e
        return onnx.load(str(raw))  # pulls any external-data side files into the proto


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _all_nodes(model: Any) -> Iterator[Any]:
    """Every node of the model: main graph, subgraphs of control-flow ops and local functions."""
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.g.node:
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    for fn in model.functions:
        yield from fn.node


def _structure_problems(model: Any, opset: int, stats: LoweringStats, *, no_batchnorm: bool) -> list[str]:
    problems = []
    written = [o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS]
    if written != [opset]:
        problems.append(f"the exporter wrote opset {written} instead of {opset}")
    nodes = list(_all_nodes(model))
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in STANDARD_DOMAINS})
    if foreign:
        problems.append(f"ops outside the standard ONNX domain: {', '.join(foreign)}")
    foreign_imports = sorted(o.domain for o in model.opset_import if o.domain not in STANDARD_DOMAINS)
    if foreign_imports:
        problems.append(f"custom opset domains imported: {', '.join(foreign_imports)}")
    ops = Counter(n.op_type for n in nodes)
    if no_batchnorm and ops["BatchNormalization"]:
        problems.append(f"{ops['BatchNormalization']} BatchNormalization node(s) remain after norm='gn+pn'")
    if ops["GroupNormalization"] and opset < GROUP_NORM_OPSET:
        problems.append(f"GroupNormalization emitted at opset {opset}; its pre-21 form is per-group and deprecated")
    if stats.group_norms and opset >= GROUP_NORM_OPSET and not ops["GroupNormalization"]:
        problems.append(f"{stats.group_norms} GroupNorm layer(s) were decomposed instead of GroupNormalization-{opset}")
    return problems


def _flatten(out: Any) -> list[torch.Tensor]:
    tensors = list(flatten_tensors(out))
    if not tensors:
        raise ExportError(f"model output of type {type(out).__name__} holds no tensor to compare with onnxruntime")
    return tensors


def _real_inputs(inputs: Sequence[Any], batch: int) -> tuple:
    """Real CPU tensors shaped like ``inputs`` with the given batch (inputs may be meta/fake)."""
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            out.append(x)
            continue
        shape = (batch, *x.shape[1:]) if x.dim() else ()
        if x.dtype.is_floating_point:
            out.append(torch.randn(shape, dtype=x.dtype))
        else:
            out.append(torch.zeros(shape, dtype=x.dtype))
    return tuple(out)


def _compare(session: Any, reference: nn.Module, inputs: tuple) -> tuple[float, float, float]:
    """(max abs error, max normwise relative error, largest |reference output|) over all outputs."""
    with torch.no_grad():
        expected = _flatten(reference(*inputs))
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), [x for x in inputs if isinstance(x, torch.Tensor)])}
    got = session.run(None, feed)
    if len(got) != len(expected):
        raise ExportError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(expected)}")
    max_abs = max_rel = largest = 0.0
    for g, e in zip(got, expected):
        e = e.detach().float()
        g = torch.from_numpy(g).float()
        if g.shape != e.shape:
            raise ExportError(f"onnxruntime output shape {tuple(g.shape)} differs from PyTorch's {tuple(e.shape)}")
        err = (g - e).abs().max().item() if e.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else err)
        largest = max(largest, scale)
    return max_abs, max_rel, largest


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What was written and how it was checked."""

    path: str
    opset: int
    exporter: str
    file_bytes: int
    max_abs_error: float
    max_rel_error: float
    checked_batches: tuple[int, ...]
    output_nonzero: bool  # False: PyTorch's output was all zeros, so the comparison proved nothing
    group_norm_form: str  # "GroupNormalization", "decomposed" or "none"
    lowering: LoweringStats
    op_counts: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"wrote {self.path} ({self.file_bytes / 2**20:.1f} MiB, opset {self.opset}, {self.exporter} exporter): "
            f"{sum(self.op_counts.values())} nodes, GroupNorm {self.group_norm_form}, "
            f"{self.lowering.compression_points_removed} compression points removed, "
            f"{self.lowering.proxy_norms_folded} Proxy Norms folded; onnxruntime vs PyTorch at batch "
            f"{'/'.join(map(str, self.checked_batches))}: max abs {self.max_abs_error:.2e}, "
            f"max rel {self.max_rel_error:.2e}"
            + ("" if self.output_nonzero else " (VACUOUS: the PyTorch output is identically zero)")
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _metadata(model: nn.Module, stats: LoweringStats, plan: Any) -> dict[str, str]:
    import graphpass

    meta = {"graphpass.version": graphpass.__version__}
    gm_meta = getattr(model, "meta", {}) if isinstance(model, torch.fx.GraphModule) else {}
    meta["graphpass.passes"] = json.dumps(gm_meta.get("graphpass.passes", []), default=str)
    config = gm_meta.get("graphpass.config")
    if config is not None:
        meta["graphpass.config"] = json.dumps(dataclasses.asdict(config), default=str)
    meta["graphpass.lowering"] = json.dumps(dataclasses.asdict(stats))
    if plan is not None:
        meta["graphpass.memory_plan"] = json.dumps(_plan_figures(plan))
    return meta


def _plan_figures(plan: Any) -> dict[str, Any]:
    keys = ("model", "lower_bound_bytes", "planned_bytes", "predicted_peak_bytes", "saved_bytes",
            "parameter_bytes", "algorithm", "bits", "norm", "measured_peak_bytes")
    figures = {k: getattr(plan, k, None) for k in keys}
    if getattr(plan, "baseline", None) is not None:
        figures["baseline"] = {k: getattr(plan.baseline, k, None) for k in keys}
    return figures


def _wants_no_batchnorm(model: nn.Module, stats: LoweringStats) -> bool:
    config = getattr(model, "meta", {}).get("graphpass.config") if isinstance(model, torch.fx.GraphModule) else None
    return getattr(config, "norm", None) == "gn+pn" or stats.proxy_norms_folded > 0


def _checked_session(proto: Any, metadata: dict[str, str], what: str, opset: int) -> Any:
    """Attach the metadata, run onnx.checker (full check) and open an onnxruntime session."""
    import onnx
    import onnxruntime

    onnx.helper.set_model_props(proto, metadata)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejects {what} (opset {opset}): {e}") from e
    return onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def export_onnx(
    gm_or_model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    path: str | Path,
    *,
    opset: int = GROUP_NORM_OPSET,
    plan: Any = None,
    rtol: float = 1e-4,
    exporter: str = "auto",
) -> ExportReport:
    """Export ``gm_or_model`` for inference to one self-contained ONNX file, checked.

    Args:
        gm_or_model: a GraphModule from ``gp.transform`` or any traceable nn.Module (traced first).
        example_inputs: inputs (real or meta tensors); only their shapes and dtypes are used.
        path: the ``.onnx`` file to write; its folder must exist. Written only if every check passes.
        opset: ONNX opset, 17 up to :func:`max_opset`.
        plan: optional MemoryPlan whose figures go into the model's metadata.
        rtol: largest allowed normwise relative error of onnxruntime against PyTorch.
        exporter: "auto" (dynamo on torch >= 2.9, else TorchScript), "dynamo" or "torchscript".

    Raises:
        InputError: bad opset, missing folder, wrong suffix.
        TraceError: a plain model that torch.fx cannot trace.
        ExportError: the exporter fails or a check fails; no file is left behind.
    """
    opset = _check_opset(opset, exporter)
    exporter = _resolve_exporter(exporter, opset)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors or any(x.dim() == 0 for x in tensors):
        raise InputError("example_inputs must hold at least one tensor, each with a leading batch axis")
    import onnx
    import onnxruntime

    with atomic_output(path, suffixes=(".onnx",)) as tmp:
        model = gm_or_model
        if not isinstance(model, torch.fx.GraphModule):
            from graphpass.tracing import trace

            # the norm modules stay calls, so the lowering can swap them for their inference form
            model = trace(copy.deepcopy(model), leaf_modules=tuple(_norm_lowerings()))
        lowered, stats = lower_for_inference(model)
        reference, _ = lower_for_inference(model, fold_norms=False)
        batch = max(2, int(tensors[0].shape[0]))  # batch 1 would be specialised by torch.export
        export_inputs = _real_inputs(inputs, batch)
        proto = _export_proto(lowered, export_inputs, opset, exporter, type(gm_or_model).__name__)
        problems = _structure_problems(proto, opset, stats, no_batchnorm=_wants_no_batchnorm(model, stats))
        if problems:
            raise ExportError(f"exported model of {type(gm_or_model).__name__} is not clean: " + "; ".join(problems))
        metadata = _metadata(model, stats, plan)
        session = _checked_session(proto, metadata, "the exported model", opset)
        max_abs = max_rel = largest = 0.0
        checked = (batch, batch + 1)
        for b in checked:
            a, r, m = _compare(session, reference, _real_inputs(inputs, b))
            max_abs, max_rel, largest = max(max_abs, a), max(max_rel, r), max(largest, m)
        # an output that is zero for every input (an untrained zero-initialised head, as in
        # torchvision's ViT) matches anything that is also zero: say so rather than claim a check
        verified = largest > 0
        if not verified:
            log.warning(
                "the onnxruntime comparison of %s is vacuous: PyTorch's output is identically zero on random "
                "inputs (zero-initialised head?); export a trained model to check the numerics", path
            )
        if not max_rel <= rtol:
            raise ExportError(
                f"onnxruntime output differs from PyTorch's eval output: max relative error {max_rel:.3e} "
                f"(max abs {max_abs:.3e}) exceeds {rtol:.0e}"
            )
        metadata["graphpass.verification"] = json.dumps(
            {"max_abs_error": max_abs, "max_rel_error": max_rel, "batches": list(checked), "output_nonzero": verified,
             "onnxruntime": onnxruntime.__version__}
        )
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(tmp))
        ops = Counter(n.op_type for n in _all_nodes(proto))
        report = ExportReport(
            path=str(path),
            opset=opset,
            exporter=exporter,
            file_bytes=tmp.stat().st_size,
            max_abs_error=max_abs,
            max_rel_error=max_rel,
            checked_batches=checked,
            output_nonzero=verified,
            group_norm_form="GroupNormalization" if ops["GroupNormalization"] else ("decomposed" if stats.group_norms else "none"),
            lowering=stats,
            op_counts=dict(sorted(ops.items())),
            metadata=metadata,
        )
    log.info("%s", report.summary())
    return report


# ---------------------------------------------------------------------------------------------
# Annotated training forward graph (for Netron)
# ---------------------------------------------------------------------------------------------


@dataclass
class SavePoint:
    """One quantize-on-save point as it appears in the annotated export."""

    node: str  # the compression point's fx node
    tensor: str  # fx node whose value autograd keeps in compressed form
    bits: int
    layout: str  # "group" (everything saved from here on) or "anchored" (one copy per layer)
    detail: str  # the rest of node.meta["graphpass.quant"]
    output: str  # name of the DequantizeLinear output in the ONNX graph


@dataclass
class TrainingGraphReport:
    """What ``export_training_graph`` wrote."""

    path: str
    opset: int
    exporter: str
    points: list[SavePoint]
    max_rel_error: float  # of the model output, onnxruntime against PyTorch
    file_bytes: int

    def summary(self) -> str:
        bits = Counter(p.bits for p in self.points)
        marked = ", ".join(f"{n} at {b} bits" for b, n in sorted(bits.items()))
        return (
            f"wrote {self.path} ({self.file_bytes / 2**20:.1f} MiB, opset {self.opset}): training forward graph with "
            f"{len(self.points)} quantize-on-save points marked ({marked}); output max rel error {self.max_rel_error:.2e}"
        )


def _save_points(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node, Any]]:
    """(compression point, node whose value is stored, its QuantFormat) for every point that stores data."""
    from graphpass.meta import META_QUANT

    layer_inputs = {}
    points = []
    for node in gm.graph.nodes:
        fmt = node.meta.get(META_QUANT)
        if fmt is None or not _is_compression_node(node):
            continue
        if fmt.point == "layer_input":
            layer_inputs[fmt.layer] = node.args[0]
        if fmt.layout:
            # with no activation after the norm, the layer's copy is the norm input, not its output
            stored = layer_inputs.get(fmt.layer) if getattr(fmt, "stored", "") == "norm_input" else None
            points.append((node, stored if stored is not None else node.args[0], fmt))
    return points


def _add_qdq(proto: Any, value: Any, point: SavePoint, sample: torch.Tensor, opset: int, module: str) -> None:
    """Append value -> QuantizeLinear -> DequantizeLinear -> graph output ``point.output`` (same type)."""
    from onnx import TensorProto, helper, numpy_helper

    levels = 2**point.bits - 1
    lo, hi = min(sample.min().item(), 0.0), max(sample.max().item(), 0.0)
    scale = (hi - lo) / levels if hi > lo else 1.0
    zero = int(round(-lo / scale))
    # 4- and 2-bit codes fit ONNX's uint4 from opset 21; before it they are stored in uint8 lanes
    zero_type = TensorProto.UINT4 if point.bits <= 4 and opset >= GROUP_NORM_OPSET else TensorProto.UINT8
    prefix = f"graphpass_q{point.bits}__{point.node}"
    proto.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{prefix}__scale"),
            helper.make_tensor(f"{prefix}__zero_point", zero_type, [], [zero]),
        ]
    )
    doc = (
        f"graphpass quantize-on-save point {point.node} (module {module or '-'}): autograd keeps a "
        f"{point.bits}-bit {point.layout} copy of {point.tensor} for backward ({point.detail}). "
        "Training only: the inference export has no such branch; scale here is per-tensor, from the example input."
    )
    proto.graph.node.extend(
        [
            helper.make_node("QuantizeLinear", [value.name, f"{prefix}__scale", f"{prefix}__zero_point"], [f"{prefix}__codes"], name=f"{prefix}/quantize", doc_string=doc),
            helper.make_node("DequantizeLinear", [f"{prefix}__codes", f"{prefix}__scale", f"{prefix}__zero_point"], [point.output], name=f"{prefix}/dequantize", doc_string=doc),
        ]
    )
    out = proto.graph.output.add()
    out.CopyFrom(value)
    out.name = point.output


def export_training_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any] | torch.Tensor,
    path: str | Path,
    *,
    opset: int = GROUP_NORM_OPSET,
    exporter: str = "auto",
) -> TrainingGraphReport:
    """Export the forward graph with every quantize-on-save point drawn as a Q/DQ side branch.

    Each point becomes ``QuantizeLinear -> DequantizeLinear`` on the tensor autograd keeps, with
    its bit width in the node names (``graphpass_q4__<node>``), the zero point's type (uint4 for
    4 and 2 bits from opset 21) and a doc string, ending in an extra graph output
    ``saved_<bits>bit__<node>``, so Netron shows where training stores what. The main output is the
    inference model's and is checked against PyTorch like :func:`export_onnx`.
    """
    import onnx

    if not isinstance(gm, torch.fx.GraphModule):
        raise InputError(f"export_training_graph takes the GraphModule from gp.transform, got {type(gm).__name__}")
    opset = _check_opset(opset, exporter)
    exporter = _resolve_exporter(exporter, opset)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    found = _save_points(gm)
    if not found:
        raise InputError("the graph has no quantize-on-save points: build it with gp.transform(..., bits=8, 4 or 2)")
    with atomic_output(path, suffixes=(".onnx",)) as tmp:
        tapped, stats = lower_for_inference(gm)
        names = {n.name: n for n in tapped.graph.nodes}
        output = next(n for n in tapped.graph.nodes if n.op == "output")
        taps = [names[stored.name] for _, stored, _ in found]
        output.args = ((output.args[0], *taps),)
        tapped.recompile()
        export_inputs = _real_inputs(inputs, max(2, int(inputs[0].shape[0])))
        with torch.no_grad():
            expected, *samples = tapped(*export_inputs)
        proto = _export_proto(tapped, export_inputs, opset, exporter, type(gm).__name__)
        graph_outputs = list(proto.graph.output)
        if len(graph_outputs) != 1 + len(taps):
            raise ExportError(f"expected {1 + len(taps)} graph outputs, the exporter wrote {len(graph_outputs)}")
        del proto.graph.output[1:]
        points = []
        for (node, stored, fmt), value, sample in zip(found, graph_outputs[1:], samples):
            detail = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(fmt).items() if v not in ("", None) and k not in ("bits", "layout"))
            point = SavePoint(node.name, stored.name, fmt.bits, fmt.layout, detail, f"saved_{fmt.bits}bit__{node.name}")
            _add_qdq(proto, value, point, sample, opset, node.meta.get("graphpass.module", ""))
            points.append(point)
        meta = _metadata(gm, stats, None)
        meta["graphpass.save_points"] = json.dumps([dataclasses.asdict(p) for p in points])
        session = _checked_session(proto, meta, "the annotated training graph", opset)
        feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), [x for x in export_inputs if isinstance(x, torch.Tensor)])}
        got = torch.from_numpy(session.run([proto.graph.output[0].name], feed)[0])
        err = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
        if not err <= 1e-4:
            raise ExportError(f"annotated training graph: onnxruntime output differs from PyTorch's by {err:.3e} relative")
        onnx.save(proto, str(tmp))
        report = TrainingGraphReport(str(path), opset, exporter, points, err, tmp.stat().st_size)
    log.info("%s", report.summary())
    return report


def export_command(args: Any) -> int:
    """``graphpass export MODEL -o F.onnx``: transform, export, check; prints the report."""
    import graphpass as gp
    from graphpass.tracing import example_inputs, load_model

    _check_opset(args.opset, "auto")
    if not Path(args.output).parent.is_dir():
        raise InputError(f"output {args.output!r}: folder {str(Path(args.output).parent)!r} does not exist; create it first")
    model = load_model(args.model)
    inputs = example_inputs(args.batch, args.image)
    print(f"graphpass export: transforming {args.model} (norm={args.norm}, bits={args.bits})", file=sys.stderr)
    gm = gp.transform(model, inputs, bits=args.bits, norm=args.norm, groups=args.groups)
    plan = _plan_or_none(model, inputs, args)
    print(f"graphpass export: exporting at opset {args.opset} and checking", file=sys.stderr)
    report = export_onnx(gm, inputs, args.output, opset=args.opset, plan=plan)
    print(report.summary())
    return 0


def _plan_or_none(model: nn.Module, inputs: tuple, args: Any) -> Any:
    """The memory plan for the metadata; it is extra information, so a model it fails on still exports."""
    import graphpass as gp

    meta_inputs = tuple(x.to("meta") for x in inputs)
    try:
        return gp.plan(
            model, meta_inputs, bits=args.bits, norm=args.norm, groups=args.groups,
            description=f"{args.model} batch {args.batch} {args.image}px",
        )  # fmt: skip
    except GraphpassError as e:
        log.warning("no memory plan in the metadata: %s", e)
        return None
