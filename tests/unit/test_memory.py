"""Memory model: features by hand, the fit recovering known figures, the cost model using it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hwkd.errors import ProfileError
from hwkd.hardware.cost import LayerWork, price
from hwkd.hardware.memory import COEFFICIENTS, fit_memory_model, memory_features
from hwkd.hardware.profiles import load_profile

MB = 2**20


def _works():
    conv3 = LayerWork("c", "Conv", macs=64 * 32 * 32 * 27, params=64 * 27, act_in=3 * 32 * 32, act_out=64 * 32 * 32,
                      channels=64, kernel=9, in_channels=3)  # fmt: skip
    relu = LayerWork("r", "Relu", macs=0, params=0, act_in=64 * 32 * 32, act_out=64 * 32 * 32, fused=True)
    pw = LayerWork("p", "Conv", macs=64 * 32 * 32 * 64, params=64 * 64, act_in=64 * 32 * 32, act_out=64 * 32 * 32,
                   channels=64, kernel=1, in_channels=64)  # fmt: skip
    return [conv3, relu, pw]


def test_features_are_weights_widest_layer_and_largest_im2col():
    base, weights, acts, workspace = memory_features(_works(), nbytes=4)
    assert base == 1.0
    assert weights == pytest.approx((64 * 27 + 64 * 64) * 4 / MB)
    assert acts == pytest.approx(2 * 64 * 32 * 32 * 4 / MB)  # the 1x1 conv: in + out, the fused Relu ignored
    assert workspace == pytest.approx(32 * 32 * 27 * 4 / MB)  # only the 3x3 conv lowers to im2col


def test_fit_recovers_known_memory_figures():
    rng = np.random.default_rng(0)
    truth = np.array([6.0, 2.0, 1.5, 0.5])
    rows = [[1.0, *rng.uniform(0, 40, 3)] for _ in range(12)]
    model, stats = fit_memory_model(rows, [float(np.dot(truth, r)) for r in rows])
    assert [model[k] for k in COEFFICIENTS] == pytest.approx(list(truth), rel=1e-3)
    assert stats["fit_mape_pct"] < 0.1 and stats["cv_mape_pct"] < 0.1 and stats["cv_within_25pct"] == 1.0


def test_price_uses_the_fitted_memory_model():
    base = load_profile("x86-avx2")
    model = {"base_mb": 5.0, "weight_copies": 2.0, "activation_copies": 1.0, "workspace_copies": 0.0}
    profile = dataclasses.replace(base, calibration={"memory_model": {"fp32": model}})
    _, weights, acts, _ = memory_features(_works(), nbytes=4)
    assert price(_works(), profile, "fp32").memory_mb == pytest.approx(5.0 + 2 * weights + acts)
    bad = dataclasses.replace(base, calibration={"memory_model": {"fp32": {**model, "base_mb": -1}}})
    with pytest.raises(ProfileError, match="memory_model"):
        price(_works(), bad, "fp32")
