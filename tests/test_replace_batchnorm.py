"""replace_batchnorm: structure, numerical equivalence, activation forms, rules for groups and
frozen statistics, and on real models: no BatchNorm left, batch independence, saved bytes."""

import copy
import functools
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import graphpass as gp
from graphpass.meta import META_FROM_PASS, META_NORM, META_TENSOR
from graphpass.proxy_norm import NormRecord, ProxyNormAct, ScaledGroupNorm
from graphpass.testing import assert_equivalent, count_modules
from passes.replace_batchnorm import replace_batchnorm
from tests.models import SmallResNet


@pytest.fixture(autouse=True)
def _one_thread():
    """Small inputs: waking the thread pool (native group norm parallelizes even tiny inputs)
    costs more than the work; on a loaded 2-core machine a model step took 40x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rewritten(model: nn.Module, inputs=None, *, leaf_modules=(), **kwargs):
    gm = gp.trace(model, inputs, leaf_modules=leaf_modules)
    return gm, replace_batchnorm(gm, **kwargs)


def randomize_affine(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
    return model


def test_small_resnet_structure_metadata_and_idempotence():
    model = randomize_affine(SmallResNet())
    x = torch.randn(4, 3, 16, 16)
    gm, result = rewritten(copy.deepcopy(model), (x,))
    assert result.modified and dict(result.stats) == {"bn_to_gn_pn": 2, "bn_to_scaled_gn": 1}
    assert count_modules(gm, _BatchNorm) == 0 and count_modules(gm, nn.ReLU) == 0  # ReLUs folded in
    stem, bn2 = gm.get_submodule("stem.1"), gm.get_submodule("bn2")
    assert isinstance(stem, ProxyNormAct) and (stem.activation, stem.groups, stem.num_channels) == ("relu", 8, 16)
    assert isinstance(bn2, ScaledGroupNorm) and bn2.groups == 8
    # Convolution weights and the BatchNorm affine carry over.
    assert torch.equal(gm.get_submodule("conv2").weight, model.conv2.weight)
    assert torch.equal(stem.weight, model.stem[1].weight) and torch.equal(stem.bias, model.stem[1].bias)
    assert torch.equal(bn2.weight, model.bn2.weight)
    records = {n.target: n.meta[META_NORM] for n in gm.graph.nodes if META_NORM in n.meta}
    assert records["bn2"] == NormRecord("scaled_gn", "BatchNorm2d", "identity", 8, 16, "")
    assert records["stem.1"].kind == "gn+pn" and records["stem.1"].activation_node == "stem_2"
    new_nodes = [n for n in gm.graph.nodes if META_NORM in n.meta]
    assert all(n.meta[META_FROM_PASS] == "replace_batchnorm" and n.meta[META_TENSOR] is not None for n in new_nodes)
    again = replace_batchnorm(gm)
    assert not again.modified and dict(again.stats) == {}


def test_small_resnet_matches_hand_built_gn_pn_model():
    model = randomize_affine(SmallResNet())
    gm, _ = rewritten(copy.deepcopy(model))
    reference = copy.deepcopy(model)
    for seq in (reference.stem, reference.conv1):
        pn = ProxyNormAct(16, 8, activation="relu")
        pn.load_state_dict({"weight": seq[1].weight, "bias": seq[1].bias, **dict(list(pn.state_dict().items())[2:])})
        seq[1], seq[2] = pn, nn.Identity()
    reference.bn2 = ScaledGroupNorm(16, 8)
    reference.bn2.load_state_dict({"weight": model.bn2.weight})
    assert_equivalent(reference, gm, (torch.randn(4, 3, 16, 16),), rtol=1e-5, atol=1e-5)


def test_model_without_batchnorm_is_not_touched():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())
    gm, result = rewritten(model)
    code = gm.code
    assert not result.modified and dict(result.stats) == {}
    assert gm.code == code


class ConvBNAct(nn.Module):
    def __init__(self, act, channels: int = 16, bn: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = bn if bn is not None else nn.BatchNorm2d(channels)
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


ACTIVATION_FORMS = {
    "ReLU": (nn.ReLU(), "relu", 0.01),
    "ReLU(inplace)": (nn.ReLU(inplace=True), "relu", 0.01),
    "F.relu": (F.relu, "relu", 0.01),
    "F.relu(inplace)": (functools.partial(F.relu, inplace=True), "relu", 0.01),
    "torch.relu_": (torch.relu_, "relu", 0.01),
    "Tensor.relu": (lambda t: t.relu(), "relu", 0.01),
    "Tensor.relu_": (lambda t: t.relu_(), "relu", 0.01),
    "ReLU6": (nn.ReLU6(inplace=True), "relu6", 0.01),
    "F.relu6": (F.relu6, "relu6", 0.01),
    "LeakyReLU": (nn.LeakyReLU(0.2), "leaky_relu", 0.2),
    "F.leaky_relu": (functools.partial(F.leaky_relu, negative_slope=0.3, inplace=True), "leaky_relu", 0.3),
    "SiLU(inplace)": (nn.SiLU(inplace=True), "silu", 0.01),
    "F.silu": (F.silu, "silu", 0.01),
    "GELU": (nn.GELU(), "gelu", 0.01),
    "F.gelu": (F.gelu, "gelu", 0.01),
    "Hardswish": (nn.Hardswish(), "hardswish", 0.01),
    "F.hardswish": (F.hardswish, "hardswish", 0.01),
    "Mish": (nn.Mish(inplace=True), "mish", 0.01),
    "F.mish": (F.mish, "mish", 0.01),
}


@pytest.mark.parametrize("form", ACTIVATION_FORMS)
def test_activation_forms_fold_into_pn_act(form):
    act, kind, slope = ACTIVATION_FORMS[form]
    model = randomize_affine(ConvBNAct(act))
    gm, result = rewritten(copy.deepcopy(model))
    assert dict(result.stats) == {"bn_to_gn_pn": 1}
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    pn = gm.get_submodule("bn")
    assert (pn.activation, pn.negative_slope) == (kind, slope)
    reference = copy.deepcopy(model)
    reference.bn = ProxyNormAct(16, 8, activation=kind, negative_slope=slope)
    reference.bn.load_state_dict(pn.state_dict())
    reference.act = nn.Identity()
    assert_equivalent(reference, gm, (torch.randn(2, 3, 6, 6),), rtol=1e-5, atol=1e-5)


class BNTwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(x)
        return torch.relu(y) + y


@pytest.mark.parametrize(
    "model",
    [ConvBNAct(torch.sigmoid), ConvBNAct(nn.GELU(approximate="tanh")), ConvBNAct(nn.Identity()), BNTwoUsers()],
    ids=["sigmoid", "gelu-tanh", "identity", "two-users"],
)
def test_norm_without_foldable_activation_becomes_scaled_group_norm(model):
    gm, result = rewritten(copy.deepcopy(model))
    assert dict(result.stats) == {"bn_to_scaled_gn": 1}
    assert isinstance(gm.get_submodule("bn"), ScaledGroupNorm)
    x = torch.randn(2, 3 if isinstance(model, ConvBNAct) else 8, 5, 5)
    reference = copy.deepcopy(model)
    reference.bn = ScaledGroupNorm(reference.bn.num_features, 8)
    assert_equivalent(reference, gm, (x,), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bn, shape",
    [(nn.BatchNorm1d(16), (4, 16)), (nn.BatchNorm1d(16), (4, 16, 7)), (nn.BatchNorm3d(16), (2, 16, 3, 4, 4))],
    ids=["1d-NC", "1d-NCL", "3d"],
)
def test_batchnorm_1d_and_3d(bn, shape):
    model = nn.Sequential(bn, nn.SiLU())
    gm, result = rewritten(model)
    assert dict(result.stats) == {"bn_to_gn_pn": 1}
    x = torch.randn(shape, requires_grad=True)
    out = gm(x)
    out.sum().backward()
    assert out.shape == shape and torch.isfinite(x.grad).all()


def test_sync_batchnorm_converts():
    model = ConvBNAct(nn.ReLU(), bn=nn.SyncBatchNorm(16))
    gm, result = rewritten(model)
    assert dict(result.stats) == {"bn_to_gn_pn": 1} and count_modules(gm, _BatchNorm) == 0
    gm(torch.randn(2, 3, 4, 4)).sum().backward()


def test_groups_not_dividing_channels_use_nearest_divisor_with_warning():
    with pytest.warns(UserWarning, match="layer 'bn' has 12 channels, not divisible by groups=5; using 4 groups"):
        gm, _ = rewritten(ConvBNAct(nn.ReLU(), channels=12), groups=5)  # 4 and 6 tie: the smaller wins
    assert gm.get_submodule("bn").groups == 4
    with pytest.warns(UserWarning, match="using 6 groups"):
        gm, _ = rewritten(ConvBNAct(nn.ReLU(), channels=12), groups=8)
    assert gm.get_submodule("bn").groups == 6


def test_one_group_is_layer_norm():
    gm, _ = rewritten(ConvBNAct(torch.sigmoid, channels=8), groups=1)
    x = torch.randn(2, 3, 5, 5)
    conv_out = gm.get_submodule("conv")(x)
    torch.testing.assert_close(gm(x), torch.sigmoid(F.layer_norm(conv_out, conv_out.shape[1:])), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [0, -1, 17, 2.5])
def test_bad_groups_raise_input_error_naming_the_layer_and_leave_graph_alone(groups):
    model = SmallResNet()
    gm = gp.trace(model)
    code = gm.code
    with pytest.raises(gp.InputError, match=r"groups.*layer 'stem\.1'"):
        replace_batchnorm(gm, groups=groups)
    assert gm.code == code and count_modules(gm, _BatchNorm) == 3


def test_frozen_batchnorm_in_eval_mode_is_kept_unless_asked(caplog):
    model = SmallResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    with caplog.at_level(logging.DEBUG, logger="passes.replace_batchnorm"):
        gm, result = rewritten(copy.deepcopy(model))
    assert not result.modified and dict(result.stats) == {"bn_frozen_kept": 3}
    assert "eval mode with frozen running statistics" in caplog.text and "kept 3 BatchNorm layer(s)" in caplog.text
    assert torch.equal(gm(x), expected)
    gm, result = rewritten(copy.deepcopy(model), convert_frozen=True)
    assert dict(result.stats) == {"bn_to_gn_pn": 2, "bn_to_scaled_gn": 1}
    assert not gm.get_submodule("stem.1").training  # the converted layer keeps the module's mode


def test_eval_batchnorm_without_running_statistics_is_converted():
    model = ConvBNAct(nn.ReLU(), bn=nn.BatchNorm2d(16, track_running_stats=False)).eval()
    _, result = rewritten(model)
    assert dict(result.stats) == {"bn_to_gn_pn": 1}


def test_transform_trains_with_param_groups():
    torch.manual_seed(1)
    x, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    gm = gp.transform(SmallResNet(), (x,), bits=None, norm="gn+pn", groups=4)
    assert count_modules(gm, ProxyNormAct) == 2 and count_modules(gm, _BatchNorm) == 0
    groups = gp.proxy_norm_param_groups(gm, 1e-4)
    assert [len(g["params"]) for g in groups] == [4, 5, 5]  # proxy; PN affine + scale; 3 convs, fc weight and bias
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(gm(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- real models (slow)


def _no_dropout(model: nn.Module) -> nn.Module:
    """Dropout and stochastic depth are random per run; batch independence is about the norms."""
    for m in model.modules():
        if isinstance(m, (nn.Dropout, torchvision.ops.StochasticDepth)):
            m.eval()
    return model


def _outputs(out):
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def _max_batch_dependence(model: nn.Module, x: torch.Tensor, samples) -> float:
    """Max abs difference of each sample's output and input gradient, alone vs in the batch."""

    def run(inp, weight):
        inp = inp.clone().requires_grad_()
        out = model(inp)
        (out * weight).sum().backward()
        return out.detach(), inp.grad

    weight = torch.randn(x.shape[0], 1000, dtype=x.dtype)
    out, grad = run(x, weight)
    worst = 0.0
    for i in samples:
        out_i, grad_i = run(x[i : i + 1], weight[i : i + 1])
        worst = max(worst, (out_i - out[i : i + 1]).abs().max().item(), (grad_i - grad[i : i + 1]).abs().max().item())
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf"])
def test_batch_independence_in_training_mode(name):
    # float64: in float32 convolution kernels picked per batch size differ in rounding, which the
    # depth amplifies past 1e-5 even for a batch-independent model.
    model = _no_dropout(torchvision.models.get_model(name, weights=None)).double()
    gm, result = rewritten(copy.deepcopy(model))
    assert gm.training and result.modified
    x = torch.randn(16, 3, 40, 40, dtype=torch.float64)  # 2x2 at the last stage: BN runs on one sample
    assert _max_batch_dependence(gm, x, range(16)) <= 1e-5
    assert _max_batch_dependence(model, x, [0]) > 1e-5  # the BatchNorm original fails the same test


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after the forward, deduplicated by storage."""
    storages: dict[int, int] = {}

    def pack(t):
        storages.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.slow
def test_resnet50_saved_bytes_not_above_batchnorm():
    model = torchvision.models.resnet50()
    gm, _ = rewritten(copy.deepcopy(model))
    x = torch.randn(4, 3, 64, 64)
    bn, pn = _saved_bytes(model, x), _saved_bytes(gm, x)
    assert pn <= bn, f"GN+PN keeps {pn} bytes for backward, BatchNorm {bn}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50d", "efficientnet_b0"])
def test_timm_models_convert(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False)
    norm_act = count_modules(model, timm.layers.BatchNormAct2d)
    gm, result = rewritten(model)
    assert count_modules(gm, _BatchNorm) == 0
    assert not [n for n in gm.graph.nodes if n.target in (F.batch_norm, torch.batch_norm)]
    assert result.stats["bn_to_gn_pn"] > 0 and result.stats["bn_to_scaled_gn"] > 0
    if name == "efficientnet_b0":
        assert norm_act > 0 and {m.activation for m in gm.modules() if isinstance(m, ProxyNormAct)} == {"silu"}
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    gm(x).sum().backward()
    assert torch.isfinite(x.grad).all()


TORCHVISION_CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
IMAGE_SIZE = {"inception_v3": 299, "maxvit_t": 224}  # fixed-size parts; 32 px for every other model
REAL_RUN_MAX_PARAMS = 50_000_000  # larger models run on the meta device (shapes only)


def _build(name: str, device: str, monkeypatch) -> nn.Module:
    from torchvision.models import regnet

    # RegNet computes its widths with torch ops and .tolist(), which the meta device cannot do.
    original = regnet.BlockParams.from_init_params.__func__

    def widths_on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    monkeypatch.setattr(regnet.BlockParams, "from_init_params", classmethod(widths_on_cpu))
    kwargs = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    with torch.device(device):
        return torchvision.models.get_model(name, weights=None, **kwargs)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:replace_batchnorm.*not divisible by groups")  # ShuffleNet's 58, 116, ... channels
@pytest.mark.parametrize("name", TORCHVISION_CLASSIFIERS)
def test_no_batchnorm_left_in_torchvision_classifiers(name, monkeypatch):
    """Every classifier: the rewrite leaves no BatchNorm, and forward and backward run (on the CPU
    up to 50M parameters, with finite results; above that on the meta device, where only shapes
    are computed, since the rewrite does not depend on width). Models without one are left alone."""
    model = _build(name, "meta", monkeypatch)
    had_bn = count_modules(model, _BatchNorm)
    if not had_bn:
        assert not replace_batchnorm(gp.trace(model)).modified
        return
    device = "cpu" if sum(p.numel() for p in model.parameters()) <= REAL_RUN_MAX_PARAMS else "meta"
    if device == "cpu":
        model = _build(name, device, monkeypatch)
    gm, result = rewritten(model)
    assert count_modules(gm, _BatchNorm) == 0
    assert not [n for n in gm.graph.nodes if n.target in (F.batch_norm, torch.batch_norm)]
    assert sum(result.stats.values()) == had_bn
    size = IMAGE_SIZE.get(name, 32)
    x = torch.randn(1, 3, size, size, device=device, requires_grad=True)
    outputs = _outputs(gm(x))
    sum(t.sum() for t in outputs).backward()
    assert x.grad.shape == x.shape
    if device == "cpu":
        assert all(torch.isfinite(t).all() for t in outputs) and torch.isfinite(x.grad).all()


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(x)) + self.bn(x * 2)


class CustomBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "model, fragment",
    [
        (SharedBN(), "left unchanged: called at 2 places"),
        (ConvBNAct(nn.ReLU(), bn=CustomBN(16)), "CustomBN overrides forward"),
    ],
    ids=["shared", "custom-forward"],
)
def test_batchnorm_it_cannot_rewrite_is_left_with_a_warning(model, fragment, caplog):
    gm = gp.trace(model, leaf_modules=[CustomBN])
    code = gm.code
    with caplog.at_level(logging.WARNING, logger="passes.replace_batchnorm"):
        result = replace_batchnorm(gm)
    assert not result.modified and gm.code == code
    assert fragment in caplog.text


class FunctionalBN(nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)


def test_traced_through_batchnorm_is_reported(caplog):
    gm = gp.trace(ConvBNAct(nn.ReLU(), bn=FunctionalBN(16)))  # not a leaf: becomes an F.batch_norm call
    with caplog.at_level(logging.WARNING, logger="passes.replace_batchnorm"):
        assert not replace_batchnorm(gm).modified
    assert "batch_norm call batch_norm in module 'bn' was traced through" in caplog.text


def test_timm_batchnorm_act_folds_its_activation():
    timm = pytest.importorskip("timm")
    with_act = ConvBNAct(nn.Identity(), bn=timm.layers.BatchNormAct2d(16, act_layer=nn.SiLU))
    gm, result = rewritten(with_act, leaf_modules=[timm.layers.BatchNormAct2d])
    assert dict(result.stats) == {"bn_to_gn_pn": 1} and gm.get_submodule("bn").activation == "silu"
    without_act = ConvBNAct(nn.ReLU6(), bn=timm.layers.BatchNormAct2d(16, apply_act=False))
    gm, result = rewritten(without_act, leaf_modules=[timm.layers.BatchNormAct2d])
    assert dict(result.stats) == {"bn_to_gn_pn": 1} and gm.get_submodule("bn").activation == "relu6"
    gm(torch.randn(2, 3, 4, 4)).sum().backward()
