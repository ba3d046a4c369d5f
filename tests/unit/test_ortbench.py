"""onnxruntime timing: interleaved rounds, statistics, provider fallback, host info, the bench stage."""

from __future__ import annotations

import contextlib
import types
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwkd.config import BenchConfig
from hwkd.errors import StageError
from hwkd.onnx import bench as ortbench
from hwkd.pipeline import PipelineState, Progress, RunContext
from hwkd.stages import bench as bench_stage


def _cnn(path, channels: int, seed: int = 0):
    """A tiny Conv-ReLU-pool-Gemm ONNX model with a dynamic batch, built directly (no torch export)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((channels, 4)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [w, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    return _cnn(d / "small.onnx", 4), _cnn(d / "large.onnx", 32, seed=1)


class RecordingProgress(Progress):
    def __init__(self):
        self.tasks = []

    @contextlib.contextmanager
    def task(self, description, total):
        record = {"description": description, "total": total, "done": 0}
        self.tasks.append(record)

        def advance(n=1, **fields):
            record["done"] += n

        yield advance


def _state(onnx_paths, providers=("CPUExecutionProvider",), threads=2):
    runtime = types.SimpleNamespace(providers=providers, threads=threads)
    return PipelineState(
        student=None,
        student_spec={},
        teachers=[],
        teacher_weights=[],
        dataset=None,
        profile=types.SimpleNamespace(name="jetson-orin-nano", runtime=runtime),
        budget=None,
        onnx=dict(onnx_paths),
    )


def test_schedule_interleaves_and_rotates():
    plan = ortbench.schedule(n_models=3, iterations=10, rounds=4)
    rounds = sorted({r for r, _, _ in plan})
    assert rounds == [0, 1, 2, 3]
    for r in rounds:
        assert sorted(k for rr, k, _ in plan if rr == r) == [0, 1, 2]  # every model in every round
    firsts = [next(k for rr, k, _ in plan if rr == r) for r in rounds]
    assert firsts == [0, 1, 2, 0]  # the order rotates, so no model always goes first
    per_model = Counter()
    for _, k, n in plan:
        per_model[k] += n
    assert per_model == {0: 10, 1: 10, 2: 10}


def test_schedule_never_has_more_rounds_than_iterations():
    plan = ortbench.schedule(n_models=2, iterations=3, rounds=10)
    assert max(r for r, _, _ in plan) == 2
    assert sum(n for _, k, n in plan if k == 0) == 3


def test_measure_returns_ordered_percentiles(models):
    done = []
    stats = ortbench.measure(models, warmup=3, iterations=40, rounds=4, threads=1, advance=done.append)
    assert set(stats) == set(models)
    for s in stats.values():
        assert 0 < s.min <= s.p50 <= s.p90 <= s.p99
        assert s.iterations == 40 and s.rounds == 4 and s.batch == 1
        assert s.throughput == pytest.approx(1000.0 / s.mean, rel=1e-6)
        assert s.providers == ("CPUExecutionProvider",) and s.threads == 1
        d = s.to_dict()
        assert d["providers"] == ["CPUExecutionProvider"] and d["p50"] == pytest.approx(s.p50, abs=1e-4)
    assert sum(done) == 2 * 40 and len(done) == 2 * 4  # one advance per (round, model) chunk
    for s in stats.values():  # one p50 per round, each from that round's 10 runs
        assert len(s.round_p50) == 4 and min(s.round_p50) <= s.p50 <= max(s.round_p50)
        assert s.round_spread_pct == pytest.approx(ortbench.round_spread_pct(s.round_p50))


def test_round_spread_is_max_minus_min_over_the_median_of_round_p50s():
    ms = 1_000_000  # ns
    rounds = [[10 * ms] * 5, [12 * ms] * 5, [10 * ms, 10 * ms, 11 * ms, 30 * ms, 10 * ms]]
    s = ortbench.LatencyStats.from_samples(
        rounds, batch=1, providers=(), providers_requested=(), threads=1,
        threads_requested=1, rounds=3,
    )
    assert s.round_p50 == (10.0, 12.0, 10.0)  # the 30 ms outlier moves no round's p50
    assert s.iterations == 15 and s.p50 == 10.0 and s.min == 10.0
    assert s.round_spread_pct == pytest.approx(100 * (12 - 10) / 10)
    assert ortbench.round_spread_pct([5.0]) == 0.0 and ortbench.round_spread_pct([]) == 0.0
    d = s.to_dict()
    assert d["round_p50"] == [10.0, 12.0, 10.0] and d["round_spread_pct"] == 20.0


def _stats(round_p50):
    return ortbench.LatencyStats(
        p50=sorted(round_p50)[len(round_p50) // 2], p90=0, p99=0, mean=0, std=0, min=0, iterations=40, batch=1,
        throughput=0, providers=(), providers_requested=(), threads=2, threads_requested=2, rounds=len(round_p50),
        round_p50=tuple(round_p50),
    )


def test_a_p50_whose_rounds_moved_more_than_the_threshold_is_warned_about():
    limit = ortbench.ROUND_SPREAD_WARN_PCT
    quiet = _stats([1.0, 1.02, 1.01, 0.99, 1.0])
    two_speed = _stats([1.0, 1.25, 1.0, 1.24, 1.0])  # the project's two-speed VM host moves ~25%
    assert quiet.round_spread_pct < limit < two_speed.round_spread_pct
    assert quiet.speed_change_warning("m.onnx") is None
    warning = two_speed.speed_change_warning("m.onnx")
    assert warning.startswith("m.onnx: ") and "25% apart" in warning and "1 to 1.25 ms" in warning
    assert _stats([1.0]).speed_change_warning("m.onnx") is None  # one round: nothing to compare


def test_speed_moved_is_the_threshold_rule_bench_and_gate_share():
    limit = ortbench.ROUND_SPREAD_WARN_PCT
    assert not ortbench.speed_moved(None)  # a record without rounds (older reports)
    assert not ortbench.speed_moved(0.0) and not ortbench.speed_moved(limit)  # at the threshold: not moved
    assert ortbench.speed_moved(limit + 0.1)


def test_measure_uses_the_requested_batch(models):
    stats = ortbench.measure(models[:1], batch=4, warmup=1, iterations=5, rounds=1, threads=1)
    s = stats[models[0]]
    assert s.batch == 4
    assert s.throughput == pytest.approx(4 * 1000.0 / s.mean, rel=1e-6)
    (result,) = ortbench.bench_models(models[:1], batches=[4], warmup=0, iterations=2, rounds=1, threads=1)
    assert result.runs[0].shapes == {"input": (4, 1, 16, 16)}


def test_measure_dedupes_and_rejects_missing_files(models, tmp_path):
    stats = ortbench.measure([models[0], models[0]], warmup=0, iterations=3, rounds=1, threads=1)
    assert len(stats) == 1
    with pytest.raises(StageError, match="does not exist"):
        ortbench.measure([tmp_path / "nope.onnx"], iterations=3)


def test_missing_provider_falls_back_to_cpu(models):
    requested = ["TensorrtExecutionProvider", "cuda"]
    session, used = ortbench.make_session(models[0], requested, threads=1)
    assert used == ["CPUExecutionProvider"]
    assert session.get_providers() == used
    assert ortbench.missing_providers(requested, ["CPUExecutionProvider"]) == requested
    stats = ortbench.measure(models[:1], warmup=0, iterations=3, rounds=1, providers=requested, threads=1)
    s = stats[models[0]]
    assert s.providers == ("CPUExecutionProvider",)
    assert s.providers_requested == ("TensorrtExecutionProvider", "cuda")


def test_resolve_providers_keeps_preference_order():
    available = ["CUDAExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"]
    got = ortbench.resolve_providers(
        ["xnnpack", "TensorrtExecutionProvider", "CUDAExecutionProvider"], available
    )
    assert got == ["XnnpackExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ortbench.resolve_providers(["CPUExecutionProvider", "cuda"], available) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_threads_are_capped_at_usable_cores(models):
    usable = ortbench.host_info()["usable_cores"]
    assert ortbench.effective_threads(10_000) == usable
    assert ortbench.effective_threads(0) == usable
    assert ortbench.effective_threads(1) == 1
    s = ortbench.measure(models[:1], warmup=0, iterations=2, rounds=1, threads=10_000)[models[0]]
    assert s.threads == usable and s.threads_requested == 10_000


def test_host_info_describes_this_machine():
    info = ortbench.host_info()
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert info["logical_cores"] >= info["usable_cores"] >= 1
    assert info["onnxruntime"] == ort.__version__
    assert "CPUExecutionProvider" in info["available_providers"]
    assert info["os"]
    assert info["load_average_1min"] is None or info["load_average_1min"] >= 0


def test_bench_stage_times_every_model(models):
    small, large = models
    progress = RecordingProgress()
    ctx = RunContext(run_dir=small.parent, progress=progress)
    state = _state({"teacher": large, "fp32": large, "int8": small}, providers=("tensorrt",), threads=64)
    cfg = BenchConfig(warmup=2, iterations=20, rounds=2)
    out_state, result = bench_stage.run(state, cfg, ctx)
    assert out_state is state
    m = result.metrics
    assert set(m["latency"]) == {"teacher", "fp32", "int8"}
    assert m["latency"]["teacher"] == m["latency"]["fp32"]  # the same file is timed once
    for stats in m["latency"].values():
        assert stats["iterations"] == 20 and stats["batch"] == 1
        assert stats["providers"] == ["CPUExecutionProvider"]
        assert stats["p50"] <= stats["p90"] <= stats["p99"]
        # Memory is measured in a fresh process, where loading the model raises the peak RSS.
        assert stats["memory_method"] == "isolated" and stats["peak_memory_mb"] > 0
        assert stats["file_size_mb"] > 0
    assert m["int8_speedup"] == pytest.approx(
        m["latency"]["fp32"]["p50"] / m["latency"]["int8"]["p50"], rel=1e-2
    )
    assert m["providers_missing"] == ["tensorrt"]
    assert m["note"].startswith(f"measured on this host ({m['host']['cpu']}, CPUExecutionProvider, ")
    assert m["note"].endswith("threads), not on jetson-orin-nano")
    assert progress.tasks[0]["total"] == progress.tasks[0]["done"] == 2 * 20


def test_bench_stage_needs_models(tmp_path):
    ctx = RunContext(run_dir=tmp_path)
    with pytest.raises(StageError, match="export"):
        bench_stage.run(_state({}), BenchConfig(), ctx)
    with pytest.raises(StageError, match="fp32"):
        bench_stage.run(_state({"fp32": tmp_path / "gone.onnx"}), BenchConfig(), ctx)
