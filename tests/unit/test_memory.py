"""Memory model: features by hand, the fit recovering known figures, the cost model using it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hwkd.errors import ProfileError
from hwkd.hardware.cost import LayerWork, price
from hwkd.hardware.memory import COEFFICIENTS, conv_scratch_bytes, fit_memory_model, memory_features
from hwkd.hardware.profiles import load_profile

MB = 2**20


def _works():
    conv3 = LayerWork("c", "Conv", macs=64 * 32 * 32 * 27, params=64 * 27, act_in=3 * 32 * 32, act_out=64 * 32 * 32,
                      channels=64, kernel=9, in_channels=3)  # fmt: skip
    relu = LayerWork("r", "Relu", macs=0, params=0, act_in=64 * 32 * 32, act_out=64 * 32 * 32, fused=True)
    pw = LayerWork("p", "Conv", macs=64 * 32 * 32 * 64, params=64 * 64, act_in=64 * 32 * 32, act_out=64 * 32 * 32,
                   channels=64, kernel=1, in_channels=64)  # fmt: skip
    return [conv3, relu, pw]


def test_features_are_weights_widest_layer_and_the_largest_conv_scratch():
    base, weights, acts, scratch = memory_features(_works(), nbytes=4)
    assert base == 1.0
    assert weights == pytest.approx((64 * 27 + 64 * 64) * 4 / MB)
    assert acts == pytest.approx(2 * 64 * 32 * 32 * 4 / MB)  # the 1x1 conv: in + out, the fused Relu ignored
    assert scratch == 0.0  # FP32 group-1 convs run as NCHWc kernels, no scratch
    # INT8: the 3-channel stem is off MLAS's symmetric path (3 % 4): int32 output + im2col; the 1x1 is on it
    assert memory_features(_works(), nbytes=1)[3] == pytest.approx((4 * 64 * 1024 + 27 * 1024) / MB)
    # profiles calibrated before stop 23: the largest im2col buffer of any k x k conv
    assert memory_features(_works(), nbytes=4, legacy=True)[3] == pytest.approx(32 * 32 * 27 * 4 / MB)


def _conv(cin, cout, k, pixels, groups=1):
    return LayerWork("c", "Conv", macs=cout * pixels * cin * k, params=cout * cin * k, act_in=cin * groups * pixels,
                     act_out=cout * pixels, channels=cout, kernel=k, groups=groups, in_channels=cin)  # fmt: skip


def test_conv_scratch_follows_the_runtime_kernels_path():
    px = 16 * 16
    # INT8, symmetric path (cin % 4 == 0, cout >= 16 and % 8 == 0): one pointer per tap and output pixel
    assert conv_scratch_bytes(_conv(32, 64, 9, px), 1) == 8 * 9 * px
    assert conv_scratch_bytes(_conv(32, 64, 1, px), 1) == 0  # a 1x1 reads its input directly
    # off it (12 output channels < 16): int32 output + im2col of the reduction
    assert conv_scratch_bytes(_conv(32, 12, 9, px), 1) == 4 * 12 * px + 32 * 9 * px
    # depthwise: indirection buffer, plus an int32 output unless the groups are a multiple of 16
    assert conv_scratch_bytes(_conv(1, 32, 9, px, groups=32), 1) == 8 * 9 * px
    assert conv_scratch_bytes(_conv(1, 24, 9, px, groups=24), 1) == 8 * 9 * px + 4 * 24 * px
    # FP32: NCHWc kernels need none; a grouped conv has NCHW copies of its input and output and one group's im2col
    assert conv_scratch_bytes(_conv(32, 64, 9, px), 4) == 0
    assert conv_scratch_bytes(_conv(1, 32, 9, px, groups=32), 4) == 0
    assert conv_scratch_bytes(_conv(8, 64, 9, px, groups=4), 4) == 4 * (32 * px + 64 * px) + 4 * 8 * 9 * px
    # FP32 on ARM (no NCHWc kernels): every conv past 1x1 lowers to im2col, one group at a time
    assert conv_scratch_bytes(_conv(32, 64, 9, px), 4, arm=True) == 4 * 32 * 9 * px
    assert conv_scratch_bytes(_conv(32, 64, 1, px), 4, arm=True) == 0


def test_price_takes_the_arm_rule_from_the_profile():
    base = load_profile("rpi4")
    assert base.hardware.cpu_family == "arm"
    model = {"base_mb": 5.0, "weight_copies": 2.0, "activation_copies": 1.0, "scratch_copies": 1.0}
    profile = dataclasses.replace(base, calibration={"memory_model": {"fp32": model}})
    _, weights, acts, scratch = memory_features(_works(), nbytes=4, arm=True)
    assert scratch == pytest.approx(32 * 32 * 27 * 4 / MB)  # the 3x3 stem's im2col
    assert price(_works(), profile, "fp32").memory_mb == pytest.approx(5.0 + 2 * weights + acts + scratch)


def test_fit_recovers_known_memory_figures():
    rng = np.random.default_rng(0)
    truth = np.array([6.0, 2.0, 1.5, 0.5])
    rows = [[1.0, *rng.uniform(0, 40, 3)] for _ in range(12)]
    model, stats = fit_memory_model(rows, [float(np.dot(truth, r)) for r in rows])
    assert [model[k] for k in COEFFICIENTS] == pytest.approx(list(truth), rel=1e-3)
    assert stats["fit_mape_pct"] < 0.1 and stats["cv_mape_pct"] < 0.1 and stats["cv_within_25pct"] == 1.0


def test_price_uses_the_fitted_memory_model():
    base = load_profile("x86-avx2")
    model = {"base_mb": 5.0, "weight_copies": 2.0, "activation_copies": 1.0, "scratch_copies": 0.5}
    profile = dataclasses.replace(base, calibration={"memory_model": {"int8": model}})
    _, weights, acts, scratch = memory_features(_works(), nbytes=1)
    assert scratch > 0
    assert price(_works(), profile, "int8").memory_mb == pytest.approx(5.0 + 2 * weights + acts + 0.5 * scratch)
    bad = dataclasses.replace(base, calibration={"memory_model": {"int8": {**model, "base_mb": -1}}})
    with pytest.raises(ProfileError, match="memory_model"):
        price(_works(), bad, "int8")


def test_a_profile_calibrated_before_the_scratch_feature_prices_as_it_was_fitted():
    base = load_profile("x86-avx2")
    model = {"base_mb": 5.0, "weight_copies": 2.0, "activation_copies": 1.0, "workspace_copies": 0.5}
    profile = dataclasses.replace(base, calibration={"memory_model": {"fp32": model}})
    _, weights, acts, im2col = memory_features(_works(), nbytes=4, legacy=True)
    assert price(_works(), profile, "fp32").memory_mb == pytest.approx(5.0 + 2 * weights + acts + 0.5 * im2col)
