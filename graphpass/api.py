"""``gp.transform``: trace a copy of the user's model and run the rewrite pipeline on it."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx
from torch import nn

from graphpass.errors import InputError
from graphpass.pass_base import pass_spec
from graphpass.pass_manager import PassManager
from graphpass.tracing import trace

__all__ = ["TransformConfig", "transform", "register_pipeline", "get_pipeline"]

BITS = (None, 8, 4, 2)
NORMS = ("keep", "gn+pn")
ROUNDINGS = ("nearest", "stochastic")

# Pipelines are registered by the ``passes`` package; graphpass never imports passes directly.
_PIPELINES: dict[str, Callable[..., list]] = {}


def register_pipeline(name: str, builder: Callable[..., list]) -> None:
    _PIPELINES[name] = builder


def get_pipeline(name: str) -> Callable[..., list]:
    if not _PIPELINES:
        importlib.import_module("passes")
    try:
        return _PIPELINES[name]
    except KeyError:
        raise InputError(f"no pipeline named {name!r}; known: {', '.join(sorted(_PIPELINES))}") from None


@dataclass(frozen=True)
class TransformConfig:
    """What ``transform`` does; validated on construction so bad arguments fail before tracing."""

    bits: int | None = 4
    norm: str = "keep"
    groups: int = 8
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise InputError(f"bits must be one of None, 8, 4 or 2; got {self.bits!r}")
        if self.norm not in NORMS:
            raise InputError(f"norm must be 'keep' or 'gn+pn'; got {self.norm!r}")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups <= 0:
            raise InputError(f"groups must be a positive integer (1 means LayerNorm); got {self.groups!r}")
        if self.rounding not in ROUNDINGS:
            raise InputError(f"rounding must be 'nearest' or 'stochastic'; got {self.rounding!r}")


def transform(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    bits: int | None = 4,
    norm: str = "keep",
    groups: int = 8,
    rounding: str = "nearest",
    leaf_modules: Sequence[type] = (),
) -> torch.fx.GraphModule:
    """Return a rewritten copy of ``model`` that trains with less memory; ``model`` is untouched.

    Args:
        model: any nn.Module that torch.fx can trace (mark untraceable parts with ``leaf_modules``).
        example_inputs: a tuple of inputs (real or meta tensors) used for shape propagation.
        bits: None (no compression), 8, 4 or 2 bits for the copies autograd keeps for backward.
        norm: "keep", or "gn+pn" to replace BatchNorm by GroupNorm + Proxy Normalization.
        groups: GroupNorm groups for norm="gn+pn" (1 means LayerNorm).
        rounding: "nearest" (deterministic) or "stochastic" rounding of the compressed copies.
        leaf_modules: module types traced as opaque calls.
    """
    config = TransformConfig(bits=bits, norm=norm, groups=groups, rounding=rounding)
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    gm = trace(copy.deepcopy(model), example_inputs, leaf_modules=leaf_modules)
    pipeline = get_pipeline("transform")(config)
    results = PassManager(pipeline, example_inputs=example_inputs).run(gm)
    gm.meta["graphpass.config"] = config
    gm.meta["graphpass.passes"] = [
        {"name": pass_spec(p).name, "modified": r.modified, "stats": dict(r.stats)}
        for p, r in zip(pipeline, results)
    ]
    return gm
