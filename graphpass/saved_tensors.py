"""Saved-tensor discovery: which tensors each node's backward keeps, learned by running the graph.

The traced graph runs once in train mode on fake tensors (nothing is allocated) under
``torch.autograd.graph.saved_tensors_hooks``; an fx Interpreter tracks the node being run, so
every tensor autograd packs is attributed to the node whose forward saved it. Compression pack
hooks (the quantize-on-save runtime) report what they really store through
:mod:`graphpass.save_recorder`; tensors that our own hook sees are stored in full.

Tensors are identified by the storage they keep alive (its StorageImpl, held by a strong
reference for the whole run so its identity cannot be reused), never by a data pointer: fake and
meta tensors have none, and the allocator reuses real ones.

Each saved tensor is classified as a ``parameter``, a model ``buffer``, a graph ``input``, another
node's ``output``, a ``view`` of one (same storage, other tensor), ``internal`` (a tensor the
operator made for its backward, such as BatchNorm's saved mean/invstd or max-pool indices) or
``compressed`` (reported by a pack hook).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from graphpass.errors import GraphpassError, InputError
from graphpass.ir import flatten_tensors
from graphpass.meta import META_MODULE, META_SAVED, set_meta
from graphpass.save_recorder import recording
from graphpass.tracing import buffers_kept, check_input_count, fake_inputs
from torch.overrides import TorchFunctionMode

__all__ = ["SavedTensor", "StorageInfo", "NodeRecord", "SavedTensors", "discover_saved_tensors", "meta_copy"]

log = logging.getLogger(__name__)

SAVED_KINDS = ("parameter", "buffer", "input", "output", "view", "internal", "compressed")


@dataclass(frozen=True)
class SavedTensor:
    """One tensor a node's backward keeps."""

    kind: str  # one of SAVED_KINDS
    source: str  # producing node, or the parameter/buffer name
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # bytes kept: the whole storage for full tensors, the stored bytes for compressed ones
    storage: int  # id of the memory block kept alive (same id = same bytes; ids are per discovery run)
    fmt: str = "full"  # "full" or the compression format reported by the pack hook


@dataclass(frozen=True)
class StorageInfo:
    """One memory block seen during discovery."""

    id: int
    nbytes: int
    kind: str  # "input" | "parameter" | "buffer" | "activation" | "internal" | "compressed"
    owner: str  # node that allocated it, or the parameter/buffer name
    requires_grad: bool = False  # for parameters: whether training produces a gradient for it


@dataclass(frozen=True)
class NodeRecord:
    """What one node did during the discovery run."""

    name: str
    module: str
    outputs: tuple[int, ...]  # storages of the tensors the node returns (flattened)
    grad_nbytes: int  # bytes of the gradient of its outputs (0 if they need none)
    grad_is_alias: bool  # outputs are views or tuple items of inputs: their gradient needs no new memory
    saved: tuple[SavedTensor, ...]
    parameters: tuple[str, ...]  # parameters whose gradient this node's backward produces


@dataclass
class SavedTensors:
    """The result of discovery: per-node records in graph order and the storages they refer to."""

    nodes: dict[str, NodeRecord]
    storages: dict[int, StorageInfo]
    graph_outputs: tuple[int, ...]
    parameters: dict[str, int] = field(default_factory=dict)  # name -> storage id (buffers included)

    def saved_bytes(self) -> int:
        """Bytes of activations autograd keeps at the end of forward, each storage counted once."""
        kept = {s.storage: s.nbytes for r in self.nodes.values() for s in r.saved if s.kind not in ("parameter", "buffer", "input")}
        return sum(kept.values())


class _NodeFailure(InputError):
    """A node failed on the example inputs (their shape does not fit, or no shape function)."""


