"""The Python API the CLI is thin over. ``compress`` runs the whole pipeline and returns its report.

Example::

    import hwkd
    result = hwkd.compress(profile="jetson", out="runs/demo")
    print(result.report["final"]["accuracy"], result.run_dir)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from hwkd import __version__
from hwkd.config import PipelineConfig, merge
from hwkd.errors import ConfigError


@dataclass
class CompressResult:
    run_dir: Path
    report: dict[str, Any]


def load_recipe(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a recipe TOML (the same keys as PipelineConfig); errors name the file."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Recipe file {str(path)!r} does not exist.", "Check the --config path.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Recipe file {str(path)!r} is not valid TOML: {exc}.") from exc


def resolve_config(recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Built-in defaults < recipe file < CLI overrides, validated (unknown keys are errors)."""
    data = merge(load_recipe(recipe), overrides or {})
    where = f"recipe {recipe}" if recipe else "config"
    return PipelineConfig.from_dict(data, where)


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import torch_pruning
    import torchao

    return {
        "hwkd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "unknown"),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def check_run_dir(out: str | os.PathLike | None, overwrite: bool) -> Path:
    """The run dir to use; refuse to mix a new run into an old one unless told to. Creates nothing."""
    run_dir = Path(out) if out else Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {str(run_dir)!r} exists and is not a directory.", "Choose another --out.")
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"Run directory {str(run_dir)!r} already exists and is not empty.",
            "Choose another --out, or pass --overwrite to replace its contents.",
        )
    return run_dir


RUN_ARTIFACTS = ("manifest.json", "report.json", "report.md", "report.html", "model.onnx", "model_fp32.onnx", "teacher.onnx")
RUN_ARTIFACTS += ("model_qat.onnx", "model_ptq.onnx", "model_fp16.onnx")


def clear_run_dir(run_dir: Path) -> None:
    """Create the run dir, removing a previous run's artifacts so none can pass for this run's."""
    import shutil

    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_ARTIFACTS:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "stages", ignore_errors=True)


