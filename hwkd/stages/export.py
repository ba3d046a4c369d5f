"""Export stage: FP32 student -> model_fp32.onnx, INT8 student (if qat ran) -> model.onnx, with parity.

Parity compares PyTorch and ONNX Runtime on the test set. An exporter bug that flips predictions is
caught here (top-1 agreement below ``cfg.min_top1_agreement`` is an error), not by a user in the field.
"""

from __future__ import annotations

import dataclasses
import os
import time

import hwkd
from hwkd import onnx_export as ox
from hwkd.artifacts import atomic_write
from hwkd.config import ExportConfig
from hwkd.errors import StageError
from hwkd.pipeline import PipelineState, RunContext, StageResult

FINAL_NAME = "model.onnx"
FP32_NAME = "model_fp32.onnx"
TOP_OPS = 8  # executed op types listed in the report


def run(state: PipelineState, cfg: ExportConfig, ctx: RunContext) -> tuple[PipelineState, StageResult]:
    ds = state.dataset
    meta = ox.onnx_metadata(hwkd.__version__, state.profile.name, ds)
    x = state.example_input
    fp32_path = ctx.run_dir / FP32_NAME
    final_path = ctx.run_dir / FINAL_NAME
    quantized = state.quantized is not None
    # Export into the stage dir first; only models that pass parity are moved into the run dir, so a
    # rejected export never sits where a deployer looks (it stays in stages/export/ for inspection).
    work = ctx.stage_dir("export")
    seconds: dict[str, float] = {}

    with ctx.progress.task("export to ONNX", total=4 if quantized else 2) as advance:
        t0 = time.perf_counter()
        ox.export_onnx(state.student, x, work / FP32_NAME, meta, cfg.opset, name="FP32 student")
        seconds["fp32"] = round(time.perf_counter() - t0, 2)
        advance()
        par = {"fp32": ox.parity(state.student, work / FP32_NAME, ds.x_test)}
        advance()
        if quantized:
            t0 = time.perf_counter()
            ox.export_onnx(state.quantized, x, work / FINAL_NAME, meta, cfg.opset, name="INT8 student")
            seconds["int8"] = round(time.perf_counter() - t0, 2)
            advance()
            par["int8"] = ox.parity(state.quantized, work / FINAL_NAME, ds.x_test)
            advance()
    _check_parity(par, cfg.min_top1_agreement, ctx.rel(work))

    os.replace(work / FP32_NAME, fp32_path)
    if quantized:
        os.replace(work / FINAL_NAME, final_path)
    else:
        # No INT8 model: the final model is the FP32 one, byte for byte.
        atomic_write(final_path, fp32_path.read_bytes())

    executed = ox.ort_executed_ops(final_path)
    metrics = {
        "precision": "int8" if quantized else "fp32",
        "accuracy": ox.accuracy(final_path, ds.x_test, ds.y_test),
        "fp32_accuracy": ox.accuracy(fp32_path, ds.x_test, ds.y_test),
        "parity": par,
        "quant_nodes": ox.count_quant_nodes(final_path),
        "executed_ops": dict(executed.most_common(TOP_OPS)),
        "model_size_mb": round(ox.model_size_mb(final_path), 4),
        "fp32_model_size_mb": round(ox.model_size_mb(fp32_path), 4),
        "export_seconds": seconds,
        "opset": cfg.opset,
    }
    ctx.log.info(
        "export: %s model %.3f MiB, accuracy %.4f, parity %s",
        metrics["precision"],
        metrics["model_size_mb"],
        metrics["accuracy"],
        {k: v["top1_agreement"] for k, v in par.items()},
    )
    onnx_paths = {**state.onnx, "fp32": fp32_path}
    if quantized:
        onnx_paths["int8"] = final_path
    else:
        onnx_paths.pop("int8", None)  # a stale INT8 file from an earlier state is not this run's model
    result = StageResult(
        "export",
        metrics=metrics,
        artifacts={"model": ctx.rel(final_path), "model_fp32": ctx.rel(fp32_path)},
    )
    return dataclasses.replace(state, onnx=onnx_paths), result


def _check_parity(par: dict[str, dict[str, float]], minimum: float, kept_in: str) -> None:
    broken = {k: v for k, v in par.items() if v["top1_agreement"] < minimum}
    if not broken:
        return
    summary = ", ".join(
        f"{k}: top-1 agreement {v['top1_agreement']:.4f} (max |logit diff| {v['max_abs_diff']:.4g}, "
        f"{v['near_tie_disagreements']} of {v['disagreements']} disagreements on near ties)"
        for k, v in par.items()
    )
    raise StageError(
        f"ONNX export broke the {' and '.join(broken)} model's predictions: {summary}; "
        f"the minimum is {minimum:.4f}. The rejected files are kept in {kept_in}/ for inspection.",
        "This is usually an exporter or runtime bug for an operator in the model; try another opset "
        "(export.opset), or lower export.min_top1_agreement if the gap is expected.",
    )
