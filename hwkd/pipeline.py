"""Runs the chosen stages in order, checkpoints after each, and records what each did.

A stage is ``run(state, cfg, ctx) -> (state, StageResult)``. Stages never print: they report through
``ctx.progress`` and ``ctx.log``, and the CLI renders.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwkd import distributed

log = logging.getLogger("hwkd")
TRAINING_STAGES = ("distill", "prune", "qat")  # what every torchrun rank runs; export and bench: rank 0


@dataclass
class PipelineState:
    """What flows between stages. Stages return a new state (dataclasses.replace) rather than mutate."""

    student: Any  # nn.Module, the current FP32 student
    student_spec: dict[str, Any]  # how to rebuild its unpruned architecture (see artifacts.save_model)
    teachers: list[Any]  # nn.Modules in eval mode
    teacher_weights: list[float]
    dataset: Any  # hwkd.data.Dataset
    profile: Any  # hwkd.hardware.profiles.Profile
    budget: Any  # hwkd.hardware.profiles.Budget (resolved, absolute)
    kd: Any = None  # hwkd.kd.losses.KDLoss used by distill and by prune recovery
    quantized: Any = None  # torchao-converted INT8 GraphModule, after qat
    quant_method: str | None = None  # qat | ptq | auto, set by the qat stage; None = no INT8 requested
    reduce_range: bool = False  # 7-bit INT8 weights (hosts without VNNI); the PTQ peer follows it
    onnx: dict[str, Path] = field(default_factory=dict)  # "teacher", "<stage>", "fp32", "int8" -> file
    checkpoints: dict[str, Path] = field(default_factory=dict)  # stage -> hwkd model checkpoint
    channels: dict[str, dict[str, int]] = field(default_factory=dict)  # snapshot -> layer -> out channels
    exported: dict[str, Path] = field(default_factory=dict)  # export_key (weights, opset) -> FP32 ONNX written
    budget_reach: dict[str, Any] | None = None  # prune.budget_reach of the student, when over budget at the start
    round_to: int = 0  # prune.round_to (0: the profile's channel_multiple), which the distill stage's plan penalty needs

    @property
    def example_input(self):
        return self.dataset.example_input()


@dataclass
class StageResult:
    name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # label -> path relative to the run dir
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch / step
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 2),
            **self.metrics,
            "artifacts": self.artifacts,
            "history": self.history,
        }


class Progress:
    """Progress reporting interface; the default does nothing (library use), the CLI draws rich bars."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """Yield ``advance(n=1, **fields)``; fields (loss, acc) may be shown beside the bar."""
        yield lambda n=1, **fields: None


@dataclass
class RunContext:
    run_dir: Path
    device: str = "cpu"  # where training runs (hwkd.accel.resolve_device); export and bench stay on the CPU
    amp: str = "off"
    seed: int = 0
    log: logging.Logger = log
    progress: Progress = field(default_factory=Progress)
    train: Any = None  # hwkd.config.TrainConfig shared by every training stage (None -> defaults)
    resume: bool = False  # a resumed run: training stages continue from stages/<stage>/last.pt
    stage: str | None = None  # the stage running now (named in divergence / interrupt messages)
    _checkpoints: dict[str, Any] = field(default_factory=dict, repr=False)

    def checkpoint(self, stage: str):
        """The stage's per-epoch checkpoint (hwkd.checkpoint.StageCheckpoint), read once when resuming."""
        if stage not in self._checkpoints:
            from hwkd.checkpoint import StageCheckpoint

            path = self.stage_dir(stage) / "last.pt"
            self._checkpoints[stage] = StageCheckpoint.load(path) if self.resume else StageCheckpoint(path)
        return self._checkpoints[stage]

    def earlier_seconds(self, stage: str) -> float:
        """Seconds ``stage`` ran in the launches before a resume (0 when it did not use a checkpoint)."""
        ckpt = self._checkpoints.get(stage)
        return ckpt.earlier_seconds if ckpt is not None else 0.0

    def stage_dir(self, stage: str) -> Path:
        path = self.run_dir / "stages" / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.run_dir))


