"""Export stage: FP32 student -> model_fp32.onnx; the final model.onnx in the chosen precision.

INT8 (the default): hwkd's QAT model and onnxruntime's static PTQ of model_fp32.onnx (the peer, same
calibration images; every variant in hwkd.onnx.ptq.VARIANTS: ORT's defaults, the U8S8 types its docs
name for x86, and a labelled hwkd-tuned call) are all produced and compared, with the ops ORT really
executes for each; ``qat.method`` (``--quant qat|ptq|auto``) picks which becomes model.onnx, the others
stay beside it (model_qat.onnx, model_ptq*.onnx). FP16 (``--precision fp16``, GPU profiles):
model_fp32.onnx converted to FP16 with float32 inputs/outputs.

Parity compares PyTorch and ONNX Runtime on the test set. An exporter bug that flips predictions is
caught here: top-1 agreement below ``cfg.min_top1_agreement`` on the images where PyTorch has a clear
answer (near ties excluded, hwkd.onnx.check.NEAR_TIE) is an error, not something a user finds in the field.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

import hwkd
from hwkd.artifacts import atomic_write
from hwkd.config import ExportConfig
from hwkd.errors import ConfigError, StageError
from hwkd.onnx import check, ptq
from hwkd.onnx import export as ox
from hwkd.pipeline import PipelineState, RunContext, StageResult

FINAL_NAME = "model.onnx"
FP32_NAME = "model_fp32.onnx"
QAT_NAME = "model_qat.onnx"
PTQ_NAME = "model_ptq.onnx"
FP16_NAME = "model_fp16.onnx"
PRECISIONS = ("int8", "fp16", "fp32")
GPU_EPS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "DmlExecutionProvider", "ROCMExecutionProvider")
TOP_OPS = 8  # executed op types listed in the report


def check_precision(cfg, profile):
    """Check ``export.precision`` and ``qat.method`` up front; FP16/FP32 runs drop the qat stage.

    FP16 is for GPU profiles (a CUDA/TensorRT/DirectML/ROCm EP in ``runtime.providers``): on a CPU
    EP, FP16 runs slower than FP32, so asking for it on a CPU profile is an error, not a silent loss.
    """
    from hwkd.onnx import bench as ortbench
    from hwkd.stages.qat import quant_method

    quant_method(cfg.qat)
    if cfg.export.precision not in PRECISIONS:
        raise ConfigError(
            f"Unknown precision {cfg.export.precision!r} (export.precision / --precision).",
            f"Use one of: {', '.join(PRECISIONS)}.",
        )
    if cfg.export.precision == "fp16":
        eps = [ortbench.provider_name(p) for p in profile.runtime.providers]
        if not any(ep in GPU_EPS for ep in eps):
            raise ConfigError(
                f"--precision fp16 needs a GPU profile; {profile.name!r} runs on {', '.join(eps)}.",
                "Use --precision int8 for CPU profiles, or a profile whose runtime.providers list a GPU "
                "execution provider (e.g. jetson).",
            )
    if cfg.export.precision != "int8" and "qat" in cfg.stages:
        cfg = dataclasses.replace(cfg, stages=tuple(s for s in cfg.stages if s != "qat"))
    return cfg


def _calibration(ds, count: int, seed: int):
    """A fixed random subset of training images (float32 NCHW) that calibrates every PTQ variant."""
    return ds.sample("train", count, seed)[0].numpy()


def run(state: PipelineState, cfg: ExportConfig, ctx: RunContext) -> tuple[PipelineState, StageResult]:
    ds = state.dataset
    meta = ox.onnx_metadata(hwkd.__version__, state.profile.name, ds)
    x = state.example_input
    test_x = ds.eval_batches("test")  # a re-iterable DataLoader of (x, y)
    fp32_path = ctx.run_dir / FP32_NAME
    final_path = ctx.run_dir / FINAL_NAME
    # A quantized model without a recorded method comes from QAT (states built before --quant existed).
    method = state.quant_method or ("qat" if state.quantized is not None else None)
    int8 = cfg.precision == "int8" and method is not None
    qat = int8 and state.quantized is not None
    # Export into the stage dir first; only models that pass parity are moved into the run dir, so a
    # rejected export never sits where a deployer looks (it stays in stages/export/ for inspection).
    work = ctx.stage_dir("export")
    seconds: dict[str, float] = {}
    quant: dict = {}
    steps = 2 + (len(ptq.VARIANTS) + 2 if int8 else 0) + (cfg.precision == "fp16")

    with ctx.progress.task("export to ONNX", total=steps) as advance:
        t0 = time.perf_counter()
        earlier = state.exported.get(ox.export_key(state.student, cfg.opset))
        if earlier is not None and Path(earlier).is_file():
            # the same weights a training stage already exported (QAT trains a copy): copy, don't re-trace
            ox.copy_with_metadata(earlier, work / FP32_NAME, meta)
            reused = ctx.rel(Path(earlier))
        else:
            ox.export_onnx(state.student, x, work / FP32_NAME, meta, cfg.opset, name="FP32 student")
            reused = None
        seconds["fp32"] = round(time.perf_counter() - t0, 2)
        advance()
        par = {"fp32": check.parity(state.student, work / FP32_NAME, test_x)}
        advance()
        if qat:
            t0 = time.perf_counter()
            ox.export_onnx(state.quantized, x, work / QAT_NAME, meta, cfg.opset, name="INT8 student")
            seconds["int8"] = round(time.perf_counter() - t0, 2)
            par["int8"] = check.parity(state.quantized, work / QAT_NAME, test_x)
        if int8:
            advance()
            images = _calibration(ds, cfg.ptq_calibration_images, ctx.seed)
            for label in ptq.VARIANTS:
                t0 = time.perf_counter()
                ptq.quantize_ptq(
                    work / FP32_NAME, work / ptq_name(label), images, variant=label, reduce_range=state.reduce_range
                )
                seconds[label] = round(time.perf_counter() - t0, 2)
                advance()
            quant = _compare_int8(state, method, work, qat, ds, len(images))
            advance()
        if cfg.precision == "fp16":
            t0 = time.perf_counter()
            ox.convert_fp16(work / FP32_NAME, work / FP16_NAME)
            seconds["fp16"] = round(time.perf_counter() - t0, 2)
            par["fp16"] = check.parity(state.student, work / FP16_NAME, test_x)
            advance()
    _check_parity(par, cfg.min_top1_agreement, ctx.rel(work))

    os.replace(work / FP32_NAME, fp32_path)
    onnx_paths = {**state.onnx, "fp32": fp32_path}
    for label in ("int8", "qat", "fp16", *ptq.VARIANTS):
        onnx_paths.pop(label, None)  # a stale file from an earlier state is not this run's model
    if int8:
        chosen = quant["chosen"]
        files = {label: ptq_name(label) for label in ptq.VARIANTS}
        if qat:
            files = {"qat": QAT_NAME, **files}
        for label, name in files.items():
            target = final_path if label == chosen else ctx.run_dir / name
            os.replace(work / name, target)
            onnx_paths[label] = target
        onnx_paths["int8"] = final_path
        precision = "int8"
    elif cfg.precision == "fp16":
        os.replace(work / FP16_NAME, final_path)
        onnx_paths["fp16"] = final_path
        precision = "fp16"
    else:
        # No INT8 model: the final model is the FP32 one, byte for byte.
        atomic_write(final_path, fp32_path.read_bytes())
        precision = "fp32"

    executed = check.executed_summary(final_path)
    metrics = {
        "precision": precision,
        "accuracy": check.accuracy(final_path, test_x),
        "fp32_accuracy": check.accuracy(fp32_path, test_x),
        "parity": par,
        "quant_nodes": check.count_quant_nodes(final_path),
        "executed_ops": dict(list(executed["ops"].items())[:TOP_OPS]),
        "executed": executed,
        "model_size_mb": round(ox.model_size_mb(final_path), 4),
        "fp32_model_size_mb": round(ox.model_size_mb(fp32_path), 4),
        "export_seconds": seconds,
        "fp32_copied_from": reused,  # the stage export with the same weights, or None (exported here)
        "opset": cfg.opset,
    }
    if quant:
        metrics["quantization"] = quant
    ctx.log.info(
        "export: %s model %.3f MiB, accuracy %.4f, parity %s",
        metrics["precision"],
        metrics["model_size_mb"],
        metrics["accuracy"],
        {k: v["top1_agreement"] for k, v in par.items()},
    )
    artifacts = {"model": ctx.rel(final_path), "model_fp32": ctx.rel(fp32_path)}
    for label in ("qat", *ptq.VARIANTS):
        if label in onnx_paths and onnx_paths[label] != final_path:
            artifacts[f"model_{label}"] = ctx.rel(onnx_paths[label])
    result = StageResult("export", metrics=metrics, artifacts=artifacts)
    return dataclasses.replace(state, onnx=onnx_paths), result


def ptq_name(label: str) -> str:
    """model_ptq.onnx (ORT defaults), model_ptq_u8s8.onnx, model_ptq_tuned.onnx."""
    return f"model_{label}.onnx"


# Ties in validation accuracy go to the first of these: QAT was trained for INT8; among the PTQ
# variants, the ones ORT runs as integer kernels end to end on x86 come first.
PREFERENCE = ("qat", "ptq_u8s8", "ptq_tuned", "ptq")


def _compare_int8(state: PipelineState, method: str, work: Path, qat: bool, ds, n_calib: int) -> dict:
    """FP32 vs hwkd QAT vs each ORT PTQ variant (accuracy, size, agreement, what ORT executes) and the
    choice ``qat.method`` makes.

    ``auto`` keeps the most accurate INT8 model on the validation split (never the test split, which
    reports the result) among those within the latency budget; ``ptq`` the most accurate PTQ variant.
    All INT8 models have the student's architecture, so the cost model's INT8 estimate for the device
    is the same for all; the budget can rule out INT8 as a whole, not one of them.
    """
    from hwkd.hardware.cost import estimate

    test, val = ds.eval_batches("test"), ds.eval_batches("val")
    test_y = ds.targets("test").numpy()
    fp32_logits = check.onnx_predict(work / FP32_NAME, test)
    paths = {"fp32": work / FP32_NAME}
    if qat:
        paths["qat"] = work / QAT_NAME
    paths.update({label: work / ptq_name(label) for label in ptq.VARIANTS})
    models = {}
    for label, path in paths.items():
        logits = check.onnx_predict(path, test)
        models[label] = {
            "recipe": _recipe(label, state),
            "accuracy": float(np.mean(logits.argmax(1) == test_y)),
            "val_accuracy": check.accuracy(path, val),
            "model_size_mb": round(ox.model_size_mb(path), 4),
            "top1_agreement_with_fp32": float((logits.argmax(1) == fp32_logits.argmax(1)).mean()),
        }
        if label != "fp32":
            models[label]["executed"] = check.executed_summary(path)
    est = within = None
    if state.budget is not None:
        est = estimate(state.student, state.example_input, state.profile, precision="int8").latency_ms
        within = bool(est <= state.budget.latency_ms)
    budget_note = (
        "no latency budget"
        if est is None
        else f"INT8 estimate {est:.3f} ms on the device is {'within' if within else 'over'} the "
        f"{state.budget.latency_ms:g} ms budget (cost model)"
    )
    ptqs = [label for label in PREFERENCE if label in ptq.VARIANTS]
    if method == "auto":
        pool = [label for label in PREFERENCE if label in models]
        chosen = max(pool, key=lambda k: (models[k]["val_accuracy"], -pool.index(k)))
        why = "auto: highest validation accuracy (" + ", ".join(
            f"{k} {models[k]['val_accuracy']:.4f}" for k in pool
        ) + f"; ties go to {' > '.join(pool)}); {budget_note}"
    elif method == "qat" and qat:
        chosen, why = "qat", "--quant qat (hwkd quantization-aware distillation)"
    else:
        chosen = max(ptqs, key=lambda k: (models[k]["val_accuracy"], -ptqs.index(k)))
        why = ("--quant ptq" if method == "ptq" else "no QAT model") + (
            ": the onnxruntime static PTQ variant with the highest validation accuracy ("
            + ", ".join(f"{k} {models[k]['val_accuracy']:.4f}" for k in ptqs) + ")"
        )
    return {
        "method": method,
        "chosen": chosen,
        "selection": why,
        "estimated_int8_latency_ms": None if est is None else round(est, 4),
        "int8_within_budget": within,
        "calibration_images": n_calib,
        "reduce_range": bool(state.reduce_range),
        "ptq_recipe": {label: v.label for label, v in ptq.VARIANTS.items()},
        "models": models,
    }


def _recipe(label: str, state: PipelineState) -> str:
    if label == "fp32":
        return "FP32"
    if label == "qat":
        bits = " (7-bit weights, reduce_range)" if state.reduce_range else ""
        return f"hwkd QAT: uint8 activations, int8 per-channel symmetric weights{bits}"
    v = ptq.VARIANTS[label]
    rr = " + reduce_range" if v.host_reduce_range and state.reduce_range else ""
    return f"{v.label}{rr} [{v.by}]"


def _check_parity(par: dict[str, dict[str, float]], minimum: float, kept_in: str) -> None:
    """Each model must agree with PyTorch on ``minimum`` of the images where PyTorch has a clear
    answer (near ties excluded: hwkd.onnx.check.NEAR_TIE)."""
    broken = {k: v for k, v in par.items() if v["clear_top1_agreement"] < minimum}
    if not broken:
        return
    summary = ", ".join(
        f"{k}: top-1 agreement {v['clear_top1_agreement']:.4f} on the {v['clear_samples']} of {v['samples']} "
        f"images with a clear answer ({v['top1_agreement']:.4f} on all; max |logit diff| {v['max_abs_diff']:.4g}; "
        f"{v['near_tie_disagreements']} of {v['disagreements']} disagreements on near ties, "
        f"{v['near_tie_rule']})"
        for k, v in par.items()
    )
    raise StageError(
        f"ONNX export broke the {' and '.join(broken)} model's predictions: {summary}; "
        f"the minimum is {minimum:.4f}. The rejected files are kept in {kept_in}/ for inspection.",
        "This is usually an exporter or runtime bug for an operator in the model (or, for INT8 on x86 "
        "without VNNI, weight saturation: qat.reduce_range=on); try another opset (export.opset), or lower "
        "export.min_top1_agreement if the gap is expected.",
    )
