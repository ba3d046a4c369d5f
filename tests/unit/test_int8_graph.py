"""The INT8 graph ORT really runs: integer kernels end to end, no FP32 conv/add islands.

These read ORT's optimized graph (SessionOptions.optimized_model_filepath), the thing that decides
INT8 speed, so a change in Q/DQ placement that leaves a conv or an add in FP32 fails here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hwkd.errors import StageError
from hwkd.models.zoo import ZOO
from hwkd.onnx import check
from hwkd.onnx.quantizer import OrtQuantizer
from hwkd.stages import qat
from tests.conftest import calibrated_int8


def _n_convs(model) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_default_student_has_no_fp32_conv_or_add_island(tmp_path):
    """The default run's student (MobileNetV2 on 1x32x32 digits): every conv a QLinearConv, every add
    a QLinearAdd, Transposes only at the edges of the NHWC integer section. (Both CPU families use the
    same recipe, see test_quant; the default profile, jetson, is "arm".)"""
    family = "arm"
    student = ZOO.get("mobilenetv2")(10, 1)
    converted, path = calibrated_int8(student, (1, 32, 32), family, tmp_path)
    ex = check.executed_summary(path)
    ops = ex["ops"]
    assert ops.get("QLinearConv") == _n_convs(student), ops
    assert ops.get("QLinearAdd") == 3, ops  # the student's three residual adds
    assert ex["float_compute"] == {}, ex  # no Conv / FusedConv / Add / Gemm in FP32
    assert ex["transpose"] <= 2, ex  # into and out of NHWC, nothing in between
    par = check.parity(converted, path, torch.randn(64, 1, 32, 32))
    assert par["max_abs_diff"] < 0.5 * par["samples"]  # sanity: the INT8 graph computes the same function
    assert par["clear_top1_agreement"] >= 0.95, par


def test_torchvision_resnet18_quantizes_to_integer_kernels(tmp_path):
    """torchao's X86InductorQuantizer raised 'Input partition has more than one output node' here
    (resnet18 reuses one ReLU module); hwkd's quantizer annotates the ATen graph itself."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    _, path = calibrated_int8(model, (3, 32, 32), "x86", tmp_path, batches=2)
    ex = check.executed_summary(path)
    assert ex["ops"].get("QLinearConv") == _n_convs(model), ex
    assert ex["ops"].get("QLinearAdd") == 8, ex
    assert ex["float_compute"] == {} and ex["transpose"] <= 2, ex


class SqueezeExciteSiLU(nn.Module):
    """EfficientNet's shapes: conv -> SiLU, a squeeze-excite gate (sigmoid, mul), a residual add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.SiLU(), nn.Conv2d(4, 16, 1), nn.Sigmoid())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.conv(x)
        z = self.dw(y)
        z = z * self.se(z)
        return self.head(torch.flatten((y + z).mean((2, 3)), 1))


def test_silu_and_squeeze_excite_run_as_integer_kernels(tmp_path):
    model = SqueezeExciteSiLU()
    _, path = calibrated_int8(model, (3, 16, 16), "x86", tmp_path)
    ex = check.executed_summary(path)
    assert ex["ops"].get("QLinearConv") == 4, ex
    assert ex["ops"].get("QLinearSigmoid", 0) >= 4 and ex["ops"].get("QLinearMul", 0) >= 3, ex
    assert ex["float_compute"] == {}, ex
    # the squeeze-excite pooling is integer too (exported as ReduceMean, rewritten to GlobalAveragePool);
    # only the head's keepdim=False mean stays a float ReduceMean
    assert ex["ops"].get("QLinearGlobalAveragePool") == 1 and ex["ops"].get("ReduceMean") == 1, ex


def test_a_quantizer_failure_is_a_stage_error_not_a_traceback(monkeypatch):
    def boom(self, graph):
        raise ValueError("Input partition has more than one output node")

    monkeypatch.setattr(OrtQuantizer, "_annotate", boom)
    with pytest.raises(StageError, match="could not annotate.*--quant ptq"):
        qat.prepare_qat(ZOO.get("cnn")(4, 1).eval(), torch.randn(2, 1, 8, 8), "x86")
