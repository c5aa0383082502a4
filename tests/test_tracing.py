import pytest
import torch

import graphpass as gp
from graphpass.meta import META_MODULE, META_TENSOR, TensorInfo
from tests.models import DataDependent, Gate, SmallResNet


def test_trace_propagates_shapes_without_allocating():
    gm = gp.trace(SmallResNet(), gp.example_inputs(512, 64, device="meta"))
    infos = {n.name: n.meta[META_TENSOR] for n in gm.graph.nodes}
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert infos[out.name] == TensorInfo((512, 10), torch.float32, 512 * 10 * 4)
    assert all(META_MODULE in n.meta for n in gm.graph.nodes)


def test_untraceable_module_is_named_with_source_line():
    with pytest.raises(gp.TraceError) as e:
        gp.trace(DataDependent())
    msg = str(e.value)
    assert "'gate' (Gate)" in msg and "models.py" in msg and "if x.sum() > 0" in msg and "leaf_modules" in msg
    gm = gp.trace(DataDependent(), leaf_modules=[Gate])  # the documented fix works
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("torchvision:resnet5000", "unknown torchvision model 'resnet5000'"),
        ("resnet18", "is not of the form"),
        ("nowhere/model.py:make", "does not exist"),
        ("foo:bar", "neither 'torchvision', 'timm' nor a .py file"),
    ],
)
def test_bad_model_strings(spec, fragment):
    with pytest.raises(gp.ModelSpecError, match=fragment.replace("(", r"\(")):
        gp.load_model(spec)


def test_factory_that_raises(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def make():\n    raise ValueError('no weights here')\n")
    with pytest.raises(gp.ModelSpecError, match=r"make\(\) raised ValueError: no weights here"):
        gp.load_model(f"{f}:make")


def test_wrong_input_shape_names_the_node():
    with pytest.raises(gp.InputError, match=r"node stem_0 .*\(2, 1, 32, 32\)"):
        gp.trace(SmallResNet(), (torch.randn(2, 1, 32, 32),))


def test_stochastic_depth_follows_train_and_eval_after_tracing():
    from torchvision.ops import StochasticDepth

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), StochasticDepth(0.5, "row"))
    gm = gp.trace(model)
    x = torch.randn(64, 4)
    gm.eval()
    assert torch.equal(gm(x), model.eval()(x))  # eval: no random drops baked in at trace time
    gm.train()
    assert (gm(x) == 0).all(dim=1).any()  # train: rows are dropped


def test_retracing_a_transformed_model_keeps_proxy_norm_modules():
    from graphpass.proxy_norm import ProxyNormAct

    gm = gp.transform(SmallResNet(), (torch.randn(2, 3, 16, 16),), bits=None, norm="gn+pn")
    again = gp.trace(gm)
    modules = [again.get_submodule(n.target) for n in again.graph.nodes if n.op == "call_module"]
    assert sum(isinstance(m, ProxyNormAct) for m in modules) == 2


@pytest.mark.parametrize("bits", [None, 4])
def test_shape_propagation_does_not_count_a_batchnorm_step(bits):
    """Fake-tensor runs reach real buffers changed in place: num_batches_tracked counted each one."""
    model = SmallResNet().train()
    counters = {n: b.clone() for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}
    x = torch.randn(2, 3, 16, 16)
    gm = gp.transform(model, (x,), bits=bits)
    assert counters and all(torch.equal(gm.get_buffer(n), c) for n, c in counters.items())
    model(x)
    gm(x)
    assert all(torch.equal(gm.get_buffer(n), model.get_buffer(n)) for n in counters)
