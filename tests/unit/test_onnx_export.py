"""ONNX export: FP32 and INT8 (torchao PT2E) models, metadata, dynamic batch, parity, the export stage."""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hwkd.config import ExportConfig
from hwkd.errors import StageError
from hwkd.onnx import check
from hwkd.onnx import export as ox
from hwkd.pipeline import PipelineState, RunContext
from hwkd.stages import export as export_stage

LABELS = ["zero", "one", "two", "three"]


class TinyNet(nn.Module):
    """Conv-BN-ReLU, a residual block, global pool, linear: the shapes a real student has."""

    def __init__(self, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.bn(self.conv(y)) + y)
        return self.fc(y.mean((2, 3)))


class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.export cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def _dataset(n: int = 48, seed: int = 0):
    import dataclasses

    from hwkd.data import Dataset

    g = torch.Generator().manual_seed(seed)
    splits = {
        "test": (torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)),
        "val": (torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)),
        "train": (torch.randn(64, 1, 16, 16, generator=g), torch.randint(0, 4, (64,), generator=g)),  # PTQ calibration
    }
    ds = Dataset.from_tensors("tiny", splits, LABELS)
    # the metadata records this recipe; the tensors above stand for its output
    ds.preprocessing = dataclasses.replace(ds.preprocessing, scale=1 / 255, mean=(0.5,), std=(0.25,))
    ds._example = splits["val"][0][:1]
    return ds


def _x(ds, split="test"):
    return torch.cat([b[0] for b in ds.eval_batches(split)])


def _profile():
    runtime = types.SimpleNamespace(providers=("CPUExecutionProvider",), threads=2)
    return types.SimpleNamespace(name="test-device", runtime=runtime)


