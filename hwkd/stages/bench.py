"""Bench stage: time every ONNX model of the run on this host, interleaved, at batch 1.

The numbers are from the machine hwkd runs on, with the profile's execution providers where this
onnxruntime has them, not from the target device; the ``note`` metric says so in words.
"""

from __future__ import annotations

from pathlib import Path

from hwkd.config import BenchConfig
from hwkd.errors import StageError
from hwkd.onnx import bench as ortbench
from hwkd.pipeline import PipelineState, RunContext, StageResult

BATCH = 1


def _graph_digest(path: Path) -> str:
    """A digest of an ONNX file's graph (nodes, weights, inputs/outputs), ignoring its metadata."""
    import hashlib

    import onnx

    return hashlib.blake2b(onnx.load(str(path)).graph.SerializeToString(), digest_size=16).hexdigest()


def run(state: PipelineState, cfg: BenchConfig, ctx: RunContext) -> tuple[PipelineState, StageResult]:
    if not state.onnx:
        raise StageError("The bench stage has no ONNX models to time.", "Run the export stage before bench.")
    labels = dict(state.onnx)
    for label, path in labels.items():
        if not Path(path).is_file():
            raise StageError(
                f"The {label} ONNX model {str(path)!r} does not exist.", "Re-run the export stage."
            )
    runtime = state.profile.runtime
    providers = tuple(runtime.providers)
    # One graph is timed once: a file listed under two labels, or two files that differ only in
    # metadata (model_fp32.onnx is a copy of the pruned student's stage export).
    digests = {path: _graph_digest(path) for path in dict.fromkeys(Path(p) for p in labels.values())}
    timed = {}  # graph digest -> the first file carrying it, the one that is timed
    for path, digest in digests.items():
        timed.setdefault(digest, path)
    unique = list(timed.values())

    with ctx.progress.task("benchmark (onnxruntime)", total=len(unique) * cfg.iterations) as advance:
        models = ortbench.bench_models(
            unique,
            batches=[BATCH],
            warmup=cfg.warmup,
            iterations=cfg.iterations,
            rounds=cfg.rounds,
            providers=providers,
            threads=int(runtime.threads),
            seed=ctx.seed,
            advance=advance,
        )
    by_path = {m.path: m for m in models}
    # This process's peak RSS was set by training, so each model's memory is measured in a fresh one.
    for m in models:
        m.memory = m.fresh_memory(cfg.warmup)
    stats = {p: m.runs[0].stats for p, m in by_path.items()}
    latency = {}
    for label, path in labels.items():
        m = by_path[timed[digests[Path(path)]]]
        latency[label] = {
            **m.runs[0].stats.to_dict(),
            "peak_memory_mb": m.memory["peak_mb"],
            "memory_method": m.memory["method"],
            "file_size_mb": m.file_size_mb,
        }
    host = ortbench.host_info()
    first = next(iter(stats.values()))
    used_ep = first.providers[0] if first.providers else ortbench.CPU_EP
    note = (
        f"measured on this host ({host['cpu']}, {used_ep}, {first.threads} threads), "
        f"not on {state.profile.name}"
    )
    metrics = {"latency": latency, "host": host, "note": note, "batch": BATCH}
    if "fp32" in latency and "int8" in latency and latency["int8"]["p50"] > 0:
        metrics["int8_speedup"] = round(latency["fp32"]["p50"] / latency["int8"]["p50"], 3)
    missing = ortbench.missing_providers(providers)
    if missing:
        metrics["providers_missing"] = missing
    warnings = [w for p, st in stats.items() if (w := st.speed_change_warning(p.name))]
    for warning in warnings:
        ctx.log.warning("bench: %s", warning)
    if warnings:
        metrics["warnings"] = warnings
    ctx.log.info("bench: %s", ", ".join(f"{k} p50 {v['p50']:.3f} ms" for k, v in latency.items()))
    return state, StageResult("bench", metrics=metrics)
