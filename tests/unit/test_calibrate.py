"""Calibration: the written profile is complete and valid, the fit recovers known figures, CLI works."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from hwkd.hardware.calibrate import fit_channel_tile, fit_kernel_model, random_network
from hwkd.hardware.cost import FEATURES, estimate_onnx, price
from hwkd.hardware.onnx_trace import trace_onnx
from hwkd.hardware.profiles import dump_profile_toml, load_profile

ROOT = Path(__file__).resolve().parents[2]


def test_random_networks_are_valid_and_varied():
    rng = np.random.default_rng(0)
    models = [random_network(rng) for _ in range(6)]
    ops = set()
    for model in models:
        onnx.checker.check_model(model)
        ops |= {n.op_type for n in model.graph.node}
    assert {"Conv", "Relu", "GlobalAveragePool", "Gemm"} <= ops
    assert len({m.SerializeToString() for m in models}) == 6


def _kernel_profile(model: dict[str, float], tile: int = 8):
    base = load_profile("x86-avx2")
    table = {**dict.fromkeys(FEATURES, 0.0), **model}
    return dataclasses.replace(base, calibration={"kernel_model": {"fp32": table}})


def test_fit_recovers_the_kernel_model_that_generated_the_latencies(tmp_path):
    """Latencies priced by a known kernel model are fitted back to it."""
    truth = {"conv_flops": 0.01, "pointwise_flops": 0.012, "depthwise_flops": 0.03, "ops": 800.0,
             "run_ns": 9000.0, "k_half": 16.0, "channel_tile": 8}  # fmt: skip
    profile = _kernel_profile(truth)
    rng = np.random.default_rng(1)
    works_list, latencies = [], []
    for i in range(40):
        path = tmp_path / f"n{i}.onnx"
        onnx.save(random_network(rng, max_macs=20e6), path)
        works, params, _ = trace_onnx(path)
        works_list.append(works)
        latencies.append(price(works, profile, "fp32", params=params).latency_ms)
    model, stats = fit_kernel_model(works_list, latencies, tile=8)
    assert stats["fit_mape_pct"] < 1.0 and stats["fit_within_10pct"] == 1.0
    assert stats["cv_within_10pct"] == 1.0
    assert model["k_half"] == 16.0 and model["channel_tile"] == 8
    assert model["conv_flops"] == pytest.approx(0.01, rel=0.05)
    assert model["ops"] == pytest.approx(800.0, rel=0.1)
    assert model["run_ns"] == pytest.approx(9000.0, rel=0.2)


def test_fit_is_robust_to_one_network_timed_during_a_burst_of_load(tmp_path):
    profile = _kernel_profile({"conv_flops": 0.01, "pointwise_flops": 0.01, "depthwise_flops": 0.02, "ops": 500.0,
                               "run_ns": 5000.0, "k_half": 8.0})  # fmt: skip
    rng = np.random.default_rng(2)
    works_list, latencies = [], []
    for i in range(30):
        path = tmp_path / f"n{i}.onnx"
        onnx.save(random_network(rng, max_macs=20e6), path)
        works, params, _ = trace_onnx(path)
        works_list.append(works)
        latencies.append(price(works, profile, "fp32", params=params).latency_ms * (5.0 if i == 0 else 1.0))
    _, stats = fit_kernel_model(works_list, latencies, tile=8)
    assert stats["fit_within_10pct"] >= 29 / 30  # only the disturbed one is missed


@pytest.mark.parametrize("tile", [8, 16])
def test_channel_tile_is_read_off_padded_latencies(tile):
    channels = [8 * m for m in range(1, 9)]
    latencies = [0.02 + 0.004 * (-(-c // tile) * tile) for c in channels]
    assert fit_channel_tile(channels, latencies, (8, 16, 32)) == tile


def test_random_networks_respect_the_mac_cap():
    rng = np.random.default_rng(5)
    for _ in range(5):
        works, _, _ = trace_onnx(random_network(rng, max_macs=5e6))
        assert sum(w.macs for w in works) <= 5e6


def test_calibrate_cli_writes_a_profile_that_loads(tmp_path):
    out = tmp_path / "host.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "hwkd", "profiles", "calibrate", "--out", str(out), "--name", "my-host", "--quick",
         "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Wrote" in proc.stdout
    prof = load_profile(out)
    assert prof.name == "my-host" and prof.runtime.threads == 1 and prof.hardware.cpu_cores == 1
    assert set(prof.hardware.peak_gflops) == {"fp32", "int8"}
    assert prof.hardware.memory_bandwidth_gbs > 0 and prof.hardware.per_op_overhead_us >= 0
    cal = prof.calibration
    assert set(cal["kernel_model"]) == {"fp32", "int8"}
    for table in cal["kernel_model"].values():
        assert set(table) == {*FEATURES, "run_ns", "k_half", "channel_tile", "threads", "input_align"}  # no grain
        assert all(v >= 0 for v in table.values())
    vector_width = prof.hardware.vector_width
    assert cal["kernel_model"]["int8"]["input_align"] == 4
    assert cal["kernel_model"]["fp32"]["input_align"] == (vector_width if prof.hardware.cpu_family == "x86" else 4)
    assert cal["kernel_model"]["fp32"]["channel_tile"] in (8, 16, 32)
    assert prof.runtime.channel_multiple == max(t["channel_tile"] for t in cal["kernel_model"].values())
    assert cal["measured"]["fit_networks"] == 8 and cal["measured"]["threads"] == 1
    assert set(cal["measured"]["fit"]) == {"fp32", "int8"}
    assert load_profile(out) == prof and dump_profile_toml(prof)  # round-trips
    # the profile prices any ONNX graph
    path = tmp_path / "m.onnx"
    onnx.save(random_network(np.random.default_rng(3)), path)
    assert estimate_onnx(path, prof).latency_ms > 0
    stability = cal["measured"]["stability"]
    assert len(stability["probes_ms"]) == 3 and stability["spread_pct"] >= 0  # start, middle, end
    # the estimate shows its thread count and the profile's held-out error beside each figure
    shown = subprocess.run(
        [sys.executable, "-m", "hwkd", "estimate", str(path), "--profile", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "(1 thread; held-out error ±" in shown.stdout
    assert f"{cal['measured']['fit']['fp32']['cv_mape_pct']:.1f}% MAPE" in shown.stdout
    # refuses to overwrite without --overwrite
    again = subprocess.run(
        [sys.executable, "-m", "hwkd", "profiles", "calibrate", "--out", str(out), "--quick"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_estimate_cli_json_and_table(tmp_path):
    import json

    path = tmp_path / "m.onnx"
    onnx.save(random_network(np.random.default_rng(4)), path)
    proc = subprocess.run(
        [sys.executable, "-m", "hwkd", "estimate", str(path), "--profile", "rpi4", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("latency_ms", "memory_mb", "macs", "params", "per_layer"):
        assert key in data
    expected = estimate_onnx(path, load_profile("rpi4"))
    assert data["latency_ms"] == pytest.approx(expected.latency_ms)
    assert data["macs"] == expected.macs and len(data["per_layer"]) == len(expected.per_layer)
    table = subprocess.run(
        [sys.executable, "-m", "hwkd", "estimate", str(path), "--profile", "rpi4"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert table.returncode == 0 and "latency_ms" in table.stdout and "Conv" in table.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "hwkd", "estimate", str(tmp_path / "nope.onnx")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_predictor_refit_scores_a_recorded_run_without_timing(tmp_path):
    """A dump whose timings a known kernel model produced: the refit reproduces them (benchmarks/predictor_refit.py)."""
    import dataclasses
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import predictor_refit

    truth = {"conv_flops": 0.01, "pointwise_flops": 0.012, "depthwise_flops": 0.03, "ops": 800.0,
             "run_ns": 9000.0, "k_half": 16.0, "channel_tile": 8, "input_align": 8}  # fmt: skip
    # input_align 8: what the refit assumes for FP32 on 8 lanes (calibrate.input_align). At the default 4 the
    # truth is a model the refit cannot express exactly (a 4-channel input is aligned at 4, not at 8): the
    # test passed by luck of the draw, and failed when stop 30 tried other calibration networks
    profile = _kernel_profile(truth)
    rng = np.random.default_rng(4)
    nets = []
    for i in range(24):
        path = tmp_path / f"n{i}.onnx"
        onnx.save(random_network(rng, max_macs=20e6), path)
        works, params, _ = trace_onnx(path)
        ms = price(works, profile, "fp32", params=params).latency_ms
        nets.append({"family": ("random", "other")[i % 2], "works": [dataclasses.asdict(w) for w in works],
                     "fit_ms": ms, "wall_1_ms": ms, "wall_n_ms": ms, "threads": 1, "tile": 8, "lanes": 8})  # fmt: skip
    models = [{"model": f"m{i}", "group": "benchmark", "precision": "fp32", "works": n["works"], "t1_ms": n["fit_ms"]}
              for i, n in enumerate(nets[:4])]  # fmt: skip
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"calibration": {"fp32": nets}, "models": models}))
    rows = predictor_refit.summary(predictor_refit.refit(predictor_refit.load_dump(dump)))
    assert rows == [{"threads": 1, "group": "benchmark", "precision": "fp32", "n": 4, "within_10pct": 1.0,
                     "within_15pct": 1.0, "mape_pct": rows[0]["mape_pct"]}]  # fmt: skip
    assert rows[0]["mape_pct"] < 2.0
    # --cross: a second run on a host twice as slow; each fit scored on both runs' benchmark timings
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps({"calibration": {"fp32": [{**n, "fit_ms": 2 * n["fit_ms"], "wall_1_ms": 2 * n["fit_ms"],
                                                          "wall_n_ms": 2 * n["fit_ms"]} for n in nets]},
                                "models": [{**m, "t1_ms": 2 * m["t1_ms"]} for m in models]}))  # fmt: skip
    table = predictor_refit.cross([dump, slow])["fp32 1"]
    assert table[str(dump)] == {str(dump): 1.0, str(slow): 0.0}
    assert table[str(slow)] == {str(dump): 0.0, str(slow): 1.0}


def test_thread_model_variants_leave_hwkds_thread_model_as_they_found_it():
    """benchmarks/thread_model_variants.py swaps hwkd.hardware.threads' features per variant: each swap adds its
    terms while it lasts and is undone afterwards, so nothing it tries leaks into hwkd's own pricing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import thread_model_variants as tv

    from hwkd.hardware import fit
    from hwkd.hardware import threads as tm

    before = (tm.COEFFICIENTS, tm.features, tm.layer_seconds_at, tm.MAC_GRAIN_GRID, tm.fitted_thread_model,
              fit.fit_thread_model)  # fmt: skip
    added = {"serial": ("serial_ns",), "node": ("node_ns",), "unaligned": ("ratio_unaligned",),
             "class_sync": tuple(f"sync_{k}" for k in tm.CLASSES), "current": (), "fine_grid": ()}  # fmt: skip
    for name in tv.VARIANTS:
        with tv.variant(name):
            assert tm.COEFFICIENTS == (*before[0], *added[name])
            assert (tm.MAC_GRAIN_GRID == tv.FINE_GRID) == (name == "fine_grid")
        after = (tm.COEFFICIENTS, tm.features, tm.layer_seconds_at, tm.MAC_GRAIN_GRID, tm.fitted_thread_model,
                 fit.fit_thread_model)  # fmt: skip
        assert after == before, name