def _trained_like(model: nn.Module) -> nn.Module:
    """Give BN non-trivial running stats, as after training."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 16, 16))
    return model.eval()


def _negated(model: nn.Module) -> nn.Module:
    """The same network with negated logits: every top-1 prediction changes."""
    other = copy.deepcopy(model).eval()
    with torch.no_grad():
        other.fc.weight.neg_()
        other.fc.bias.neg_()
    return other


def _int8(model: nn.Module):
    """A torchao PT2E-converted INT8 GraphModule from hwkd's quantizer (BN folded, observers fed a few
    batches instead of QAT training: fast in tests, the same Q/DQ form as the qat stage)."""
    from hwkd.stages import qat

    prepared, _ = qat.prepare_qat(model.eval(), torch.randn(4, 1, 16, 16), "x86")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(32, 1, 16, 16, generator=g))
    return qat.convert(prepared)


@pytest.fixture(scope="module")
def ds():
    return _dataset()


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, ds):
    model = _trained_like(TinyNet())
    path = tmp_path_factory.mktemp("fp32") / "model_fp32.onnx"
    meta = ox.onnx_metadata("9.9.9", "test-device", ds)
    ox.export_onnx(model, ds.example_input(), path, meta)
    return model, path


@pytest.fixture(scope="module")
def int8(tmp_path_factory, ds):
    quantized = _int8(_trained_like(TinyNet()))
    path = tmp_path_factory.mktemp("int8") / "model.onnx"
    ox.export_onnx(quantized, ds.example_input(), path, ox.onnx_metadata("9.9.9", "test-device", ds))
    return quantized, path


def _state(ds, student, quantized=None, onnx_paths=None):
    return PipelineState(
        student=student,
        student_spec={},
        teachers=[],
        teacher_weights=[],
        dataset=ds,
        profile=_profile(),
        budget=None,
        quantized=quantized,
        onnx=dict(onnx_paths or {}),
    )


def test_fp32_export_is_valid_and_carries_metadata(fp32):
    _, path = fp32
    onnx.checker.check_model(str(path))
    meta = ox.read_metadata(path)
    assert meta["hwkd.version"] == "9.9.9"
    assert meta["hwkd.profile"] == "test-device"
    assert json.loads(meta["hwkd.labels"]) == LABELS
    assert json.loads(meta["hwkd.input_shape"]) == [1, 16, 16]
    prep = json.loads(meta["hwkd.preprocessing"])
    assert prep["resize"] == [16, 16] and prep["mean"] == [0.5] and prep["std"] == [0.25]
    graph = onnx.load(str(path)).graph  # no exporter debug props (stack traces with local paths)
    assert not any(n.metadata_props for n in graph.node)


def test_fp32_export_has_named_io_and_dynamic_batch(fp32):
    _, path = fp32
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 5):
        logits = check.onnx_predict(path, np.random.default_rng(0).standard_normal((batch, 1, 16, 16)))
        assert logits.shape == (batch, 4)


def test_fp32_parity_is_exact(fp32, ds):
    model, path = fp32
    par = check.parity(model, path, _x(ds))
    assert par["top1_agreement"] == 1.0 and par["disagreements"] == 0
    assert par["max_abs_diff"] < 1e-4
    assert par["samples"] == ds.split_size("test")


def test_accuracy_matches_pytorch(fp32, ds):
    model, path = fp32
    with torch.no_grad():
        expected = (model(_x(ds)).argmax(1) == ds.targets("test")).float().mean().item()
    assert check.accuracy(path, ds.eval_batches("test")) == pytest.approx(expected)


def test_predict_batches_large_inputs(fp32, ds):
    _, path = fp32
    whole = check.onnx_predict(path, _x(ds), batch_size=1000)
    chunked = check.onnx_predict(path, _x(ds), batch_size=7)
    np.testing.assert_allclose(whole, chunked, atol=1e-5)


def test_fp32_graph_has_no_quant_nodes_and_size_is_reported(fp32):
    _, path = fp32
    counts = check.count_quant_nodes(path)
    assert counts["QuantizeLinear"] == counts["DequantizeLinear"] == counts["integer_ops"] == 0
    assert counts["total_nodes"] > 0
    assert ox.model_size_mb(path) == pytest.approx(path.stat().st_size / 2**20)


def test_int8_export_has_qdq_and_ort_runs_integer_conv(int8, ds):
    quantized, path = int8
    counts = check.count_quant_nodes(path)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    executed = check.ort_executed_ops(path)
    assert executed["QLinearConv"] >= 1
    assert check.parity(quantized, path, _x(ds))["top1_agreement"] >= 0.95
    assert json.loads(ox.read_metadata(path)["hwkd.labels"]) == LABELS


def test_parity_detects_a_different_model(fp32, ds):
    model, path = fp32
    par = check.parity(_negated(model), path, _x(ds))
    assert par["top1_agreement"] < 0.95
    assert par["max_abs_diff"] > 1e-2
    assert par["disagreements"] == round((1 - par["top1_agreement"]) * par["samples"]) > 0
    assert par["near_tie_disagreements"] <= par["disagreements"]


def test_failed_export_raises_and_leaves_the_old_file(tmp_path, ds):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous model")
    with pytest.raises(StageError) as err:
        ox.export_onnx(DataDependent(), torch.randn(2, 1, 16, 16), path, {}, name="odd model")
    assert "odd model" in str(err.value)
    assert "data-dependent" in str(err.value)
    assert path.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file left


def test_failed_export_creates_nothing(tmp_path):
    path = tmp_path / "sub" / "model.onnx"
    with pytest.raises(StageError):
        ox.export_onnx(DataDependent(), torch.randn(2, 1, 16, 16), path, {})
    assert not path.exists()
    assert not path.parent.exists() or not any(path.parent.iterdir())


def test_metadata_values_must_be_strings(tmp_path, ds):
    with pytest.raises(StageError, match="strings"):
        ox.export_onnx(TinyNet().eval(), ds.example_input(), tmp_path / "m.onnx", {"hwkd.version": 1})
    assert not (tmp_path / "m.onnx").exists()


def test_export_stage_without_quantized_model_ships_fp32(tmp_path, ds):
    student = _trained_like(TinyNet())
    ctx = RunContext(run_dir=tmp_path)
    state, result = export_stage.run(
        _state(ds, student, onnx_paths={"teacher": tmp_path / "t.onnx"}), ExportConfig(), ctx
    )
    final, fp32_path = tmp_path / "model.onnx", tmp_path / "model_fp32.onnx"
    assert final.read_bytes() == fp32_path.read_bytes()
    assert result.metrics["precision"] == "fp32"
    assert result.metrics["parity"]["fp32"]["top1_agreement"] == 1.0
    assert "int8" not in result.metrics["parity"]
    assert result.metrics["accuracy"] == result.metrics["fp32_accuracy"]
    assert result.artifacts == {"model": "model.onnx", "model_fp32": "model_fp32.onnx"}
    assert state.onnx == {"teacher": tmp_path / "t.onnx", "fp32": fp32_path}
    assert ox.read_metadata(final)["hwkd.profile"] == "test-device"


def test_export_stage_with_int8_model(tmp_path, ds, int8):
    quantized, _ = int8
    student = _trained_like(TinyNet())
    ctx = RunContext(run_dir=tmp_path)
    state, result = export_stage.run(
        _state(ds, student, quantized), ExportConfig(min_top1_agreement=0.9), ctx
    )
    m = result.metrics
    assert m["precision"] == "int8"
    assert m["parity"]["fp32"]["top1_agreement"] == 1.0
    assert m["parity"]["int8"]["top1_agreement"] >= 0.9
    assert m["quant_nodes"]["QuantizeLinear"] > 0
    assert "QLinearConv" in m["executed_ops"]
    assert 0 < m["model_size_mb"] and 0 < m["fp32_model_size_mb"]
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["fp32_accuracy"] <= 1.0
    # QAT is model.onnx; the onnxruntime PTQ peer of the same FP32 model sits beside it.
    assert state.onnx == {
        "fp32": tmp_path / "model_fp32.onnx",
        "int8": tmp_path / "model.onnx",
        "qat": tmp_path / "model.onnx",
        "ptq": tmp_path / "model_ptq.onnx",
        "ptq_u8s8": tmp_path / "model_ptq_u8s8.onnx",
        "ptq_tuned": tmp_path / "model_ptq_tuned.onnx",
    }
    assert m["quantization"]["chosen"] == "qat"
    assert set(m["quantization"]["models"]) == {"fp32", "qat", "ptq", "ptq_u8s8", "ptq_tuned"}
    assert m["executed"]["float_compute"] == {} and m["executed"]["integer_kernels"] > 0
    assert check.count_quant_nodes(tmp_path / "model_ptq.onnx")["QuantizeLinear"] > 0
    assert check.count_quant_nodes(tmp_path / "model.onnx")["QuantizeLinear"] > 0
    json.dumps(result.to_dict())  # the pipeline writes it as JSON


def test_export_stage_rejects_broken_parity(tmp_path, ds, monkeypatch):
    """Simulate an exporter that writes the wrong network for the INT8 model."""
    student = _trained_like(TinyNet())
    wrong = _negated(student)
    real_export = ox.export_onnx

    def broken_export(model, x, path, meta, opset=18, *, name=None):
        return real_export(wrong if name == "INT8 student" else model, x, path, meta, opset, name=name)

    monkeypatch.setattr(ox, "export_onnx", broken_export)
    ctx = RunContext(run_dir=tmp_path)
    with pytest.raises(StageError) as err:
        export_stage.run(_state(ds, student, quantized=student), ExportConfig(), ctx)
    msg = str(err.value)
    assert "fp32: top-1 agreement 1.0000" in msg and "int8: top-1 agreement 0." in msg
    assert "images with a clear answer" in msg and "0.9900" in msg
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "model_fp32.onnx").exists()
    assert (tmp_path / "stages" / "export" / "model_qat.onnx").exists()  # kept for inspection


def test_a_quantizer_failure_falls_back_to_ort_ptq_and_says_so(tmp_path, ds, monkeypatch):
    """hwkd's quantizer failing on a student is handled: the run ships ORT's PTQ, and the qat metrics
    and the INT8 selection say why (issue 10: prefer handling over refusing, never a traceback)."""
    from hwkd.config import QatConfig
    from hwkd.stages import qat

    def refuse(*args, **kwargs):
        raise StageError("qat: hwkd's INT8 quantizer could not annotate the student's graph (ValueError: x).")

    monkeypatch.setattr(qat, "prepare_qat", refuse)
    student = _trained_like(TinyNet())
    ctx = RunContext(run_dir=tmp_path)
    state, result = qat.run(_state(ds, student), QatConfig(quantizer="x86"), ctx)
    assert state.quantized is None and state.quant_method == "ptq"
    assert "could not annotate" in result.metrics["fallback"] and result.metrics["method"] == "ptq"
    state, result = export_stage.run(state, ExportConfig(), ctx)
    q = result.metrics["quantization"]
    assert q["chosen"] in ("ptq", "ptq_u8s8", "ptq_tuned") and "qat" not in q["models"]
    assert (tmp_path / "model.onnx").is_file()
