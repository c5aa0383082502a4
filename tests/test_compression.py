"""Compressed saved activations: the pass, the runtime's layer and generic modes, edge cases."""

import collections
import copy
import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpass import runtime
from graphpass.errors import InputError
from graphpass.meta import META_QUANT
from graphpass.proxy_norm import ProxyNormAct, ScaledGroupNorm
from graphpass.quantize import Packed, apply_epilogue, unpack
from graphpass.save_recorder import recording
from graphpass.tracing import trace
from passes.insert_quantize_on_save import insert_quantize_on_save
from tests.models import SmallResNet
from tests.test_quantize import needs_interpreter


def transformed(model: nn.Module, x: torch.Tensor, bits: int = 4, rounding: str = "nearest") -> torch.fx.GraphModule:
    gm = trace(copy.deepcopy(model), (x,))
    result = insert_quantize_on_save(gm, bits=bits, rounding=rounding)
    assert result.modified
    gm.graph.lint()
    gm.recompile()
    return gm


def step(model: nn.Module, x: torch.Tensor, loss=lambda out: (out * out).sum()):
    model.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_()
    out = model(xr)
    loss(out).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), xr.grad, grads


def cosine(a: dict, b: dict) -> float:
    va = torch.cat([a[k].flatten().double() for k in sorted(a)])
    vb = torch.cat([b[k].flatten().double() for k in sorted(a)])
    return F.cosine_similarity(va, vb, dim=0).item()


def assert_same_gradients(got: dict, expected: dict, tol: float = 1e-5) -> None:
    """Equal to ``tol`` of each gradient's scale: float rounding of the rebuilt tensors only."""
    assert set(got) == set(expected)
    overall = max(ref.abs().max().item() for ref in expected.values())
    for name, ref in expected.items():
        scale = max(ref.abs().max().item(), 1e-3 * overall)  # some gradients are zero up to rounding
        err = (got[name] - ref).abs().max().item()
        assert err <= tol * scale, f"{name}: max abs difference {err:.3g}, scale {scale:.3g}"


class Recorded:
    """Formats reported through graphpass.save_recorder, with the shapes they were reported for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, int]] = []

    def __call__(self, t: torch.Tensor, nbytes: int, fmt: str) -> None:
        self.calls.append((fmt, tuple(t.shape), nbytes))

    def formats(self) -> set[str]:
        return {fmt for fmt, _, _ in self.calls}


# ----------------------------------------------------------------------------- the pass


def test_pass_shows_each_point_and_its_bit_width():
    x = torch.randn(2, 3, 16, 16)
    gm = transformed(SmallResNet(), x, bits=4)
    code = gm.code
    assert code.count("quantize_layer(") == 3 and code.count("layer_input(") == 3
    assert "bits = 4" in code and "activation = 'relu'" in code and "activation = 'none'" in code
    points = [n for n in gm.graph.nodes if runtime.is_compression_node(n)]
    assert len(points) == 8  # begin, 3 x (layer_input, quantize_layer), end
    for node in points:
        fmt = node.meta[META_QUANT]
        assert isinstance(fmt, runtime.QuantFormat) and fmt.bits == 4
    layers = [n.meta[META_QUANT] for n in points if n.meta[META_QUANT].point == "layer"]
    assert [(f.norm, f.activation, f.stored) for f in layers] == [
        ("batch_norm", "relu", "pre_activation"),
        ("batch_norm", "relu", "pre_activation"),
        ("batch_norm", "none", "norm_input"),
    ]
    assert {n.target for n in points} <= runtime.COMPRESSION_OPS


def test_pass_is_idempotent_and_reports_stats():
    x = torch.randn(2, 3, 16, 16)
    gm = trace(SmallResNet(), (x,))
    first = insert_quantize_on_save(gm, bits=8)
    assert first.modified and first.stats == {"layers": 3, "layers_after_conv": 3, "layers_none": 1, "layers_relu": 2}
    code = gm.code
    second = insert_quantize_on_save(gm, bits=8)
    assert not second.modified and second.stats == {}
    assert gm.code == code


def test_no_norm_means_no_layer_points():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    gm = trace(model, (torch.randn(3, 8),))
    result = insert_quantize_on_save(gm, bits=4)
    assert result.stats == {"layers": 0}
    assert not any(n.target in (runtime.quantize_layer, runtime.layer_input) for n in gm.graph.nodes)


@pytest.mark.parametrize("bits", [0, 1, 3, 16, 32, None, True, "4"])
def test_bits_outside_2_4_8_is_a_clear_error(bits):
    gm = trace(SmallResNet(), (torch.randn(2, 3, 8, 8),))
    with pytest.raises(InputError, match="bits must be one of 8, 4 or 2"):
        insert_quantize_on_save(gm, bits=bits)


def test_unknown_rounding_is_a_clear_error():
    gm = trace(SmallResNet(), (torch.randn(2, 3, 8, 8),))
    with pytest.raises(InputError, match="rounding"):
        insert_quantize_on_save(gm, bits=4, rounding="up")


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("bits,min_cosine", [(8, 0.999), (4, 0.99), (2, 0.85)])
def test_forward_exact_and_gradients_close(bits, min_cosine):
    model = SmallResNet().train()
    x = torch.randn(4, 3, 16, 16)
    gm = transformed(model, x, bits=bits)
    out_r, gin_r, g_r = step(model, x)
    out_c, gin_c, g_c = step(gm, x)
    assert torch.equal(out_r, out_c)
    assert cosine(g_r, g_c) >= min_cosine
    assert F.cosine_similarity(gin_r.flatten(), gin_c.flatten(), dim=0) >= min_cosine


class FarFromZero(nn.Module):
    """Channels whose values sit far from zero next to their spread, as in trained networks: a
    BatchNorm-ReLU layer with beta / gamma = +-6, and a norm input (a convolution of a positive
    input) whose |mean| is about 15 std. BLPA's grid clips both. ``norm``: "bn" or "gn"."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        make_norm = {"bn": lambda: nn.BatchNorm2d(8), "gn": lambda: nn.GroupNorm(4, 8)}[norm]
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = make_norm()
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = make_norm()
        with torch.no_grad():
            self.bn1.weight.fill_(0.1)
            self.bn1.bias.copy_(0.6 * torch.tensor([1.0, -1.0] * 4))
            self.conv2.weight.mul_(0.1).add_(1.0)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + h)


