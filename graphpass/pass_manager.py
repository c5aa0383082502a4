"""A small pass manager: an explicit ordered list, lint and recompile after each rewrite,
metadata invalidation and re-propagation, and errors naming the failing pass."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch.fx

from graphpass.errors import GraphpassError, PassError
from graphpass.meta import META_TENSOR, clear_meta
from graphpass.pass_base import PassKind, PassResult, pass_spec

__all__ = ["PassManager"]

log = logging.getLogger(__name__)

PassFn = Callable[[torch.fx.GraphModule], PassResult]


class PassManager:
    """Run passes in order.

    After a rewrite that reports ``modified``: ``graph.lint()``, ``recompile()``, drop the metadata
    keys it declares invalid, and (given example inputs) propagate shapes again so the next pass
    sees fresh ``graphpass.tensor`` metadata.

    Args:
        passes: callables ``gm -> PassResult`` (bind configuration with functools.partial).
        example_inputs: inputs for shape re-propagation after rewrites; None skips it.
        disabled: pass names to skip.
    """

    def __init__(
        self,
        passes: Sequence[PassFn],
        *,
        example_inputs: Sequence[Any] | None = None,
        disabled: Iterable[str] = (),
    ) -> None:
        self.passes = list(passes)
        self.example_inputs = example_inputs
        self.disabled = frozenset(disabled)
        self.debug = os.environ.get("GRAPHPASS_DEBUG") == "1"

    def run(self, gm: torch.fx.GraphModule) -> list[PassResult]:
        from graphpass.tracing import propagate_shapes

        results: list[PassResult] = []
        done: list[str] = []
        for fn in self.passes:
            spec = pass_spec(fn)
            if spec.name in self.disabled:
                log.info("pass %s disabled", spec.name)
                continue
            try:
                result = fn(gm)
            except GraphpassError as e:
                raise type(e)(f"{e} (in pass {spec.name}; before it: {', '.join(done) or 'none'})") from e
            except Exception as e:
                raise PassError(
                    f"pass {spec.name} failed: {type(e).__name__}: {e} "
                    f"(passes before it: {', '.join(done) or 'none'})"
                ) from e
            if result.graph_module is not gm:
                raise PassError(f"pass {spec.name} returned a different GraphModule; rewrites work in place")
            if result.modified and spec.kind is PassKind.REWRITE:
                gm.graph.lint()
                gm.recompile()
                clear_meta(gm.graph, spec.invalidates | {META_TENSOR})
                if self.example_inputs is not None:
                    propagate_shapes(gm, self.example_inputs)
                if self.debug:
                    log.debug("after %s:\n%s", spec.name, gm.code)
            log.info("pass %s: modified=%s stats=%s", spec.name, result.modified, dict(result.stats))
            results.append(result)
            done.append(spec.name)
        return results

