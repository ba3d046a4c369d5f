"""Calibration: the written profile is complete and valid, the fit recovers known figures, CLI works."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from hwkd.hardware.calibrate import _theta, fit_profile, random_network
from hwkd.hardware.cost import estimate_onnx, price
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


def test_fit_recovers_the_figures_that_generated_the_latencies(tmp_path):
    """Latencies priced by a known profile are fitted back to it (up to what they can tell apart)."""
    truth = load_profile("x86-avx2")
    truth = dataclasses.replace(
        truth,
        hardware=dataclasses.replace(truth.hardware, peak_gflops={"fp32": 50.0}, memory_bandwidth_gbs=20.0),
        runtime=dataclasses.replace(truth.runtime, threads=truth.hardware.cpu_cores),
        calibration={"efficiency": 1.0, "k_half": 40.0, "op_overhead_us": {"fp32": 6.0}, "per_run_overhead_us": 30.0},
    )
    rng = np.random.default_rng(1)
    samples = []
    for i in range(12):
        path = tmp_path / f"n{i}.onnx"
        onnx.save(random_network(rng), path)
        works, params, _ = trace_onnx(path)
        samples.append((works, params, "fp32", price(works, truth, "fp32", params=params).latency_ms))
    start = _theta({"fp32": 10.0}, 200.0, 1.0, 1.0, 5.0)
    fitted, stats = fit_profile(truth, samples, start)
    assert stats["fit_mape_pct"] < 2.0 and stats["fit_within_10pct"] == 1.0
    assert fitted.calibration["op_overhead_us"]["fp32"] == pytest.approx(6.0, rel=0.2)
    assert fitted.calibration["per_run_overhead_us"] == pytest.approx(30.0, rel=0.3)


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
    assert set(cal["op_overhead_us"]) == {"fp32", "int8"} and cal["per_run_overhead_us"] >= 0
    assert cal["measured"]["fit_networks"] == 6 and cal["measured"]["threads"] == 1
    assert load_profile(out) == prof and dump_profile_toml(prof)  # round-trips
    # the profile prices any ONNX graph
    path = tmp_path / "m.onnx"
    onnx.save(random_network(np.random.default_rng(3)), path)
    assert estimate_onnx(path, prof).latency_ms > 0
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
