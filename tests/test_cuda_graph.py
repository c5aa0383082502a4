"""A transformed model's whole training step captured in a CUDA graph (gp.capture_step)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import graphpass as gp
from graphpass.cli import main
from graphpass.errors import InputError, UnsupportedError
from tests.models import SmallResNet


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_capture_needs_a_cuda_device(capsys):
    with pytest.raises(InputError, match="CUDA device"):
        gp.capture_step(lambda: None)
    assert main(["bench", "torchvision:resnet18", "--device", "cpu", "--cuda-graph"]) == 2
    assert "CUDA graphs need --device cuda" in capsys.readouterr().err


def test_a_failed_capture_is_a_clear_error(monkeypatch):
    """The CUDA calls are stood in for, so this runs without a GPU: the capture's error surfaces as an
    UnsupportedError that says what happened, not as CUDA's "a previous error during capture"."""
    import contextlib
    import types

    class Capture:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    fake_stream = types.SimpleNamespace(wait_stream=lambda other: None)
    for name, value in {
        "is_available": lambda: True,
        "device": lambda device: contextlib.nullcontext(),
        "Stream": lambda: fake_stream,
        "stream": lambda stream: contextlib.nullcontext(),
        "current_stream": lambda: fake_stream,
        "CUDAGraph": lambda: types.SimpleNamespace(replay=lambda: None),
        "graph": lambda graph: Capture(),
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    steps = []
    with pytest.raises(UnsupportedError, match="could not be recorded as a CUDA graph .CUDA error: operation failed"):
        gp.capture_step(lambda: steps.append(1), warmup_steps=2)
    assert len(steps) == 3  # two warm-up steps, then the one being recorded


def _training(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, None])
def test_replayed_steps_train_like_eager_steps(bits):
    """Five steps from the same weights, eager and captured (three warm-up steps, then two replays:
    recording runs nothing): the same kernels run, so the weights agree."""
    x = torch.randn(8, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    model = SmallResNet().cuda().train()
    if bits is not None:
        model = gp.transform(model, (x,), bits=bits)
    eager, captured = model, copy.deepcopy(model)
    eager_step = _training(eager, x, y)
    for _ in range(5):
        eager_step()
    replay = gp.capture_step(_training(captured, x, y), warmup_steps=3)
    replay()
    replay()
    torch.cuda.synchronize()
    for (name, a), b in zip(eager.named_parameters(), captured.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # A new batch is read from the captured input tensors.
    x.copy_(torch.randn_like(x))
    before = [p.detach().clone() for p in captured.parameters()]
    replay()
    assert any(not torch.equal(p, q) for p, q in zip(captured.parameters(), before))


@pytest.mark.gpu
def test_stochastic_rounding_is_refused_under_capture():
    x = torch.randn(4, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    model = gp.transform(SmallResNet().cuda().train(), (x,), bits=4, rounding="stochastic")
    with pytest.raises(UnsupportedError, match="stochastic rounding under CUDA graph capture"):
        gp.capture_step(_training(model, x, y), warmup_steps=1)


@pytest.mark.gpu
@pytest.mark.parametrize("image", [32, 224])  # at 32 px the last stage's activations are kept as they are
def test_bench_with_cuda_graphs_runs_every_method(image):
    from graphpass.bench import run_bench

    doc = run_bench("torchvision:resnet18", batch=4, image=image, device="cuda", bits=4, steps=2, cuda_graph=True)
    assert doc["cuda_graph"] is True
    for r in doc["runs"]:
        assert r["error"] is None, r
        assert r["peak_bytes"] > 0 and r["step_ms"] > 0
