"""The models and learning-rate schedule the training examples share (examples/common.py)."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import graphpass as gp
from graphpass.proxy_norm import ProxyNormAct, ScaledGroupNorm
from graphpass.testing import count_modules, run_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from common import PreActResNet, SmallResNet, lr_schedule  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def example() -> torch.Tensor:
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def test_preact_resnet_every_batchnorm_becomes_pn_act():
    model = PreActResNet(1, 10, (8, 16, 32))
    bns = count_modules(model, nn.BatchNorm2d)
    gm = gp.transform(model, (example(),), bits=None, norm="gn+pn", groups=4)
    assert count_modules(gm, nn.BatchNorm2d) == 0
    assert count_modules(gm, ProxyNormAct) == bns == 7
    assert count_modules(gm, ScaledGroupNorm) == 0


def test_post_activation_resnet_keeps_uncentred_norms_before_each_add():
    # The contrast PreActResNet's docstring names: a v1 block's last norm and its shortcut norm
    # have no activation right after them (the add comes first), so they get no Proxy Norm.
    gm = gp.transform(SmallResNet(1, 10, (8, 16, 32)), (example(),), bits=None, norm="gn+pn", groups=4)
    assert count_modules(gm, ScaledGroupNorm) == 5
    assert count_modules(gm, ProxyNormAct) == 4


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[name].flatten().double() for name in sorted(grads)])


@pytest.mark.parametrize("bits,min_cosine", [(8, 0.999), (4, 0.99)])
def test_compressed_preact_resnet_forward_exact_and_gradients_close(bits, min_cosine):
    # Layer mode where a norm's input is a residual sum and its activation feeds two convolutions.
    torch.manual_seed(0)
    model = PreActResNet(1, 10, (8, 16, 32)).train()
    reference = PreActResNet(1, 10, (8, 16, 32)).train()
    reference.load_state_dict(model.state_dict())  # a twin: training forwards move running statistics
    gm = gp.transform(model, (example(),), bits=bits, norm="keep")
    assert gm.code.count("quantize_layer(") == 7 and f"bits = {bits}" in gm.code
    out_r, _, g_r = run_step(reference, (example(),))
    out_c, _, g_c = run_step(gm, (example(),))
    assert torch.equal(out_r, out_c)
    assert set(g_r) == set(g_c)
    assert torch.nn.functional.cosine_similarity(flat(g_r), flat(g_c), dim=0) >= min_cosine


def test_lr_schedule_warms_up_linearly_then_follows_cosine_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = lr_schedule(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lrs[4:] == pytest.approx([0.2 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_lr_schedule_without_warmup_is_torch_cosine_annealing():
    ours = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    torch_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    ours_sched = lr_schedule(ours, 0, 10)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch_opt, 10)
    for _ in range(10):
        assert ours.param_groups[0]["lr"] == pytest.approx(torch_opt.param_groups[0]["lr"])
        ours.step(), torch_opt.step()
        ours_sched.step(), torch_sched.step()
