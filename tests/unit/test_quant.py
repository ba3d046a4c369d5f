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


def test_ptq_variants_call_quantize_static_with_their_documented_types(tmp_path):
    """defaults: int8 activations; U8S8: uint8 activations, int8 weights; tuned: per-channel too."""
    model = _trained_like(Residual())
    fp32 = ox.export_onnx(model, torch.randn(2, 1, 12, 12), tmp_path / "fp32.onnx", {})
    images = ptq.calibration_images(torch.randn(64, 1, 12, 12), 32)
    kinds = {}
    for label in ptq.VARIANTS:
        out = ptq.quantize_ptq(fp32, tmp_path / f"{label}.onnx", images, variant=label)
        graph = onnx.load(str(out)).graph
        inits = {t.name: t for t in graph.initializer}
        act_zp = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
        w_scales = [
            inits[n.input[1]] for n in graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 4
        ]
        kinds[label] = (act_zp[0].data_type, max(len(s.dims) and s.dims[0] for s in w_scales))
    assert kinds["ptq"][0] == onnx.TensorProto.INT8 and kinds["ptq"][1] in (0, 1)  # S8S8, per-tensor
    assert kinds["ptq_u8s8"][0] == onnx.TensorProto.UINT8 and kinds["ptq_u8s8"][1] in (0, 1)
    assert kinds["ptq_tuned"][0] == onnx.TensorProto.UINT8 and kinds["ptq_tuned"][1] > 1  # per-channel
    assert "hwkd-tuned" in ptq.VARIANTS["ptq_tuned"].by and "defaults" in ptq.VARIANTS["ptq"].by


def test_calibration_takes_an_iterable_of_batches():
    loader = [(torch.full((4, 1, 2, 2), float(i)), torch.zeros(4)) for i in range(5)]
    images = ptq.calibration_images(iter(loader), 10)
    assert images.shape == (10, 1, 2, 2) and images[-1, 0, 0, 0] == 2.0


def test_near_ties_are_relative_to_the_logit_scale():
    ref = np.array([[10.0, 0.0, -10.0], [5.0, 4.5, -10.0], [0.1, 0.0, -20.0]])  # margins 10, 0.5, 0.1
    tie, scale = check.near_ties(ref)
    assert scale == pytest.approx(20.0)  # median of max - min (20, 15, 20.1)
    assert tie.tolist() == [False, True, True]  # margin < 0.05 * 20 = 1.0


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.as_tensor(logits, dtype=torch.float32)

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def _onnx_of(logits, tmp_path, name):
    """An ONNX model that returns row i of ``logits`` for input i (Gather on a constant table)."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.asarray(logits, dtype=np.float32), "table")
    nodes = [
        helper.make_node("Reshape", ["input", "flat"], ["f"]),
        helper.make_node("Cast", ["f"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["logits"]),
    ]
    consts = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")]
    graph = helper.make_graph(
        nodes, "fixed", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(logits[0])])], [table, *consts],
    )
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_parity_excuses_near_ties_and_stays_strict_on_clear_answers(tmp_path):
    from hwkd.errors import StageError
    from hwkd.stages.export import _check_parity

    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (200, 10)).astype(np.float32)
    ref[:, 0] += 8.0  # a clear answer on every image ...
    ref[:20, 1] = ref[:20, 0] - 0.01  # ... but 20 near ties (10%)
    flipped = ref.copy()
    flipped[:20, [0, 1]] = flipped[:20, [1, 0]]  # INT8 rounding flips exactly the near ties
    x = torch.arange(200, dtype=torch.float32).reshape(200, 1, 1, 1)
    par = check.parity(_Fixed(ref), _onnx_of(flipped, tmp_path, "ties.onnx"), x)
    assert par["top1_agreement"] == pytest.approx(0.90) and par["near_tie_disagreements"] == 20
    assert par["clear_top1_agreement"] == 1.0 and par["clear_samples"] == 180
    _check_parity({"int8": par}, 0.99, "stages/export")  # accepted: 0.90 overall, 1.0 where clear

    broken = ref.copy()
    broken[20:24, [0, 2]] = broken[20:24, [2, 0]]  # 4 flips where FP32 is clear: 4/180 > 1%
    par = check.parity(_Fixed(ref), _onnx_of(broken, tmp_path, "broken.onnx"), x)
    with pytest.raises(StageError, match="clear answer"):
        _check_parity({"int8": par}, 0.99, "stages/export")


def test_report_lists_what_ort_executes_for_every_int8_model():
    from hwkd.report.markdown import _quantization_section

    ex_int = {"ops": {}, "integer_kernels": 24, "float_compute": {}, "transpose": 2}
    ex_fp = {"ops": {}, "integer_kernels": 14, "float_compute": {"Conv": 6, "Add": 3}, "transpose": 12}
    row = {"accuracy": 0.99, "val_accuracy": 0.98, "top1_agreement_with_fp32": 1.0, "model_size_mb": 0.1}
    q = {
        "chosen": "qat", "selection": "--quant qat", "calibration_images": 256,
        "models": {
            "fp32": {**row, "recipe": "FP32"},
            "qat": {**row, "executed": ex_int, "recipe": "hwkd QAT"},
            "ptq": {**row, "executed": ex_fp, "recipe": "defaults [onnxruntime defaults]"},
        },
    }
    md = "\n".join(_quantization_section(q))
    assert "24 integer kernels; FP32 compute: none; 2 Transpose" in md
    assert "14 integer kernels; FP32 compute: Conv 6, Add 3; 12 Transpose" in md
    assert "ORT PTQ, defaults (S8S8)" in md and "hwkd QAT INT8 ← model.onnx" in md
