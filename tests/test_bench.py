"""graphpass bench: per-block checkpointing, per-method failure isolation, JSON and table."""

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from graphpass.bench import (
    BenchRun,
    CheckpointedBlock,
    Method,
    checkpoint_blocks,
    format_table,
    largest_batch,
    run_bench,
)
from graphpass.cli import main
from graphpass.testing import assert_equivalent, count_modules
from tests.models import ConvBNReLU

TINY_MODEL = '''
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))

def tiny():
    return nn.Sequential(Block(3, 8), Block(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

class Flat(nn.Module):  # no container anywhere: nothing to checkpoint
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

def flat():
    return Flat()
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny_models.py"
    path.write_text(TINY_MODEL)
    return path


@pytest.mark.parametrize(
    "name, blocks",
    [
        ("resnet18", 8),  # the BasicBlocks of layer1..layer4
        ("mobilenet_v2", 19),  # stem, 17 inverted residuals, last conv; not the classifier's Linear
        ("vit_b_16", 12),  # the encoder layers
    ],
)
def test_checkpoint_blocks_finds_the_blocks_of_torchvision_models(name, blocks):
    model = torchvision.models.get_model(name, weights=None)
    assert checkpoint_blocks(model) == blocks
    assert count_modules(model, CheckpointedBlock) == blocks
    assert checkpoint_blocks(nn.Linear(2, 2)) == 0  # no container: nothing to wrap


def test_checkpointed_model_has_the_same_outputs_and_gradients():
    reference = nn.Sequential(ConvBNReLU(3, 8), nn.Sequential(ConvBNReLU(8, 8), nn.Conv2d(8, 4, 1)), nn.Flatten())
    candidate = copy.deepcopy(reference)
    assert checkpoint_blocks(candidate) == 2  # the two ConvBNReLU; the lone Conv2d is not worth it
    names = {n: n.replace(".block", "") for n, _ in candidate.named_parameters()}
    assert_equivalent(reference, candidate, (torch.randn(2, 3, 6, 6),), rtol=1e-6, atol=1e-6, param_names=names)


def test_bench_measures_every_cpu_method_and_reports_ratios(model_file):
    doc = run_bench(f"{model_file}:tiny", batch=4, image=8, device="cpu", bits=4, steps=2, max_batch_mib=64)
    runs = {r["method"]: r for r in doc["runs"]}
    assert list(runs) == ["plain", "checkpoint", "graphpass", "graphpass+gn+pn"]
    assert doc["device"] == "cpu"
    plain = runs["plain"]
    assert plain["error"] is None and plain["peak_vs_plain"] == 1.0
    assert plain["peak_bytes"] > plain["persistent_bytes"] > 0
    assert len(plain["step_ms_all"]) == 2 and plain["step_ms"] > 0
    # The CPU largest batch is a linear extrapolation of the measured peak, flagged as such.
    per_sample = (plain["peak_bytes"] - plain["persistent_bytes"]) / 4
    assert plain["max_batch_predicted"] is True
    assert plain["max_batch"] == int((64 * 2**20 - plain["persistent_bytes"]) // per_sample)
    assert "plain" in format_table(doc) and "max batch @ 64 MiB" in format_table(doc)


def test_a_failing_method_is_reported_and_the_others_still_run(model_file, capsys):
    # The 'flat' model has no blocks: checkpointing fails, plain and graphpass do not.
    doc = run_bench(f"{model_file}:flat", batch=2, image=8, device="cpu", bits=8, steps=1)
    runs = {r["method"]: r for r in doc["runs"]}
    assert "no blocks to checkpoint" in runs["checkpoint"]["error"]
    assert runs["checkpoint"]["peak_bytes"] is None
    assert runs["plain"]["error"] is None
    assert runs["graphpass"]["error"] is None
    assert "failed: InputError" in format_table(doc)
    assert "checkpoint: failed" in capsys.readouterr().err


def test_bench_command_writes_json_and_table(model_file, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", f"{model_file}:tiny", "--batch", "2", "--image", "8", "--steps", "1", "--device", "cpu",
                 "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert {"device", "runs"} <= set(doc)
    assert all({"method", "peak_bytes", "step_ms"} <= set(r) for r in doc["runs"])
    assert "graphpass+gn+pn" in capsys.readouterr().out


def test_bench_command_bad_input_fails_before_measuring(model_file, tmp_path, capsys):
    assert main(["bench", f"{model_file}:tiny", "--device", "cpu", "--json", str(tmp_path / "no" / "b.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "torchvision:resnet_nope", "--device", "cpu"]) == 2
    assert "unknown torchvision model" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", f"{model_file}:tiny", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_largest_batch_on_cpu_is_none_when_the_budget_holds_only_the_parameters():
    run = BenchRun(method="plain", batch=4, peak_bytes=5000, persistent_bytes=3000)
    assert largest_batch("unused", Method("plain"), run, 8, torch.device("cpu"), budget=2000) == (0, True)
    assert largest_batch("unused", Method("plain"), run, 8, torch.device("cpu"), budget=3000 + 5 * 500) == (5, True)


@pytest.mark.parametrize("limit", [0, 1, 37, 1000, 5000])
def test_largest_batch_search_on_cuda_brackets_then_bisects(monkeypatch, limit):
    tried = []

    def fits(spec, method, batch, image, device, budget):  # stands in for a real CUDA training step
        tried.append(batch)
        return batch <= limit

    monkeypatch.setattr("graphpass.bench._fits", fits)
    run = BenchRun(method="plain", batch=4, peak_bytes=5000, persistent_bytes=3000)  # guess: 10 for 8000 bytes
    found, predicted = largest_batch("unused", Method("plain"), run, 8, torch.device("cuda"), budget=8000)
    assert predicted is False
    assert found <= limit and limit - found <= max(1, found // 100)  # exact below 100, within 1% above
    assert len(tried) <= 24


@pytest.mark.gpu
def test_cuda_out_of_memory_is_reported_per_method_and_memory_is_freed(model_file):
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    # Cap the allocator at about 8 MiB: the tiny model's activations at batch 64, 64x64 px do not fit,
    # so every method fails with OOM; none may crash the run or leave memory behind.
    torch.cuda.set_per_process_memory_fraction(8 * 2**20 / torch.cuda.get_device_properties(0).total_memory)
    try:
        doc = run_bench(f"{model_file}:tiny", batch=64, image=64, device="cuda", bits=4, steps=1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert doc["device"].startswith("cuda")
    for r in doc["runs"]:
        assert r["error"] == "out of memory", r
    assert torch.cuda.memory_allocated() == before
