"""ProxyNormAct: reference values, gradients against a plain eager implementation, gradcheck,
memory (what autograd keeps), dtypes, errors, optimizer parameter groups."""

import collections
import copy

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import graphpass as gp
from graphpass import quantize
from graphpass.proxy_norm import ACTIVATIONS, ProxyNormAct, ScaledGroupNorm, proxy_norm_act
from tests.test_quantize import needs_interpreter



@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: waking a thread pool (native group norm parallelizes even 100
    elements) costs far more than the work, badly so on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EAGER_ACTIVATIONS = {
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": lambda h: F.leaky_relu(h, 0.2),
    "silu": F.silu,
    "gelu": F.gelu,
    "hardswish": F.hardswish,
    "mish": F.mish,
    "identity": lambda h: h,
}


def eager_proxy_norm_act(x: torch.Tensor, m: ProxyNormAct) -> torch.Tensor:
    """Plain unfused ops, written from the recipe in shared/reference/papers.md section 2.7."""
    act = EAGER_ACTIVATIONS[m.activation]
    view = (1, -1) + (1,) * (x.dim() - 2)
    y = F.group_norm(x, m.groups, eps=m.eps)
    q = torch.special.ndtri((torch.arange(200, dtype=torch.float64) + 0.5) / 200).to(x.dtype)
    proxy = m.proxy_bias[:, None] + (1 + m.proxy_weight[:, None]) * q[None, :]
    p = act(m.weight[:, None] * proxy + m.bias[:, None])
    mu = p.mean(dim=1)
    var = ((p - mu[:, None]) ** 2).mean(dim=1)
    z = act(m.weight.view(view) * y + m.bias.view(view))
    return (z - mu.view(view)) / torch.sqrt(var.view(view) + 0.03)


def randomized(m: ProxyNormAct) -> ProxyNormAct:
    """Parameters away from their initial values, so every gradient path is exercised."""
    with torch.no_grad():
        m.weight.copy_(1 + 0.5 * torch.randn_like(m.weight))
        m.bias.copy_(0.5 * torch.randn_like(m.bias))
        m.proxy_weight.copy_(0.3 * torch.randn_like(m.proxy_weight))
        m.proxy_bias.copy_(0.3 * torch.randn_like(m.proxy_bias))
    return m


def make(activation: str, channels: int = 8, groups: int = 4, dtype=torch.float32) -> ProxyNormAct:
    slope = {"negative_slope": 0.2} if activation == "leaky_relu" else {}
    return randomized(ProxyNormAct(channels, groups, activation=activation, dtype=dtype, **slope))


@pytest.mark.parametrize(
    "activation, mu, var, inv_std",
    [("relu", 0.398451, 0.338035, 1.648373), ("silu", 0.206048, 0.310004, 1.714977)],
)
def test_reference_values_at_init(activation, mu, var, inv_std):
    m = ProxyNormAct(3, 1, activation=activation)
    got_mu, got_inv = m.proxy_stats()
    assert got_mu.dtype == torch.float32
    torch.testing.assert_close(got_mu, torch.full((3,), mu), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_inv, torch.full((3,), inv_std), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_inv**-2 - 0.03, torch.full((3,), var), rtol=0, atol=1e-5)
    assert (m.weight == 1).all() and (m.bias == 0).all() and (m.proxy_weight == 0).all() and (m.proxy_bias == 0).all()
    assert (m.num_points, m.proxy_eps) == (200, 0.03)


@pytest.fixture(params=["eager", pytest.param("triton", marks=needs_interpreter)])
def statistics_launches(request, monkeypatch):
    """The proxy statistics from eager ops, or from the Triton kernels as on CUDA (the interpreter runs
    them on CPU tensors); counts the kernels' launches."""
    launches = collections.Counter()
    if request.param == "triton":
        from graphpass import triton_kernels

        monkeypatch.setattr(quantize, "KERNEL_DEVICES", ("cuda", "cpu"))
        for name in ("proxy_statistics", "proxy_statistics_grads"):
            kernel = getattr(triton_kernels, name)
            monkeypatch.setattr(triton_kernels, name, lambda *a, _k=kernel, _n=name: (launches.update([_n]), _k(*a))[1])
    return request.param, launches