@pytest.mark.parametrize("norm", ["bn", "gn"])
@pytest.mark.parametrize("bits,min_cosine", [(8, 0.999), (4, 0.99)])
def test_channels_far_from_zero_keep_their_gradients(norm, bits, min_cosine):
    torch.manual_seed(0)
    model = FarFromZero(norm).train()
    x = torch.randn(4, 3, 8, 8)
    weights = torch.randn(4, 8, 8, 8)
    loss = lambda out: (out * weights).sum()  # noqa: E731
    gm = transformed(model, x, bits=bits)
    _, gin_r, g_r = step(model, x, loss)
    _, gin_c, g_c = step(gm, x, loss)
    assert cosine(g_r, g_c) >= min_cosine
    assert F.cosine_similarity(gin_r.flatten(), gin_c.flatten(), dim=0) >= min_cosine


@pytest.mark.parametrize(
    "norm,act,gamma,beta",
    [
        (nn.BatchNorm2d, nn.Hardswish, 1.0, 0.0),
        (nn.BatchNorm2d, nn.ReLU6, 2.0, 0.0),
        (lambda c: nn.GroupNorm(8, c), nn.Hardswish, 1.0, 0.0),
    ],
)
def test_activation_jumps_keep_their_side(norm, act, gamma, beta):
    """Hardswish's derivative jumps at +-3, where BLPA's window ends when gamma = 1 (its
    initialization); ReLU6's at 6, where it ends when gamma = 2. Rebuilt across a jump, a value
    takes the wrong derivative."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 1, bias=False), norm(64), act()).train()
    with torch.no_grad():
        model[1].weight.fill_(gamma)
        model[1].bias.fill_(beta)
    x, weights = torch.randn(8, 64, 8, 8), torch.randn(8, 64, 8, 8)
    loss = lambda out: (out * weights).sum()  # noqa: E731
    _, gin_r, g_r = step(model, x, loss)
    _, gin_c, g_c = step(transformed(model, x, bits=8), x, loss)
    exact = torch.cat([gin_r.flatten(), *(g.flatten() for g in g_r.values())])
    got = torch.cat([gin_c.flatten(), *(g_c[n].flatten() for n in g_r)])
    assert (got - exact).norm() / exact.norm() < 0.01


@pytest.mark.parametrize("bits,bound", [(8, 0.013), (4, 0.12)])
def test_window_fits_the_bit_width(bits, bound):
    """The convolution's weight gradient reads its input rebuilt from the first layer's copy (a
    norm without activation). BLPA's +-3 std window clips the tails: 2.1% at 8 bits; +-4.5 std:
    1.0%. 4 bits keeps BLPA's window: 11%."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(64), nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU()).train()
    x, weights = torch.randn(8, 64, 8, 8), torch.randn(8, 128, 8, 8)
    loss = lambda out: (out * weights).sum()  # noqa: E731
    _, _, g_r = step(model, x, loss)
    _, _, g_c = step(transformed(model, x, bits=bits), x, loss)
    assert (g_c["1.weight"] - g_r["1.weight"]).norm() / g_r["1.weight"].norm() < bound


def test_stochastic_rounding_runs_and_stays_close():
    model = SmallResNet().train()
    x = torch.randn(4, 3, 16, 16)
    gm = transformed(model, x, bits=4, rounding="stochastic")
    out_r, _, g_r = step(model, x)
    out_c, _, g_c = step(gm, x)
    assert torch.equal(out_r, out_c)
    assert cosine(g_r, g_c) >= 0.98


class Functional(nn.Module):
    """Functional and Tensor-method forms of norms and activations."""

    def __init__(self, act: str) -> None:
        super().__init__()
        self.act = act
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gn_weight = nn.Parameter(torch.rand(8) + 0.5)
        self.gn_bias = nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        h = F.batch_norm(self.conv1(x), self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, True)
        h = h.relu() if self.act == "method" else F.relu(h, inplace=True)
        h = F.group_norm(self.conv2(h), 2, self.gn_weight, self.gn_bias)
        return F.leaky_relu(h, 0.2)


