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
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def parse_teacher_weights(spec: str | list[float] | None, n_teachers: int) -> list[float] | str:
    """``None``/"equal" -> equal weights; "auto" stays "auto"; "0.6,0.4" or a list -> normalized floats."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "equal"):
        return [1.0 / n_teachers] * n_teachers
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return "auto"
    try:
        values = [float(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
    except (TypeError, ValueError):
        raise ConfigError(
            f"--teacher-weights {spec!r} is not a comma-separated list of numbers.",
            "Example: --teacher-weights 0.6,0.4 (or auto, from each teacher's validation accuracy).",
        ) from None
    if len(values) != n_teachers or any(v < 0 or v != v for v in values) or sum(values) <= 0:
        raise ConfigError(
            f"--teacher-weights {spec!r} must give {n_teachers} non-negative weight(s), not all zero, one "
            f"per --teacher.",
            "Example: --teacher-weights 0.6,0.4 for two teachers, or auto.",
        )
    total = sum(values)
    return [v / total for v in values]


def resolve_teacher_weights(spec, teachers, dataset) -> list[float]:
    """Teacher weights for KD; "auto" weighs each teacher by its validation accuracy above chance."""
    weights = parse_teacher_weights(spec, len(teachers))
    if weights != "auto":
        return weights
    from hwkd.kd.losses import accuracy_weights
    from hwkd.train import split_accuracy

    return accuracy_weights([split_accuracy(t, dataset, "val") for t in teachers], dataset.num_classes)


def compress(
    profile: str = "jetson",
    *,
    teacher: str | list[str] | None = None,
    teacher_arch: str | None = None,
    teacher_weights: str | list[float] | None = None,
    data: str | None = None,
    student: str | None = None,
    student_weights: str | None = None,
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
    ResNet teacher trained on first use and cached). ``teacher`` may be a list (multi-teacher KD);
    ``teacher_weights`` is a list, ``"0.6,0.4"``, ``"equal"`` (default) or ``"auto"`` (from each
    teacher's validation accuracy). ``teacher_arch`` / ``student`` name architectures: a zoo name,
    ``torchvision:NAME``, ``timm:NAME`` (the ``hwkd[vision]`` extra) or ``pkg.mod:fn`` (``trust_code``);
    ``student_weights`` is a state dict or hwkd checkpoint to start the student from.
    """
    import torch

    from hwkd import accel
    from hwkd.artifacts import save_model, write_json
    from hwkd.data import check_compatible, load_dataset
    from hwkd.data.checks import check_teachers
    from hwkd.hardware.budget import parse_latency, parse_memory, resolve_budget
    from hwkd.hardware.cost import estimate
    from hwkd.hardware.profiles import load_profile
    from hwkd.kd.losses import make_kd_loss
    from hwkd.models.loaders import build_student, load_teacher
    from hwkd.onnx.export import export_onnx, model_size_mb, onnx_metadata
    from hwkd.pipeline import PipelineState, Progress, RunContext, run_stages
    from hwkd.pipeline import log as default_log
    from hwkd.report.build import build_report, write_reports
    from hwkd.stages import get_stage
    from hwkd.stages.common import model_metrics, out_channels
    from hwkd.teacher import builtin_teacher

    started = time.time()
    # torchao logs a warning for each optional CUDA kernel library it cannot load on a CPU-only host.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from hwkd.quiet import quiet_torchao_import

    quiet_torchao_import()
    # Everything that can be checked without training is checked first, so bad input fails in seconds.
    cfg = resolve_config(config, overrides)
    prof = load_profile(profile)
    from hwkd.stages.export import check_precision

    cfg = check_precision(cfg, prof)  # --quant / --precision checked up front; fp16/fp32 skip qat
    if latency_budget is not None:
        parse_latency(latency_budget)
    if memory_budget is not None:
        parse_memory(memory_budget)
    device = accel.resolve_device(cfg.device)
    accel.check_amp(cfg.amp, device)
    run_dir = check_run_dir(out, overwrite)
    log = log or default_log
    progress = progress or Progress()
    torch.manual_seed(cfg.seed)

    teacher_sources = [teacher] if isinstance(teacher, str) else list(teacher or [])
    parse_teacher_weights(teacher_weights, max(1, len(teacher_sources)))  # fail before any training
    dataset = load_dataset(data, image_size, cfg.seed, cfg.data, teacher_arch, user_teacher=bool(teacher_sources))
    c = dataset.input_shape[0]
    if not teacher_sources:
        teacher_model, teacher_spec, teacher_info = builtin_teacher(
            dataset, cfg.seed, cfg.teacher, cfg.train, progress, log, device=device, amp=cfg.amp
        )
        teacher_models = [teacher_model]
    else:
        loaded = [load_teacher(src, teacher_arch, dataset.num_classes, c, trust_code) for src in teacher_sources]
        teacher_models = [m for m, _ in loaded]
        teacher_model, teacher_spec = loaded[0]
        teacher_info = {"source": teacher_sources[0]}
    for model in teacher_models:
        check_compatible(model, dataset)
    if teacher_sources:  # before any training: a teacher near chance means the preprocessing is wrong
        scores = check_teachers(teacher_models, teacher_sources, dataset, cfg.allow_weak_teacher, log)
        teacher_info["val_accuracy_check"] = scores
    weights = resolve_teacher_weights(teacher_weights, teacher_models, dataset)
    student_model, student_spec = build_student(
        student, teacher_model, teacher_spec, dataset.num_classes, c, trust_code, dataset.example_input(),
        weights=student_weights,
    )  # fmt: skip
    check_compatible(student_model, dataset)
    if "prune" in cfg.stages or cfg.distill.penalty_weight > 0:
        from hwkd.models.depgraph import unprunable_layers

        unprunable_layers(student_model, dataset.example_input(), check_groups=True)  # fails here, before training

    clear_run_dir(run_dir)
    ctx = RunContext(run_dir=run_dir, device=str(device), amp=cfg.amp, seed=cfg.seed, log=log, progress=progress,
                     train=cfg.train)  # fmt: skip
    teacher_cost = estimate(teacher_model, dataset.example_input(), prof, precision="fp32")
    budget = resolve_budget(
        prof,
        latency=latency_budget,
        memory=memory_budget,
        teacher_latency_ms=teacher_cost.latency_ms,
        teacher_memory_mb=teacher_cost.memory_mb,
        # the budget is for the deployed model: INT8 when QAT runs, so pruning estimates at that precision
        precision="int8" if "qat" in cfg.stages else "fp32",
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
            "teacher_weights": teacher_weights,
            "data": data,
            "student": student,
            "student_weights": student_weights,
            "image_size": image_size,
            "latency_budget": latency_budget,
            "memory_budget": memory_budget,
            "config": str(config) if config else None,
        },
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "dataset": dataset.summary(),
        "preprocessing": dataset.preprocessing.to_dict(),
        "device": str(device),
        "teacher": {"spec": teacher_spec, **{k: v for k, v in teacher_info.items() if k != "history"}},
        "teacher_weights": weights,
        "student_spec": student_spec,
        "budget": dataclasses.asdict(budget),
        "stage_seconds": {},
    }
    write_json(run_dir / "manifest.json", manifest)

    state = PipelineState(
        student=student_model,
        student_spec=student_spec,
        teachers=teacher_models,
        teacher_weights=weights,
        dataset=dataset,
        profile=prof,
        budget=budget,
        kd=make_kd_loss(cfg.distill.kd, cfg.distill.temperature, cfg.distill.alpha).logits_only(),
        channels={"student_initial": out_channels(student_model)},
    )
    metadata = onnx_metadata(__version__, prof.name, dataset)
    teacher_onnx = run_dir / "teacher.onnx"
    try:
        export_onnx(teacher_model, dataset.example_input(), teacher_onnx, {**metadata, "hwkd.role": "teacher"})
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
                state_now.student, dataset.example_input(), stage_dir / "model.onnx", {**metadata, "hwkd.stage": result.name}
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


