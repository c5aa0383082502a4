"""Direct launches of compiled Triton kernels, checked against Triton's own launch.

A training step launches graphpass's kernels hundreds of times with a few dozen argument
specializations. Each ``kernel[grid](...)`` goes through ``JITFunction.run``, which binds and
specializes every argument and builds a cache key before it reaches the compiled kernel: about half
of a launch's host time (``examples/host_cost.py``), and the host is what a fast GPU waits on.

:func:`direct_launch` wraps a ``@triton.jit`` kernel so that ``kernel[grid](...)`` looks the compiled
kernel up by a key of its own, computed in a few microseconds, and calls it as ``JITFunction.run``
would. That key is at least as fine as Triton's specialization (tensor dtypes and 16-byte alignment,
specialized integers by value, unspecialized ones by width, constexprs and options by value), so a
key never stands for two compiled kernels. Nothing is assumed about how a Triton version calls its
compiled kernels: the first launch of a key goes through Triton, the second too while recording the
call Triton makes to the compiled kernel, and only if that call is the one this module would make
(the same grid, stream, function and metadata, launch hooks that do nothing, the same arguments in
the same order) does the key launch directly from then on. Launch hooks that do something
(profilers) send every launch through Triton.
``GRAPHPASS_DIRECT_LAUNCH=0`` turns direct launches off.

:class:`StubDriver` and :func:`stub_compiles` run this launch work on a machine without a GPU, up to
where a compiled kernel would call the driver: ``examples/host_cost.py`` measures it so, and the
tests check direct launches against Triton's so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.runtime.interpreter
from triton.runtime import driver

__all__ = ["DirectLaunch", "direct_launch", "StubDriver", "stub_compiles"]

log = logging.getLogger(__name__)

ENABLED = os.environ.get("GRAPHPASS_DIRECT_LAUNCH", "1") != "0"
# Keys per kernel before its table starts over. Specialized integers (sizes) are keyed by value, so
# inputs of ever-changing shape would grow it without end; a step of a fixed model needs dozens.
MAX_KEYS = 4096

try:  # triton >= 3.4
    from triton import knobs as _knobs

    def _hooks() -> tuple[Any, Any]:
        runtime = _knobs.runtime
        return runtime.launch_enter_hook, runtime.launch_exit_hook

except ImportError:  # older triton keeps the hooks on CompiledKernel
    from triton.compiler.compiler import CompiledKernel as _CompiledKernel

    def _hooks() -> tuple[Any, Any]:
        return getattr(_CompiledKernel, "launch_enter_hook", None), getattr(_CompiledKernel, "launch_exit_hook", None)


def _acts(hook: Any) -> bool:
    """Whether a launch hook does something: newer Triton keeps an empty ``HookChain`` when none is set."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _int_width(value: int) -> int:
    """Triton's integer argument types: i32, i64, u64 (by range)."""
    if -(2**31) <= value < 2**31:
        return 32
    return 64 if -(2**63) <= value < 2**63 else 65


class _Entry:
    """One key's compiled kernel, and the argument tail a direct call appends (None: not checked yet)."""

    __slots__ = ("kernel", "tail")

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.tail: tuple | None = None