def compress(
    profile: str = "jetson",
    *,
    teacher: str | None = None,
    teacher_arch: str | None = None,
    data: str | None = None,
    student: str | None = None,
    out: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    image_size: int | None = None,
    latency_budget: str | None = None,
    memory_budget: str | None = None,
    trust_code: bool = False,
    overwrite: bool = False,
    progress=None,
    on_stage_done=None,
    log=None,
) -> CompressResult:
    """Distill, prune, quantize, export and benchmark a model for a device profile.

    With no ``teacher`` and ``data``, runs on the embedded default (scikit-learn digits and a built-in
    ResNet teacher trained on first use and cached).
    """
    import torch

    from hwkd.artifacts import save_model, write_json
    from hwkd.data import check_compatible, load_dataset
    from hwkd.hardware.budget import parse_latency, parse_memory, resolve_budget
    from hwkd.hardware.cost import estimate
    from hwkd.hardware.profiles import load_profile
    from hwkd.kd.losses import make_kd_loss
    from hwkd.models.loaders import build_student, load_teacher
    from hwkd.onnx_export import export_onnx, model_size_mb, onnx_metadata
    from hwkd.pipeline import PipelineState, Progress, RunContext, run_stages
    from hwkd.pipeline import log as default_log
    from hwkd.report.build import build_report, write_reports
    from hwkd.stages import get_stage
    from hwkd.stages.common import model_metrics, out_channels
    from hwkd.teacher import builtin_teacher

    started = time.time()
    # torchao logs a warning for each optional CUDA kernel library it cannot load on a CPU-only host.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    # Everything that can be checked without training is checked first, so bad input fails in seconds.
    cfg = resolve_config(config, overrides)
    prof = load_profile(profile)
    from hwkd.stages.export import check_precision

    cfg = check_precision(cfg, prof)  # --quant / --precision checked up front; fp16/fp32 skip qat
    if latency_budget is not None:
        parse_latency(latency_budget)
    if memory_budget is not None:
        parse_memory(memory_budget)
    run_dir = check_run_dir(out, overwrite)
    log = log or default_log
    progress = progress or Progress()
    torch.manual_seed(cfg.seed)

    dataset = load_dataset(data, image_size=image_size, seed=cfg.seed)
    c = dataset.input_shape[0]
    if teacher is None:
        teacher_model, teacher_spec, teacher_info = builtin_teacher(
            dataset, cfg.seed, cfg.teacher, cfg.train, progress, log
        )
    else:
        teacher_model, teacher_spec = load_teacher(teacher, teacher_arch, dataset.num_classes, c, trust_code)
        teacher_info = {"source": teacher}
    check_compatible(teacher_model, dataset)
    student_model, student_spec = build_student(
        student, teacher_model, teacher_spec, dataset.num_classes, c, trust_code, dataset.x_val[:1]
    )
    check_compatible(student_model, dataset)

    clear_run_dir(run_dir)
    ctx = RunContext(run_dir=run_dir, device=cfg.device, seed=cfg.seed, log=log, progress=progress, train=cfg.train)
    teacher_cost = estimate(teacher_model, dataset.x_val[:1], prof, precision="fp32")
    budget = resolve_budget(
        prof,
        latency=latency_budget,
        memory=memory_budget,
        teacher_latency_ms=teacher_cost.latency_ms,
        teacher_memory_mb=teacher_cost.memory_mb,
    )
    manifest = {
        "status": "running",
        "hwkd_version": __version__,
        "command": sys.argv,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "inputs": {
            "profile": prof.name,
            "profile_source": str(prof.source),
            "teacher": teacher,
            "teacher_arch": teacher_arch,
            "data": data,
            "student": student,
            "image_size": image_size,
            "latency_budget": latency_budget,
            "memory_budget": memory_budget,
            "config": str(config) if config else None,
        },
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "dataset": dataset.summary(),
        "teacher": {"spec": teacher_spec, **{k: v for k, v in teacher_info.items() if k != "history"}},
        "student_spec": student_spec,
        "budget": dataclasses.asdict(budget),
        "stage_seconds": {},
    }
    write_json(run_dir / "manifest.json", manifest)

    state = PipelineState(
        student=student_model,
        student_spec=student_spec,
        teachers=[teacher_model],
        teacher_weights=[1.0],
        dataset=dataset,
        profile=prof,
        budget=budget,
        kd=make_kd_loss(cfg.distill.kd, cfg.distill.temperature, cfg.distill.alpha),
        channels={"student_initial": out_channels(student_model)},
    )
    metadata = onnx_metadata(__version__, prof.name, dataset)
    teacher_onnx = run_dir / "teacher.onnx"
    try:
        export_onnx(teacher_model, dataset.x_val[:1], teacher_onnx, {**metadata, "hwkd.role": "teacher"})
        state.onnx["teacher"] = teacher_onnx
    except Exception as exc:  # a TorchScript teacher may not export; the run still goes on
        log.warning("teacher could not be exported to ONNX, so its latency is not measured: %s", exc)
    teacher_metrics = model_metrics(teacher_model, state)
    if teacher_onnx.exists():
        teacher_metrics["model_size_mb"] = model_size_mb(teacher_onnx)

    def after_stage(result, state_now):
        """Checkpoint the student after a training stage and export it for benchmarking."""
        manifest["stage_seconds"][result.name] = round(result.seconds, 2)
        if result.name in ("distill", "prune"):
            stage_dir = ctx.stage_dir(result.name)
            ckpt = save_model(stage_dir / "model.pt", state_now.student, state_now.student_spec)
            onnx_path = export_onnx(
                state_now.student, dataset.x_val[:1], stage_dir / "model.onnx", {**metadata, "hwkd.stage": result.name}
            )
            state_now.checkpoints[result.name] = ckpt
            state_now.onnx[result.name] = onnx_path
            result.artifacts.update({"checkpoint": ctx.rel(ckpt), "onnx": ctx.rel(onnx_path)})
            result.metrics["model_size_mb"] = model_size_mb(onnx_path)
        write_json(run_dir / "manifest.json", manifest)
        if on_stage_done:
            on_stage_done(result)

    stages = [(name, get_stage(name), getattr(cfg, name)) for name in cfg.stages]
    try:
        state, results = run_stages(state, stages, ctx, on_stage_done=after_stage)
    except BaseException as exc:
        # The run dir stays for inspection, but its manifest says plainly that it did not finish.
        manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        write_json(run_dir / "manifest.json", manifest)
        raise

    report = build_report(
        run_dir=run_dir,
        profile=prof,
        budget=budget,
        dataset=dataset,
        teacher_metrics=teacher_metrics,
        results=results,
        state=state,
        versions=manifest["versions"],
    )
    write_reports(run_dir, report)
    manifest.update(
        status="complete",
        finished=_dt.datetime.now().isoformat(timespec="seconds"),
        wall_seconds=round(time.time() - started, 1),
    )
    write_json(run_dir / "manifest.json", manifest)
    return CompressResult(run_dir=run_dir, report=report)
