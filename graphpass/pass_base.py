"""The pass contract: a pass is a plain function ``GraphModule -> PassResult``.

Rewrites mutate the GraphModule in place and return the same object; analyses leave the graph
alone and return their graph-level result in ``PassResult.analysis``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch.fx

__all__ = ["PassKind", "PassSpec", "PassResult", "graph_pass", "PASS_REGISTRY", "pass_spec"]


class PassKind(str, Enum):
    ANALYSIS = "analysis"
    REWRITE = "rewrite"


@dataclass(frozen=True)
class PassSpec:
    name: str
    kind: PassKind
    invalidates: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    stats: Mapping[str, int] = field(default_factory=dict)
    analysis: Any = None


PASS_REGISTRY: dict[str, Callable[..., PassResult]] = {}


def graph_pass(
    *, kind: PassKind, invalidates: tuple[str, ...] = (), name: str | None = None
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Register a function as a named pass and attach its :class:`PassSpec`.

    Analyses may not modify the graph: the wrapper checks the returned ``modified`` flag.
    """

    def decorate(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        spec = PassSpec(name or fn.__name__, PassKind(kind), frozenset(invalidates))
        if spec.name in PASS_REGISTRY:
            raise ValueError(f"a pass named {spec.name!r} is already registered")

        @functools.wraps(fn)
        def wrapper(gm: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> PassResult:
            result = fn(gm, *args, **kwargs)
            if not isinstance(result, PassResult):
                raise TypeError(f"pass {spec.name} returned {type(result).__name__}, not PassResult")
            if spec.kind is PassKind.ANALYSIS and result.modified:
                raise AssertionError(f"analysis pass {spec.name} reported modifying the graph")
            return result

        wrapper.spec = spec  # type: ignore[attr-defined]
        PASS_REGISTRY[spec.name] = wrapper
        return wrapper

    return decorate


def pass_spec(fn: Callable[..., PassResult]) -> PassSpec:
    """The spec of a registered pass, or an ad-hoc rewrite spec for a plain function.

    Looks through functools.partial, which is how pipelines bind a pass's configuration.
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    spec = getattr(fn, "spec", None)
    if spec is None:
        name = getattr(fn, "__name__", repr(fn))
        spec = PassSpec(name, PassKind.REWRITE)
    return spec
