"""expand_norm_act: timm's norm-and-activation modules split into norm and activation nodes, exactly
equivalent (forward, gradients, running statistics, state dict), and then compressed as layers."""

import copy
import logging

import pytest
import torch
from torch import nn

import graphpass as gp
from graphpass.meta import META_FROM_PASS, META_TENSOR
from passes.expand_norm_act import expand_norm_act

timm = pytest.importorskip("timm")
BatchNormAct2d = timm.layers.BatchNormAct2d


class TwoLayers(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = first
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = second

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x)))) + 1.0


def timm_model() -> nn.Module:
    torch.manual_seed(0)
    model = TwoLayers(BatchNormAct2d(8, act_layer=nn.Hardswish), BatchNormAct2d(8, act_layer=nn.ReLU, act_kwargs={"inplace": True}))
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.train()


def expanded(model: nn.Module, x: torch.Tensor):
    gm = gp.trace(copy.deepcopy(model), (x,), leaf_modules=[BatchNormAct2d])
    return gm, expand_norm_act(gm)


def step(model: nn.Module, x: torch.Tensor):
    # A fixed random projection as the loss: through a final BatchNorm, sum(out**2)'s input gradient
    # is mostly cancellation (see tests/test_compression.py).
    model.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    out = model(xr)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    return out.detach(), xr.grad, {n: p.grad for n, p in model.named_parameters()}


def test_split_into_norm_and_activation_nodes():
    x = torch.randn(4, 3, 8, 8)
    gm, result = expanded(timm_model(), x)
    assert result.modified and result.stats == {"norm_act_expanded": 2}
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["conv1", "bn1", "bn1.act", "conv2", "bn2", "bn2.act"]
    assert type(gm.bn1) is nn.BatchNorm2d and isinstance(gm.bn1.act, nn.Hardswish)
    act = next(n for n in gm.graph.nodes if n.target == "bn1.act")
    assert act.meta[META_FROM_PASS] == "expand_norm_act" and act.meta[META_TENSOR].shape == (4, 8, 8, 8)


def test_forward_gradients_and_running_statistics_are_unchanged():
    model, x = timm_model(), torch.randn(4, 3, 8, 8)
    gm, _ = expanded(model, x)
    assert list(gm.state_dict()) == list(model.state_dict())
    for _ in range(2):  # two steps: running statistics and num_batches_tracked advance alike
        out_r, gin_r, g_r = step(model, x)
        out_c, gin_c, g_c = step(gm, x)
        assert torch.equal(out_c, out_r)
        torch.testing.assert_close(gin_c, gin_r, rtol=1e-6, atol=1e-7)
        for name, g in g_r.items():
            torch.testing.assert_close(g_c[name], g, rtol=1e-6, atol=1e-7)
    for name, value in model.state_dict().items():
        assert torch.equal(gm.state_dict()[name], value), name
    model.eval()
    gm.eval()
    assert torch.equal(gm(x), model(x))


def test_is_idempotent_and_leaves_other_norms_alone():
    x = torch.randn(2, 3, 8, 8)
    gm, _ = expanded(timm_model(), x)
    code = gm.code
    again = expand_norm_act(gm)
    assert not again.modified and gm.code == code

    plain = TwoLayers(nn.BatchNorm2d(8), nn.BatchNorm2d(8))
    gm, result = expanded(plain, x)
    assert not result.modified and result.stats == {}


def test_an_unknown_norm_and_activation_module_is_left_alone(caplog):
    class OwnNormAct(nn.BatchNorm2d):  # has drop and act, but its forward is its own
        def __init__(self, c):
            super().__init__(c)
            self.drop, self.act = nn.Identity(), nn.ReLU()

        def forward(self, x):
            return self.act(super().forward(x)) * 2

    model, x = TwoLayers(OwnNormAct(8), OwnNormAct(8)), torch.randn(2, 3, 8, 8)
    gm = gp.trace(copy.deepcopy(model), (x,), leaf_modules=[OwnNormAct])
    with caplog.at_level(logging.DEBUG, logger="passes.expand_norm_act"):
        result = expand_norm_act(gm)
    assert not result.modified
    assert "its forward is not known" in caplog.text


def test_a_drop_between_norm_and_activation_becomes_a_node():
    model = TwoLayers(BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.2)), BatchNormAct2d(8, apply_act=False))
    x = torch.randn(2, 3, 8, 8)
    gm, result = expanded(model.train(), x)
    assert result.stats == {"norm_act_expanded": 2}
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_module"] == ["conv1", "bn1", "bn1.drop", "bn1.act", "conv2", "bn2"]
    torch.manual_seed(3)
    expected = model(x)
    torch.manual_seed(3)
    assert torch.equal(gm(x), expected)


def test_compression_then_keeps_one_copy_per_layer_with_its_activation(caplog):
    model, x = timm_model(), torch.randn(4, 3, 8, 8)
    with caplog.at_level(logging.DEBUG, logger="graphpass.runtime"):
        gm = gp.transform(model, (x,), bits=8, leaf_modules=[BatchNormAct2d])
        out_r, gin_r, g_r = step(model, x)
        out_c, gin_c, g_c = step(gm, x)
    assert "activation = 'hardswish'" in gm.code and "activation = 'relu'" in gm.code
    assert "statistics unavailable" not in caplog.text  # before the split, every layer fell back
    assert torch.equal(out_c, out_r)
    exact = torch.cat([gin_r.flatten(), *(g.flatten() for g in g_r.values())])
    got = torch.cat([gin_c.flatten(), *(g_c[n].flatten() for n in g_r)])
    assert (got - exact).norm() / exact.norm() < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "efficientnet_b0"])
def test_timm_models_compress_every_norm_as_a_layer(name, caplog):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).train()
    norm_acts = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.DEBUG, logger="graphpass.runtime"):
        gm = gp.transform(model, (x,), bits=4)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        out = gm(x)
        out.sum().backward()
    assert torch.equal(out, expected)
    stats = {p["name"]: p["stats"] for p in gm.meta["graphpass.passes"]}
    assert stats["expand_norm_act"]["norm_act_expanded"] == norm_acts
    assert stats["insert_quantize_on_save"]["layers"] == norm_acts
    assert "statistics unavailable" not in caplog.text