class _Discovery(torch.fx.Interpreter):
    """Runs the graph and attributes every packed tensor to the node being run."""

    def __init__(self, module: torch.fx.GraphModule, graph: torch.fx.Graph) -> None:
        # Runs ``graph`` (the caller's nodes, so records name them) on ``module``'s attributes.
        super().__init__(module, garbage_collect_values=False, graph=graph)
        self.current: torch.fx.Node | None = None
        self.keep: list[torch.Tensor] = []  # strong references: storage identities stay unique
        self.ids: dict[int, int] = {}  # StorageImpl address -> storage id
        self.storages: dict[int, StorageInfo] = {}
        self.tensor_owner: dict[int, str] = {}  # id(tensor) -> node that returned exactly this tensor
        self.saved: dict[str, dict[tuple[int, str], SavedTensor]] = {}
        self.compressed_of: dict[tuple[int, str], int] = {}  # (original storage, fmt) -> compressed id
        self.values: dict[str, Any] = {}  # node name -> value (kept: identities must stay unique)
        self.parameters: dict[str, int] = {}  # parameter/buffer name -> storage id
        self.packed: list[tuple[str, torch.Tensor, str, int]] = []  # (node, tensor, fmt, stored bytes)
        self.passthrough: dict[str, bool] = {}

    def storage_id(self, t: torch.Tensor, kind: str, owner: str, requires_grad: bool = False) -> int:
        key = t.untyped_storage()._cdata
        if key not in self.ids:
            sid = len(self.storages)
            self.ids[key] = sid
            self.storages[sid] = StorageInfo(sid, t.untyped_storage().nbytes(), kind, owner, requires_grad)
            self.keep.append(t)
        return self.ids[key]

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        versions = {id(t): t._version for a in n.all_input_nodes for t in flatten_tensors(self.values.get(a.name))}
        try:
            out = super().run_node(n)
        except GraphpassError:
            raise
        except Exception as e:
            args = [self.values.get(a.name) for a in n.all_input_nodes]
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            raise _NodeFailure(
                f"node {n.name} ({n.op} {getattr(n.target, '__name__', n.target)}) in module "
                f"{n.meta.get(META_MODULE, '')!r} fails on inputs of shape [{shapes}]: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}; check the example inputs' shape (--batch/--image) "
                "against what the model expects"
            ) from e
        finally:
            self.current = None
        self.values[n.name] = out
        # Returning an input unchanged (same tensor, same version: a tuple item, a compression
        # point) passes its gradient through; an in-place op returns it with a new version.
        outs = list(flatten_tensors(out))
        self.passthrough[n.name] = bool(outs) and all(versions.get(id(t)) == t._version for t in outs)
        return out

    def record(self, t: torch.Tensor, fmt: str = "full", stored_nbytes: int = 0) -> None:
        """Note that the running node's backward keeps ``t`` (classified after the run)."""
        if self.current is not None:  # packed outside any node (e.g. a loss): not part of the graph
            self.packed.append((self.current.name, t, fmt, stored_nbytes))

    def classify(self) -> None:
        """Name every storage and saved tensor once all outputs are known.

        A storage belongs to the first node (in graph order) that returns it, so in-place results
        and views alias their source; a packed storage that no node returns is internal to the
        node that saved it.
        """
        for n in self.graph.nodes:
            if n.name not in self.values:
                continue
            kind = "input" if n.op == "placeholder" else "activation"
            for t in flatten_tensors(self.values[n.name]):
                self.storage_id(t, kind, n.name)
                self.tensor_owner.setdefault(id(t), n.name)
        # Copies first: a reference can be reported before the copy it shares is made (a norm saves
        # its input before quantize_layer, after it, makes the layer's one copy).
        sids = [self.storage_id(t, "internal", node) for node, t, _, _ in self.packed]
        for sid, (node, _, fmt, stored_nbytes) in zip(sids, self.packed):
            if fmt != "full" and stored_nbytes and (sid, fmt) not in self.compressed_of:
                cid = len(self.storages)
                self.storages[cid] = StorageInfo(cid, stored_nbytes, "compressed", node)
                self.compressed_of[(sid, fmt)] = cid
        for sid, (node, t, fmt, _) in zip(sids, self.packed):
            info = self.storages[sid]
            if info.kind != "activation":
                kind, source = info.kind, info.owner
            elif id(t) in self.tensor_owner:
                kind, source = "output", self.tensor_owner[id(t)]
            else:
                kind, source = "view", info.owner
            shape, dtype = tuple(t.shape), t.dtype
            if fmt != "full":
                key = (sid, fmt)
                if key in self.compressed_of:
                    cid = self.compressed_of[key]
                else:
                    shared = self.nearest_copy(node, fmt)
                    if shared is None:
                        continue
                    cid = shared
                entry = SavedTensor("compressed", source, shape, dtype, self.storages[cid].nbytes, cid, fmt)
            else:
                entry = SavedTensor(kind, source, shape, dtype, info.nbytes, sid)
            self.saved.setdefault(node, {})[(entry.storage, fmt)] = entry


    def nearest_copy(self, node: str, fmt: str) -> int | None:
        """The copy of format ``fmt`` that a zero-byte report at ``node`` shares.

        A pack hook reports 0 bytes when it hands out a reference to a copy made for another
        tensor, e.g. one K-bit copy per Conv-Norm-Act layer serves the norm's input, its output and
        the activation. That copy was made by the nearest node in the graph (undirected distance)
        that made a copy of the same format; ties go to the earlier report.
        """
        owners: dict[str, int] = {}
        for (_, f), cid in self.compressed_of.items():
            if f == fmt:
                owners.setdefault(self.storages[cid].owner, cid)
        if not owners:
            return None
        by_name = {n.name: n for n in self.graph.nodes}
        seen, frontier = {node}, [by_name[node]]
        while frontier:
            hits = [owners[n.name] for n in frontier if n.name in owners]
            if hits:
                return min(hits)
            nxt = []
            for n in frontier:
                for m in (*n.all_input_nodes, *n.users):
                    if m.name not in seen:
                        seen.add(m.name)
                        nxt.append(m)
            frontier = nxt
        return None


