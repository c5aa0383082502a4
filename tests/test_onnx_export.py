"""Checked ONNX export: inference lowering, GroupNorm forms per opset, numerics, metadata, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torchvision.ops import StochasticDepth
from torch import nn

import graphpass as gp
from graphpass.errors import ExportError, InputError, TraceError
from graphpass.onnx_export import InferenceNormAct, export_onnx, lower_for_inference, max_opset
from graphpass.proxy_norm import ACTIVATIONS, ProxyNormAct, ScaledGroupNorm
from tests.models import DataDependent, SmallResNet


class GNPNNet(nn.Module):
    """What replace_batchnorm produces: Conv -> GN+PN-Act, Conv -> ScaledGroupNorm, residual, head."""

    def __init__(self, width: int = 16, activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.pn1 = ProxyNormAct(width, 4, activation=activation)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.sgn2 = ScaledGroupNorm(width, 4)
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pn1(self.conv1(x))
        x = torch.relu(x + self.sgn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def randomized(model: nn.Module) -> nn.Module:
    """Non-trivial norm parameters, so a wrong fold of the proxy statistics shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("weight", "bias")) and p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_lowering_folds_proxy_norm_exactly(activation):
    model = randomized(GNPNNet(activation=activation)).eval()
    lowered, stats = lower_for_inference(model)
    assert (stats.proxy_norms_folded, stats.scaled_group_norms_lowered, stats.group_norms) == (1, 1, 2)
    assert not any(isinstance(m, (ProxyNormAct, ScaledGroupNorm)) for m in lowered.modules())
    assert sum(isinstance(m, InferenceNormAct) for m in lowered.modules()) == 2
    assert isinstance(model.pn1, ProxyNormAct)  # the caller's model is untouched
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("exporter", "opset", "form"),
    [
        ("dynamo", 21, "GroupNormalization"),
        ("dynamo", 18, "decomposed"),
        ("auto", 17, "decomposed"),
        ("torchscript", 21, "GroupNormalization"),
        ("torchscript", 18, "decomposed"),
    ],
)
def test_group_norm_form_follows_the_opset(exporter, opset, form, tmp_path):
    model = randomized(GNPNNet())
    path = tmp_path / "gnpn.onnx"
    report = export_onnx(model, torch.randn(2, 3, 12, 12), path, opset=opset, exporter=exporter)
    ops = op_types(path)
    assert report.group_norm_form == form
    if form == "GroupNormalization":
        assert ops.count("GroupNormalization") == 2 and "InstanceNormalization" not in ops
    else:
        assert "GroupNormalization" not in ops and ops.count("InstanceNormalization") == 2
    assert "BatchNormalization" not in ops
    assert [(d.domain, d.version) for d in onnx.load(str(path)).opset_import] == [("", opset)]
    assert report.max_rel_error <= 1e-4
    assert report.lowering.proxy_norms_folded == 1
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    # the batch axis is dynamic
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(ort_run(path, x), expected, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gnpn.onnx"]  # one file, no side files


@pytest.mark.parametrize("opset", [18, 21])
def test_untransformed_model_matches_torch_onnx_export(opset, tmp_path):
    model = SmallResNet().eval()
    x = torch.randn(3, 3, 16, 16)
    report = export_onnx(model, (x,), tmp_path / "ours.onnx", opset=opset)
    torch.onnx.export(model, (x,), str(tmp_path / "theirs.onnx"), opset_version=opset)
    np.testing.assert_allclose(ort_run(tmp_path / "ours.onnx", x), ort_run(tmp_path / "theirs.onnx", x), rtol=1e-5, atol=1e-6)
    assert report.max_rel_error <= 1e-4 and report.output_nonzero
    assert report.group_norm_form == "none"


def test_metadata_names_version_passes_and_plan(tmp_path):
    from graphpass.memory_plan import PlannedTensor, build_plan

    gm = gp.trace(SmallResNet())
    gm.meta["graphpass.passes"] = [{"name": "replace_batchnorm", "modified": True, "stats": {"replaced": 3}}]
    plan = build_plan("SmallResNet", [PlannedTensor("a", "a", "", "activation", 64, 0, 2, None)], ["f", "b"], 1)
    report = export_onnx(gm, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", opset=17, exporter="torchscript", plan=plan)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["graphpass.version"] == gp.__version__
    assert json.loads(props["graphpass.passes"])[0]["stats"] == {"replaced": 3}
    assert json.loads(props["graphpass.memory_plan"])["planned_bytes"] == 64
    verification = json.loads(props["graphpass.verification"])
    assert verification["max_rel_error"] == report.max_rel_error <= 1e-4
    assert verification["batches"] == [2, 3]  # batch 1 is exported as 2 so the axis stays dynamic
    assert props == report.metadata


def test_transformed_model_exports_without_compression_or_batchnorm(tmp_path):
    gm = gp.transform(SmallResNet(), (torch.randn(2, 3, 16, 16),), bits=4, norm="gn+pn", groups=4)
    before = [n.name for n in gm.graph.nodes]
    report = export_onnx(gm, (torch.randn(2, 3, 16, 16),), tmp_path / "t.onnx", opset=21)
    assert report.lowering.compression_points_removed > 0
    assert report.lowering.proxy_norms_folded > 0
    assert "BatchNormalization" not in op_types(tmp_path / "t.onnx")
    assert [n.name for n in gm.graph.nodes] == before  # the caller's graph keeps its compression points
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "t.onnx")).metadata_props}
    assert [p["name"] for p in json.loads(props["graphpass.passes"])] == ["replace_batchnorm", "expand_norm_act", "insert_quantize_on_save"]