class DirectLaunch:
    """``kernel[grid](*args, **kwargs)`` with direct launches after the checks above. ``args`` are the
    kernel's leading parameters, ``kwargs`` its constexprs and Triton options."""

    def __init__(self, fn: triton.runtime.JITFunction) -> None:
        self.fn = fn
        self._names = [p.name for p in fn.params]
        self._unspecialized = tuple(bool(getattr(p, "do_not_specialize", False)) for p in fn.params)
        self._entries: dict[tuple, _Entry] = {}
        # None until the first launch; False where launches must all go through Triton: a target
        # other than CUDA (whose specializations this key may not cover), or a Triton whose call
        # to the compiled kernel differs from a direct one.
        self._direct: bool | None = None

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict[str, Any]) -> None:
        active = driver.active
        device = active.get_current_device()
        try:
            key = self._key(device, args, kwargs)
            entry = self._entries.get(key)
        except TypeError:  # an unhashable argument: Triton decides
            key = entry = None
        enter, exit_ = _hooks()
        if entry is None or entry.tail is None or _acts(enter) or _acts(exit_):
            self._through_triton(grid, args, kwargs, key, entry)
            return
        kernel = entry.kernel
        kernel.run(
            grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
            active.get_current_stream(device), kernel.function, kernel.packed_metadata, None, None, None,
            *args, *entry.tail,
        )  # fmt: skip

    def _key(self, device: int, args: tuple, kwargs: dict[str, Any]) -> tuple:
        key: list[Any] = [device]
        add = key.append
        for value, unspecialized in zip(args, self._unspecialized):
            kind = type(value)
            if kind is torch.Tensor or (kind is not int and isinstance(value, torch.Tensor)):
                add(value.dtype)
                add(value.data_ptr() % 16 == 0)
            elif kind is int:
                add(value if not unspecialized else 32 if -(2**31) <= value < 2**31 else _int_width(value))
            elif kind is float:
                add(float)  # Triton does not specialize floats
            else:
                add((kind, value))
        key.extend(kwargs.items())
        return tuple(key)

    def _through_triton(self, grid, args, kwargs, key, entry: _Entry | None) -> None:
        if self._direct is None:
            self._direct = driver.active.get_current_target().backend == "cuda"
        if key is None or not self._direct or any(_acts(hook) for hook in _hooks()):
            self.fn[grid](*args, **kwargs)
        elif entry is None:
            kernel = self.fn[grid](*args, **kwargs)
            if all(hasattr(kernel, name) for name in ("run", "function", "packed_metadata")):
                if len(self._entries) >= MAX_KEYS:  # shapes that keep changing: start over
                    self._entries.clear()
                self._entries[key] = _Entry(kernel)
        else:
            self._check(grid, args, kwargs, entry)

    def _check(self, grid, args, kwargs, entry: _Entry) -> None:
        """Launch through Triton, recording its call to the compiled kernel; if that call is the one a
        direct launch makes, the key launches directly from now on."""
        kernel = entry.kernel
        calls: list[tuple] = []
        forward = kernel.run
        own = "run" in vars(kernel)
        try:
            kernel.run = lambda *call: (calls.append(call), forward(*call))[1]
        except AttributeError:  # a compiled kernel that takes no attributes: no recording
            self._stop_direct()
            self.fn[grid](*args, **kwargs)
            return
        try:
            launched = self.fn[grid](*args, **kwargs)
        finally:
            if own:
                kernel.run = forward
            else:
                del kernel.run
        entry.tail = self._tail(grid, args, kwargs, kernel, calls) if launched is kernel and len(calls) == 1 else None
        if entry.tail is None:
            self._stop_direct()

    def _stop_direct(self) -> None:
        log.info("%s: Triton's launch differs from a direct one; launching through Triton", self.fn.__name__)
        self._direct = False
        self._entries.clear()

    def _tail(self, grid, args, kwargs, kernel, calls) -> tuple | None:
        """What a direct call appends to ``args``, if Triton's recorded call equals a direct one."""
        (call,) = calls
        active = driver.active
        head = (
            grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
            active.get_current_stream(active.get_current_device()), kernel.function, kernel.packed_metadata,
        )  # fmt: skip
        # Then the launch metadata, which the compiled kernel only hands to the hooks, and the hooks: a
        # direct call passes None for all three, so Triton's must do nothing with them either.
        hooks = call[len(head) + 1 : len(head) + 3]
        if not _same(call[: len(head)], head) or len(hooks) != 2 or any(_acts(h) for h in hooks):
            return None
        head_len = len(head) + 3
        if not _same(call[head_len : head_len + len(args)], args):
            return None
        tail = call[head_len + len(args) :]
        rest = self._names[len(args) :]
        constexprs = tuple(kwargs[name] for name in rest) if all(name in kwargs for name in rest) else None
        for candidate in (constexprs, ()):  # every parameter (newer Triton), or the runtime ones only
            if candidate is not None and _same(tail, candidate):
                return candidate
        return None


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        x is y or (type(x) is type(y) and not isinstance(x, torch.Tensor) and x == y) for x, y in zip(a, b)
    )


def direct_launch(fn: Any) -> Any:
    """Decorator over ``@triton.jit``: a :class:`DirectLaunch`, or ``fn`` itself where it is not a
    JITFunction (``TRITON_INTERPRET=1`` makes interpreted functions) or direct launches are off."""
    return DirectLaunch(fn) if ENABLED and isinstance(fn, triton.runtime.JITFunction) else fn


# ----------------------------------------------------------------------------- without a GPU


class StubDriver:
    """Triton's active driver on a machine without a GPU: device 0, stream 0, an H100's target.
    Make it active with ``triton.runtime.driver.set_active(StubDriver())``."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


class _StubKernel:
    """A compiled kernel in a JITFunction's cache whose launch reports its call instead of calling the driver."""

    function = None
    packed_metadata = None

    def __init__(self, on_launch: Callable[[Any, tuple], None]) -> None:
        self.on_launch = on_launch

    def launch_metadata(self, grid, stream, *args) -> dict | None:
        # As Triton's: metadata for the enter hook, where there is one (newer Triton: always a chain).
        return None if _hooks()[0] is None else {"grid": grid, "stream": stream}

    def run(self, *call) -> None:
        self.on_launch(self, call)


def stub_compiles(
    kernel: Any, on_launch: Callable[[Any, tuple], None], *, compile_for_target: bool = False
) -> triton.runtime.JITFunction:  # fmt: skip
    """A new JITFunction of ``kernel``'s Python function (``kernel``: a :class:`DirectLaunch`, a
    JITFunction or, under ``TRITON_INTERPRET=1``, an interpreted function), whose compiles put a stub
    compiled kernel in its cache; the stub's launches call ``on_launch(stub, call)`` with the
    arguments Triton passed it. ``kernel`` itself, and its compiled kernels on a GPU, stay as they
    are. Needs :class:`StubDriver` active. With ``compile_for_target`` each specialization is first
    compiled for real, for the stub driver's H100 (Triton's compiler and its bundled ptxas, no GPU):
    a kernel that would not build on the GPU fails here."""
    source = kernel.fn if isinstance(kernel, DirectLaunch) else kernel
    if isinstance(source, triton.runtime.interpreter.InterpretedFunction):
        options = source.kwargs
    else:
        options = {
            "do_not_specialize": getattr(source, "do_not_specialize", None),
            "do_not_specialize_on_alignment": getattr(source, "do_not_specialize_on_alignment", None),
        }
    jit = triton.runtime.JITFunction(source.fn, **{k: v for k, v in options.items() if v is not None})
    if not (hasattr(jit, "device_caches") and hasattr(jit, "_do_compile")):
        raise AttributeError("this Triton's JITFunction has no device_caches/_do_compile to stub")

    compile_for_real = jit._do_compile

    def compile_stub(key, signature, device, *args, **kwargs):
        if compile_for_target:
            compile_for_real(key, signature, device, *args, **kwargs)  # its cache entry is replaced below
        stub = jit.device_caches[device][0][key] = _StubKernel(on_launch)
        return stub

    jit._do_compile = compile_stub
    return jit