BENCH_FORMAT = "hwkd.bench/1"


def parse_duration(text: str | float | None) -> float | None:
    """``"10s"``, ``"500ms"``, ``"2m"`` or a number of seconds -> seconds; None stays None."""
    import re

    if text is None or isinstance(text, int | float):
        return None if text is None else float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min)?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--duration {text!r} is not a positive duration.", "Examples: --duration 10s, 500ms, 2m.")
    scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, None: 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def benchmark(
    models: list[str | os.PathLike],
    *,
    profile: str | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
    batches: list[int] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    inputs: dict[str, str | os.PathLike] | None = None,
    warmup: int = 20,
    iterations: int = 200,
    duration: str | float | None = None,
    rounds: int = 5,
    seed: int = 0,
    advance=None,
    on_start=None,
) -> dict[str, Any]:
    """Time ONNX models with onnxruntime on this host, interleaved, and return a JSON-ready record.

    Execution providers and threads come from ``profile`` (its runtime section) unless ``providers`` /
    ``threads`` are given; EPs this onnxruntime lacks fall back to the CPU and are listed as missing.
    ``latency_ms`` at the top is the first model at the first batch (scripts that time one model read
    it directly); ``results`` has every (model, batch), with ``p50_ratio`` against the first model.

    Example::

        rec = hwkd.benchmark(["a.onnx", "b.onnx"], batches=[1, 8], shapes={"height": (640,)})
        print(rec["latency_ms"]["p50"], [r["p50_ratio"] for r in rec["results"]])
    """
    from hwkd.onnx import bench as ortbench

    if not models:
        raise ConfigError("hwkd bench needs at least one ONNX model.", "Example: hwkd bench model.onnx")
    for m in models:
        if not Path(m).is_file():
            raise ConfigError(f"ONNX model {str(m)!r} does not exist.", "Check the path.")
    prof = None
    if profile is not None:
        from hwkd.hardware.profiles import load_profile

        prof = load_profile(profile)
    eps = list(providers) if providers else list(prof.runtime.providers) if prof else [ortbench.CPU_EP]
    n_threads = threads if threads is not None else int(prof.runtime.threads) if prof else 0
    duration_s = parse_duration(duration)
    names = {Path(m): str(m) for m in models}
    results = ortbench.bench_models(
        list(names),
        batches=batches,
        shapes=shapes,
        input_files=inputs,
        warmup=warmup,
        iterations=iterations,
        duration_s=duration_s,
        rounds=rounds,
        providers=eps,
        threads=n_threads,
        seed=seed,
        advance=advance,
        on_start=on_start,
    )
    host = ortbench.host_info()
    first_p50: dict[int, float] = {run.batch: run.stats.p50 for run in results[0].runs}
    rows = []
    for mb in results:
        for run in mb.runs:
            row = {"model": names[mb.path], **run.to_dict()}
            row["peak_memory_mb"] = mb.memory["peak_mb"]
            row["file_size_mb"] = mb.file_size_mb
            base = first_p50.get(run.batch)
            row["p50_ratio"] = round(run.stats.p50 / base, 4) if base else None
            rows.append(row)
    used = results[0].providers[0] if results[0].providers else ortbench.CPU_EP
    record = {
        "format": BENCH_FORMAT,
        "hwkd_version": __version__,
        "latency_ms": rows[0]["latency_ms"],
        "note": f"measured on this host ({host['cpu']}, {used}, {results[0].threads} threads)"
        + (f", not on {prof.name}" if prof else ""),
        "profile": prof.name if prof else None,
        "budget": dataclasses.asdict(prof.budgets) if prof else None,
        "settings": {
            "warmup": warmup,
            "iterations": None if duration_s else iterations,
            "duration_s": duration_s,
            "rounds": rounds,
            "seed": seed,
            "batches": list(batches) if batches else None,
            "shapes": {k: list(v) for k, v in (shapes or {}).items()},
            "inputs": {k: str(v) for k, v in (inputs or {}).items()},
        },
        "models": [{"model": names[mb.path], **mb.to_dict()} for mb in results],
        "results": rows,
        "measured_on": host,
    }
    return record


