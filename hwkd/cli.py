"""The ``hwkd`` command: parse flags, build a config, call hwkd.api, render with rich.

Heavy imports (torch, onnx) happen inside the commands, so ``hwkd --help`` is instant.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import tomllib
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
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


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
    profile: Annotated[str, typer.Option("--profile", "-p", help="Device profile name or path to a .toml.")] = "jetson",
    teacher: Annotated[
        str | None, typer.Option(help="Teacher: state dict (+ --teacher-arch), TorchScript file, or module:factory.")
    ] = None,
    teacher_arch: Annotated[str | None, typer.Option(help="Zoo architecture of a state-dict teacher.")] = None,
    data: Annotated[str | None, typer.Option(help="Image folder (one subfolder per class) or .npz with x/y.")] = None,
    student: Annotated[
        str | None, typer.Option(help="Zoo name, module:factory, or a width multiplier of the teacher (0.5x).")
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
        str | None, typer.Option(help="INT8 method: qat, ptq (onnxruntime static PTQ) or auto (more accurate).")
    ] = None,
    precision: Annotated[str | None, typer.Option(help="Final model precision: int8, fp16 (GPU profiles), fp32.")] = None,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Allow running module:factory code.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Reuse a non-empty --out directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final report as JSON on stdout.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    """Distill, prune, quantize (INT8 QAT), export to ONNX and benchmark a model for a device."""
    with handle_errors(debug):
        overrides = parse_sets(set_)
        if stages is not None:
            overrides["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
        if seed is not None:
            overrides["seed"] = seed
        if quant is not None:
            overrides.setdefault("qat", {})["method"] = quant
        if precision is not None:
            overrides.setdefault("export", {})["precision"] = precision
        from hwkd import api

        progress = RichProgress(err)
        if not as_json:
            err.print(f"[bold]hwkd {__version__}[/] compress  profile={profile}  data={data or 'embedded digits'}")
        result = api.compress(
            profile,
            teacher=teacher,
            teacher_arch=teacher_arch,
            data=data,
            student=student,
            out=out_dir,
            config=config,
            overrides=overrides,
            image_size=image_size,
            latency_budget=latency_budget,
            memory_budget=memory_budget,
            trust_code=trust_code,
            overwrite=overwrite,
            progress=progress,
            on_stage_done=lambda r, s=None: err.print(_stage_line(r), highlight=False),
        )
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
