"""Saved-tensor discovery: classification, identity, compressed tensors, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpass as gp
from graphpass.meta import META_SAVED
from graphpass.save_recorder import record_pack
from graphpass.saved_tensors import discover_saved_tensors


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


def saved_by(record, node):
    return {(s.kind, s.source, s.shape, s.dtype) for s in record.nodes[node].saved}


def count_saved(record, node, kind, shape):
    return sum(1 for s in record.nodes[node].saved if s.kind == kind and s.shape == shape)


def test_classification_of_every_kind():
    model = Net()
    gm = gp.trace(model)
    record = discover_saved_tensors(gm, (torch.randn(2, 3, 8, 8),))
    f32 = torch.float32
    assert saved_by(record, "conv") == {("input", "x", (2, 3, 8, 8), f32), ("parameter", "conv.weight", (4, 3, 3, 3), f32)}
    bn = saved_by(record, "bn")
    assert ("output", "conv", (2, 4, 8, 8), f32) in bn
    assert ("parameter", "bn.weight", (4,), f32) in bn
    assert count_saved(record, "bn", "internal", (4,)) == 2  # save_mean, save_invstd
    # in-place ReLU returns BatchNorm's tensor: same storage, classified as bn's output
    assert saved_by(record, "relu") == {("output", "bn", (2, 4, 8, 8), f32)}
    pool = saved_by(record, "pool")
    assert ("output", "bn", (2, 4, 8, 8), f32) in pool
    assert ("internal", "pool", (2, 4, 4, 4), torch.int64) in pool  # max-pool indices
    # fc keeps flatten's output, which lives in the pooled tensor's storage
    assert ("output", "flatten", (2, 64), f32) in saved_by(record, "fc")
    fc_input = next(s for s in record.nodes["fc"].saved if s.kind == "output")
    assert fc_input.storage == record.nodes["pool"].outputs[0]
    node = next(n for n in gm.graph.nodes if n.name == "relu")
    assert node.meta[META_SAVED] == record.nodes["relu"].saved


class LinearOn3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x * 2)


def test_a_reshaped_input_is_a_view_of_its_producer():
    gm = gp.trace(LinearOn3d())
    record = discover_saved_tensors(gm, (torch.randn(2, 3, 8),))
    assert ("view", "mul", (6, 8), torch.float32) in saved_by(record, "fc")


def test_same_storage_is_counted_once():
    gm = gp.trace(Net())
    record = discover_saved_tensors(gm, (torch.randn(2, 3, 8, 8),))
    bn_storage = {s.storage for s in record.nodes["relu"].saved}
    assert len(bn_storage) == 1
    assert {s.storage for s in record.nodes["pool"].saved if s.kind == "output"} == bn_storage
    activation = 2 * 4 * 8 * 8 * 4
    # conv output (for bn) + bn/relu output (one storage) + indices + pooled view, each once
    expected = activation + activation + 2 * 4 * 4 * 4 * 8 + 2 * 64 * 4 + 2 * 4 * 4  # + BN mean/invstd
    assert record.saved_bytes() == expected


def test_user_model_is_untouched():
    model = Net().eval()
    gm = gp.trace(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    discover_saved_tensors(gm, (torch.randn(2, 3, 8, 8),))
    assert not model.training and not gm.training
    assert all(p.grad is None and p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_meta_inputs_at_a_huge_batch_allocate_nothing():
    gm = gp.trace(Net())
    record = discover_saved_tensors(gm, (torch.empty(100_000, 3, 8, 8, device="meta"),))
    assert record.saved_bytes() > 100_000 * 4 * 8 * 8 * 4


class Compressed(nn.Module):
    """Stands in for the quantize-on-save runtime: its pack hook stores 1/8 of the bytes."""

    def forward(self, x):
        def pack(t):
            record_pack(t, t.numel() * t.element_size() // 8, "q4-test")
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return torch.sigmoid(x)


class WithCompression(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.act = Compressed()

    def forward(self, x):
        return self.act(self.fc(x)).sum(1)


def test_pack_hooks_report_compressed_bytes():
    gm = gp.trace(WithCompression(), leaf_modules=[Compressed])
    record = discover_saved_tensors(gm, (torch.randn(8, 16),))
    (saved,) = record.nodes["act"].saved
    assert saved.kind == "compressed" and saved.fmt == "q4-test"
    assert saved.nbytes == 8 * 16 * 4 // 8
    assert record.storages[saved.storage].kind == "compressed"


class Attention(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


def test_attention_keeps_what_fused_kernels_keep():
    gm = gp.trace(Attention())
    q = torch.randn(2, 3, 50, 8, requires_grad=True)
    record = discover_saved_tensors(gm, (q,))
    shapes = {s.shape for s in record.nodes["scaled_dot_product_attention"].saved}
    assert (2, 3, 50, 50) not in shapes  # no attention matrix
    assert (2, 3, 50) in shapes  # log-sum-exp


def test_wrong_inputs_raise_input_error_naming_the_node():
    gm = gp.trace(Net())
    with pytest.raises(gp.InputError, match="node conv .* shape"):
        discover_saved_tensors(gm, (torch.randn(2, 5, 8, 8),))
    with pytest.raises(gp.InputError, match="1 to 1 input"):
        discover_saved_tensors(gm, (torch.randn(2, 3, 8, 8), torch.randn(1)))
