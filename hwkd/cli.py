"""The ``hwkd`` command: parse flags, build a config, call hwkd.api, render with rich.

Heavy imports (torch, onnx) happen inside the commands, so ``hwkd --help`` is instant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hwkd import __version__
from hwkd.errors import ConfigError, HwkdError

app = typer.Typer(
    name="hwkd",
    help="Hardware-aware model compression: distill, prune, INT8 QAT, ONNX export, on-device budgets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
profiles_app = typer.Typer(help="List, show and calibrate device profiles.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")

err = Console(stderr=True)
out = Console()
_state = {"debug": False}


@contextlib.contextmanager
def handle_errors(debug: bool = False):
    """Bad input -> one paragraph on stderr and exit 2; tracebacks only with --debug."""
    try:
        yield
    except HwkdError as exc:
        if debug or _state["debug"]:
            err.print_exception()
        from rich.markup import escape  # a message may hold [shapes] that are not markup

        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        run_dir = getattr(exc, "hwkd_run_dir", None)
        hint = f"; the run is resumable: hwkd compress --resume {run_dir}" if run_dir else ""
        err.print(f"[yellow]interrupted[/]{hint}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler or torchrun stopping the job) stops a run like Ctrl-C: resumable, marked so."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _version(value: bool):
    if value:
        out.print(f"hwkd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
):
    _state["debug"] = debug


def parse_sets(items: list[str]) -> dict:
    """``--set distill.epochs=2`` -> {"distill": {"epochs": 2}}; values are TOML (strings may be bare)."""
    result: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE.", "Example: --set distill.epochs=2")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return result


def kd_overrides(overrides: dict, kd, temperature, temperature_schedule, alpha) -> dict:
    """Fold the KD flags into the ``distill`` overrides (flags win over --set and the recipe)."""
    flags = {"kd": kd, "temperature": temperature, "temperature_schedule": temperature_schedule, "alpha": alpha}
    flags = {k: v for k, v in flags.items() if v is not None}
    if not flags:
        return overrides
    return {**overrides, "distill": {**overrides.get("distill", {}), **flags}}


def run_overrides(overrides: dict, *, mean, std, resize, crop, interpolation, channel_order, device, amp,
                  allow_weak_teacher) -> dict:
    """Fold the preprocessing / device flags into the overrides (flags win over --set and the recipe)."""
    from hwkd.data.preprocess import parse_floats

    data = {
        "mean": list(parse_floats(mean, "--mean")) if mean is not None else None,
        "std": list(parse_floats(std, "--std")) if std is not None else None,
        "resize": resize,
        "crop": crop,
        "interpolation": interpolation,
        "channel_order": channel_order,
    }
    data = {k: v for k, v in data.items() if v is not None}
    out = dict(overrides)
    if data:
        out["data"] = {**out.get("data", {}), **data}
    if device is not None:
        out["device"] = device
    if amp is not None:
        out["amp"] = amp
    if allow_weak_teacher:
        out["allow_weak_teacher"] = True
    return out


class RichProgress:
    """hwkd.pipeline.Progress drawn with rich: one bar per training task, kept after it finishes."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(
            TextColumn("{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )

    @contextlib.contextmanager
    def task(self, description: str, total: int):
        task_id = self.bars.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields):
            info = "  ".join(f"{k} {v:.3f}" for k, v in fields.items() if isinstance(v, float))
            self.bars.update(task_id, advance=n, info=info)

        with self.bars:
            yield advance