StageFn = Callable[[PipelineState, Any, RunContext], tuple[PipelineState, StageResult]]


def run_stages(
    state: PipelineState,
    stages: list[tuple[str, StageFn, Any]],
    ctx: RunContext,
    on_stage_done: Callable[[StageResult, PipelineState], None] | None = None,
) -> tuple[PipelineState, list[StageResult]]:
    """Run ``(name, fn, cfg)`` stages in order; time each; call ``on_stage_done(result, state)`` after each."""
    results: list[StageResult] = []
    for name, fn, cfg in stages:
        ctx.log.info("stage %s: start", name)
        ctx.stage = name
        t0 = time.perf_counter()
        state, result = fn(state, cfg, ctx)
        earlier = ctx.earlier_seconds(name)  # a resumed stage: its time before the run was killed counts too
        result.seconds = time.perf_counter() - t0 + earlier
        if earlier:
            ctx.log.info("stage %s: done in %.1fs (%.1fs of it before the resume)", name, result.seconds, earlier)
        else:
            ctx.log.info("stage %s: done in %.1fs", name, result.seconds)
        results.append(result)
        if on_stage_done is not None:
            on_stage_done(result, state)
        if name in TRAINING_STAGES:  # torchrun: the other ranks wait while rank 0 writes its artifacts
            distributed.barrier()
    ctx.stage = None
    return state, results


# --- the orchestrator: build the state, run the stages, write the manifest; resume a run ----------------

def parse_teacher_weights(spec, n_teachers: int):
    """``None``/"equal" -> equal weights; "auto" stays "auto"; "0.6,0.4" or a list -> normalized floats."""
    from hwkd.errors import ConfigError

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