@pytest.mark.parametrize("activation", ACTIVATIONS)
# (N, C) has no spatial extent: 32 channels keep groups of 8 values (two-value groups are ill-conditioned).
@pytest.mark.parametrize("shape", [(4, 8, 5, 6), (5, 32), (2, 8, 3, 4, 2)], ids=["2d", "1d", "3d"])
def test_matches_eager_forward_and_all_gradients(activation, shape, statistics_launches):
    """Fused float32 against the eager formula evaluated in float64 (so the reference's own
    rounding does not count: the identity's beta gradient, for one, is exactly zero). The proxy
    statistics come from eager ops, or from the Triton kernels (mish has no kernel form)."""
    path, launches = statistics_launches
    m = make(activation, channels=shape[1])
    m64 = copy.deepcopy(m).double()
    x = 2 * torch.randn(shape) + 0.5
    out_ref = eager_proxy_norm_act(x_ref := x.double().requires_grad_(), m64)
    w = torch.randn_like(out_ref)
    ref_grads = torch.autograd.grad((out_ref * w).sum(), [x_ref, *m64.parameters()])
    out = m(x_fused := x.clone().requires_grad_())
    grads = torch.autograd.grad((out * w.float()).sum(), [x_fused, *m.parameters()])
    torch.testing.assert_close(out, out_ref.float(), rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(["input", "weight", "bias", "proxy_weight", "proxy_bias"], grads, ref_grads):
        torch.testing.assert_close(g, g_ref.float(), rtol=1e-5, atol=1e-5, msg=lambda s: f"{activation} {name}: {s}")
    kernel_launches = 1 if path == "triton" and activation != "mish" else 0
    assert launches == collections.Counter({"proxy_statistics": kernel_launches, "proxy_statistics_grads": kernel_launches})


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(activation):
    m = make(activation, channels=6, groups=3, dtype=torch.float64)
    x = torch.randn(3, 6, 4, 3, dtype=torch.float64) * 2
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def fn(x, w, b, pw, pb):
        return proxy_norm_act(x, w, b, pw, pb, groups=3, eps=1e-5, activation=activation, negative_slope=0.2)

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params))


def test_no_grad_path_equals_fused_path():
    m = make("silu")
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        plain = m(x)
    fused = m(x.clone().requires_grad_())
    assert fused.grad_fn is not None and plain.grad_fn is None
    torch.testing.assert_close(plain, fused.detach(), rtol=1e-6, atol=1e-6)


