"""The Python API the CLI is thin over. ``compress`` runs the whole pipeline and returns its report.

Example::

    import hwkd
    result = hwkd.compress(profile="jetson", out="runs/demo")
    print(result.report["final"]["accuracy"], result.run_dir)
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwkd import __version__
from hwkd.config import PipelineConfig, merge
from hwkd.errors import ConfigError
from hwkd.pipeline import (  # noqa: F401  (re-exported: the API's argument helpers live with the orchestrator)
    parse_teacher_weights,
    resolve_teacher_weights,
    versions,
)
from hwkd.rundir import check_run_dir  # noqa: F401


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
    ``student_weights`` is a state dict or hwkd checkpoint to start the student from. The
    orchestration lives in ``hwkd.pipeline``.
    """
    from hwkd import pipeline

    cfg = resolve_config(config, overrides)  # first: a bad number fails before anything loads
    inputs = {
        "profile": profile,
        "teacher": teacher,
        "teacher_arch": teacher_arch,
        "teacher_weights": teacher_weights,
        "data": data,
        "student": student,
        "student_weights": student_weights,
        "image_size": image_size,
        "latency_budget": latency_budget,
        "memory_budget": memory_budget,
        "config": config,
    }
    run_dir, report = pipeline.compress(
        inputs, cfg, out=out, overwrite=overwrite, trust_code=trust_code,
        progress=progress, on_stage_done=on_stage_done, log=log,
    )  # fmt: skip
    return CompressResult(run_dir=run_dir, report=report)


def resume(
    run_dir: str | os.PathLike,
    *,
    overrides: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
    trust_code: bool = False,
    progress=None,
    on_stage_done=None,
    log=None,
) -> CompressResult:
    """Continue an unfinished run (killed, Ctrl-C, diverged) from the last complete epoch.

    ``overrides`` may change learning rates only (e.g. ``{"distill": {"lr": 0.01}}`` after a
    divergence); ``inputs`` given again (profile, teacher, data, ...) must equal the run's.

    Example::

        hwkd.api.resume("runs/demo", overrides={"distill": {"lr": 0.01}})
    """
    from hwkd import pipeline

    run_dir, report = pipeline.resume(
        run_dir, overrides=overrides, inputs=inputs, trust_code=trust_code,
        progress=progress, on_stage_done=on_stage_done, log=log,
    )  # fmt: skip
    return CompressResult(run_dir=Path(run_dir), report=report)


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
    # This process's peak RSS was set by its own imports, so growth measured here is a lower bound; each
    # model's memory is measured in a fresh process instead (as the pipeline and calibration measure it,
    # and as the memory model predicts), at its largest batch. The in-process figure stays if that fails.
    for mb in results:
        fresh = mb.fresh_memory(warmup)
        if fresh.get("peak_mb") is not None:
            mb.memory = fresh
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
    warnings = [
        w for mb in results for run in mb.runs
        if (w := run.stats.speed_change_warning(names[mb.path] + (f" (batch {run.batch})" if len(mb.runs) > 1 else "")))
    ]  # fmt: skip
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
        "warnings": warnings,
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
    works = cost_model.trace_torch(model, example_input, precision or "fp32")
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