class _ConsoleWarnings(logging.Handler):
    """The pipeline's warnings (logger "hwkd") as one marked paragraph each on stderr, not bare log lines."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape

        err.print(f"[bold yellow]warning[/]: {escape(record.getMessage())}", highlight=False, soft_wrap=True)


class _ConsoleNotes(logging.Handler):
    """What the pipeline decided for the user (logger "hwkd.note", e.g. the width a params:N% student got)."""

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape

        err.print(f"[cyan]note[/]: {escape(record.getMessage())}", highlight=False, soft_wrap=True)


def _show_warnings() -> None:
    logger = logging.getLogger("hwkd")
    if not any(isinstance(h, _ConsoleWarnings) for h in logger.handlers):
        logger.addHandler(_ConsoleWarnings())
    notes = logging.getLogger("hwkd.note")
    notes.setLevel(logging.INFO)
    if not any(isinstance(h, _ConsoleNotes) for h in notes.handlers):
        notes.addHandler(_ConsoleNotes(logging.INFO))


def _stage_line(result) -> str:
    m = result.metrics
    bits = [f"[bold green]✓[/] {result.name:<8}", f"{result.seconds:6.1f}s"]
    if m.get("accuracy") is not None:
        bits.append(f"acc {100 * m['accuracy']:.2f}%")
    if m.get("params") is not None:
        bits.append(f"params {m['params'] / 1e3:.1f}k")
    if m.get("model_size_mb") is not None:
        bits.append(f"{m['model_size_mb']:.3f} MB")
    for label, stats in (m.get("latency") or {}).items():
        bits.append(f"{label} {stats['p50']:.3f}ms")
    return "  ".join(bits)


@app.command()
def compress(
    profile: Annotated[
        str | None, typer.Option("--profile", "-p", help="Device profile name or path to a .toml (default jetson).")
    ] = None,
    teacher: Annotated[
        list[str] | None,
        typer.Option(help="Teacher: state dict (+ --teacher-arch), TorchScript file, or module:factory. Repeat for several."),
    ] = None,
    teacher_weights: Annotated[
        str | None, typer.Option(help="Weights of repeated --teacher: 0.6,0.4 | equal | auto (from val accuracy).")
    ] = None,
    kd: Annotated[
        str | None, typer.Option("--kd", help="KD loss: hinton, dkd, fitnet, at, rkd, sp, combined (hinton+at:500), or none.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="KD temperature T (the start T for schedules).")] = None,
    temperature_schedule: Annotated[
        str | None, typer.Option(help="constant | linear | adaptive | multi (see docs).")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="Weight of the soft (teacher) loss; 1 - alpha on the labels.")] = None,
    teacher_arch: Annotated[
        str | None,
        typer.Option(help="Architecture of a state-dict teacher: torchvision:NAME, timm:NAME, a zoo name, or module:factory."),
    ] = None,
    data: Annotated[str | None, typer.Option(help="Image folder (one subfolder per class) or .npz with x/y.")] = None,
    student: Annotated[
        str | None,
        typer.Option(help="torchvision:NAME, timm:NAME, a zoo name, module:factory, a width of the teacher (0.5x), or the widest width with at most a share of its parameters (params:10%)."),
    ] = None,
    student_weights: Annotated[
        Path | None, typer.Option(help="State dict (or hwkd checkpoint) to start the student from; default fresh.")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default runs/<time>).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Recipe TOML (same keys as --set).")] = None,
    stages: Annotated[str | None, typer.Option(help="Comma-separated subset of distill,prune,qat,export,bench.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a recipe key, e.g. distill.epochs=4.")] = [],  # noqa: B006
    image_size: Annotated[int | None, typer.Option(help="Resize images to this square size.")] = None,
    latency_budget: Annotated[str | None, typer.Option(help="e.g. 2.5ms or 30% (of the teacher).")] = None,
    memory_budget: Annotated[str | None, typer.Option(help="e.g. 16MB or 50% (of the teacher).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    quant: Annotated[
        str | None, typer.Option(help="INT8 method: qat, ptq (best onnxruntime static-PTQ variant) or auto (best of all on val).")
    ] = None,
    precision: Annotated[str | None, typer.Option(help="Final model precision: int8, fp16 (GPU profiles), fp32.")] = None,
    mean: Annotated[
        str | None, typer.Option(help="The teacher's normalisation mean per channel, e.g. 0.485,0.456,0.406.")
    ] = None,
    std: Annotated[str | None, typer.Option(help="The teacher's normalisation std, e.g. 0.229,0.224,0.225.")] = None,
    resize: Annotated[
        int | None, typer.Option(help="Resize images to NxN (with --crop: the shorter side to N, aspect kept).")
    ] = None,
    crop: Annotated[int | None, typer.Option(help="Center crop NxN after --resize (e.g. --resize 256 --crop 224).")] = None,
    interpolation: Annotated[str | None, typer.Option(help="Resize interpolation: bilinear | bicubic | nearest.")] = None,
    channel_order: Annotated[str | None, typer.Option(help="rgb | bgr (teachers trained on OpenCV-loaded images).")] = None,
    device: Annotated[str | None, typer.Option(help="Training device: auto | cpu | cuda | cuda:N | mps.")] = None,
    amp: Annotated[str | None, typer.Option(help="Mixed precision on CUDA: bf16 | fp16 | off.")] = None,
    allow_weak_teacher: Annotated[
        bool, typer.Option("--allow-weak-teacher", help="Go on when a teacher scores near chance on val.")
    ] = False,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Allow running module:factory code.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Reuse a non-empty --out directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final report as JSON on stdout.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue an unfinished run dir from its last complete epoch (--set *.lr only)."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    """Distill, prune, quantize (INT8 QAT), export to ONNX and benchmark a model for a device.

    Exit codes: 0 done; 1 a gate failed; 2 bad input; 3 training diverged (resumable); 130 interrupted.
    """
    with handle_errors(debug), sigterm_as_interrupt():
        overrides = parse_sets(set_)
        if stages is not None:
            overrides["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
        if seed is not None:
            overrides["seed"] = seed
        overrides = kd_overrides(overrides, kd, temperature, temperature_schedule, alpha)
        if quant is not None:
            overrides.setdefault("qat", {})["method"] = quant
        if precision is not None:
            overrides.setdefault("export", {})["precision"] = precision
        overrides = run_overrides(
            overrides,
            mean=mean,
            std=std,
            resize=resize,
            crop=crop,
            interpolation=interpolation,
            channel_order=channel_order,
            device=device,
            amp=amp,
            allow_weak_teacher=allow_weak_teacher,
        )
        from hwkd import api

        progress = RichProgress(err)
        _show_warnings()
        on_done = lambda r, s=None: err.print(_stage_line(r), highlight=False)  # noqa: E731
        if resume is not None:
            if out_dir is not None and Path(out_dir).resolve() != Path(resume).resolve():
                raise ConfigError("--resume continues the run in its own directory; leave --out out.")
            given = {
                "profile": profile, "teacher": teacher or None, "teacher_arch": teacher_arch,
                "teacher_weights": teacher_weights, "data": data, "student": student,
                "student_weights": str(student_weights) if student_weights else None, "config": config,
                "image_size": image_size, "latency_budget": latency_budget, "memory_budget": memory_budget,
            }  # fmt: skip
            if not as_json:
                err.print(f"[bold]hwkd {__version__}[/] compress --resume {resume}")
            result = api.resume(
                resume, overrides=overrides, inputs=given, trust_code=trust_code, progress=progress,
                on_stage_done=on_done,
            )  # fmt: skip
        else:
            profile = profile or "jetson"
            if not as_json:
                err.print(f"[bold]hwkd {__version__}[/] compress  profile={profile}  data={data or 'embedded digits'}")
            result = api.compress(
                profile,
                teacher=teacher or None,
                teacher_arch=teacher_arch,
                teacher_weights=teacher_weights,
                data=data,
                student=student,
                student_weights=str(student_weights) if student_weights else None,
                out=out_dir,
                config=config,
                overrides=overrides,
                image_size=image_size,
                latency_budget=latency_budget,
                memory_budget=memory_budget,
                trust_code=trust_code,
                overwrite=overwrite,
                progress=progress,
                on_stage_done=on_done,
            )
        if result.report is None:
            return  # a torchrun rank other than 0: rank 0 reports
        if as_json:
            print(json.dumps(result.report, indent=2, default=str))
        else:
            _print_summary(result)


def _print_summary(result) -> None:
    from rich.table import Table

    rep = result.report
    table = Table(title=f"hwkd: {rep['profile']['name']} ({rep['measured_on'].get('note', '')})")
    for col in ("model", "accuracy", "p50 ms (host)", "est. ms (device)", "params", "size MB"):
        table.add_column(col, justify="right" if col != "model" else "left")

    def fmt(m, key, f):
        v = m.get(key)
        return "–" if v is None else f(v)

    # export and bench produce no new model: their figures are the final model's, shown once below.
    rows = [("teacher", rep["teacher"])]
    rows += [(f"after {s['name']}", s) for s in rep["stages"] if s["name"] in ("distill", "prune", "qat")]
    rows.append((f"final ({rep['final']['precision']})", rep["final"]))
    for name, m in rows:
        table.add_row(
            name,
            fmt(m, "accuracy", lambda v: f"{100 * v:.2f}%"),
            fmt(m, "measured_latency_ms", lambda v: f"{v:.3f}"),
            fmt(m, "estimated_latency_ms", lambda v: f"{v:.3f}"),
            fmt(m, "params", lambda v: f"{v / 1e3:.1f}k"),
            fmt(m, "model_size_mb", lambda v: f"{v:.3f}"),
        )
    out.print(table)
    out.print(f"Run directory: [bold]{result.run_dir}[/] (report.md, report.json, model.onnx)")


@profiles_app.command("list")
def profiles_list(as_json: Annotated[bool, typer.Option("--json")] = False):
    """List the built-in device profiles."""
    with handle_errors():
        from hwkd.hardware.profiles import list_profiles

        profs = list_profiles()
        if as_json:
            print(json.dumps([p.to_dict() for p in profs], indent=2))
            return
        from rich.table import Table

        table = Table(title="Built-in device profiles")
        for col in ("name", "aliases", "cpu", "latency budget ms", "memory budget MB", "description"):
            table.add_column(col)
        for p in profs:
            table.add_row(
                p.name,
                ", ".join(p.aliases),
                f"{p.hardware.cpu_family} x{p.hardware.cpu_cores}",
                f"{p.budgets.latency_ms:g}",
                f"{p.budgets.memory_mb:g}",
                p.description,
            )
        out.print(table)


@profiles_app.command("show")
def profiles_show(
    name: Annotated[str, typer.Argument(help="Profile name, alias, or path to a .toml.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
):
    """Show one device profile."""
    with handle_errors():
        from hwkd.hardware.profiles import load_profile

        p = load_profile(name)
        if as_json:
            print(json.dumps(p.to_dict(), indent=2))
        else:
            out.print_json(json.dumps(p.to_dict()))


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of positive integers.", f"Example: {flag} 1,8")
    return values


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(help="ONNX model(s); several are timed interleaved and compared.")],
    profile: Annotated[
        str | None, typer.Option("--profile", "-p", help="Take execution providers, threads and budget from a profile.")
    ] = None,
    providers: Annotated[str | None, typer.Option(help="Execution providers, e.g. cuda,cpu (overrides the profile).")] = None,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (0 = all usable cores).")] = None,
    batch: Annotated[str | None, typer.Option("--batch", "-b", help="Batch size(s), e.g. 1,8.")] = None,
    shape: Annotated[
        list[str], typer.Option("--shape", help="NAME=1,3,640,640 (an input) or NAME=640 (a named dimension).")
    ] = [],  # noqa: B006
    input_: Annotated[list[str], typer.Option("--input", help="NAME=FILE.npy: feed real data to an input.")] = [],  # noqa: B006
    warmup: Annotated[int, typer.Option(help="Untimed runs per model and batch first.")] = 20,
    iterations: Annotated[
        int | None, typer.Option("--iterations", "-n", help="Timed runs per model and batch [default: 200].")
    ] = None,
    duration: Annotated[
        str | None, typer.Option(help="Time each model and batch for this long instead (10s, 500ms, 2m).")
    ] = None,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds the runs are split into.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    """Time ONNX models with onnxruntime on this host: p50/p90/p99, mean, std, throughput, memory."""
    with handle_errors(debug):
        from hwkd import api
        from hwkd.onnx.inputs import parse_input_flags, parse_shape_flags

        batches = _int_list(batch, "--batch")
        if iterations is not None and duration is not None:
            raise ConfigError("Give --iterations or --duration, not both.")
        iterations = 200 if iterations is None else iterations
        shapes = parse_shape_flags(shape)
        inputs = parse_input_flags(input_)
        eps = [p.strip() for p in providers.split(",") if p.strip()] if providers else None
        if as_json:
            record = api.benchmark(
                [str(m) for m in models], profile=profile, providers=eps, threads=threads, batches=batches,
                shapes=shapes, inputs=inputs, warmup=warmup, iterations=iterations, duration=duration,
                rounds=rounds, seed=seed,
            )
            print(json.dumps(record, indent=2))
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(TextColumn("benchmark"), BarColumn(), MofNCompleteColumn(), console=err, transient=True) as bar:
            task = bar.add_task("bench", total=None)
            record = api.benchmark(
                [str(m) for m in models], profile=profile, providers=eps, threads=threads, batches=batches,
                shapes=shapes, inputs=inputs, warmup=warmup, iterations=iterations, duration=duration,
                rounds=rounds, seed=seed,
                on_start=lambda total: bar.update(task, total=total),
                advance=lambda n: bar.advance(task, n),
            )
        _print_bench(record)


def _ms3(v: float) -> str:
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _print_bench(record: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    several = len(record["models"]) > 1
    table = Table(title=f"hwkd bench: {record['note']}")
    cols = ["model", "batch", "p50", "p90", "p99", "mean", "std", "items/s"]
    if several:
        cols.insert(3, "p50/1st")
    table.caption = "latencies in ms"
    for col in cols:
        if col == "model":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for r in record["results"]:
        lat = r["latency_ms"]
        cells = [r["model"], str(r["batch"])] + [_ms3(lat[k]) for k in ("p50", "p90", "p99", "mean", "std")]
        cells.append(f"{r['throughput_per_s']:.0f}")
        if several:
            cells.insert(3, f"{r['p50_ratio']:.2f}x")
        table.add_row(*cells)
    out.print(table)
    for m in record["models"]:
        shapes = "; ".join(f"{i['name']} {i['type'].removeprefix('tensor(').rstrip(')')} [{', '.join('?' if d is None else str(d) for d in i['dims'])}] ({i['fill']})"
                           for i in m["inputs"])
        mem = "–" if m["peak_memory_mb"] is None else f"{m['peak_memory_mb']:.1f} MB"
        line = (
            f"{m['model']}: {m['file_size_mb']:.3g} MB file, peak memory {mem}; providers "
            f"{', '.join(m['providers'])}, {m['threads']} threads; inputs {shapes}"
        )
        if m["providers_missing"]:
            line += f"; [yellow]not in this onnxruntime, fell back: {', '.join(m['providers_missing'])}[/]"
        out.print(line, highlight=False, soft_wrap=True)
    first = record["models"][0]
    s = record["settings"]
    runs = f"{s['duration_s']} s per model and batch" if s["duration_s"] else f"{s['iterations']} runs"
    out.print(
        f"{runs} after {s['warmup']} warm-up, in {record['results'][0]['rounds']} interleaved rounds. "
        f"Peak memory: {first['memory_method']}.",
        highlight=False, soft_wrap=True,
    )
    for warning in record.get("warnings", []):
        err.print(f"[bold yellow]warning[/]: {escape(warning)}", highlight=False, soft_wrap=True)


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (or its report.json).")],
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    """Regenerate report.md and report.html (plots embedded, no network) from a run's report.json."""
    with handle_errors(debug):
        from hwkd import api

        for path in api.render_reports(run_dir):
            out.print(f"wrote {path}", highlight=False)