def conv_norm_act(norm: str, act: str, inplace: bool) -> nn.Module:
    norms = {
        "bn": lambda c: nn.BatchNorm2d(c),
        "gn": lambda c: nn.GroupNorm(2, c),
        "gn_noaffine": lambda c: nn.GroupNorm(4, c, affine=False),
        "scaled_gn": lambda c: ScaledGroupNorm(c, 2),
    }
    acts = {
        "relu": lambda: nn.ReLU(inplace=inplace),
        "relu6": lambda: nn.ReLU6(inplace=inplace),
        "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=inplace),
        "silu": lambda: nn.SiLU(inplace=inplace),
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU("tanh"),
        "hardswish": lambda: nn.Hardswish(inplace=inplace),
        "none": lambda: nn.Identity(),
    }
    layers: list[nn.Module] = []
    for cin in (3, 8):
        layers += [nn.Conv2d(cin, 8, 3, padding=1, bias=False), norms[norm](8), acts[act]()]
    model = nn.Sequential(*layers)
    with torch.no_grad():  # affine parameters away from their init, both signs of beta
        for m in model.modules():
            if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1:
                m.weight.uniform_(0.5, 1.5)
            if isinstance(getattr(m, "bias", None), nn.Parameter) and m.bias.dim() == 1:
                m.bias.uniform_(-0.5, 0.5)
    return model


LAYER_CASES = [
    ("bn", "relu", True), ("bn", "relu", False), ("bn", "relu6", True), ("bn", "relu6", False),
    ("bn", "leaky_relu", True), ("bn", "leaky_relu", False), ("bn", "silu", True), ("bn", "silu", False),
    ("bn", "gelu", False), ("bn", "gelu_tanh", False), ("bn", "hardswish", True), ("bn", "hardswish", False),
    ("bn", "none", False), ("gn", "relu", True), ("gn", "silu", False), ("gn", "none", False),
    ("gn_noaffine", "relu", False), ("scaled_gn", "none", False),
]  # fmt: skip


@pytest.mark.parametrize("norm,act,inplace", LAYER_CASES)
def test_reconstruction_formulas_with_quantization_off(norm, act, inplace):
    """Same code path, exact copies: every saved tensor of the chain is rebuilt from one copy per
    layer, and the gradients equal plain autograd."""
    model = conv_norm_act(norm, act, inplace).train()
    x = torch.randn(4, 3, 12, 12)
    gm = transformed(model, x, bits=4)
    # A fixed random projection, not sum(out**2): through a final BatchNorm the latter's input
    # gradient is almost pure cancellation (its exact value is eps/var of the terms), where fp32
    # autograd itself is 7.7e-5 off float64, so no other summation order can match it to 1e-5.
    weights = torch.randn(4, 8, 12, 12)
    loss = lambda out: (out * weights).sum()  # noqa: E731
    _, gin_r, g_r = step(model, x, loss)
    recorded = Recorded()
    with runtime.quantization_disabled(), recording(recorded):
        _, gin_c, g_c = step(gm, x, loss)
    assert_same_gradients({"input": gin_c, **g_c}, {"input": gin_r, **g_r})
    # Every activation-sized tensor autograd saved is a reference to a layer copy, except the
    # model input (saved by the first convolution).
    big = [(fmt, shape) for fmt, shape, _ in recorded.calls if math.prod(shape) >= runtime.MIN_PACKED_NUMEL]
    assert big and all(fmt == "exact-layer" for fmt, shape in big if shape != tuple(x.shape)), big


def test_functional_and_method_forms_are_layers():
    for act in ("method", "functional"):
        model = Functional(act).train()
        x = torch.randn(4, 3, 12, 12)
        gm = transformed(model, x, bits=4)
        layers = [n.meta[META_QUANT] for n in gm.graph.nodes if n.target is runtime.quantize_layer]
        assert [(f.norm, f.activation) for f in layers] == [("batch_norm", "relu"), ("group_norm", "leaky_relu")]
        _, _, g_r = step(model, x)
        with runtime.quantization_disabled():
            _, _, g_c = step(gm, x)
        assert_same_gradients(g_c, g_r)


