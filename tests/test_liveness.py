"""Liveness of a training step on tiny graphs, worked out by hand (float32, batch 2).

Convention: a tensor is live on steps start <= step < end. Steps: forward nodes in graph order,
then backward in reverse.
"""

import pytest
import torch
from torch import nn

import graphpass as gp
from graphpass.liveness import META_LIVE, LiveRange, compute_liveness
from graphpass.memory_plan import build_plan, verify_plan
from graphpass.saved_tensors import discover_saved_tensors


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return torch.relu(h) + h


def liveness_of(model):
    gm = gp.trace(model)
    live = compute_liveness(gm, discover_saved_tensors(gm, (torch.randn(2, 4),)))
    return gm, live, {t.name: (t.kind, t.nbytes, t.start, t.end) for t in live.tensors}


def test_chain_by_hand():
    gm, live, ranges = liveness_of(Chain())
    assert live.steps == ["forward fc1", "forward relu", "forward fc2", "backward fc2", "backward relu", "backward fc1"]
    assert live.num_forward_steps == 3
    assert ranges == {
        "x": ("input", 32, 0, 6),
        "fc1.weight": ("parameter", 128, 0, 6),
        "fc1.bias": ("parameter", 32, 0, 6),
        "fc2.weight": ("parameter", 96, 0, 6),
        "fc2.bias": ("parameter", 12, 0, 6),
        # fc1's output is read by relu only (relu saves its result, not its input)
        "fc1": ("activation", 64, 0, 2),
        # relu's output is saved by relu and fc2: kept until relu's backward (step 4)
        "relu": ("saved", 64, 1, 5),
        # graph outputs live to the end of the step
        "fc2": ("activation", 24, 2, 6),
        # d(fc2) arrives from the loss at the first backward step, consumed by fc2's backward
        "grad:fc2": ("activation_grad", 24, 3, 4),
        "grad:relu": ("activation_grad", 64, 3, 5),
        "grad:fc1": ("activation_grad", 64, 4, 6),
        "grad:fc2.weight": ("param_grad", 96, 3, 6),
        "grad:fc2.bias": ("param_grad", 12, 3, 6),
        "grad:fc1.weight": ("param_grad", 128, 5, 6),
        "grad:fc1.bias": ("param_grad", 32, 5, 6),
    }
    node = next(n for n in gm.graph.nodes if n.name == "relu")
    assert node.meta[META_LIVE] == LiveRange(1, 5)
    plan = build_plan("chain", live.tensors, live.steps, live.num_forward_steps)
    verify_plan(plan)
    # arena per step: 64 | 128 | 88 | 284 | 324 | 356  (+300 for x and the parameters)
    assert plan.memory_profile() == [364, 428, 388, 584, 624, 656]
    assert plan.lower_bound_bytes == 356
    assert plan.predicted_peak_bytes == 656
    assert plan.saved_bytes == 64


def test_residual_by_hand():
    _, live, ranges = liveness_of(Residual())
    assert live.steps == ["forward fc", "forward relu", "forward add", "backward add", "backward relu", "backward fc"]
    assert ranges == {
        "x": ("input", 32, 0, 6),
        "fc.weight": ("parameter", 64, 0, 6),
        "fc.bias": ("parameter", 16, 0, 6),
        "fc": ("activation", 32, 0, 3),  # read by relu and by the add
        "relu": ("saved", 32, 1, 5),
        "add": ("activation", 32, 2, 6),
        "grad:add": ("activation_grad", 32, 3, 4),
        "grad:relu": ("activation_grad", 32, 3, 5),
        # h's gradient starts with the add's contribution (step 3), before relu's (step 4)
        "grad:fc": ("activation_grad", 32, 3, 6),
        "grad:fc.weight": ("param_grad", 64, 5, 6),
        "grad:fc.bias": ("param_grad", 16, 5, 6),
    }
    plan = build_plan("residual", live.tensors, live.steps, live.num_forward_steps)
    verify_plan(plan)
    # arena per step: 32 | 64 | 96 | 160 | 128 | 144
    assert plan.lower_bound_bytes == 160
    assert plan.planned_bytes == 160


class ViewChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.relu(x * 2).view(2, 8))


def test_views_share_storage_and_gradient():
    gm = gp.trace(ViewChain())
    live = compute_liveness(gm, discover_saved_tensors(gm, (torch.randn(2, 2, 4, requires_grad=False),)))
    names = {t.name for t in live.tensors}
    # the view allocates nothing and its gradient is a view of relu's
    assert "view" not in names and "grad:view" not in names
    relu = next(t for t in live.tensors if t.name == "relu")
    fc_step = live.steps.index("forward fc")
    assert relu.kind == "saved" and relu.end > live.num_forward_steps
    assert relu.start < fc_step


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_backward_rebuilds_each_compressed_copy_at_full_size_while_its_saver_runs(norm):
    """Conv -> Norm -> ReLU -> Conv at 4 bits: one layer copy, kept from quantize_layer (which makes
    it after the norm has saved its input) through the norm's backward; the ReLU and the second
    conv each rebuild a full-size tensor from it during their own backward step; the norm's backward
    (BatchNorm or GroupNorm) reads the copy itself. Nothing else rebuilds (the first conv saves the
    model's input as it is; quantize_layer's backward reads nothing)."""
    norm_layer = nn.BatchNorm2d(8) if norm == "batch" else nn.GroupNorm(2, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm_layer, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 3, 16, 16)  # layer tensors of 2 * 8 * 16 * 16 = 4,096 elements: compressed
    gm = gp.transform(model, (x,), bits=4)
    live = compute_liveness(gm, discover_saved_tensors(gm, (x,)))
    (copy,) = [t for t in live.tensors if t.kind == "compressed"]
    assert copy.node == "quantize_layer" and copy.end == live.steps.index("backward _1") + 1
    unpacked = {t.node: t for t in live.tensors if t.kind == "unpacked"}
    assert set(unpacked) == {"_2", "_3"}
    for node, t in unpacked.items():
        assert t.nbytes == 2 * 8 * 16 * 16 * 4
        assert (t.start, t.end) == (live.steps.index(f"backward {node}"), live.steps.index(f"backward {node}") + 1)
    plain = compute_liveness(gp.trace(model), discover_saved_tensors(gp.trace(model), (x,)))
    assert not [t for t in plain.tensors if t.kind in ("compressed", "unpacked")]


def test_a_large_convolution_before_a_norm_rebuilds_one_batch_chunk_at_a_time(monkeypatch):
    """Its "unpacked" tensor is one chunk of rows of its input, as runtime.conv_rebuild_bytes says."""
    from graphpass import runtime

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    x = torch.randn(4, 3, 16, 16)
    gm = gp.transform(model, (x,), bits=4)
    monkeypatch.setattr(runtime, "CONV_CHUNK_BYTES", 4 * 8 * 16 * 16 * 4 // 8)  # an eighth of conv 2's input
    live = compute_liveness(gm, discover_saved_tensors(gm, (x,)))
    unpacked = {t.node: t.nbytes for t in live.tensors if t.kind == "unpacked"}
    assert unpacked["_3"] == 8 * 16 * 16 * 4  # a chunk is half a sample: the smallest cut, one sample
    assert unpacked["_2"] == 4 * 8 * 16 * 16 * 4  # the ReLU's own backward rebuilds all of it
