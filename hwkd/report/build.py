"""report.json: one record per model (teacher, each stage, final) with the same fields, so they compare.

Every model record holds ``accuracy`` (fraction, test split), ``measured_latency_ms`` (onnxruntime p50
at batch 1, on this host), ``estimated_latency_ms`` (the cost model, for the profile's device),
``params``, ``macs``, ``model_size_mb`` (ONNX file size), ``estimated_memory_mb`` (the cost model:
weights plus peak live activations) and ``measured_memory_mb`` (the growth of the process's peak RSS
while onnxruntime loaded and warmed the model on this host, see hwkd.onnx.memory.MEMORY_METHOD).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hwkd.artifacts import atomic_write, write_json

REPORT_FORMAT = "hwkd.report/1"
# Which ONNX benchmark label stands for the model a stage produced.
STAGE_MODEL_LABEL = {"distill": "distill", "prune": "prune", "qat": "int8", "export": "int8", "bench": "int8"}
MODEL_FIELDS = (
    "accuracy",
    "measured_latency_ms",
    "estimated_latency_ms",
    "params",
    "macs",
    "model_size_mb",
    "estimated_memory_mb",
    "measured_memory_mb",
)


def _latency_table(results) -> tuple[dict[str, Any], dict[str, Any], str]:
    bench = next((r for r in results if r.name == "bench"), None)
    if bench is None:
        return {}, {}, "not measured (the bench stage did not run)"
    return bench.metrics.get("latency", {}), bench.metrics.get("host", {}), bench.metrics.get("note", "")


def build_report(*, run_dir: Path, profile, budget, dataset, teacher_metrics, results, state, versions,
                 student_note: str | None = None) -> dict:  # fmt: skip
    latency, host, note = _latency_table(results)
    has_int8 = "int8" in state.onnx  # the export stage sets it only for an INT8 model.onnx (QAT or PTQ)

    def p50(label: str) -> float | None:
        stats = latency.get(label)
        return None if stats is None else stats["p50"]

    def peak_mb(label: str) -> float | None:
        return (latency.get(label) or {}).get("peak_memory_mb")

    teacher = {
        **{k: teacher_metrics.get(k) for k in MODEL_FIELDS},
        "measured_latency_ms": p50("teacher"),
        "measured_memory_mb": peak_mb("teacher"),
        "estimated_precision": "fp32",  # a relative budget is a share of this figure
    }
    by_name = {r.name: r for r in results}
    last_fp32 = next(
        (by_name[n].metrics for n in ("prune", "distill") if n in by_name), teacher_metrics
    )
    if has_int8:
        final_estimate, final_memory = _estimate_int8(state, profile)
    else:
        final_estimate, final_memory = last_fp32.get("estimated_latency_ms"), last_fp32.get("estimated_memory_mb")
    final_precision = "int8" if has_int8 else "fp32"  # the precision final_estimate prices
    stages = []
    for r in results:
        label = STAGE_MODEL_LABEL[r.name] if (r.name in ("distill", "prune") or has_int8) else "fp32"
        record = {"name": r.name, "seconds": round(r.seconds, 2)}
        if r.name in ("distill", "prune"):
            record.update({k: r.metrics.get(k) for k in MODEL_FIELDS})
            record["estimated_precision"] = "fp32"  # the model as it is after the stage, not as it will deploy
        else:  # qat / export / bench describe the final (quantized) model
            record.update({k: last_fp32.get(k) for k in ("params", "macs")})
            record["estimated_latency_ms"] = final_estimate
            record["estimated_memory_mb"] = final_memory
            record["estimated_precision"] = final_precision
            export = by_name.get("export")
            record["accuracy"] = r.metrics.get("accuracy", export.metrics.get("accuracy") if export else None)
            record["model_size_mb"] = export.metrics.get("model_size_mb") if export else None
        record["measured_latency_ms"] = p50(label)
        record["measured_memory_mb"] = peak_mb(label)
        record["details"] = {k: v for k, v in r.metrics.items() if k not in record}
        record["history"] = r.history
        record["artifacts"] = r.artifacts
        stages.append(record)

    export = by_name.get("export")
    final_label = "int8" if has_int8 else ("fp16" if "fp16" in state.onnx else "fp32")
    final = {
        "path": "model.onnx" if export else None,
        "precision": export.metrics.get("precision", final_label) if export else final_label,
        "accuracy": export.metrics.get("accuracy") if export else last_fp32.get("accuracy"),
        "measured_latency_ms": p50(final_label),
        "estimated_latency_ms": final_estimate,
        "estimated_precision": final_precision,
        "params": last_fp32.get("params"),
        "macs": last_fp32.get("macs"),
        "model_size_mb": export.metrics.get("model_size_mb") if export else None,
        "estimated_memory_mb": final_memory,
        "measured_memory_mb": peak_mb(final_label),
        # how far the timing rounds' p50s moved: above ROUND_SPREAD_WARN_PCT the measured figure may not repeat
        "measured_latency_round_spread_pct": (latency.get(final_label) or {}).get("round_spread_pct"),
    }
    final["budget_check"] = _budget_check(final, budget)
    if teacher["measured_latency_ms"] and final["measured_latency_ms"]:
        # relative budgets are shares of the teacher: this is the same share, measured on this host
        final["budget_check"]["measured_share_of_teacher"] = round(
            final["measured_latency_ms"] / teacher["measured_latency_ms"], 4
        )
    if teacher["measured_latency_ms"] and final["measured_latency_ms"]:
        final["speedup_vs_teacher"] = round(teacher["measured_latency_ms"] / final["measured_latency_ms"], 3)
    if teacher["model_size_mb"] and final["model_size_mb"]:
        final["size_reduction_vs_teacher"] = round(teacher["model_size_mb"] / final["model_size_mb"], 3)
    return {
        "format": REPORT_FORMAT,
        "hwkd_version": versions.get("hwkd"),
        "run_dir": str(run_dir),
        "profile": {"name": profile.name, "source": str(profile.source), "description": profile.description},
        "budget": dataclasses.asdict(budget),
        "dataset": dataset.summary(),
        **({"student_note": student_note} if student_note else {}),
        "measured_on": {"note": note, **host},
        "latency": latency,
        "teacher": teacher,
        "stages": stages,
        "final": final,
        "channels": state.channels,
        "versions": versions,
        **_quantization(export, latency),
    }


def _quantization(export, latency: dict) -> dict:
    """FP32 vs hwkd QAT INT8 vs ORT PTQ INT8, side by side, with measured p50 from the bench stage."""
    quant = export.metrics.get("quantization") if export else None
    if not quant:
        return {}
    parity = export.metrics.get("parity", {}).get("int8")
    models = {}
    for label, record in quant["models"].items():
        stats = latency.get(label)
        models[label] = {**record, "measured_latency_ms": None if stats is None else stats["p50"]}
    if parity is not None and "qat" in models:
        models["qat"]["parity_vs_pytorch"] = parity
    return {"quantization": {**{k: v for k, v in quant.items() if k != "models"}, "models": models}}


def _estimate_int8(state, profile) -> tuple[float, float]:
    """The cost model's (latency ms, memory MB) for the final INT8 model on the device."""
    from hwkd.hardware.cost import estimate

    cost = estimate(state.student, state.example_input, profile, precision="int8")
    return cost.latency_ms, cost.memory_mb


def _budget_check(final: dict, budget) -> dict[str, Any]:
    """Budgets are for the target device, so they are checked against the cost model's estimate there;
    the host measurement is shown beside it (a calibrated profile makes the two agree)."""
    est = final.get("estimated_latency_ms")
    return {
        "latency_budget_ms": budget.latency_ms,
        "estimated_latency_ms": est,
        "latency_within_budget": None if est is None else bool(est <= budget.latency_ms),
    }


def write_reports(run_dir: Path, report: dict, json_too: bool = True) -> list[Path]:
    """report.json (unless ``json_too`` is False), report.md and the self-contained report.html."""
    from hwkd.report.html import render_html
    from hwkd.report.markdown import render_markdown

    written = []
    if json_too:
        written.append(write_json(run_dir / "report.json", report))
    written.append(atomic_write(run_dir / "report.md", render_markdown(report)))
    written.append(atomic_write(run_dir / "report.html", render_html(report)))
    return written
