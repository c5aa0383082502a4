"""Direct launches of compiled Triton kernels (graphpass.triton_launch), checked against Triton's own
launch on the CPU: a stub driver stands in for the GPU, and stub compiled kernels record the call
each launch makes to them."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import graphpass.triton_kernels as kernels  # noqa: E402
import graphpass.triton_launch as triton_launch  # noqa: E402
from graphpass.triton_launch import DirectLaunch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The metadata and hook slots of a compiled kernel's call: a direct launch passes None in all three.
HEAD, HOOKS = 6, slice(6, 9)


@pytest.fixture
def stub_driver():
    driver = triton.runtime.driver
    previous = getattr(driver, "_active", None)
    driver.set_active(triton_launch.StubDriver())
    yield
    driver.set_active(previous)


class Recorder:
    """The calls stub compiled kernels receive, with the stub each went to."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, tuple]] = []

    def __call__(self, stub, call) -> None:
        self.calls.append((stub, call))


def _unpack_launch(numel: int = 8 * 64 * 256, channels: int = 64, inner: int = 256, offset: int = 0):
    """The arguments graphpass.triton_kernels.anchored_unpack gives its kernel (ReLU epilogue)."""
    codes = torch.zeros(numel // 2, dtype=torch.uint8)
    flags = torch.zeros(numel // 512, dtype=torch.uint8)
    grid = torch.rand(channels, 3)
    out = torch.empty(numel + offset)[offset:]
    magic = kernels._magic
    args = (
        codes, flags, grid, grid, grid, grid, grid, out, numel, channels, inner, *magic(channels), *magic(inner),
        1, 1, *magic(1), *magic(1), 0.0,
    )  # fmt: skip
    kwargs = dict(
        BITS=4, BLOCK=512, WIDE=False, INNER_IS_ONE=False, ACTIVATION=1, AFFINE=False, PER_SAMPLE=False,
        BATCH_INNER_IS_ONE=True, ON_CUDA=True, ADD_GRAD=False, GRAD_ACTIVATION=0, num_warps=4,
    )  # fmt: skip
    return (numel // 512,), args, kwargs


def _direct(recorder: Recorder) -> DirectLaunch:
    return DirectLaunch(triton_launch.stub_compiles(kernels._anchored_unpack_kernel, recorder))


def _through_triton_count(launcher: DirectLaunch, monkeypatch) -> list[int]:
    count = [0]
    run = launcher.fn.run

    def counted(*args, **kwargs):
        count[0] += 1
        return run(*args, **kwargs)

    monkeypatch.setattr(launcher.fn, "run", counted)
    return count


def _launched(monkeypatch, times: int):
    """A direct launcher of the unpack kernel after ``times`` launches with one set of arguments: its
    recorder, the launcher, its count of launches through Triton and the (grid, args, kwargs)."""
    recorder = Recorder()
    launcher = _direct(recorder)
    through_triton = _through_triton_count(launcher, monkeypatch)
    grid, args, kwargs = _unpack_launch()
    for _ in range(times):
        launcher[grid](*args, **kwargs)
    return recorder, launcher, through_triton, (grid, args, kwargs)


def test_direct_launch_calls_the_compiled_kernel_as_triton_does(stub_driver, monkeypatch):
    recorder, _, through_triton, (_, args, _) = _launched(monkeypatch, 4)
    # Triton compiles (1st), Triton again while its call is recorded (2nd), then direct calls.
    assert through_triton[0] == 2 and len(recorder.calls) == 4
    reference_stub, reference = recorder.calls[1]
    for stub, call in recorder.calls[2:]:
        assert stub is reference_stub  # the kernel Triton picked for these arguments
        assert call[HOOKS] == (None, None, None)
        assert len(call) == len(reference)
        assert all(a is b or a == b for a, b in zip(call[:HEAD] + call[9:], reference[:HEAD] + reference[9:]))
    # The arguments: the kernel's runtime arguments, then its constexprs in signature order.
    assert call[9 : 9 + len(args)] == args and call[9 + len(args) :] == (4, 512, False, False, 1, False, False, True, True, False, 0)


def test_a_key_never_stands_for_two_specializations(stub_driver, monkeypatch):
    recorder, launcher, through_triton, (grid, args, kwargs) = _launched(monkeypatch, 3)
    aligned_stub = recorder.calls[-1][0]
    # An output 4 bytes off 16-byte alignment, a specialized integer (numel) no longer a multiple of 16,
    # and another constexpr each make Triton compile another kernel: the key must tell them apart.
    variants = [_unpack_launch(offset=1), _unpack_launch(numel=8 * 64 * 256 + 8), (grid, args, {**kwargs, "ACTIVATION": 2})]
    for v_grid, v_args, v_kwargs in variants:
        before = through_triton[0]
        launcher[v_grid](*v_args, **v_kwargs)
        assert through_triton[0] == before + 1  # a new key goes through Triton
        assert recorder.calls[-1][0] is not aligned_stub
    # Specialized integers are keyed by value, finer than Triton: another multiple of 16 is a new key
    # for the same compiled kernel.
    launcher[grid](*_unpack_launch(numel=8 * 64 * 256 + 512)[1], **kwargs)
    assert recorder.calls[-1][0] is aligned_stub and len(launcher._entries) == 5
    # Unspecialized integers (the division magics) change freely within one width: no new key.
    magic_args = list(args)
    magic_args[11] += 1
    launcher[grid](*magic_args, **kwargs)
    assert len(launcher._entries) == 5 and recorder.calls[-1][0] is aligned_stub


def test_launch_hooks_send_every_launch_through_triton(stub_driver, monkeypatch):
    knobs = pytest.importorskip("triton.knobs")
    recorder, launcher, through_triton, (grid, args, kwargs) = _launched(monkeypatch, 3)
    assert through_triton[0] == 2
    hook = knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):  # a HookChain (newer Triton)

        def profiler(metadata):
            return None

        hook.add(profiler)
        try:
            launcher[grid](*args, **kwargs)
        finally:
            hook.remove(profiler)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)
        launcher[grid](*args, **kwargs)
        monkeypatch.undo()
    assert through_triton[0] == 3 and recorder.calls[-1][1][HOOKS] != (None, None, None)


def test_a_triton_that_calls_its_kernels_otherwise_keeps_launching_through_triton(stub_driver, monkeypatch):
    recorder = Recorder()
    launcher = _direct(recorder)
    run = triton.runtime.JITFunction.run

    def run_with_an_extra_argument(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:
            kernel.run(*grid, 1, 1, 0, kernel.function, kernel.packed_metadata, None, None, None, "extra", *args)
        return kernel

    monkeypatch.setattr(triton.runtime.JITFunction, "run", run_with_an_extra_argument)
    grid, args, kwargs = _unpack_launch()
    for _ in range(4):
        launcher[grid](*args, **kwargs)
    assert launcher._direct is False and not launcher._entries
    assert len(recorder.calls) == 4 and all(call[9] == "extra" for _, call in recorder.calls)


def test_graphpass_kernels_launch_directly_unless_turned_off(monkeypatch):
    kernel = kernels._mask_unpack_kernel  # interpreted here (TRITON_INTERPRET=1), a DirectLaunch on a GPU
    interpreted = kernel if isinstance(kernel, triton.runtime.interpreter.InterpretedFunction) else None
    jit = triton.runtime.JITFunction(kernel.fn if interpreted else kernel.fn.fn)
    assert isinstance(triton_launch.direct_launch(jit), DirectLaunch)
    if interpreted is not None:  # interpreted kernels launch as they are
        assert triton_launch.direct_launch(interpreted) is interpreted
    monkeypatch.setattr(triton_launch, "ENABLED", False)  # GRAPHPASS_DIRECT_LAUNCH=0
    assert triton_launch.direct_launch(jit) is jit


@pytest.mark.slow
@pytest.mark.parametrize(
    "norm, kernels_used",
    [
        ("keep", {"_layer_tables_kernel", "_anchored_channel_sums_kernel", "_mask_pack_kernel"}),
        ("gn+pn", {"_layer_tables_kernel", "_anchored_table_kernel", "_proxy_statistics_kernel", "_group_norm_tables_kernel"}),
    ],
)
def test_every_kernel_of_a_training_step_ends_up_launching_directly(stub_driver, monkeypatch, norm, kernels_used):
    """resnet18's compressed step through the runtime's CUDA path (CPU tensors, stub compiled kernels
    that compute nothing), with its BatchNorms or GroupNorm + PN-Act: each kernel's real call sites
    pass the checks, so after two steps no launch goes through Triton."""
    import torch.nn.functional as F

    import graphpass as gp
    from graphpass import quantize, runtime

    launchers = {}
    for name in dir(kernels):
        kernel = getattr(kernels, name)
        if name.endswith("_kernel") and isinstance(kernel, (DirectLaunch, triton.runtime.interpreter.InterpretedFunction)):
            launchers[name] = DirectLaunch(triton_launch.stub_compiles(kernel, Recorder()))
            monkeypatch.setattr(kernels, name, launchers[name])
    monkeypatch.setattr(quantize, "KERNEL_DEVICES", ("cuda", "cpu"))  # CPU tensors take the CUDA path
    monkeypatch.setattr(runtime, "MIN_PACKED_NUMEL", 64)  # tiny tensors take the full-size paths
    torch.manual_seed(0)
    x, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    gm = gp.transform(gp.load_model("torchvision:resnet18").train(), (x,), bits=4, norm=norm)
    through_triton = {name: _through_triton_count(launcher, monkeypatch) for name, launcher in launchers.items()}
    for _ in range(2):  # each key: Triton's launch, then Triton's launch recorded and checked
        F.cross_entropy(gm(x), labels).backward()
    before = {name: count[0] for name, count in through_triton.items()}
    F.cross_entropy(gm(x), labels).backward()
    used = {name for name, launcher in launchers.items() if launcher._entries}
    assert used >= {"_anchored_pack_kernel", "_anchored_unpack_kernel", "_group_pack_kernel", *kernels_used}
    for name in used:
        launcher = launchers[name]
        assert launcher._direct and all(entry.tail is not None for entry in launcher._entries.values()), name
        assert through_triton[name][0] == before[name], name


_LAYER_KERNELS = (
    "_layer_tables_kernel", "_anchored_pack_kernel", "_anchored_unpack_kernel", "_anchored_channel_sums_kernel",
    "_group_pack_kernel", "_group_unpack_kernel", "_mask_pack_kernel", "_mask_unpack_kernel", "_proxy_statistics_kernel",
    "_group_norm_tables_kernel",
)  # fmt: skip


def _layer_kernels_once(y: torch.Tensor, grad: torch.Tensor, stats: tuple) -> list[torch.Tensor]:
    """One BatchNorm layer's kernels, forward and backward, the generic and mask kernels, and a
    GroupNorm + PN-Act layer's (:func:`_group_norm_layer_kernels`)."""
    from graphpass import quantize

    grid, floats = quantize.layer_tables(*stats, bits=4, store_output=True)
    packed = quantize.pack_anchored(y, 4, grid=grid)
    rebuilt = quantize.unpack(packed, activation=quantize.Activation("relu"), scale=floats[0], shift=floats[1])
    groups, mask = quantize.pack_groups(y, 4), quantize.pack_positive_mask(y)
    return [
        grid, floats, packed.codes, packed.flags, rebuilt, *quantize.batch_norm_backward(packed, grad, floats[2:5]),
        groups.codes, quantize.unpack(groups), mask.codes, quantize.unpack(mask, dtype=torch.float32),
        *_group_norm_layer_kernels(stats, packed, grad),
    ]  # fmt: skip


def _group_norm_layer_kernels(params: tuple, packed, grad: torch.Tensor) -> list[torch.Tensor]:
    """A GroupNorm + PN-Act layer's tables, proxy statistics and their gradients, and its backward
    from the copy (``packed``: 8 samples of 64 channels, taken as 16 groups)."""
    from graphpass import proxy_norm, quantize

    per_group = (params[0].view(4, 16), params[1].view(4, 16))  # 4 samples, 16 groups of the 64 channels
    floats = quantize.layer_tables(*per_group, params[2], params[3], bits=None, store_output=True, channels=64)[1]
    pn = dict(activation="silu", negative_slope=0.01, num_points=200)
    mu, inv_std = proxy_norm._statistics(params, proxy_eps=0.03, **pn)
    backward_floats = torch.cat([floats[2:5]] * 2, dim=1)  # the 4 samples' tables twice: 8 samples
    grad_x, rows = quantize.group_norm_backward(
        packed, grad, backward_floats, params[2], params[3], groups=16, activation=quantize.Activation("silu"),
        output_map=(mu, inv_std),
    )  # fmt: skip
    return [
        floats, mu, inv_std, *proxy_norm._proxy_statistics_grads(params, mu, inv_std, params[0], params[3], **pn),
        grad_x, rows,
    ]  # fmt: skip


@pytest.mark.gpu
def test_direct_launches_on_a_gpu_give_triton_s_results(monkeypatch):
    """On a real driver: the results of Triton's own launches, then of three more rounds with the
    same tensors, the last launching every kernel directly, are equal bit for bit."""
    if not triton_launch.ENABLED:
        pytest.skip("GRAPHPASS_DIRECT_LAUNCH=0")
    y = torch.randn(8, 64, 16, 16, device="cuda")
    grad = torch.randn_like(y)
    stats = tuple(t.cuda() for t in (torch.randn(64), torch.rand(64) + 0.5, torch.rand(64) + 0.5, torch.randn(64)))
    with monkeypatch.context() as through_triton:
        for name in _LAYER_KERNELS:
            through_triton.setattr(kernels, name, getattr(kernels, name).fn)
        reference = _layer_kernels_once(y, grad, stats)
    runs = [_layer_kernels_once(y, grad, stats) for _ in range(2)]  # Triton's launch, then the check
    counts = {name: _through_triton_count(getattr(kernels, name), monkeypatch) for name in _LAYER_KERNELS}
    runs.append(_layer_kernels_once(y, grad, stats))
    torch.cuda.synchronize()
    assert {name: count[0] for name, count in counts.items()} == dict.fromkeys(_LAYER_KERNELS, 0)
    for run in runs:
        assert all(torch.equal(got, ref) for got, ref in zip(run, reference))