class TrainingOnlyOps(nn.Module):
    """fx records F.dropout with training=True baked in; StochasticDepth stays an opaque module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop_path = StochasticDepth(0.5, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.nn.functional.dropout(y + self.drop_path(y), 0.5, training=True)


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_an_all_zero_output_is_reported_as_a_vacuous_check(tmp_path, caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    report = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "z.onnx", opset=17)
    assert not report.output_nonzero and "VACUOUS" in report.summary()
    assert "vacuous" in caplog.text
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "z.onnx")).metadata_props}
    assert json.loads(props["graphpass.verification"])["output_nonzero"] is False


def test_training_only_ops_vanish_and_random_ops_are_refused(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = TrainingOnlyOps()
    report = export_onnx(model, x, tmp_path / "m.onnx", opset=17)
    # the dropout call recorded with training=True goes; the StochasticDepth module is off in eval()
    assert report.lowering.training_only_ops_removed == 1
    ops = op_types(tmp_path / "m.onnx")
    assert "Dropout" not in ops and "RandomUniformLike" not in ops and "Bernoulli" not in ops
    with torch.no_grad():
        expected = (2 * model.conv(x)).numpy()
    np.testing.assert_allclose(ort_run(tmp_path / "m.onnx", x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ExportError, match="rand_like.*draws random numbers"):
        export_onnx(Noisy(), x, tmp_path / "n.onnx", opset=17)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("opset", [16, 0, "21", 10_000])
def test_unsupported_opset_is_an_input_error_before_any_work(opset, tmp_path):
    with pytest.raises(InputError, match=f"from 17 to {max_opset()}"):
        export_onnx(SmallResNet(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_dynamo_exporter_below_opset_18_is_refused(tmp_path):
    # it would silently write opset 18; "auto" picks the TorchScript exporter there
    with pytest.raises(InputError, match="exporter='torchscript'"):
        export_onnx(SmallResNet(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", opset=17, exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


def test_bad_outputs_and_untraceable_models_leave_no_file(tmp_path, monkeypatch):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(InputError, match="does not exist"):
        export_onnx(SmallResNet(), x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(InputError, match="suffix"):
        export_onnx(SmallResNet(), x, tmp_path / "m.pb")
    with pytest.raises(TraceError, match="gate"):
        export_onnx(DataDependent(), x, tmp_path / "m.onnx")
    import graphpass.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "_compare", lambda session, reference, inputs: (1.0, 0.5, 2.0))
    with pytest.raises(ExportError, match="relative error 5.000e-01"):
        export_onnx(SmallResNet(), x, tmp_path / "m.onnx", exporter="torchscript", opset=17)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_survives_a_failed_export(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(TraceError):
        export_onnx(DataDependent(), torch.randn(1, 3, 8, 8), target)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.onnx"]


def test_export_command(tmp_path, capsys):
    from graphpass.cli import main

    out = tmp_path / "m.onnx"
    argv = ["export", "tests/models.py:SmallResNet", "-o", str(out), "--batch", "1", "--image", "16"]
    assert main([*argv, "--norm", "gn+pn", "--groups", "4", "--bits", "4", "--opset", "17"]) == 0
    assert "max rel" in capsys.readouterr().out
    assert "BatchNormalization" not in op_types(out)
    out.unlink()
    assert main([*argv, "--opset", "99"]) == 2
    assert "--opset 99 is not supported" in capsys.readouterr().err
    assert main(["export", "tests/models.py:SmallResNet", "-o", str(tmp_path / "no" / "m.onnx")]) == 2
    assert list(tmp_path.iterdir()) == []


ZOO = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "regnet_y_400mf", "vit_b_16"]


@pytest.mark.slow
@pytest.mark.parametrize("opset", [21, 17])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_gn_pn_4bit_exports_clean(name, opset, tmp_path):
    image = 224 if name.startswith("vit") else 64  # torchvision's ViT fixes its image size
    inputs = gp.example_inputs(2, image)
    model = gp.load_model(f"torchvision:{name}")
    if name.startswith("vit"):
        # torchvision zero-initialises ViT's head, so an untrained model outputs zeros, which any
        # export matches; a random head makes the comparison mean something
        nn.init.normal_(model.heads.head.weight, std=0.02)
    gm = gp.transform(model, inputs, bits=4, norm="gn+pn")
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(gm, inputs, path, opset=opset)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node) and not model.functions
    assert report.max_rel_error <= 1e-4 and report.output_nonzero
    assert report.lowering.compression_points_removed > 0
    if report.lowering.group_norms:
        assert ("GroupNormalization" in ops) == (opset >= 21)


@pytest.mark.parametrize(("bits", "opset", "code_type"), [(4, 21, onnx.TensorProto.UINT4), (8, 17, onnx.TensorProto.UINT8)])
def test_training_graph_marks_every_quantize_on_save_point(bits, opset, code_type, tmp_path):
    from graphpass.meta import META_QUANT
    from graphpass.onnx_export import export_training_graph

    x = torch.randn(2, 3, 16, 16)
    gm = gp.transform(SmallResNet(), (x,), bits=bits, norm="keep")
    storing = [n.name for n in gm.graph.nodes if n.meta.get(META_QUANT) is not None and n.meta[META_QUANT].layout]
    assert len(storing) == 4  # the generic session and one copy per Conv-BN layer (3)
    report = export_training_graph(gm, (x,), tmp_path / "train.onnx", opset=opset)
    model = onnx.load(str(tmp_path / "train.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [p.node for p in report.points] == storing
    assert [o.name for o in model.graph.output[1:]] == [f"saved_{bits}bit__{name}" for name in storing]
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert [n.name for n in quantize] == [f"graphpass_q{bits}__{name}/quantize" for name in storing]
    assert all(f"{bits}-bit" in n.doc_string for n in quantize)
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == len(storing)
    zero_points = {i.name: i for i in model.graph.initializer if i.name.endswith("__zero_point")}
    assert len(zero_points) == len(storing) and {z.data_type for z in zero_points.values()} == {code_type}
    assert report.max_rel_error <= 1e-4
    # the layer without an activation keeps its norm input (conv2's output), not the norm's output
    assert report.points[-1].tensor == "conv2"


def test_training_graph_needs_compression_points(tmp_path):
    from graphpass.onnx_export import export_training_graph

    with pytest.raises(InputError, match="bits="):
        export_training_graph(gp.trace(SmallResNet()), torch.randn(2, 3, 8, 8), tmp_path / "t.onnx")
    assert list(tmp_path.iterdir()) == []