def test_layer_keeps_one_quantized_copy_per_layer():
    model = conv_norm_act("bn", "relu", True).train()
    x = torch.randn(4, 3, 12, 12)
    gm = transformed(model, x, bits=4)
    recorded = Recorded()
    with recording(recorded):
        step(gm, x)
    stored = [(fmt, shape, n) for fmt, shape, n in recorded.calls if n > 0 and fmt != "full"]
    assert [fmt for fmt, _, _ in stored] == ["q4-layer", "q4-layer"]
    numel = 4 * 8 * 12 * 12
    assert all(n < numel // 2 + 1024 for _, _, n in stored)  # 4 bits per element plus per-channel floats


@pytest.mark.parametrize("norm,act", [("bn", "relu"), ("bn", "none"), ("gn", "silu"), ("bn", "gelu_tanh"), ("proxy", "relu")])
def test_layer_roles_are_rebuilt_in_one_unpack(norm, act, monkeypatch):
    """With quantization on, each role backward asks for is one unpack call with the epilogue, and
    equals unpacking the stored copy and then applying the layer's activation and per-channel floats.
    A norm's input is never asked for: its backward reads the copy."""
    if norm == "proxy":
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ProxyNormAct(8, 2, activation=act), nn.Conv2d(8, 8, 3)).train()
        with torch.no_grad():
            model[1].proxy_weight.uniform_(-0.2, 0.2), model[1].proxy_bias.uniform_(-0.2, 0.2)
    else:
        model = conv_norm_act(norm, act, False).train()
    x = torch.randn(4, 3, 12, 12)
    gm = transformed(model, x, bits=4)
    unpack_calls, rebuilt = [], []
    rebuild = runtime._Layer.rebuild

    def recording_rebuild(layer, role, dtype):
        before = len(unpack_calls)
        out = rebuild(layer, role, dtype)
        rebuilt.append((layer, role, out, unpack_calls[before:]))
        return out

    def counting_unpack(*args, **kwargs):
        unpack_calls.append(kwargs)
        return unpack(*args, **kwargs)

    monkeypatch.setattr(runtime._Layer, "rebuild", recording_rebuild)
    monkeypatch.setattr(runtime, "unpack", counting_unpack)
    step(gm, x)
    checked = set()
    for layer, role, out, calls in rebuilt:
        if not isinstance(layer.stored, Packed) or (role == "input" and not calls):
            continue  # the norm reading its input during the forward pass
        assert len(calls) <= 1, (role, calls)  # none: the activation output cached from its previous rebuild
        if calls and role != layer.stored_role:  # the epilogue went into the unpack
            assert calls[0].get("activation") is not None or calls[0].get("scale") is not None, (role, calls)
        v = unpack(layer.stored).float()
        if role == "activation":
            expected = layer.activation(v)
            if layer.post_scale is not None:
                expected = torch.addcmul(layer.post_shift, expected, layer.post_scale)
        elif role == layer.other_role:  # tables per channel (BatchNorm) or broadcastable (GroupNorm)
            expected = apply_epilogue(v, scale=layer.scale.reshape(-1), shift=layer.shift.reshape(-1))
        else:
            expected = v
        assert torch.equal(out, expected.to(out.dtype)), role
        checked.add(role)
    # A norm's backward reads the copy itself: its input is never rebuilt.
    other = "output" if act == "none" else "activation"
    assert other in checked and "input" not in checked, checked