def gate(
    report: str | os.PathLike,
    *,
    max_latency_ms: float | None = None,
    max_memory_mb: float | None = None,
    min_accuracy: float | str | None = None,
    baseline: str | os.PathLike | None = None,
    tolerance: float | str = "5%",
    accuracy_tolerance: float | str = "0.5%",
    source: str = "both",
    use_budget: bool = True,
):
    """Check a report.json (or a ``hwkd bench --json`` record) against budgets and a baseline.

    Returns a ``hwkd.report.gate.GateResult``; ``result.exit_code`` is 0 (passed) or 1 (a check failed).
    Bad input raises a HwkdError (exit 2).

    Example::

        result = hwkd.api.gate("runs/a/report.json", baseline="runs/main/report.json", tolerance="5%")
        assert result.exit_code == 0, [c.message for c in result.failed]
    """
    from hwkd.report import gate as gates

    current = gates.load_gate_input(report)
    base = gates.load_gate_input(baseline, "baseline") if baseline is not None else None
    return gates.run_gate(
        current,
        max_latency_ms=max_latency_ms,
        max_memory_mb=max_memory_mb,
        min_accuracy=gates.parse_fraction(min_accuracy, "--min-accuracy"),
        baseline=base,
        tolerance=gates.parse_fraction(tolerance, "--tolerance"),
        accuracy_tolerance=gates.parse_fraction(accuracy_tolerance, "--accuracy-tolerance"),
        source=source,
        use_budget=use_budget,
    )


