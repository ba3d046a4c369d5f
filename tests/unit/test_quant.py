"""INT8 and FP16: quantizer choice per profile, ORT-shaped Q/DQ, the PTQ peer, --quant/--precision, FP16."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hwkd.config import PipelineConfig, QatConfig
from hwkd.errors import ConfigError
from hwkd.hardware.profiles import load_profile
from hwkd.onnx import check, ptq
from hwkd.onnx import export as ox
from hwkd.onnx.quantizer import OrtQuantizer
from hwkd.stages import qat
from hwkd.stages.export import check_precision


class Residual(nn.Module):
    """Conv-ReLU6, a residual add fed by a conv, global pool, linear: the MobileNetV2 shapes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.project(self.expand(y))
        return self.fc(torch.flatten(self.pool(y), 1))


def _trained_like(model):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 12, 12))
    return model.eval()


@pytest.mark.parametrize(("profile", "family"), [("jetson", "arm"), ("rpi5", "arm"), ("x86-avx2", "x86")])
def test_quantizer_follows_the_profile_cpu_family(profile, family):
    assert qat.quantizer_family(QatConfig(), load_profile(profile)) == family
    assert qat.quantizer_family(QatConfig(quantizer="x86"), load_profile(profile)) == "x86"


def test_unknown_quantizer_is_a_config_error():
    with pytest.raises(ConfigError, match="No INT8 quantizer"):
        qat.quantizer_family(QatConfig(quantizer="riscv"), load_profile("jetson"))


@pytest.mark.parametrize("family", ["x86", "arm"])
def test_every_family_quantizes_u8_activations_and_s8_per_channel_weights(family):
    quantizer = qat.make_quantizer(family)
    assert isinstance(quantizer, OrtQuantizer) and quantizer.family == family
    weight = quantizer.weight
    assert weight.qscheme == torch.per_channel_symmetric and weight.ch_axis == 0
    assert weight.dtype == torch.int8 and (weight.quant_min, weight.quant_max) == (-128, 127)
    assert quantizer.act.dtype == torch.uint8 and (quantizer.act.quant_min, quantizer.act.quant_max) == (0, 255)
    seven = qat.make_quantizer(family, reduce_range=True).weight
    assert (seven.quant_min, seven.quant_max) == (-64, 63)


def test_residual_add_and_head_run_as_integer_kernels_in_ort(tmp_path):
    """The project conv feeding the add must end in Q (QLinearConv), not stay an FP32 FusedConv."""
    model = _trained_like(Residual())
    prepared, folded = qat.prepare_qat(model, torch.randn(2, 1, 12, 12), "x86")
    assert folded
    with torch.no_grad():
        for _ in range(3):
            prepared(torch.randn(16, 1, 12, 12))
    converted = qat.convert(prepared)
    path = ox.export_onnx(converted, torch.randn(2, 1, 12, 12), tmp_path / "q.onnx", {})
    executed = check.ort_executed_ops(path)
    assert executed["QLinearConv"] >= 2, executed
    assert "FusedConv" not in executed, executed  # conv + add fused in FP32 = the old, slower graph
    assert executed["QGemm"] == 1, executed
    # and the INT8 graph still computes the same function (parity with PyTorch)
    x = torch.randn(32, 1, 12, 12)
    par = check.parity(converted, path, x)
    assert par["top1_agreement"] >= 0.9 and par["max_abs_diff"] < 0.5


def test_ptq_produces_qdq_that_runs_and_keeps_metadata(tmp_path):
    model = _trained_like(Residual())
    fp32 = ox.export_onnx(model, torch.randn(2, 1, 12, 12), tmp_path / "fp32.onnx", {"hwkd.profile": "p"})
    images = ptq.calibration_images(torch.randn(100, 1, 12, 12), 64, seed=0)
    assert images.shape == (64, 1, 12, 12) and images.dtype == np.float32
    out = ptq.quantize_ptq(fp32, tmp_path / "ptq.onnx", images)
    onnx.checker.check_model(str(out))
    nodes = check.count_quant_nodes(out)
    assert nodes["QuantizeLinear"] > 0 and nodes["DequantizeLinear"] > nodes["QuantizeLinear"]
    meta = ox.read_metadata(out)
    assert meta["hwkd.profile"] == "p" and meta["hwkd.quantization"] == "ort-static-ptq:ptq"
    assert "QLinearConv" in check.ort_executed_ops(out)
    x = torch.randn(64, 1, 12, 12)
    ref, got = check.onnx_predict(fp32, x), check.onnx_predict(out, x)
    assert got.shape == ref.shape
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.85
    assert not list(tmp_path.glob("*.tmp"))


def test_calibration_of_an_empty_split_is_a_clear_error():
    from hwkd.errors import StageError

    with pytest.raises(StageError, match="calibration"):
        ptq.calibration_images(torch.zeros(0, 1, 4, 4), 8)


@pytest.mark.parametrize("method", ["qat", "ptq", "auto"])
def test_quant_methods_are_accepted(method):
    cfg = PipelineConfig.from_dict({"qat": {"method": method}})
    assert check_precision(cfg, load_profile("jetson")).stages == cfg.stages


def test_unknown_quant_method_and_precision_are_config_errors():
    with pytest.raises(ConfigError, match="quantization method 'int4'"):
        check_precision(PipelineConfig.from_dict({"qat": {"method": "int4"}}), load_profile("jetson"))
    with pytest.raises(ConfigError, match="precision 'bf16'"):
        check_precision(PipelineConfig.from_dict({"export": {"precision": "bf16"}}), load_profile("jetson"))


def test_fp16_needs_a_gpu_profile_and_skips_qat():
    cfg = PipelineConfig.from_dict({"export": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match="GPU profile"):
        check_precision(cfg, load_profile("x86-avx2"))
    resolved = check_precision(cfg, load_profile("jetson"))
    assert "qat" not in resolved.stages and "export" in resolved.stages
    assert dataclasses.replace(resolved, stages=cfg.stages) == cfg


def test_fp16_export_is_valid_and_runs_on_the_cpu_ep(tmp_path):
    model = _trained_like(Residual())
    fp32 = ox.export_onnx(model, torch.randn(2, 1, 12, 12), tmp_path / "fp32.onnx", {"hwkd.profile": "p"})
    half = ox.convert_fp16(fp32, tmp_path / "fp16.onnx")
    proto = onnx.load(str(half))
    onnx.checker.check_model(proto)
    weights = [t for t in proto.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept
    assert ox.read_metadata(half)["hwkd.precision"] == "fp16"
    assert ox.model_size_mb(half) < ox.model_size_mb(fp32)
    x = torch.randn(16, 1, 12, 12)
    par = check.parity(model, half, x)
    assert par["top1_agreement"] == 1.0 and par["max_abs_diff"] < 0.05
