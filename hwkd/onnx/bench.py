"""ONNX Runtime latency measurement: the one place in hwkd that times models.

Hosts are noisy (other tenants, frequency scaling), so models are timed in interleaved rounds: round r
runs every model ``iterations / rounds`` times, in an order rotated by r. A burst of noise then hits all
models alike instead of whichever happened to run at that moment. The timed loop is the hand-written
ORT loop: ``perf_counter_ns`` around ``session.run(None, feed)`` with a pre-built numpy feed, which ORT
wraps without copying. (``run_with_ort_values`` with pre-built OrtValues was measured 50-60 us per call
slower than ``run`` on onnxruntime 1.32 here, so it is not used; see benchmarks/bench_overhead.py.)
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwkd.errors import ConfigError, StageError
from hwkd.onnx.host import (  # noqa: F401 - part of the timing API callers use
    CPU_EP,
    effective_threads,
    host_info,
    missing_providers,
    provider_name,
    resolve_providers,
)
from hwkd.onnx.memory import MEMORY_METHOD, _memory_growth, _memory_kb, isolated_memory  # noqa: F401

# Spread of a model's per-round p50s, (max - min) / median, above which its p50 is flagged: the host's speed
# changed while it was timed (other load, frequency scaling, a shared VM switching between speed states).
# The project's two-speed VM host moved the median of 100-run blocks of one model 20-25% (docs/decisions-issue13.md).
ROUND_SPREAD_WARN_PCT = 10.0


def speed_moved(round_spread_pct: float | None) -> bool:
    """Whether timing rounds this far apart (percent) mean the host's speed changed while it was timed:
    the one rule behind ``hwkd bench``'s warning and ``hwkd gate``'s note."""
    return round_spread_pct is not None and round_spread_pct > ROUND_SPREAD_WARN_PCT


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency of one model, in milliseconds, over ``iterations`` timed runs."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    iterations: int
    batch: int
    throughput: float  # items per second, batch * runs / total timed seconds
    providers: tuple[str, ...]  # what the session really used, in priority order
    providers_requested: tuple[str, ...]
    threads: int  # intra-op threads the session was given
    threads_requested: int
    rounds: int
    round_p50: tuple[float, ...] = ()  # the p50 of each interleaved round, in round order

    @property
    def round_spread_pct(self) -> float:
        """(max - min) / median of round_p50, %: how much the host's speed moved while this was timed."""
        return round_spread_pct(self.round_p50)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("p50", "p90", "p99", "mean", "std", "min"):
            out[key] = round(out[key], 4)
        out["throughput"] = round(out["throughput"], 1)
        out["round_p50"] = [round(v, 4) for v in self.round_p50]
        out["round_spread_pct"] = round(self.round_spread_pct, 1)
        out["providers"] = list(self.providers)
        out["providers_requested"] = list(self.providers_requested)
        return out

    @classmethod
    def from_samples(cls, rounds_ns: Sequence[Sequence[int]], **info: Any) -> LatencyStats:
        """Stats of the run times (ns) of every round together, and the p50 of each round."""
        ms = np.asarray([t for r in rounds_ns for t in r], dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        total_s = float(ms.sum()) / 1e3
        round_p50 = tuple(float(np.median(r)) / 1e6 for r in rounds_ns if len(r))
        return cls(
            round_p50=round_p50,
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            mean=float(ms.mean()),
            std=float(ms.std()),
            min=float(ms.min()),
            iterations=len(ms),
            throughput=info["batch"] * len(ms) / total_s if total_s > 0 else float("inf"),
            **info,
        )

    def speed_change_warning(self, label: str) -> str | None:
        """A warning when the rounds' p50s differ by more than ROUND_SPREAD_WARN_PCT, else None."""
        if not speed_moved(self.round_spread_pct):  # 0 with fewer than two rounds
            return None
        lo, hi = min(self.round_p50), max(self.round_p50)
        return (
            f"{label}: the p50s of its {len(self.round_p50)} timing rounds range from {lo:.4g} to {hi:.4g} ms "
            f"({self.round_spread_pct:.0f}% apart, more than {ROUND_SPREAD_WARN_PCT:.0f}%): the host's speed changed "
            f"while it was timed (other load, frequency scaling or a shared VM), so its p50 of {self.p50:.4g} ms may "
            "not repeat: time it again on a quiet host before trusting or gating on it."
        )


def round_spread_pct(round_p50: Sequence[float]) -> float:
    """(max - min) / median of per-round p50s, in %; 0 with fewer than two rounds."""
    if len(round_p50) < 2:
        return 0.0
    mid = float(np.median(round_p50))
    return 100.0 * (max(round_p50) - min(round_p50)) / mid if mid > 0 else 0.0


def make_session(path: str | Path, providers: Sequence[str], threads: int) -> tuple[Any, list[str]]:
    """An ORT session for timing: EPs filtered to what is available (CPU fallback), fixed threads.

    Returns ``(session, used_providers)``; ``used_providers`` is what ORT reports it really uses.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=resolve_providers(providers))
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise StageError(
            f"ONNX Runtime could not load {str(path)!r} for benchmarking: {first[:300]}"
        ) from exc
    return session, list(session.get_providers())


def schedule(n_models: int, iterations: int | Sequence[int], rounds: int) -> list[tuple[int, int, int]]:
    """``(round, model_index, runs)`` in execution order: every round runs every model, rotated.

    ``iterations`` per model (one count for all, or one per model) are split over the rounds (the
    first rounds take the remainder); there are never more rounds than the smallest count.
    """
    counts = [iterations] * n_models if isinstance(iterations, int) else list(iterations)
    rounds = max(1, min(rounds, *counts) if counts else rounds)
    plan = []
    for r in range(rounds):
        for k in range(n_models):
            m = (k + r) % n_models
            base, extra = divmod(counts[m], rounds)
            plan.append((r, m, base + (1 if r < extra else 0)))
    return plan


def _time_runs(run: Callable[..., Any], out_names: list[str] | None, feed: dict[str, Any], n: int) -> list[int]:
    times = [0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        run(out_names, feed)
        times[i] = clock() - t0
    return times


def _time_for(run: Callable[..., Any], out_names: list[str] | None, feed: dict[str, Any], budget_ns: int) -> list[int]:
    """Run until ``budget_ns`` of wall time has passed (at least once); the clock reads are the ones
    that time each call, so the loop costs no more than ``_time_runs``."""
    times: list[int] = []
    clock = time.perf_counter_ns
    deadline = clock() + budget_ns
    while True:
        t0 = clock()
        run(out_names, feed)
        t1 = clock()
        times.append(t1 - t0)
        if t1 >= deadline:
            return times



def model_file_size_mb(path: str | Path) -> float:
    """Size of the ONNX file plus any external-data files it references, in MB (10^6 bytes)."""
    path = Path(path)
    total = path.stat().st_size
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        seen = set()
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location" and entry.value not in seen:
                    seen.add(entry.value)
                    ext = path.parent / entry.value
                    if ext.is_file():
                        total += ext.stat().st_size
    except Exception:  # noqa: BLE001 - the size of the main file is still right
        pass
    return round(total / 1e6, 4)


@dataclass
class BatchRun:
    """One model timed at one batch size."""

    batch: int
    shapes: dict[str, tuple[int, ...]]
    stats: LatencyStats

    def to_dict(self) -> dict[str, Any]:
        d = self.stats.to_dict()
        return {
            "batch": self.batch,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "latency_ms": {k: d[k] for k in ("p50", "p90", "p99", "mean", "std", "min")},
            "throughput_per_s": d["throughput"],
            "iterations": d["iterations"],
            "rounds": d["rounds"],
            "round_p50": d["round_p50"],
            "round_spread_pct": d["round_spread_pct"],
        }


@dataclass
class ModelBench:
    """Everything measured about one model: its inputs, runtime, memory, file size and each batch."""

    path: Path
    inputs: list[dict[str, Any]]
    providers: tuple[str, ...]
    providers_requested: tuple[str, ...]
    providers_missing: list[str]
    threads: int
    threads_requested: int
    file_size_mb: float
    memory: dict[str, Any]
    runs: list[BatchRun]

    def fresh_memory(self, warmup: int) -> dict[str, Any]:
        """This model's peak memory measured in a fresh process at its largest batch, with the providers and
        threads it was timed with (a long-lived process's peak RSS was set before the model was loaded)."""
        largest = max(self.runs, key=lambda r: r.batch or 0)
        return isolated_memory(self.path, largest.shapes, self.providers_requested, self.threads, warmup)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "file_size_mb": self.file_size_mb,
            "peak_memory_mb": self.memory["peak_mb"],
            "memory_method": MEMORY_METHOD.get(self.memory["method"], self.memory["method"]),
            "providers": list(self.providers),
            "providers_requested": list(self.providers_requested),
            "providers_missing": self.providers_missing,
            "threads": self.threads,
            "threads_requested": self.threads_requested,
            "inputs": self.inputs,
        }


def bench_models(
    paths: Sequence[str | Path],
    batches: Sequence[int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    input_files: Mapping[str, str | Path] | None = None,
    warmup: int = 20,
    iterations: int = 200,
    duration_s: float | None = None,
    rounds: int = 5,
    providers: Sequence[str] = (CPU_EP,),
    threads: int = 0,
    seed: int = 0,
    advance: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> list[ModelBench]:
    """Time every model at every batch, all interleaved in rounds; see hwkd.onnx.inputs for shapes.

    ``batches=None`` times each model once at the batch its shapes imply (1 for a dynamic batch).
    ``duration_s`` replaces ``iterations``: each (model, batch) runs for ``duration_s / rounds`` seconds
    in every round. ``on_start(total)`` is called once the plan is known, then ``advance(n)`` after
    each chunk (n = runs; with a duration, total and n count chunks).
    """
    from hwkd.onnx import inputs as ortinputs

    if iterations < 1 or any(b < 1 for b in batches or ()) or warmup < 0:
        raise StageError(
            f"Benchmark needs iterations >= 1, warmup >= 0 and batches >= 1 (got {iterations}, {warmup}, "
            f"{list(batches or [])})."
        )
    if duration_s is not None and duration_s <= 0:
        raise StageError(f"Benchmark duration must be positive (got {duration_s} s).")
    keys = list(dict.fromkeys(Path(p) for p in paths))
    for p in keys:
        if not p.is_file():
            raise StageError(f"Cannot benchmark {str(p)!r}: the file does not exist.")
    n_threads = effective_threads(threads)
    rng = np.random.default_rng(seed)
    arrays = ortinputs.load_input_files({k: Path(v) for k, v in (input_files or {}).items()})
    batch_list: list[int | None] = list(dict.fromkeys(batches)) if batches else [None]
    missing = missing_providers(providers)

    models: list[ModelBench] = []
    runners: list[tuple[int, Callable[..., Any], None, dict[str, Any]]] = []  # (model index, run, outs, feed)
    keys_given = list(dict.fromkeys([*(shapes or {}), *arrays]))
    used_keys: set[str] = set()
    _warm_ort_env()
    for p in keys:
        ranges = ortinputs.index_ranges(p)  # before the memory window: it parses the whole graph
        gc.collect()
        before = _memory_kb()
        session, eps = make_session(p, providers, n_threads)
        specs = ortinputs.input_specs(session)
        out_names = None  # all outputs, as a hand-written loop asks
        runs, fills = [], {}
        # With several models, a --shape or --input key applies to the models that have it.
        mine = set(ortinputs.applicable(specs, keys_given)) if len(keys) > 1 else set(keys_given)
        used_keys |= mine
        my_shapes = {k: v for k, v in (shapes or {}).items() if k in mine}
        my_arrays = {k: v for k, v in arrays.items() if k in mine}
        for batch in batch_list:
            shp = ortinputs.resolve_shapes(specs, batch, my_shapes, my_arrays, model=p.name)
            feed_np, fills = ortinputs.make_feed_arrays(specs, shp, rng, my_arrays, ranges)
            feed = feed_np
            eff_batch = batch if batch is not None else _implied_batch(specs, shp)
            runs.append(BatchRun(eff_batch, shp, None))  # stats filled in below
            try:
                _time_runs(session.run, out_names, feed, max(warmup, 1))
            except Exception as exc:
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                raise StageError(
                    f"ONNX Runtime failed to run {p.name} with inputs "
                    f"{', '.join(f'{k} {list(v)}' for k, v in shp.items())}: {first[:300]}",
                    "Check the --shape values (and --input files) against the model's inputs.",
                ) from exc
            runners.append((len(models), session.run, out_names, feed))
        after = _memory_kb()
        inputs = [
            {"name": s.name, "type": s.type, "dims": list(s.dims), "fill": fills.get(s.name)} for s in specs
        ]
        models.append(
            ModelBench(
                path=p,
                inputs=inputs,
                providers=tuple(eps),
                providers_requested=tuple(providers),
                providers_missing=missing,
                threads=n_threads,
                threads_requested=threads,
                file_size_mb=model_file_size_mb(p),
                memory=_memory_growth(before, after),
                runs=runs,
            )
        )
    unused = [k for k in keys_given if k not in used_keys]
    if unused:
        raise ConfigError(
            f"--shape/--input {', '.join(unused)}: no model has an input or named dimension of that name.",
            "Models' inputs: " + "; ".join(
                f"{m.path.name}: " + ", ".join(f"{i['name']} {i['dims']}" for i in m.inputs) for m in models
            ) + ".",
        )
    if not runners:
        return []

    # With a duration, each (model, batch) runs for duration / rounds seconds in every round.
    counts = [iterations] * len(runners) if duration_s is None else [rounds] * len(runners)
    plan = schedule(len(runners), counts, rounds)
    chunk_ns = None if duration_s is None else int(duration_s * 1e9 / (plan[-1][0] + 1))
    if on_start is not None:
        on_start(sum(counts) if chunk_ns is None else len(plan))
    by_round: list[dict[int, list[int]]] = [{} for _ in runners]  # runner -> {round: its run times}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise the hand-written loop would not see
    try:
        for round_, k, n in plan:
            _, run, out_names, feed = runners[k]
            if chunk_ns is None:
                timed = _time_runs(run, out_names, feed, n)
            else:
                timed = _time_for(run, out_names, feed, chunk_ns)
                n = 1  # progress counts chunks in duration mode
            by_round[k].setdefault(round_, []).extend(timed)
            if advance is not None:
                advance(n)
    finally:
        if gc_was_enabled:
            gc.enable()

    n_rounds = plan[-1][0] + 1
    k = 0
    for m in models:
        for run_ in m.runs:
            run_.stats = LatencyStats.from_samples(
                [by_round[k][r] for r in sorted(by_round[k])],
                batch=run_.batch,
                providers=m.providers,
                providers_requested=tuple(providers),
                threads=n_threads,
                threads_requested=threads,
                rounds=n_rounds,
            )
            k += 1
    return models


def _warm_ort_env() -> None:
    """Create (and drop) one trivial session, so onnxruntime's process-wide set-up (its environment,
    allocators, kernel registries) is not counted as the first model's memory."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "warm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=[CPU_EP])
    session.run(None, {"x": np.zeros(1, dtype=np.float32)})


def _implied_batch(specs: Sequence[Any], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The batch a set of shapes runs: the first dim of the first input that has one."""
    for spec in specs:
        shape = shapes[spec.name]
        if shape:
            return int(shape[0])
    return 1


def measure(
    paths: Sequence[str | Path],
    batch: int = 1,
    warmup: int = 20,
    iterations: int = 200,
    rounds: int = 5,
    providers: Sequence[str] = (CPU_EP,),
    threads: int = 0,
    seed: int = 0,
    advance: Callable[[int], None] | None = None,
) -> dict[Path, LatencyStats]:
    """Time each ONNX model at ``batch`` in interleaved rounds; return ``{path: LatencyStats}``.

    ``threads`` is capped at the usable cores (0 = all). ``advance(n)`` is called after each chunk of
    timed runs, for progress bars (total = len(paths) * iterations). See ``bench_models`` for several
    batches, named shapes, memory and file size.
    """
    if batch < 1:
        raise StageError(f"Benchmark needs iterations >= 1 and batch >= 1 (got {iterations}, {batch}).")
    results = bench_models(
        paths, batches=[batch], warmup=warmup, iterations=iterations, rounds=rounds,
        providers=providers, threads=threads, seed=seed, advance=advance,
    )
    return {m.path: m.runs[0].stats for m in results}