@app.command()
def gate(
    report: Annotated[Path, typer.Argument(help="A run's report.json, or the output of hwkd bench --json.")],
    max_latency_ms: Annotated[float | None, typer.Option(help="Latency threshold (overrides the budget).")] = None,
    max_memory_mb: Annotated[float | None, typer.Option(help="Memory threshold (overrides the budget).")] = None,
    min_accuracy: Annotated[str | None, typer.Option(help="e.g. 0.98 or 98%.")] = None,
    baseline: Annotated[Path | None, typer.Option(help="Another report to check regressions against.")] = None,
    tolerance: Annotated[str, typer.Option(help="Allowed growth of latency/memory/size vs the baseline.")] = "5%",
    accuracy_tolerance: Annotated[str, typer.Option(help="Allowed accuracy drop vs the baseline (points).")] = "0.5%",
    source: Annotated[
        str, typer.Option(help="Gate latency/memory 'measured' (host), 'estimated' (device) or 'both'.")
    ] = "both",
    no_budget: Annotated[bool, typer.Option("--no-budget", help="Ignore the budget recorded in the report.")] = False,
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here (one testcase per check).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON on stdout.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    """Gate a report on budgets and a baseline: exit 0 pass, 1 a check failed, 2 bad input."""
    import os

    with handle_errors(debug):
        from hwkd import api
        from hwkd.artifacts import atomic_write
        from hwkd.report.gate import junit_xml, markdown_summary

        result = api.gate(
            report, max_latency_ms=max_latency_ms, max_memory_mb=max_memory_mb, min_accuracy=min_accuracy,
            baseline=baseline, tolerance=tolerance, accuracy_tolerance=accuracy_tolerance, source=source,
            use_budget=not no_budget,
        )
        if junit is not None:
            junit.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(junit, junit_xml(result))
        summary_path = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary_path:
            with open(summary_path, "a", encoding="utf-8") as fh:  # appended: other steps write there too
                fh.write(markdown_summary(result))
        if as_json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            mark = {"passed": "[green]PASS[/]", "failed": "[bold red]FAIL[/]", "skipped": "[yellow]SKIP[/]"}
            from rich.markup import escape

            for c in result.checks:
                out.print(f"{mark[c.status]} {escape(c.name)}: {escape(c.message)}", highlight=False, soft_wrap=True)
            for note in result.notes:
                out.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
            verdict = "[bold green]gate passed[/]" if not result.failed else (
                f"[bold red]gate failed[/]: {len(result.failed)} of {len(result.checks)} checks"
            )
            out.print(verdict)
    raise typer.Exit(result.exit_code)


def untrustworthy_calibration_warning(stability: dict) -> str:
    """Rich markup for a calibration that did not trust its own timings: the reasons, what to do (an idle
    host whose speed still moved is a VM sharing its cores; where the 1-thread reference probe held, say
    so: stop 28's VM flipped at 2 threads and held at 1) and where the profile records it. Brackets in the
    text are escaped, not read as markup."""
    from rich.markup import escape

    from hwkd.hardware.timing import OTHER_WORK

    reasons = stability.get("reasons", [])
    if "causes" in stability:
        idle = not set(stability["causes"]) & OTHER_WORK
    else:  # a profile written before causes were recorded (stop 29 and earlier): read its reasons' wording
        idle = not any("busy" in r or "other processes" in r for r in reasons)
    one = stability.get("spread_1thread_pct")
    tolerance = stability.get("tolerance_pct", 5.0)
    if not idle:
        advice = ""
    elif one is not None and one <= tolerance:
        advice = (
            f"; nothing else ran, yet its speed moved (a virtual machine sharing its cores), while the same probe "
            f"at 1 thread held within {one:.1f}%: calibrate with --threads 1 for figures that repeat"
        )
    elif one is not None:
        advice = f"; nothing else ran, and the probe moved at 1 thread too ({one:.1f}%): the host itself is unsteady"
    else:
        advice = (
            "; if nothing else ran, the host's speed moves on its own (a virtual machine sharing its cores) and a "
            "1-thread calibration (--threads 1) may hold steadier"
        )
    return (
        f"[bold yellow]warning[/]: this calibration is not trustworthy after {stability.get('attempts')} "
        f"attempt(s): {escape('; '.join(reasons))}. Calibrate again on an idle host{advice}. The spread is "
        f"recorded in the profile's {escape('[calibration.measured.stability]')}."
    )


@profiles_app.command("calibrate")
def profiles_calibrate(
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Profile file to write (.toml).")],
    name: Annotated[str | None, typer.Option(help="Profile name (default: the file's stem).")] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime threads; 0 = every usable core.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="A few networks only (seconds; rough figures).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    """Measure this host with onnxruntime and write a calibrated device profile. Run it on the target."""
    with handle_errors(debug):
        from hwkd import api

        prof = api.calibrate_profile(
            out_file, name=name or "", quick=quick, threads=threads, overwrite=overwrite,
            log=lambda msg: err.print(f"[dim]{msg}[/]", highlight=False),
        )  # fmt: skip
        fit = prof.calibration.get("measured", {})
        hw = prof.hardware
        peaks = ", ".join(f"{k} {v:.1f}" for k, v in hw.peak_gflops.items())
        out.print(
            f"Wrote [bold]{out_file}[/] ({prof.name}): peak GFLOP/s {peaks}; bandwidth {hw.memory_bandwidth_gbs:.1f} GB/s; "
            f"fit on {fit.get('fit_networks')} networks: MAPE {fit.get('fit_mape_pct')}%, "
            f"{100 * fit.get('fit_within_10pct', 0):.0f}% within 10%"
            + "".join(
                f"; {prec} cross-validated: MAPE {s['cv_mape_pct']}%, {100 * s['cv_within_10pct']:.0f}% within 10%"
                for prec, s in fit.get("fit", {}).items()
                if "cv_mape_pct" in s
            )
            + ".",
            highlight=False,
        )
        stability = fit.get("stability", {})
        if stability.get("trustworthy") is False:
            err.print(untrustworthy_calibration_warning(stability), highlight=False)


@app.command()
def estimate(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Device profile name or path to a .toml.")] = "jetson",
    precision: Annotated[
        str | None, typer.Option(help="fp32 | fp16 | int8 (default: detected from the graph).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="onnxruntime threads to estimate at (default: the profile's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    """Estimate latency, memory, MACs and params of an ONNX model on a device profile, per layer."""
    with handle_errors(debug):
        from hwkd import api
        from hwkd.hardware.profiles import load_profile

        prof = load_profile(profile)
        cost = api.estimate(model, prof, precision=precision, threads=threads)
        if as_json:
            print(json.dumps(cost.to_dict(), indent=2))
            return
        from rich.table import Table

        table = Table(title=f"{model.name} on {prof.name} ({cost.precision}, batch 1)")
        for col in ("layer", "op", "MACs", "params", "latency ms", "bound"):
            table.add_column(col, justify="left" if col in ("layer", "op", "bound") else "right")
        for row in cost.per_layer:
            table.add_row(
                row["name"], row["op"], f"{row['macs']:,}", f"{row['params']:,}", f"{row['latency_ms']:.4f}",
                row["bound"],
            )  # fmt: skip
        out.print(table)
        def expected(err_pct):
            return f"held-out error ±{err_pct:.1f}% MAPE" if err_pct is not None else "error unknown: not calibrated"

        out.print(
            f"latency_ms {cost.latency_ms:.4f} ({cost.threads} thread{'s' if cost.threads != 1 else ''}; "
            f"{expected(cost.latency_error_pct)})  memory_mb {cost.memory_mb:.3f} ({expected(cost.memory_error_pct)})  "
            f"macs {cost.macs:,}  params {cost.params:,}",
            highlight=False,
        )
        if cost.calibration_warning:
            err.print(f"[bold yellow]warning[/]: {prof.name}: {cost.calibration_warning}.", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