class PoolNet(nn.Module):
    """A max-pool after a layer, an adaptive max-pool later, and an average pool that is no max-pool."""

    def __init__(self, pool: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = pool if pool is not None else nn.MaxPool2d(3, 2, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.avg = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.pool(self.stem(x)))
        return F.adaptive_max_pool2d(torch.tanh(y), 2).mean((2, 3)) + self.avg(y).mean((2, 3))


@pytest.mark.parametrize("image,index_format", [(32, "index-int16"), (16, "index-uint8")])
def test_max_pool_indices_are_stored_exactly_in_a_narrow_integer_type(image, index_format):
    # Indices address one input plane: 32x32 = 1024 positions need int16, 16x16 = 256 fit uint8.
    model = PoolNet().train()
    x = torch.randn(16, 3, image, image)  # pooled: at least MIN_PACKED_NUMEL elements
    gm = transformed(model, x, bits=8)
    assert gm.code.count("pool_input(") == 2 and gm.code.count("pool_output(") == 2
    assert "dims = 2" in gm.code
    assert insert_quantize_on_save(gm, bits=8).modified is False  # idempotent
    _, gin_r, g_r = step(model, x)
    recorded = Recorded()
    with runtime.quantization_disabled(), recording(recorded):
        _, gin_c, g_c = step(gm, x)
    assert_same_gradients({"input": gin_c, **g_c}, {"input": gin_r, **g_r})
    indices = [(fmt, shape, n) for fmt, shape, n in recorded.calls if fmt.startswith("index-")]
    pooled = (16, 8, image // 2, image // 2)
    assert (index_format, pooled, math.prod(pooled) * (2 if index_format == "index-int16" else 1)) in indices
    assert all(fmt == index_format or shape == (16, 16, 2, 2) for fmt, shape, _ in indices)


class SamePaddedMaxPool2d(nn.MaxPool2d):
    """Pads, then pools (like timm's MaxPool2dSame): as a leaf, its indices address the padded plane."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-math.inf), self.kernel_size, self.stride)


class ReturnsIndices(PoolNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.pool(self.stem(x))
        return y.sum((2, 3))


def test_max_pools_whose_indices_may_address_another_plane_are_left_alone():
    x = torch.randn(2, 3, 16, 16)
    returns_indices = transformed(ReturnsIndices(nn.MaxPool2d(2, return_indices=True)).train(), x, bits=4)
    assert "pool_input(" not in returns_indices.code
    gm = trace(PoolNet(SamePaddedMaxPool2d(2)).train(), (x,), leaf_modules=(SamePaddedMaxPool2d,))
    assert insert_quantize_on_save(gm, bits=4).stats["max_pools"] == 1  # the functional adaptive pool only
    gm.recompile()
    assert gm.code.count("pool_input(") == 1
    traced_through = transformed(PoolNet(SamePaddedMaxPool2d(2)).train(), x, bits=4)
    assert "pool_input(pad" in traced_through.code  # the pool's own input: the padded tensor


def test_shared_tensor_is_stored_once_and_masks_take_one_bit():
    lin1, lin2, lin3 = nn.Linear(64, 128), nn.Linear(128, 32), nn.Linear(128, 32)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2, self.lin3 = lin1, lin2, lin3

        def forward(self, x):
            h = torch.relu(self.lin1(x))
            return self.lin2(h) + self.lin3(h)

    model = TwoHeads().train()
    x = torch.randn(32, 64)
    gm = transformed(model, x, bits=4)
    recorded = Recorded()
    with recording(recorded):
        _, _, g_c = step(gm, x)
    _, _, g_r = step(model, x)
    assert cosine(g_r, g_c) > 0.99
    relu_saves = [(fmt, n) for fmt, shape, n in recorded.calls if shape == (32, 128)]
    # relu's own result: a 1-bit mask; lin2 and lin3 inputs: one 4-bit copy, shared.
    assert relu_saves[0] == ("mask1", 32 * 128 // 8)
    assert [fmt for fmt, _ in relu_saves[1:]] == ["q4-group", "q4-group"]
    assert relu_saves[1][1] > 0 and relu_saves[2][1] == 0


class TwoInputs(nn.Module):
    """Linear layers on views of both graph inputs, and one on a new tensor computed from one."""

    def __init__(self) -> None:
        super().__init__()
        self.on_x, self.on_y, self.on_product = nn.Linear(1024, 8), nn.Linear(1024, 8), nn.Linear(1024, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        product = x.flatten(1) * y.flatten(1)
        return self.on_x(x.flatten(1)) + self.on_y(y.flatten(1)) + self.on_product(product)


def test_graph_inputs_and_their_views_are_saved_as_they_are():
    """The caller holds its inputs anyway: a copy would cost memory and put error into the
    gradients of the layers that read them. A new tensor computed from them is compressed."""
    x, y = torch.randn(128, 4, 16, 16), torch.randn(128, 4, 16, 16)  # 131,072 elements: no statistic
    model = TwoInputs().train()
    gm = trace(copy.deepcopy(model), (x, y))
    insert_quantize_on_save(gm, bits=4)
    gm.recompile()
    assert "compress_saved(x, graphpass_compression, y," in gm.code
    recorded = Recorded()
    with recording(recorded):
        out = gm(x, y)
    out.square().sum().backward()
    model(x, y).square().sum().backward()
    saves = [(fmt, nbytes) for fmt, shape, nbytes in recorded.calls if shape == (128, 1024)]
    assert saves == [("full", x.nbytes), ("full", y.nbytes), ("q4-group", saves[2][1])]
    assert 0 < saves[2][1] < x.nbytes / 4
    reference = dict(model.named_parameters())
    for name in ("on_x.weight", "on_y.weight", "on_x.bias", "on_product.bias"):
        assert torch.equal(gm.get_parameter(name).grad, reference[name].grad), name
    assert not torch.equal(gm.on_product.weight.grad, model.on_product.weight.grad)  # 4-bit input
    got, expected = gm.on_product.weight.grad.flatten(), model.on_product.weight.grad.flatten()
    assert F.cosine_similarity(got, expected, 0) > 0.97  # 0.986: a product of Gaussians has heavy tails


def test_a_reused_python_id_is_not_mistaken_for_the_same_tensor():
    """A dead tensor's id (and memory) gets reused by the allocator; its entry must not match."""
    state = runtime.CompressionState()
    x = torch.randn(64, 64, requires_grad=True)
    runtime.compress_saved(x, state, bits=8)
    session = state.session
    first = torch.sin(x)
    first_id = id(first)
    handle = session.pack(first)
    del first
    second = torch.cos(x)  # same shape and version as the dead tensor
    session.entries[id(second)] = session.entries.pop(first_id)  # as if it had inherited the id
    assert session.pack(second) is not handle
    assert session.pack(second) is session.pack(second)  # a live tensor saved twice: one copy
    runtime.compress_saved_end(None, state)
    assert not session.entries and state.session is None  # dropped when the forward pass ends


def test_a_tensor_changed_in_place_is_a_new_value():
    state = runtime.CompressionState()
    x = torch.randn(64, 64, requires_grad=True)
    runtime.compress_saved(x, state, bits=8)
    session = state.session
    h = torch.sin(x)
    before = session.pack(h)
    with torch.no_grad():
        h.mul_(2)
    after = session.pack(h)
    runtime.compress_saved_end(None, state)
    assert after is not before
    torch.testing.assert_close(runtime._unpack(after), h.detach(), atol=0.02, rtol=0)


def test_nan_and_inf_survive_pack_and_unpack():
    state = runtime.CompressionState()
    x = torch.randn(8, 1024, requires_grad=True)
    special = torch.zeros(8, 1024)
    special[0, 3], special[2, 5], special[5, 7] = math.nan, math.inf, -math.inf
    runtime.compress_saved(x, state, bits=4)
    h = x + special
    y = torch.sin(h)  # saves h
    runtime.compress_saved_end(y, state)
    rebuilt = y.grad_fn._saved_self
    assert torch.isnan(rebuilt[0, 3]) and rebuilt[2, 5] == math.inf and rebuilt[5, 7] == -math.inf
    finite = torch.isfinite(h)
    assert torch.isfinite(rebuilt[finite]).all()
    assert (rebuilt[finite] - h[finite]).abs().max() < 0.5


def test_constant_channels_give_no_nan():
    model = conv_norm_act("bn", "relu", True).train()
    with torch.no_grad():
        model[0].weight[:3] = 0  # channels 0-2 of the first BatchNorm are constant
        model[1].weight[5] = 0  # and a zero gamma
    x = torch.randn(4, 3, 12, 12)
    gm = transformed(model, x, bits=4)
    _, gin, grads = step(gm, x)
    assert torch.isfinite(gin).all() and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("batch", [0, 1])
def test_batch_one_and_empty_batch(batch):
    model = SmallResNet().train()
    x = torch.randn(batch, 3, 16, 16)
    gm = transformed(model, torch.randn(2, 3, 16, 16), bits=4)
    out_r, _, g_r = step(model, x)
    out_c, _, g_c = step(gm, x)
    assert torch.equal(out_r, out_c)
    assert set(g_c) == set(g_r)
    if batch:
        assert cosine(g_r, g_c) > 0.98


def test_no_compression_in_eval_or_no_grad():
    model = SmallResNet()
    x = torch.randn(2, 3, 16, 16)
    gm = transformed(model, x, bits=4)
    recorded = Recorded()
    with recording(recorded):
        gm.eval()
        model.eval()
        out_c, _, g_c = step(gm, x)
        out_r, _, g_r = step(model, x)
        gm.train()
        with torch.no_grad():
            gm(x)
    assert recorded.calls == []
    assert torch.equal(out_r, out_c)
    for name in g_r:
        assert torch.equal(g_c[name], g_r[name])
    assert gm.get_submodule(runtime.STATE_NAME).session is None


@pytest.mark.parametrize("norm", ["keep", "gn+pn"])
def test_channels_last_and_autocast_bf16(norm):
    """Under channels_last and bf16 autocast (with gn+pn, GroupNorm + PN-Act layers, whose backward
    also reads the copy): the forward equals the uncompressed model's, the gradients are close."""
    import graphpass as gp

    model = SmallResNet().train().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    exact = gp.transform(model, (x,), bits=None, norm=norm, groups=4)
    gm = gp.transform(model, (x,), bits=8, norm=norm, groups=4)
    out_r, _, g_r = step(exact, x)
    out_c, _, g_c = step(gm, x)
    assert torch.equal(out_r, out_c) and cosine(g_r, g_c) > 0.999
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r, _, g_r = step(exact, x, loss=lambda o: (o.float() ** 2).sum())
        out_c, _, g_c = step(gm, x, loss=lambda o: (o.float() ** 2).sum())
    assert out_c.dtype == torch.bfloat16 and torch.equal(out_r, out_c)
    assert cosine(g_r, g_c) > 0.99


def test_fp16_saved_tensors():
    model = conv_norm_act("bn", "silu", False).train().half()
    x = torch.randn(4, 3, 12, 12).half()
    gm = transformed(model, x.float(), bits=8)
    out_r, _, g_r = step(model, x, loss=lambda o: (o.float() ** 2).sum())
    out_c, _, g_c = step(gm, x, loss=lambda o: (o.float() ** 2).sum())
    assert torch.equal(out_r, out_c)
    assert cosine(g_r, g_c) > 0.99


def test_runs_on_fake_and_meta_tensors_and_reports_compressed_sizes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = SmallResNet().train()
    gm = transformed(model, torch.randn(2, 3, 16, 16), bits=4)
    for device in ("meta", "fake"):
        recorded = Recorded()
        g = copy.deepcopy(gm).to("meta") if device == "meta" else gm
        mode = FakeTensorMode(allow_non_fake_inputs=True) if device == "fake" else None
        with recording(recorded), (mode if mode is not None else torch.device("meta")):
            x = torch.randn(8, 3, 16, 16, device="meta" if device == "meta" else "cpu")
            g(x).sum().backward()
        assert {"q4-layer", "mask1"} <= recorded.formats(), device
        layer = [n for fmt, shape, n in recorded.calls if fmt == "q4-layer" and n > 0]
        assert len(layer) == 3 and all(0 < n < 8 * 16 * 16 * 16 for n in layer)


@pytest.mark.parametrize("activation", ["relu", "silu", "identity"])
def test_proxy_norm_act_layers(activation):
    """Conv -> ProxyNormAct (fused GroupNorm + PN-Act): one copy of the normalized pre-activation;
    the fused function's input and its output (the next conv's input) are rebuilt from it."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), ProxyNormAct(8, 2, activation=activation),
        nn.Conv2d(8, 8, 3, padding=1), ProxyNormAct(8, 4, activation=activation),
    ).train()  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ProxyNormAct):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.proxy_weight.uniform_(-0.2, 0.2), m.proxy_bias.uniform_(-0.2, 0.2)
    x = torch.randn(4, 3, 12, 12)
    gm = transformed(model, x, bits=8)
    layers = [n.meta[META_QUANT] for n in gm.graph.nodes if n.target is runtime.quantize_layer]
    expected = "none" if activation == "identity" else activation
    assert [(f.norm, f.activation, f.stored) for f in layers] == [("proxy_norm", expected, "pre_activation")] * 2
    out_r, gin_r, g_r = step(model, x)
    recorded = Recorded()
    with runtime.quantization_disabled(), recording(recorded):
        out_c, gin_c, g_c = step(gm, x)
    assert torch.equal(out_r, out_c)
    assert_same_gradients({"input": gin_c, **g_c}, {"input": gin_r, **g_r})
    big = [fmt for fmt, shape, _ in recorded.calls if math.prod(shape) >= runtime.MIN_PACKED_NUMEL and shape != tuple(x.shape)]
    assert big and set(big) == {"exact-layer"}, big
    _, _, g_q = step(gm, x)
    assert cosine(g_r, g_q) > 0.97


def test_transform_and_saved_tensor_discovery_see_the_compressed_sizes():
    """gp.transform runs the pass; discovery (meta tensors, our hooks above its own) counts what
    the pack hooks really store."""
    import graphpass as gp
    from graphpass.saved_tensors import discover_saved_tensors

    model = SmallResNet().train()
    x = torch.randn(2, 3, 16, 16)
    big = (torch.randn(16, 3, 32, 32),)
    plain = discover_saved_tensors(gp.transform(model, (x,), bits=None), big).saved_bytes()
    compressed = discover_saved_tensors(gp.transform(model, (x,), bits=4), big).saved_bytes()
    assert 0 < compressed < plain / 4, (compressed, plain)


def test_batch_norm_layer_copies_are_freed_by_backward_unless_the_graph_is_retained(monkeypatch):
    """The BatchNorm backward holds its layer as a plain attribute, which autograd does not free:
    it drops it itself, so each copy goes as soon as its layer's backward ran; with
    retain_graph=True a second backward gives the same gradients."""
    model = conv_norm_act("bn", "relu", True).train()
    x = torch.randn(4, 3, 12, 12)
    gm = transformed(model, x, bits=4)
    layers = []
    init = runtime._Layer.__init__

    def tracked_init(self, *args):
        init(self, *args)
        layers.append(weakref.ref(self))

    monkeypatch.setattr(runtime._Layer, "__init__", tracked_init)
    loss = gm(x).square().sum()
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in gm.named_parameters()}
    gm.zero_grad(set_to_none=True)
    loss.backward()
    for name, p in gm.named_parameters():
        assert torch.equal(p.grad, first[name]), name
    assert len(layers) == 2 and all(ref() is None for ref in layers)  # the loss (and graph) still held


@pytest.mark.parametrize(
    "norm,act,channels_last",
    [("bn", "relu", False), ("bn", "relu", True), ("bn", "none", False), ("gn", "silu", False),
     ("gn", "none", True), ("proxy", "relu", False)],
)  # fmt: skip
def test_large_convolutions_run_their_backward_in_batch_chunks(norm, act, channels_last, monkeypatch):
    """With a chunk size below one sample, every convolution before a norm is taken over: its
    backward rebuilds one row of its input at a time (GroupNorm without activation: its per-sample
    tables cut too); gradients equal plain autograd (exact copies) and the unchunked compressed path
    (4-bit copies). Above the size it must not fire."""
    if norm == "proxy":
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), ProxyNormAct(8, 2, activation=act),
            nn.Conv2d(8, 8, 3, padding=1), ProxyNormAct(8, 4, activation=act),
        ).train()  # fmt: skip
    else:
        model = conv_norm_act(norm, act, False).train()
    x = torch.randn(4, 3, 12, 12)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    weights = torch.randn(4, 8, 12, 12)
    loss = lambda out: (out * weights).sum()  # noqa: E731  (well conditioned: see above)
    gm = transformed(model, x, bits=4)
    taken_over = []
    apply = runtime._ConvFromCopy.apply

    def counting_apply(*args):
        taken_over.append(args[-1])  # rows per chunk
        return apply(*args)

    monkeypatch.setattr(runtime._ConvFromCopy, "apply", counting_apply)
    _, gin_q, g_q = step(gm, x, loss)  # default chunk size: these tensors are far below it
    assert taken_over == []
    monkeypatch.setattr(runtime, "CONV_CHUNK_BYTES", 1024)
    _, gin_r, g_r = step(model, x, loss)
    with runtime.quantization_disabled():
        _, gin_c, g_c = step(gm, x, loss)
    assert taken_over == [1, 1]  # both convolutions, one sample (1,728 and 4,608 bytes) per chunk
    assert_same_gradients({"input": gin_c, **g_c}, {"input": gin_r, **g_r})
    _, gin_k, g_k = step(gm, x, loss)
    assert_same_gradients({"input": gin_k, **g_k}, {"input": gin_q, **g_q})


def test_conv_chunk_rows_respect_size_and_row_step(monkeypatch):
    mib = 2**20
    monkeypatch.setattr(runtime, "CONV_CHUNK_BYTES", 128 * mib)
    assert runtime.conv_chunk_rows(64, 2 * mib, 1) == 0  # 128 MiB in all: one piece
    assert runtime.conv_chunk_rows(128, 3 * mib, 1) == 42
    assert runtime.conv_chunk_rows(128, 3 * mib, 8) == 40  # cut at multiples of the row step
    assert runtime.conv_chunk_rows(128, 3 * mib, 0) == 0  # no row can be cut
    assert runtime.conv_chunk_rows(4, 300 * mib, 1) == 1
    assert runtime.conv_rebuild_bytes((128, 256, 56, 56), 4, "q4-layer") == 41 * 256 * 56 * 56 * 4  # 3.06 MiB rows
    assert runtime.conv_rebuild_bytes((2, 3, 5, 5), 4, "q4-group") == 2 * 3 * 5 * 5 * 4


def _step_on_counted_kernels(gm, x, monkeypatch, exact_output: bool = True) -> collections.Counter:
    """One step of ``gm`` with the runtime driving the Triton kernels (the interpreter runs them on CPU
    tensors), checked against the PyTorch path's output (identical, or with ``exact_output`` False
    equal to float rounding) and gradients; the launches per kernel."""
    from graphpass import quantize, triton_kernels

    expected = step(gm, x)
    launches = collections.Counter()

    class CountingKernels:
        def __getattr__(self, name):
            fn = getattr(triton_kernels, name)
            if name == "activation_code" or not callable(fn):  # a lookup or a constant, not a launch
                return fn

            def counted(*args, **kwargs):
                launches[name] += 1
                return fn(*args, **kwargs)

            return counted

    monkeypatch.setattr(quantize, "_kernels_for", lambda t, backend: None if backend == "torch" else CountingKernels())
    out, grad_x, grads = step(gm, x)
    if exact_output:
        assert torch.equal(out, expected[0])
    else:
        torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, expected[1], rtol=1e-4, atol=1e-6)
    assert_same_gradients(grads, expected[2], tol=1e-4)
    return launches


@needs_interpreter
def test_runtime_on_the_triton_kernels_matches_the_pytorch_path_and_launches_per_layer(monkeypatch):
    """Launches cost the host most of a step's time on a GPU, so their count per BatchNorm layer is
    held: one table launch and one pack in forward, one reduction launch and one input-gradient pass
    in backward."""
    x = torch.randn(2, 3, 16, 16)
    launches = _step_on_counted_kernels(transformed(SmallResNet(width=16), x), x, monkeypatch)
    batch_norms = 3
    assert launches["layer_tables"] == launches["anchored_pack"] == launches["batch_norm_grad_tables"] == batch_norms
    assert launches["anchored_table"] == launches["anchored_channel_sums"] == 0
    # Input gradients of the three norms, and the two activation outputs rebuilt once each (the
    # next convolution and the ReLU share the rebuild).
    assert launches["anchored_unpack"] == batch_norms + 2, launches


@needs_interpreter
def test_runtime_on_the_triton_kernels_for_group_norm_layers(monkeypatch):
    """GroupNorm + PN-Act layers (and the scaled GroupNorm without an activation): their per-(sample,
    channel) tables come from one launch per layer, as BatchNorm's per-channel ones do, PN-Act's
    proxy statistics and their gradients from one launch each, and each norm's backward from three."""
    import graphpass as gp

    x = torch.randn(2, 3, 16, 16)
    gm = gp.transform(SmallResNet(width=16).train(), (x,), bits=4, norm="gn+pn", groups=4)
    # The kernels' sums over the proxy points round otherwise than eager ops: PN-Act's output too.
    launches = _step_on_counted_kernels(gm, x, monkeypatch, exact_output=False)
    norms, pn_acts = 3, 2
    # A grid measured on the stored tensor (anchored_table), then the pack.
    assert launches["layer_tables"] == launches["anchored_table"] == launches["anchored_pack"] == norms, launches
    assert launches["proxy_statistics"] == launches["proxy_statistics_grads"] == pn_acts, launches
    # Every norm's backward reads its layer's copy: one sums and one tables launch, then the input
    # gradient in one unpack pass; neither its input nor PN-Act's pre-activation is rebuilt.
    assert launches["group_norm_sums"] == launches["group_norm_tables"] == norms, launches
    # The input gradients, and the two PN-Act outputs rebuilt once each (for the next convolution).
    assert launches["anchored_unpack"] == norms + pn_acts, launches


def _tensors_with_history() -> list:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every live object touches deprecated torch aliases
        warnings.simplefilter("ignore", FutureWarning)
        return [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.grad_fn is not None]


@pytest.mark.parametrize("norm", ["keep", "gn+pn"])
def test_a_step_leaves_no_autograd_graph_behind(norm):
    """Tensors kept as they are (too small to pack: a ReLU's result at 1x1 pixels, GroupNorm's
    statistics) are stored without their history: a node saving its own output would otherwise hold,
    through the hook, the tensor that holds the node, and the step's graph would outlive it (which
    also breaks CUDA graph capture: the next step reused the old gradient accumulators). The
    transform's own runs count too: saved-tensor discovery on fake tensors left its graph behind."""
    import graphpass as gp

    x = torch.randn(4, 3, 32, 32)  # the last stage runs at 1x1 pixels: 2,048 values, kept as they are
    labels = torch.randint(0, 1000, (4,))
    before = _tensors_with_history()  # held, so that no tensor made later can take one of their ids
    before_ids = {id(t) for t in before}
    gm = gp.transform(gp.load_model("torchvision:resnet18").train(), (x,), bits=4, norm=norm)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gm(x), labels).backward()
        opt.step()
    left = [t for t in _tensors_with_history() if id(t) not in before_ids]
    assert not left, [(type(t.grad_fn).__name__, tuple(t.shape)) for t in left]
