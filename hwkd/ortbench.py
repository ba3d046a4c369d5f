"""ONNX Runtime latency measurement: the one place in hwkd that times models.

Hosts are noisy (other tenants, frequency scaling), so models are timed in interleaved rounds: round r
runs every model ``iterations / rounds`` times, in an order rotated by r. A burst of noise then hits all
models alike instead of whichever happened to run at that moment. The timed loop is as bare as a
hand-written ORT loop: a pre-built OrtValue feed and ``perf_counter_ns`` around ``run`` only.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwkd.errors import StageError

CPU_EP = "CPUExecutionProvider"

# Short names a profile may use for execution providers.
_EP_ALIASES = {
    "cpu": CPU_EP,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
}

_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("p50", "p90", "p99", "mean", "std", "min"):
            out[key] = round(out[key], 4)
        out["throughput"] = round(out["throughput"], 1)
        out["providers"] = list(self.providers)
        out["providers_requested"] = list(self.providers_requested)
        return out

    @classmethod
    def from_samples(cls, samples_ns: Sequence[int], **info: Any) -> LatencyStats:
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        total_s = float(ms.sum()) / 1e3
        return cls(
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


def provider_name(name: str) -> str:
    """The ORT name of an execution provider given by its ORT name or a short alias ("cuda")."""
    return _EP_ALIASES.get(name.lower().removesuffix("executionprovider"), name)


def missing_providers(requested: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """Requested EPs this onnxruntime build lacks (they fall back to the CPU EP)."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    return [name for name in requested if provider_name(name) not in available]


def resolve_providers(requested: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """Requested EPs (ORT names or short aliases) that this onnxruntime has, in order; CPU always last.

    Example: ``resolve_providers(["tensorrt", "cuda"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]``
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    out: list[str] = []
    for name in requested:
        full = provider_name(name)
        if full in available and full not in out:
            out.append(full)
    if CPU_EP in out:
        out.remove(CPU_EP)
    out.append(CPU_EP)
    return out


def effective_threads(threads: int) -> int:
    """Threads to give ORT: the profile's count, capped at the cores this process may use.

    A device profile may say 6 threads; on a 2-core host that would oversubscribe and time noise.
    0 or less means all usable cores.
    """
    usable = _usable_cores()
    if threads <= 0:
        return usable
    return min(threads, usable)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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


def _feed(session: Any, batch: int, rng: np.random.Generator) -> dict[str, Any]:
    """Random inputs shaped like the model's, with ``batch`` in every dynamic dimension slot 0."""
    import onnxruntime as ort

    feed = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        if shape and shape[0] is None:
            shape[0] = batch
        if any(d is None for d in shape):
            raise StageError(
                f"Input {inp.name!r} has dynamic dimensions other than the batch ({inp.shape}); "
                "hwkd cannot choose a size for them."
            )
        dtype = _NP_DTYPES.get(inp.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape).astype(dtype)
        else:
            arr = np.zeros(shape, dtype=dtype)
        feed[inp.name] = ort.OrtValue.ortvalue_from_numpy(arr)
    return feed


def schedule(n_models: int, iterations: int, rounds: int) -> list[tuple[int, int, int]]:
    """``(round, model_index, runs)`` in execution order: every round runs every model, rotated.

    ``iterations`` per model are split over the rounds (the first rounds take the remainder).
    """
    rounds = max(1, min(rounds, iterations))
    base, extra = divmod(iterations, rounds)
    plan = []
    for r in range(rounds):
        runs = base + (1 if r < extra else 0)
        for k in range(n_models):
            plan.append((r, (k + r) % n_models, runs))
    return plan


def _time_runs(run: Callable[..., Any], out_names: list[str], feed: dict[str, Any], n: int) -> list[int]:
    times = [0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        run(out_names, feed)
        times[i] = clock() - t0
    return times


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
    timed runs, for progress bars (total = len(paths) * iterations).
    """
    if iterations < 1 or batch < 1:
        raise StageError(f"Benchmark needs iterations >= 1 and batch >= 1 (got {iterations}, {batch}).")
    keys = list(dict.fromkeys(Path(p) for p in paths))
    if not keys:
        return {}
    for p in keys:
        if not p.is_file():
            raise StageError(f"Cannot benchmark {str(p)!r}: the file does not exist.")
    n_threads = effective_threads(threads)
    rng = np.random.default_rng(seed)
    runners = []
    used: list[tuple[str, ...]] = []
    for p in keys:
        session, eps = make_session(p, providers, n_threads)
        feed = _feed(session, batch, rng)
        out_names = [o.name for o in session.get_outputs()]
        runners.append((session.run_with_ort_values, out_names, feed))
        used.append(tuple(eps))

    plan = schedule(len(keys), iterations, rounds)
    samples: list[list[int]] = [[] for _ in keys]
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise the hand-written loop would not see
    try:
        for run, out_names, feed in runners:
            _time_runs(run, out_names, feed, warmup)
        for _round, k, n in plan:
            run, out_names, feed = runners[k]
            samples[k].extend(_time_runs(run, out_names, feed, n))
            if advance is not None:
                advance(n)
    finally:
        if gc_was_enabled:
            gc.enable()

    n_rounds = plan[-1][0] + 1
    return {
        p: LatencyStats.from_samples(
            samples[k],
            batch=batch,
            providers=used[k],
            providers_requested=tuple(providers),
            threads=n_threads,
            threads_requested=threads,
            rounds=n_rounds,
        )
        for k, p in enumerate(keys)
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flags() -> list[str]:
    """The ISA extensions that decide INT8/FP32 kernel speed (VNNI makes INT8 conv much faster)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith(("flags", "features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def host_info() -> dict[str, Any]:
    """What this host is, so a report can say honestly where its latencies were measured."""
    import onnxruntime as ort

    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count() or 1,
        "usable_cores": _usable_cores(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        # Other processes on the host inflate tail latencies; a load above usable_cores means noise.
        "load_average_1min": _load_average(),
        "available_providers": list(ort.get_available_providers()),
    }
