"""Thread model: hand-computed cases, pricing at the profile's thread count, and the fit recovering it."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from hwkd.errors import ProfileError
from hwkd.hardware.calibrate import fit_thread_model, random_network
from hwkd.hardware.cost import FEATURES, LayerWork, price
from hwkd.hardware.fit import one_thread_layers
from hwkd.hardware.onnx_trace import trace_onnx
from hwkd.hardware.profiles import load_profile
from hwkd.hardware.threads import COEFFICIENTS, features, fitted_thread_model, layer_seconds_at, splits

THREADS = {"ratio_conv": 0.5, "ratio_pointwise": 0.6, "ratio_depthwise": 0.8, "ratio_gemm": 1.0,
           "ratio_elementwise": 0.9, "ratio_serial": 1.0, "sync_ns": 5000.0, "run_ns": 20000.0,
           "mac_grain": 6.4e4, "value_grain": 1.6e4, "threads": 2}  # fmt: skip


def conv(macs: int, channels: int = 16) -> LayerWork:
    return LayerWork("c", "Conv", macs=macs, params=0, act_in=0, act_out=macs // 36, channels=channels, kernel=9,
                     in_channels=4)  # fmt: skip


def add(values: int) -> LayerWork:
    return LayerWork("a", "Add", macs=0, params=0, act_in=values, act_out=values // 2)


def test_a_large_conv_splits_and_pays_one_fork_join():
    seconds, sync = layer_seconds_at(conv(10**6), 100e-6, THREADS)
    assert seconds == pytest.approx(100e-6 * 0.5 + 5e-6)  # 55 us
    assert sync == pytest.approx(5e-6)


def test_a_small_conv_runs_serially_without_fork_join():
    assert not splits(conv(36 * 16), THREADS["mac_grain"], THREADS["value_grain"])
    assert layer_seconds_at(conv(36 * 16), 10e-6, THREADS) == (pytest.approx(10e-6), 0.0)


def test_elementwise_ops_split_by_values_and_fused_epilogues_never():
    assert splits(add(20_000), 6.4e4, 1.6e4) and not splits(add(8_000), 6.4e4, 1.6e4)
    fused = dataclasses.replace(add(10**6), fused=True)
    assert not splits(fused, 0.0, 0.0)
    assert layer_seconds_at(add(20_000), 30e-6, THREADS)[0] == pytest.approx(30e-6 * 0.9 + 5e-6)


def test_feature_row_is_what_the_fit_multiplies():
    works, t1 = [conv(10**6), conv(100), add(20_000)], [100e-6, 2e-6, 30e-6]
    row = dict(zip(COEFFICIENTS, features(works, t1, 6.4e4, 1.6e4), strict=True))
    assert row == {"ratio_conv": 100e-6, "ratio_pointwise": 0.0, "ratio_depthwise": 0.0, "ratio_gemm": 0.0,
                   "ratio_elementwise": 30e-6, "ratio_serial": 2e-6, "sync_ns": 2.0, "run_ns": 1.0}  # fmt: skip
    coef = [THREADS[k] * (1e-9 if k.endswith("_ns") else 1.0) for k in COEFFICIENTS]
    by_layer = sum(layer_seconds_at(w, t, THREADS)[0] for w, t in zip(works, t1, strict=True)) + 20e-6
    assert np.dot(list(row.values()), coef) == pytest.approx(by_layer)


def _profile(threads: int, thread_model: dict | None):
    base = load_profile("x86-avx2")
    kernel = {**dict.fromkeys(FEATURES, 0.0), "conv_flops": 0.01, "elementwise": 1.0, "ops": 1000.0,
              "run_ns": 8000.0, "k_half": 0.0, "channel_tile": 8, "threads": 1}  # fmt: skip
    cal = {"kernel_model": {"fp32": kernel}}
    if thread_model is not None:
        cal["thread_model"] = {"fp32": thread_model}
    return dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, threads=threads), calibration=cal)


def test_price_at_two_threads_is_the_hand_computed_sum():
    works = [conv(36 * 16 * 1000), add(20_000)]
    one = price(works, _profile(1, THREADS), "fp32")
    two = price(works, _profile(2, THREADS), "fp32")
    assert one.threads == 1 and two.threads == 2
    t_conv, t_add = (row["latency_ms"] * 1e-3 for row in one.per_layer)
    expected = (t_conv * 0.5 + 5e-6) + (t_add * 0.9 + 5e-6) + 20e-6
    assert two.latency_ms == pytest.approx(expected * 1e3)
    assert one.latency_ms == pytest.approx((t_conv + t_add + 8e-6) * 1e3)
    # an explicit thread count overrides the profile's
    assert price(works, _profile(2, THREADS), "fp32", threads=1).latency_ms == pytest.approx(one.latency_ms)


def test_thread_model_fitted_at_another_count_is_not_applied():
    assert fitted_thread_model(_profile(4, THREADS), "fp32", 4) is None  # fitted at 2
    assert fitted_thread_model(_profile(2, THREADS), "fp32", 2)["ratio_conv"] == 0.5
    with pytest.raises(ProfileError, match="sync_ns"):
        fitted_thread_model(_profile(2, {**THREADS, "sync_ns": -1.0}), "fp32", 2)
    with pytest.raises(ProfileError, match="lacks"):
        fitted_thread_model(_profile(2, {"threads": 2}), "fp32", 2)


def test_fit_recovers_the_thread_model_that_generated_the_timings(tmp_path):
    profile = _profile(2, THREADS)
    kernel = profile.calibration["kernel_model"]["fp32"]
    rng = np.random.default_rng(3)
    works_list, t1_ms, t2_ms = [], [], []
    for i in range(24):
        path = tmp_path / f"n{i}.onnx"
        onnx.save(random_network(rng, max_macs=20e6), path)
        works, params, _ = trace_onnx(path)
        works_list.append(works)
        t1_ms.append(price(works, profile, "fp32", params=params, threads=1).latency_ms)
        t2_ms.append(price(works, profile, "fp32", params=params, threads=2).latency_ms)
    model, stats = fit_thread_model(works_list, t1_ms, t2_ms, kernel, threads=2)
    assert stats["fit_mape_pct"] < 1.0
    assert model["mac_grain"] == THREADS["mac_grain"]
    assert model["ratio_conv"] == pytest.approx(0.5, abs=0.03)
    assert model["run_ns"] == pytest.approx(20000.0, rel=0.2)
    # the layers it rescales add up to the measured 1-thread time
    t1 = one_thread_layers(works_list[0], kernel)
    assert sum(t1) * 1e3 + kernel["run_ns"] * 1e-6 == pytest.approx(t1_ms[0])