def test_eval_equals_train_and_batch_independent():
    m = make("relu")
    x = torch.randn(6, 8, 5, 5, requires_grad=True)
    out = m(x)
    (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    for i in (0, 5):
        xi = x[i : i + 1].detach().clone().requires_grad_()
        oi = m.eval()(xi)
        (oi * torch.arange(out.numel()).reshape(out.shape)[i : i + 1]).sum().backward()
        torch.testing.assert_close(oi, out[i : i + 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(xi.grad, x.grad[i : i + 1], rtol=0, atol=1e-5)


def _saved(fn, x):
    """(storage, nbytes) of everything autograd keeps for backward, deduplicated by storage."""
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return saved, out


def test_fused_layer_saves_only_its_input_and_group_statistics():
    m = make("relu", channels=16, groups=4)
    conv = nn.Conv2d(3, 16, 3, padding=1)
    inp = torch.randn(2, 3, 8, 8)
    x = conv(inp)  # a non-leaf input, as in a network
    saved, out = _saved(m, x)
    params = {p.untyped_storage()._cdata for p in m.parameters()}
    activations = {k: v for k, v in saved.items() if k not in params}
    assert x.untyped_storage()._cdata in activations
    # x itself plus mean and 1/std per (sample, group): 2 * 2 * 4 floats.
    assert sum(activations.values()) == x.nbytes + 2 * (2 * 4 * 4)
    # The unfused eager version keeps several full-size tensors.
    naive, _ = _saved(lambda t: eager_proxy_norm_act(t, m), conv(inp))
    assert sum(naive.values()) >= 3 * x.nbytes


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_forward_holds_one_full_size_tensor_beside_its_input(activation):
    """The forward's temporaries (the normalized h, the activation, the output) share one buffer:
    at its peak the call holds the output and the per-group statistics, nothing else full-size."""
    from graphpass.measure import StorageTracker

    m = make(activation, channels=16, groups=4)
    x = torch.randn(4, 16, 32, 32, requires_grad=True) * 1
    tracker = StorageTracker([x, *m.parameters()])
    before = tracker.current
    with tracker:
        out = m(x)
    assert out.untyped_storage().nbytes() == x.nbytes
    # gelu has no in-place form: its result is a second buffer
    full = 2 if activation == "gelu" else 1
    assert tracker.peak - before < (full + 0.1) * x.nbytes, (tracker.peak - before) / x.nbytes


def test_saved_input_goes_through_saved_tensor_hooks():
    """Compression hooks must see the input: replacing it in unpack changes the gradient."""
    m = make("relu")
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    xx = x * 1  # non-leaf, as after a conv
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.clone() if t.shape == xx.shape else t):
        ok = m(xx)
    ok.sum().backward()
    g_ok = x.grad.clone()
    x.grad = None
    xx = x * 1
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.flip(-1) if t.shape == xx.shape else t):
        bad = m(xx)
    bad.sum().backward()
    torch.testing.assert_close(m(x.detach()), ok.detach())
    assert not torch.allclose(g_ok, x.grad)


def test_bfloat16_input_statistics_in_float32():
    m = make("silu", dtype=torch.bfloat16)
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    out = m(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert m.proxy_weight.grad.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in m.proxy_stats())
    m32 = ProxyNormAct(8, 4, activation="silu")
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    torch.testing.assert_close(out.float(), m32(x.detach().float()), rtol=2e-2, atol=2e-2)


def test_layernorm_when_one_group():
    m = ProxyNormAct(8, 1, activation="identity")
    x = torch.randn(3, 8, 4, 4)
    mu, inv = m.proxy_stats()
    expected = (F.layer_norm(x, x.shape[1:]) - mu.view(1, -1, 1, 1)) * inv.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_retracing_keeps_one_call():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), make("relu"))
    gm = torch.fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is proxy_norm_act]
    assert len(calls) == 1
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"groups": 0}, "groups must be an integer in 1..8"),
        ({"groups": 9}, "groups must be an integer in 1..8"),
        ({"groups": 3}, "groups=3 does not divide num_channels=8"),
        ({"activation": "tanh"}, "activation must be one of"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(gp.InputError, match=fragment):
        ProxyNormAct(8, **{"groups": 4, **kwargs})


def test_scaled_group_norm_has_scale_and_no_shift():
    m = ScaledGroupNorm(8, 2)
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    with torch.no_grad():
        m.weight.copy_(torch.randn(8))
    x = torch.randn(3, 8, 5)
    torch.testing.assert_close(m(x), F.group_norm(x, 2, m.weight, None, 1e-5))
    with pytest.raises(gp.InputError, match="ScaledGroupNorm: groups=3 does not divide"):
        ScaledGroupNorm(8, 3)


def test_param_groups_decay_only_proxy_parameters():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), make("relu"), nn.Conv2d(8, 8, 1), ScaledGroupNorm(8, 2))
    groups = gp.proxy_norm_param_groups(model, 0.5)
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0, 0.0]
    pn = model[1]
    assert groups[0]["params"] == [pn.proxy_weight, pn.proxy_bias]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(groups, lr=1.0)
    (model(torch.randn(2, 3, 5, 5)) * 0).sum().backward()  # zero gradients: only weight decay moves a parameter
    opt.step()
    for name, p in model.named_parameters():
        if name.startswith("1.proxy_"):
            torch.testing.assert_close(p, before[name] * 0.5)
        else:
            assert torch.equal(p, before[name]), name
    with_other = gp.proxy_norm_param_groups(model, 0.5, other_weight_decay=0.1)
    assert [g["weight_decay"] for g in with_other] == [0.5, 0.0, 0.1]
