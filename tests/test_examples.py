"""Smoke runs of the examples and of `graphpass bench` on tiny settings (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphpass.triton_kernels as triton_kernels
from graphpass.cli import main as graphpass_main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(*args: str, timeout: int = 240, compiled_kernels: bool = False) -> subprocess.CompletedProcess:
    """Run an example; ``compiled_kernels``: without TRITON_INTERPRET, which the tests set."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if compiled_kernels:
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def test_train_digits_compares_methods_on_real_digits(tmp_path):
    out = tmp_path / "digits.json"
    proc = run_example(
        str(EXAMPLES / "train_digits.py"), "--methods", "exact,2bit,gn+pn", "--seeds", "1", "--epochs", "1",
        "--limit", "96", "--batch", "32", "--width", "8", "--threads", "1", "--json", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["exact", "2bit", "gn+pn"]
    assert doc["train_samples"] == 96 and doc["test_samples"] == 96
    for r in doc["results"].values():
        assert len(r["accuracy"]) == 1 and 0.0 <= r["mean"] <= 100.0
    assert "vs exact" in proc.stdout and "gn+pn" in proc.stdout


def test_gradient_fidelity_reports_cosines_and_where_the_error_is(tmp_path):
    out = tmp_path / "fidelity.json"
    proc = run_example(
        str(EXAMPLES / "gradient_fidelity.py"), "--model", "tests/models.py:SmallResNet", "--batch", "4",
        "--image", "16", "--bits", "8,2", "--top", "3", "--json", str(out),
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["8", "2"]
    assert 1.0 >= results["8"]["cosine"] >= 0.999 > results["2"]["cosine"] > 0.5
    for r in results.values():
        assert len(r["largest error shares"]) == 3 and 0.0 < sum(r["largest error shares"].values()) <= 1.0 + 1e-9
    assert "8-bit: cosine" in proc.stdout and "largest shares" in proc.stdout


def test_train_imagefolder_on_a_generated_folder_of_pngs(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("red", "green", "blue")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            pixels = torch.randint(0, 60, (12, 10, 3), generator=g, dtype=torch.uint8)
            pixels[..., c] += 150
            Image.fromarray(pixels.numpy()).save(tmp_path / "data" / name / f"{i}.png")
    proc = run_example(
        str(EXAMPLES / "train_imagefolder.py"), str(tmp_path / "data"), "--image", "16", "--batch", "4",
        "--epochs", "1", "--seeds", "1", "--methods", "exact,4bit", "--threads", "1",
    )  # fmt: skip
    assert "ImageFolder" in proc.stdout and "(3 classes)" in proc.stdout
    assert "4bit" in proc.stdout


def test_ddp_example_runs_under_torchrun_with_gloo():
    proc = run_example(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(EXAMPLES / "ddp_train.py"), "--epochs", "1", "--limit", "64", "--batch", "8", "--bits", "4",
    )  # fmt: skip
    assert "test accuracy" in proc.stdout and "2 ranks" in proc.stdout


def test_graphpass_bench_on_resnet18_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = graphpass_main(
        ["bench", "torchvision:resnet18", "--batch", "2", "--image", "32", "--steps", "2", "--device", "cpu",
         "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    methods = [r["method"] for r in doc["runs"]]
    assert methods == ["plain", "checkpoint", "graphpass", "graphpass+gn+pn"]
    assert all(r["error"] is None and r["peak_bytes"] > 0 and r["step_ms"] > 0 for r in doc["runs"])
    assert "graphpass+gn+pn" in capsys.readouterr().out


def test_profile_step_reports_both_methods_on_the_cpu():
    proc = run_example(
        str(EXAMPLES / "profile_step.py"), "--model", "torchvision:resnet18", "--batch", "2", "--image", "32",
        "--device", "cpu", "--steps", "1",
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert "plain" in lines[1] and "graphpass 4-bit" in lines[1]
    for figure in ("forward peak MiB", "step ms (median)", "host ms", "GPU kernel ms"):
        (row,) = [line for line in lines if line.startswith(figure)]
        assert len(row.split()) >= 2 and all(float(v) >= 0 for v in row[len(figure):].split())


def test_host_cost_runs_the_cuda_path_with_counted_launches(tmp_path):
    out = tmp_path / "host.json"
    run_example(
        str(EXAMPLES / "host_cost.py"), "--model", "torchvision:resnet18", "--batch", "2", "--image", "16",
        "--steps", "2", "--json", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert all(us > 0 for us in doc["per call us"].values())
    assert {"pack_anchored", "batch_norm_grad_tables", "pack_groups"} <= set(doc["per call us"])
    # One table launch and one pack per BatchNorm layer forward, one reduction per layer backward:
    # the runtime took its CUDA path on CPU tensors for each of resnet18's 20 BatchNorm layers.
    launches = doc["Triton launches per step"]["graphpass"]
    assert launches["layer_tables"] == launches["anchored_pack"] == launches["anchored_channel_sums"] == 20
    assert doc["Triton launches per step"]["plain"] == {}
    # Each launch did its host work up to the driver (the stub's): graphpass's direct launch, and in
    # the interleaved steps launching through Triton, JITFunction.run.
    assert doc["launches"] == "Triton's launch work, no driver call" and doc["direct launches"]
    inside = doc["ms per step inside Triton launches (median)"]
    assert inside["graphpass"] > 0 and inside["graphpass, launches through Triton"] > 0
    assert set(doc["direct launches save ms (median of paired differences)"]) == {"inside launches", "whole step"}
    assert doc["eager ops per step"]["graphpass"] > doc["eager ops per step"]["plain"] > 0
    assert doc["Python function calls per step"]["graphpass"] > doc["Python function calls per step"]["plain"] > 0


def test_every_kernel_compiles_for_an_h100_without_a_gpu(tmp_path):
    """resnet18 with GroupNorm + PN-Act, and the BatchNorm kernels of host_cost's per-call timings:
    every kernel specialization the runtime's CUDA path asks for is compiled for an H100 (Triton's
    compiler and its bundled ptxas), so a kernel that would not build fails here, not on a GPU."""
    out = tmp_path / "host.json"
    run_example(
        str(EXAMPLES / "host_cost.py"), "--model", "torchvision:resnet18", "--batch", "2", "--image", "16",
        "--norm", "gn+pn", "--steps", "1", "--compile-for-h100", "--json", str(out), timeout=600, compiled_kernels=True,
    )  # fmt: skip
    compiled = json.loads(out.read_text())["specializations compiled for an H100"]
    kernels = {name for name in dir(triton_kernels) if name.endswith("_kernel")}
    assert set(compiled) == kernels and all(n > 0 for n in compiled.values()), compiled