def _node_parameters(gm: torch.fx.GraphModule, param_names: dict[int, str]) -> dict[str, tuple[str, ...]]:
    """For each node, the trainable parameters it consumes directly (submodule or get_attr input)."""
    used: dict[str, tuple[str, ...]] = {}
    for n in gm.graph.nodes:
        names: list[str] = []
        if n.op == "call_module":
            for p in gm.get_submodule(n.target).parameters():
                if id(p) in param_names:
                    names.append(param_names[id(p)])
        for arg in n.all_input_nodes:
            if arg.op == "get_attr":
                attr = _get_attr(gm, arg.target)
                if id(attr) in param_names:
                    names.append(param_names[id(attr)])
        used[n.name] = tuple(dict.fromkeys(names))
    return used


def _get_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def discover_saved_tensors(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> SavedTensors:
    """Run ``gm`` once in train mode on fake tensors and record what every node saves.

    Writes ``node.meta["graphpass.saved"]`` (a tuple of :class:`SavedTensor`) on every node and
    returns the full record. The GraphModule's parameters, buffers and mode are left as they were.
    """
    check_input_count(gm, example_inputs)
    interp: _Discovery

    def pack(t: torch.Tensor) -> torch.Tensor:
        interp.record(t)
        return t

    def on_pack(original: torch.Tensor, stored_nbytes: int, fmt: str) -> None:
        interp.record(original, fmt, stored_nbytes)

    def run(module: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        nonlocal interp
        interp = _Discovery(module, gm.graph)
        _register_parameters(interp, module)
        with torch.enable_grad(), recording(on_pack), torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            return interp.run(*inputs)

    # Meta tensors first (C++ shape functions, fast at any batch size); FakeTensorMode covers
    # operators without a meta kernel. Both allocate nothing of the activations' size.
    on_meta = all(t.is_meta for t in (*gm.parameters(), *gm.buffers()))
    meta_gm = gm if on_meta else meta_copy(gm)
    modes = {m: m.training for m in (*gm.modules(), *meta_gm.modules())}
    meta_gm.train()
    meta_inputs = [
        torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta").requires_grad_(x.requires_grad)
        if isinstance(x, torch.Tensor)
        else x
        for x in example_inputs
    ]
    try:
        with _FusedAttentionOnMeta():
            out = run(meta_gm, meta_inputs)
    except _NodeFailure as e:
        if on_meta:
            raise
        log.info("meta run failed (%s); discovering on fake tensors", e)
        gm.train()
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with buffers_kept(gm), mode:
            out = run(gm, fake_inputs(mode, example_inputs))
    finally:
        for m, training in modes.items():
            m.training = training
    interp.classify()
    graph_outputs = tuple(dict.fromkeys(interp.storage_id(t, "activation", "output") for t in flatten_tensors(out)))

    node_params = _node_parameters(gm, {id(p): name for name, p in gm.named_parameters()})
    nodes: dict[str, NodeRecord] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        outs = list(flatten_tensors(interp.values[n.name]))
        ins = [t for a in n.all_input_nodes for t in flatten_tensors(interp.values.get(a.name))]
        in_storages = {t.untyped_storage()._cdata for t in ins}
        in_ids = {id(t) for t in ins}
        # A view's gradient is a view of the upstream gradient; an input returned unchanged passes
        # its gradient through; an in-place op (same tensor, new version) computes a new gradient.
        grad_is_alias = interp.passthrough.get(n.name, False) or (
            bool(outs) and all(t.untyped_storage()._cdata in in_storages and id(t) not in in_ids for t in outs)
        )
        grad_nbytes = sum(t.numel() * t.element_size() for t in outs if t.requires_grad)
        saved = tuple(interp.saved.get(n.name, {}).values())
        record = NodeRecord(
            name=n.name,
            module=n.meta.get(META_MODULE, ""),
            outputs=tuple(interp.ids[t.untyped_storage()._cdata] for t in outs),
            grad_nbytes=grad_nbytes,
            grad_is_alias=grad_is_alias,
            saved=saved,
            parameters=node_params[n.name] if grad_nbytes or saved else (),
        )
        nodes[n.name] = record
        set_meta(n, META_SAVED, saved)
    return SavedTensors(nodes, interp.storages, graph_outputs, interp.parameters)


class _FusedAttentionOnMeta(TorchFunctionMode):
    """Make attention on meta tensors save what the fused kernels of real devices save.

    On meta tensors ``scaled_dot_product_attention`` picks the math backend, which keeps the full
    attention matrix for backward; on CPU and CUDA the fused (flash) kernels keep only q, k, v,
    the output and the log-sum-exp. Meta calls that the fused kernels would take go to the CPU
    flash kernel, whose meta function and backward record exactly those tensors. Graph nodes
    calling attention reach this mode; calls inside Python functions that dispatch to torch
    functions themselves (``multi_head_attention_forward``) see the patched module attribute.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            return _attention(*args, **kwargs)
        return func(*args, **kwargs)

    def __enter__(self) -> _FusedAttentionOnMeta:
        F.scaled_dot_product_attention = _attention
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        F.scaled_dot_product_attention = _SDPA
        super().__exit__(*exc)


_SDPA = F.scaled_dot_product_attention


def _attention(*args: Any, **kwargs: Any) -> torch.Tensor:
    fused = _fused_attention(*args, **kwargs)
    return fused if fused is not None else _SDPA(*args, **kwargs)


def _fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor | None:
    # The fused CPU kernel takes no dropout and needs equal head counts; those calls stay on math.
    if not query.is_meta or dropout_p != 0.0 or enable_gqa or not query.is_floating_point():
        return None
    if query.dim() != 4 or key.shape[1] != query.shape[1]:
        return None
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _register_parameters(interp: _Discovery, gm: torch.fx.GraphModule) -> None:
    for name, p in gm.named_parameters():
        interp.parameters[name] = interp.storage_id(p, "parameter", name, p.requires_grad)
    for name, b in gm.named_buffers():
        interp.parameters[name] = interp.storage_id(b, "buffer", name)


def meta_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose parameters, buffers and tensor attributes are meta tensors."""
    memo: dict[int, Any] = {}
    for module in gm.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                memo[id(value)] = torch.empty_like(value, device="meta")
        for value in module._parameters.values():
            if value is not None:
                memo[id(value)] = torch.nn.Parameter(torch.empty_like(value, device="meta"), value.requires_grad)
        for value in module._buffers.values():
            if value is not None:
                memo[id(value)] = torch.empty_like(value, device="meta")
    return copy.deepcopy(gm, memo)