def versions() -> dict[str, str]:
    import platform

    import onnx
    import onnxruntime
    import torch
    import torch_pruning
    import torchao

    from hwkd import __version__

    return {
        "hwkd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "unknown"),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


@dataclass
class _Run:
    """Everything ``_execute`` needs, built the same way by a fresh and by a resumed run."""

    cfg: Any
    inputs: dict[str, Any]
    profile: Any
    device: Any
    dataset: Any
    teachers: list[Any]
    teacher_spec: dict[str, Any]
    teacher_info: dict[str, Any]
    weights: list[float]
    student: Any
    student_spec: dict[str, Any]
    student_note: str | None = None  # how a params:N% student's width was chosen


def _quiet_libraries() -> None:
    """Keep library chatter off the user's terminal: torchao's optional-CUDA-kernel warnings and the
    torch pytree deprecation message about its KernelPreference (hwkd.quiet filters only that one)."""
    from hwkd.quiet import quiet_torchao_import

    logging.getLogger("torchao").setLevel(logging.ERROR)
    quiet_torchao_import()


def _check_up_front(inputs: dict[str, Any], cfg):
    """Everything that can be checked without data or training: bad input fails in seconds."""
    from hwkd import accel
    from hwkd.hardware.budget import parse_latency, parse_memory
    from hwkd.hardware.profiles import load_profile
    from hwkd.stages.export import check_precision

    prof = load_profile(inputs["profile"])
    cfg = check_precision(cfg, prof)  # --quant / --precision checked up front; fp16/fp32 skip qat
    if inputs.get("latency_budget") is not None:
        parse_latency(inputs["latency_budget"])
    if inputs.get("memory_budget") is not None:
        parse_memory(inputs["memory_budget"])
    teachers = inputs.get("teacher")
    n = 1 if isinstance(teachers, str) else max(1, len(teachers or []))
    parse_teacher_weights(inputs.get("teacher_weights"), n)  # fail before any training
    device = accel.resolve_device(cfg.device)
    accel.check_amp(cfg.amp, device)
    return cfg, prof, device


def _build(inputs: dict[str, Any], cfg, prof, device, trust_code: bool, progress, log) -> _Run:
    """Load the data and the teacher(s), build the student: the same on a fresh and a resumed run."""
    import torch

    from hwkd.data import check_compatible, load_dataset
    from hwkd.data.checks import check_teachers
    from hwkd.errors import DivergedError
    from hwkd.models.loaders import build_student, load_teacher
    from hwkd.stages.common import channel_rounding
    from hwkd.teacher import builtin_teacher

    torch.manual_seed(cfg.seed)
    teacher = inputs.get("teacher")
    sources = [teacher] if isinstance(teacher, str) else list(teacher or [])
    arch = inputs.get("teacher_arch")
    dataset = load_dataset(inputs.get("data"), inputs.get("image_size"), cfg.seed, cfg.data, arch, user_teacher=bool(sources))
    c = dataset.input_shape[0]
    if not sources:
        try:
            model, spec, info = builtin_teacher(dataset, cfg.seed, cfg.teacher, cfg.train, progress, log,
                                                device=device, amp=cfg.amp)  # fmt: skip
        except DivergedError as exc:  # no run dir exists yet: there is nothing to resume
            raise DivergedError(exc.problem, f"Start again with a lower --set teacher.lr (now {cfg.teacher.lr:g}).",
                                epoch=exc.epoch, step=exc.step, lr=exc.lr) from None  # fmt: skip
        teachers = [model]
    else:
        loaded = [load_teacher(s, arch, dataset.num_classes, c, trust_code) for s in sources]
        teachers = [m for m, _ in loaded]
        spec, info = loaded[0][1], {"source": sources[0]}
    for model in teachers:
        check_compatible(model, dataset)
    if sources:  # before any training: a teacher near chance means the preprocessing is wrong
        info["val_accuracy_check"] = check_teachers(teachers, sources, dataset, cfg.allow_weak_teacher, log)
    weights = resolve_teacher_weights(inputs.get("teacher_weights"), teachers, dataset)
    # Seeded again so the student's initial weights do not depend on whether the teacher was cached
    # (training it draws from the same generator): a resumed run rebuilds exactly the same student.
    torch.manual_seed(cfg.seed)
    notes: list[str] = []
    student, student_spec = build_student(
        inputs.get("student"), teachers[0], spec, dataset.num_classes, c, trust_code, dataset.example_input(),
        weights=inputs.get("student_weights"), round_to=channel_rounding(cfg.prune.round_to, prof), log=notes.append,
        progress=progress,
    )  # fmt: skip
    for note in notes:  # "hwkd.note": the CLI prints these; library users get them as INFO records
        log.getChild("note").info("%s", note)
    check_compatible(student, dataset)
    if "prune" in cfg.stages or cfg.distill.penalty_weight > 0:
        from hwkd.models.depgraph import unprunable_layers

        unprunable_layers(student, dataset.example_input(), check_groups=True)  # fails here, before training
    return _Run(cfg, inputs, prof, device, dataset, teachers, spec, info, weights, student, student_spec,
                " ".join(notes) or None)  # fmt: skip


def compress(
    inputs: dict[str, Any],
    cfg,
    *,
    out=None,
    overwrite: bool = False,
    trust_code: bool = False,
    progress: Progress | None = None,
    on_stage_done=None,
    log: logging.Logger | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run every stage of ``cfg`` on ``inputs`` (see hwkd.api.compress) into a new run dir."""
    import datetime as _dt
    import sys

    from hwkd import __version__
    from hwkd.checkpoint import config_sha256, weights_fingerprint
    from hwkd.rundir import INPUT_KEYS, check_run_dir, clear_run_dir, input_fingerprints

    started = time.time()
    _quiet_libraries()
    inputs = {k: inputs.get(k) for k in INPUT_KEYS}
    inputs["config"] = str(inputs["config"]) if inputs.get("config") else None
    cfg, prof, device = _check_up_front(inputs, cfg)
    device = distributed.init_from_env(device)  # torchrun: join the group, one device per rank
    run_dir = check_run_dir(out, overwrite)
    distributed.barrier()  # every rank checked the run dir before rank 0 creates it
    log, progress, on_stage_done = _for_this_rank(log, progress, on_stage_done)
    run = _build(inputs, cfg, prof, device, trust_code, progress, log)
    if distributed.is_main():
        clear_run_dir(run_dir)
    distributed.barrier()
    manifest = {
        "status": "running",
        "hwkd_version": __version__,
        "command": sys.argv,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "inputs": {**inputs, "profile": prof.name, "profile_source": str(prof.source), "trust_code": trust_code},
        "fingerprints": {
            **input_fingerprints(inputs, str(prof.source)),
            "teacher_weights": weights_fingerprint(run.teachers),
        },
        "config": cfg.to_dict(),
        "config_sha256": config_sha256(cfg.to_dict()),
        "seed": cfg.seed,
        "world_size": distributed.world_size(),
        "versions": versions(),
        "dataset": run.dataset.summary(),
        "preprocessing": run.dataset.preprocessing.to_dict(),
        "device": str(device),
        "teacher": {"spec": run.teacher_spec, **{k: v for k, v in run.teacher_info.items() if k != "history"}},
        "teacher_weights": run.weights,
        "student_spec": run.student_spec,
        **({"student_note": run.student_note} if run.student_note else {}),
        "stage_seconds": {},
        "stages_done": [],
    }
    report = _execute(run, run_dir, manifest, progress, on_stage_done, log, resume=False)
    _finish(run_dir, manifest, started)
    return run_dir, report


def _for_this_rank(log, progress, on_stage_done):
    """Rank 0 reports; other torchrun ranks stay quiet (they train the same model)."""
    log = log or globals()["log"]
    if not distributed.is_main():
        return log, Progress(), None
    return log, progress or Progress(), on_stage_done


def resume(
    run_dir,
    *,
    overrides: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
    trust_code: bool = False,
    progress: Progress | None = None,
    on_stage_done=None,
    log: logging.Logger | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Continue a run from the last complete epoch of its unfinished stage, with its own config and inputs.

    Finished training stages replay from their last checkpoint (no epochs left to train); the
    unfinished one continues. ``overrides`` may change learning rates only (``distill.lr`` etc., e.g. to
    get past a divergence); ``inputs`` given again must equal the manifest's. Refuses, naming the
    difference, when an input file, the teacher's weights or the versions changed.
    """
    import json

    from hwkd.checkpoint import compare_fingerprints, config_sha256, weights_fingerprint
    from hwkd.config import PipelineConfig, merge
    from hwkd.errors import ConfigError
    from hwkd.rundir import (
        INPUT_KEYS,
        RESUMABLE,
        check_resume_overrides,
        check_same_inputs,
        input_fingerprints,
    )

    started = time.time()
    _quiet_libraries()
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: no manifest.json there.", "Pass a run dir hwkd compress wrote.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--resume: {str(path)!r} is not valid JSON ({exc}).") from exc
    status = manifest.get("status") if isinstance(manifest, dict) else None
    missing = [k for k in ("config", "inputs", "versions", "fingerprints", "stages_done") if k not in (manifest or {})]
    if missing and status in RESUMABLE:
        raise ConfigError(f"--resume: {str(path)!r} lacks {missing} (written by an older hwkd, or edited).",
                          "Start a new run with another --out (or --overwrite).")  # fmt: skip
    if status not in RESUMABLE:
        raise ConfigError(
            f"--resume {str(run_dir)!r}: the run's status is {status!r}; only a run that did not finish "
            f"({', '.join(RESUMABLE)}) can be resumed.",
            "Start a new run with another --out (or --overwrite).",
        )
    if config_sha256(manifest["config"]) != manifest.get("config_sha256"):
        raise ConfigError(
            f"--resume: the config in {str(path)!r} was edited after the run started.",
            "Change settings on resume with --set (learning rates only), or start a new run.",
        )
    check_resume_overrides(manifest["config"], overrides or {})
    cfg = PipelineConfig.from_dict(merge(manifest["config"], overrides or {}), f"{path} + --set")
    saved_inputs = {k: manifest["inputs"].get(k) for k in INPUT_KEYS}
    saved_inputs["profile"] = manifest["inputs"].get("profile_source") or manifest["inputs"]["profile"]
    check_same_inputs(manifest, inputs or {})
    now = versions()
    for key in ("hwkd", "torch", "torchao", "torch_pruning"):
        if manifest["versions"].get(key) != now[key]:
            raise ConfigError(
                f"--resume: {key} is {now[key]} now but the run started with {manifest['versions'].get(key)}; "
                "its checkpoints may not load the same way.",
                "Resume with the versions it started with, or start a new run.",
            )
    cfg, prof, device = _check_up_front(saved_inputs, cfg)
    prints = input_fingerprints(saved_inputs, str(prof.source))
    for key, value in prints.items():
        same = compare_fingerprints(manifest["fingerprints"].get(key), value)
        if same == "times":
            (log or logging.getLogger("hwkd")).warning(
                "--resume: the files of the %s input (%s) have new modification times but the same names and sizes "
                "as when the run started (copied, restored or re-synced?); resuming on them.",
                key, saved_inputs.get(key.split("[")[0]),
            )  # fmt: skip
        elif same != "same":
            raise ConfigError(
                f"--resume: the {key} input ({saved_inputs.get(key.split('[')[0]) or prof.source}) changed since the "
                "run started (its content fingerprint differs).",
                "Restore the file the run started with, or start a new run.",
            )
    device = distributed.init_from_env(device)
    log, progress, on_stage_done = _for_this_rank(log, progress, on_stage_done)
    # --trust-code is never taken from a manifest: a run dir from elsewhere must not run code unasked.
    run = _build(saved_inputs, cfg, prof, device, trust_code, progress, log)
    if weights_fingerprint(run.teachers) != manifest["fingerprints"].get("teacher_weights"):
        raise ConfigError(
            "--resume: the teacher's weights differ from those the run started with (for the built-in teacher: "
            "its cache was rebuilt differently).",
            "Restore the teacher (or $HWKD_CACHE) the run started with, or start a new run.",
        )
    manifest.setdefault("resumed", []).append(
        {"at": _now(), "status_before": status, "overrides": overrides or {}, "stages_done": list(manifest["stages_done"])}
    )
    manifest.update(status="running", config=cfg.to_dict(), config_sha256=config_sha256(cfg.to_dict()),
                    world_size=distributed.world_size())  # fmt: skip
    manifest.pop("error", None)
    report = _execute(run, run_dir, manifest, progress, on_stage_done, log, resume=True)
    _finish(run_dir, manifest, started)
    return run_dir, report


def _is_interrupt(exc: BaseException) -> bool:
    """True when ``exc`` comes from a Ctrl-C / SIGTERM: raised while handling one, or a DataLoader
    worker killed by the signal that stops the whole process group."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, KeyboardInterrupt):
            return True
        if isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc) and (
            "Terminated" in str(exc) or "Interrupt" in str(exc)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now().isoformat(timespec="seconds")


def _execute(run: _Run, run_dir: Path, manifest: dict, progress, on_stage_done, log, resume: bool) -> dict:
    """Budget, teacher export, the stages and the reports; the manifest says how far it got."""
    import dataclasses

    from hwkd import __version__
    from hwkd.artifacts import save_model
    from hwkd.errors import DivergedError
    from hwkd.hardware.budget import resolve_budget
    from hwkd.hardware.cost import estimate
    from hwkd.kd.losses import make_kd_loss
    from hwkd.onnx.export import export_key, export_onnx, model_size_mb, onnx_metadata
    from hwkd.report.build import build_report, write_reports
    from hwkd.stages import get_stage
    from hwkd.stages.common import model_metrics, out_channels

    cfg, dataset, prof, inputs = run.cfg, run.dataset, run.profile, run.inputs
    ctx = RunContext(run_dir=run_dir, device=str(run.device), amp=cfg.amp, seed=cfg.seed, log=log, progress=progress,
                     train=cfg.train, resume=resume)  # fmt: skip
    teacher_cost = estimate(run.teachers[0], dataset.example_input(), prof, precision="fp32")
    budget = resolve_budget(
        prof,
        latency=inputs.get("latency_budget"),
        memory=inputs.get("memory_budget"),
        teacher_latency_ms=teacher_cost.latency_ms,
        teacher_memory_mb=teacher_cost.memory_mb,
        # the budget is for the deployed model: INT8 when QAT runs, so pruning estimates at that precision
        precision="int8" if "qat" in cfg.stages else "fp32",
    )
    manifest["budget"] = dataclasses.asdict(budget)
    _write_manifest(run_dir, manifest)
    state = PipelineState(
        student=run.student,
        student_spec=run.student_spec,
        teachers=run.teachers,
        teacher_weights=run.weights,
        dataset=dataset,
        profile=prof,
        budget=budget,
        kd=make_kd_loss(cfg.distill.kd, cfg.distill.temperature, cfg.distill.alpha).logits_only(),
        channels={"student_initial": out_channels(run.student)},
        budget_reach=_budget_reach(run.student, dataset.example_input(), prof, budget, cfg, log),
        round_to=cfg.prune.round_to,
    )
    metadata = onnx_metadata(__version__, prof.name, dataset)
    teacher_onnx = run_dir / "teacher.onnx"
    try:
        if distributed.is_main():  # only rank 0 writes files
            export_onnx(run.teachers[0], dataset.example_input(), teacher_onnx, {**metadata, "hwkd.role": "teacher"})
            state.onnx["teacher"] = teacher_onnx
    except Exception as exc:  # a TorchScript teacher may not export; the run still goes on
        log.warning("teacher could not be exported to ONNX, so its latency is not measured: %s", exc)
    teacher_metrics = model_metrics(run.teachers[0], state)
    if teacher_onnx.exists():
        teacher_metrics["model_size_mb"] = model_size_mb(teacher_onnx)
    done_before = set(manifest["stages_done"])

    def after_stage(result, state_now):
        """Checkpoint the student after a training stage and export it for benchmarking (rank 0)."""
        if not distributed.is_main():
            return
        if result.name in done_before:  # replayed from its checkpoint: keep the time it really took
            result.seconds = manifest["stage_seconds"].get(result.name, result.seconds)
        manifest["stage_seconds"][result.name] = round(result.seconds, 2)
        if result.name in ("distill", "prune"):
            stage_dir = ctx.stage_dir(result.name)
            ckpt = save_model(stage_dir / "model.pt", state_now.student, state_now.student_spec)
            onnx_path = export_onnx(
                state_now.student, dataset.example_input(), stage_dir / "model.onnx", {**metadata, "hwkd.stage": result.name}
            )
            state_now.checkpoints[result.name] = ckpt
            state_now.onnx[result.name] = onnx_path
            state_now.exported[export_key(state_now.student)] = onnx_path
            result.artifacts.update({"checkpoint": ctx.rel(ckpt), "onnx": ctx.rel(onnx_path)})
            result.metrics["model_size_mb"] = model_size_mb(onnx_path)
        if result.name not in manifest["stages_done"]:
            manifest["stages_done"].append(result.name)
        _write_manifest(run_dir, manifest)
        if on_stage_done:
            on_stage_done(result)

    names = [n for n in cfg.stages if distributed.is_main() or n in TRAINING_STAGES]
    stages = [(name, get_stage(name), getattr(cfg, name)) for name in names]
    try:
        state, results = run_stages(state, stages, ctx, on_stage_done=after_stage)
    except DivergedError as exc:
        manifest.update(status="diverged", error=exc.problem, diverged={"stage": ctx.stage, "epoch": exc.epoch + 1})
        _write_manifest(run_dir, manifest)
        key = f"{ctx.stage}.lr" if ctx.stage in ("distill", "prune", "qat") else "distill.lr"
        lower = getattr(getattr(cfg, ctx.stage, cfg.distill), "lr", cfg.distill.lr) / 10
        raise DivergedError(
            exc.problem,
            f"The run dir is resumable: hwkd compress --resume {run_dir} --set {key}={lower:g} continues from "
            "the last good epoch with a lower learning rate.",
            epoch=exc.epoch, step=exc.step, lr=exc.lr,
        ) from None  # fmt: skip
    except KeyboardInterrupt as exc:
        manifest.update(status="interrupted", error=f"interrupted (Ctrl-C) during {ctx.stage}")
        _write_manifest(run_dir, manifest)
        exc.hwkd_run_dir = run_dir  # the CLI names it in the resume hint
        raise
    except BaseException as exc:
        if _is_interrupt(exc):  # e.g. the DataLoader's workers died of the same SIGTERM / Ctrl-C
            manifest.update(status="interrupted", error=f"interrupted during {ctx.stage}")
            _write_manifest(run_dir, manifest)
            stop = KeyboardInterrupt()
            stop.hwkd_run_dir = run_dir
            raise stop from None
        # The run dir stays for inspection, but its manifest says plainly that it did not finish.
        manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        _write_manifest(run_dir, manifest)
        raise
    if not distributed.is_main():
        return None  # rank 0 alone exports, benchmarks and reports
    report = build_report(
        run_dir=run_dir,
        profile=prof,
        budget=budget,
        dataset=dataset,
        teacher_metrics=teacher_metrics,
        results=results,
        state=state,
        versions=manifest["versions"],
        student_note=manifest.get("student_note"),
    )
    write_reports(run_dir, report)
    return report


def _budget_reach(student, example, prof, budget, cfg, log) -> dict | None:
    """Before any training: can budget pruning meet the budget at all? Said now, not after distillation.

    None when nothing prunes to the budget or the student already fits; else ``prune.budget_reach``'s answer,
    which the distill stage (penalty) and the prune stage (whether to prune) act on.
    """
    from hwkd.hardware.cost import estimate
    from hwkd.stages.common import channel_rounding
    from hwkd.stages.prune import budget_reach, fits, unreachable_message

    if "prune" not in cfg.stages or cfg.prune.mode != "budget":
        return None
    if fits(estimate(student, example, prof, budget.precision), budget):
        return None
    reach = budget_reach(student, example, prof, budget, channel_rounding(cfg.prune.round_to, prof))
    if not reach["reachable"] and distributed.is_main():  # every rank decides alike; one says so
        log.warning("%s", unreachable_message(reach))
    return reach


def _write_manifest(run_dir: Path, manifest: dict) -> None:
    from hwkd.artifacts import write_json

    if distributed.is_main():
        write_json(run_dir / "manifest.json", manifest)


def _finish(run_dir: Path, manifest: dict, started: float) -> None:
    main = distributed.is_main()
    if distributed.active():  # the other ranks are done after the training stages
        import torch.distributed as dist

        dist.destroy_process_group()
    if main:
        manifest.update(status="complete", finished=_now())
        manifest["wall_seconds"] = round(manifest.get("wall_seconds", 0.0) + time.time() - started, 1)
        _write_manifest(run_dir, manifest)