def render_reports(run_dir: str | os.PathLike) -> list[Path]:
    """Regenerate report.md and report.html of a run dir from its report.json; returns the paths.

    Example: ``hwkd.api.render_reports("runs/demo")`` after editing or upgrading hwkd.
    """
    import json

    from hwkd.report.build import REPORT_FORMAT, write_reports

    run_dir = Path(run_dir)
    path = run_dir / "report.json" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise ConfigError(
            f"{str(path)!r} does not exist.", "Pass a run directory written by hwkd compress (it holds report.json)."
        )
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({exc}).") from exc
    missing = [k for k in ("teacher", "stages", "final", "profile", "dataset") if k not in report]
    if not isinstance(report, dict) or report.get("format", REPORT_FORMAT) != REPORT_FORMAT or missing:
        raise ConfigError(
            f"{str(path)!r} is not a hwkd run report (format {report.get('format')!r}, missing {missing}).",
            "Pass a run directory written by hwkd compress.",
        )
    return write_reports(path.parent, report, json_too=False)


def estimate(
    model: Any,
    profile: str | Any = "jetson",
    *,
    precision: str | None = None,
    example_input: Any = None,
    threads: int | None = None,
):
    """The cost model's estimate (latency, memory, MACs, params, per layer) of a model on a profile.

    ``model`` is a path to an ONNX file (precision detected from the graph unless given) or an
    ``nn.Module`` with ``example_input``. ``threads``: estimate at this many onnxruntime threads
    (default: the profile's); the Cost carries the profile's held-out error for that case.

    Example::

        cost = hwkd.estimate("runs/demo/model.onnx", "jetson")
        print(cost.latency_ms, cost.memory_mb)
    """
    from hwkd.hardware import cost as cost_model
    from hwkd.hardware.profiles import load_profile

    prof = load_profile(profile) if isinstance(profile, str | os.PathLike) else profile
    if isinstance(model, str | os.PathLike):
        return cost_model.estimate_onnx(model, prof, precision, threads=threads)
    if example_input is None:
        raise ConfigError("Estimating a torch module needs example_input.", "Pass a batch of one input.")
    works = cost_model.trace_torch(model, example_input)
    params = sum(p.numel() for p in model.parameters())
    return cost_model.price(works, prof, precision or "fp32", params=params, threads=threads)


def calibrate_profile(
    out: str | os.PathLike,
    *,
    name: str = "",
    quick: bool = False,
    threads: int = 0,
    overwrite: bool = False,
    log=None,
):
    """Measure this host with onnxruntime and write a complete profile TOML to ``out``; return the Profile.

    ``quick`` measures a handful of networks with few iterations (seconds, for tests); the default
    takes about two minutes on two cores.
    """
    from hwkd.artifacts import atomic_write
    from hwkd.hardware.calibrate import TINY, CalibrationSettings, calibrate
    from hwkd.hardware.profiles import dump_profile_toml, load_profile

    out = Path(out)
    if out.suffix != ".toml":
        raise ConfigError(f"--out {str(out)!r} must end in .toml.", "For example --out my-host.toml.")
    if out.exists() and not overwrite:
        raise ConfigError(f"{str(out)!r} already exists.", "Choose another --out, or pass --overwrite.")
    if threads < 0:
        raise ConfigError(f"--threads must be 0 (all usable cores) or positive, got {threads}.")
    settings = dataclasses.replace(TINY if quick else CalibrationSettings(), threads=threads)
    profile = calibrate(name=name or out.stem, settings=settings, log=log)
    profile = dataclasses.replace(profile, source=str(out))
    atomic_write(out, dump_profile_toml(profile))
    return load_profile(out)
