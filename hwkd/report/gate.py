"""CI gates: check a run's report.json (or a `hwkd bench --json` record) against budgets and a baseline.

Each gate is one ``Check`` with a value, a threshold and where the threshold came from (the profile's
budget, a flag, or the baseline within a tolerance). A check whose metric the report lacks is
skipped when its threshold is implied (a budget) and is bad input when a flag asked for it.
Exit codes (DESIGN.md): 0 every check passed, 1 a check failed, 2 bad input (HwkdError).

Example::

    result = run_gate(load_gate_input("runs/a/report.json"), max_latency_ms=2.0)
    print(result.exit_code, [c.name for c in result.failed])
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from hwkd.errors import ConfigError

REPORT_FORMAT = "hwkd.report/1"
BENCH_FORMAT = "hwkd.bench/1"
SOURCES = ("measured", "estimated", "both")


@dataclass(frozen=True)
class Subject:
    """One model whose metrics are gated: a run's final model, or one (model, batch) of a bench."""

    name: str
    metrics: dict[str, float | None]  # latency_ms, memory_mb (per source), accuracy, size_mb
    round_spread_pct: float | None = None  # how far the measured latency's timing rounds moved, %


@dataclass(frozen=True)
class GateInput:
    path: str
    kind: str  # "report" | "bench"
    subjects: list[Subject]
    budget: dict[str, Any] | None
    host: str


@dataclass
class Check:
    name: str
    subject: str
    metric: str
    value: float | None
    op: str  # "<=" or ">="
    threshold: float
    source: str  # where the threshold came from
    status: str = "passed"  # passed | failed | skipped
    message: str = ""


@dataclass
class GateResult:
    checks: list[Check]
    input: GateInput
    baseline: GateInput | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": not self.failed,
            "exit_code": self.exit_code,
            "report": self.input.path,
            "baseline": self.baseline.path if self.baseline else None,
            "checks": [asdict(c) for c in self.checks],
            "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------- parsing


def parse_fraction(text: str | float | None, flag: str) -> float | None:
    """``"5%"`` -> 0.05, ``"0.05"`` -> 0.05; a bare number above 1 is refused as ambiguous."""
    if text is None or isinstance(text, int | float):
        return None if text is None else float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", str(text))
    value = float(m.group(1)) / (100 if m.group(2) else 1) if m else math.nan
    if not m or not 0 <= value <= 1:
        raise ConfigError(
            f"{flag} {text!r} is not a fraction or a percentage between 0 and 100%.",
            f"Examples: {flag} 5% or {flag} 0.05.",
        )
    return value


def _read_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"The {what} {str(path)!r} does not exist.", "Pass the report.json of a hwkd run.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The {what} {str(path)!r} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"The {what} {str(path)!r} is not a JSON object.")
    return data


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def load_gate_input(path: str | Path, what: str = "report") -> GateInput:
    """Read a run's report.json or a ``hwkd bench --json`` record into gateable subjects."""
    data = _read_json(path, what)
    fmt = data.get("format")
    host = str((data.get("measured_on") or {}).get("cpu", ""))
    if fmt == REPORT_FORMAT or (fmt is None and "final" in data):
        final = data.get("final")
        if not isinstance(final, dict):
            raise ConfigError(f"The {what} {str(path)!r} has no 'final' record.", "Regenerate it with hwkd compress.")
        metrics = {
            "latency_ms:measured": _num(final.get("measured_latency_ms")),
            "latency_ms:estimated": _num(final.get("estimated_latency_ms")),
            "memory_mb:measured": _num(final.get("measured_memory_mb")),
            "memory_mb:estimated": _num(final.get("estimated_memory_mb")),
            "accuracy": _num(final.get("accuracy")),
            "size_mb": _num(final.get("model_size_mb")),
        }
        spread = _num(final.get("measured_latency_round_spread_pct"))
        return GateInput(str(path), "report", [Subject("final", metrics, spread)], data.get("budget"), host)
    if fmt == BENCH_FORMAT:
        subjects = []
        for row in data.get("results") or []:
            lat = row.get("latency_ms") or {}
            metrics = {
                "latency_ms:measured": _num(lat.get("p50")),
                "memory_mb:measured": _num(row.get("peak_memory_mb")),
                "size_mb": _num(row.get("file_size_mb")),
            }
            name = f"{Path(str(row.get('model'))).name} (batch {row.get('batch')})"
            subjects.append(Subject(name, metrics, _num(row.get("round_spread_pct"))))
        if not subjects:
            raise ConfigError(f"The bench record {str(path)!r} has no results.")
        return GateInput(str(path), "bench", subjects, data.get("budget"), host)
    raise ConfigError(
        f"The {what} {str(path)!r} is neither a hwkd report.json nor a `hwkd bench --json` record "
        f"(format {fmt!r}).",
        "Pass runs/<name>/report.json, or the output of hwkd bench --json.",
    )


# ---------------------------------------------------------------------------------------------- checks


_LABEL = {
    "latency_ms": ("latency", "ms"),
    "memory_mb": ("memory", "MB"),
    "accuracy": ("accuracy", ""),
    "size_mb": ("model size", "MB"),
}
_SOURCE_LABEL = {"measured": "measured on host", "estimated": "estimated for device"}


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "–"
    if metric == "accuracy":
        return f"{100 * v:.2f}%"
    return f"{v:.4g} {_LABEL[metric.split(':')[0]][1]}"


def _metric_name(metric: str) -> str:
    base, _, source = metric.partition(":")
    label = _LABEL[base][0]
    if base == "latency_ms" and source == "measured":
        label = "latency p50"
    return f"{label} ({_SOURCE_LABEL[source]})" if source else label


def _check(subject: Subject, metric: str, op: str, threshold: float, source: str, explicit: bool, where: str) -> Check:
    value = subject.metrics.get(metric)
    name = f"{subject.name}: {_metric_name(metric)} {op} {_fmt(metric, threshold)} [{source}]"
    check = Check(name, subject.name, metric, value, op, threshold, source)
    if value is None:
        if explicit:
            raise ConfigError(
                f"{source} asks for the {_metric_name(metric)} of {subject.name}, but {where} does not have it.",
                "Drop the flag, or gate a report that measured it (the bench stage must have run).",
            )
        check.status, check.message = "skipped", f"{where} has no {_metric_name(metric)}"
        return check
    ok = value <= threshold if op == "<=" else value >= threshold
    check.status = "passed" if ok else "failed"
    check.message = f"{_metric_name(metric)} is {_fmt(metric, value)}, {'within' if ok else 'beyond'} {op} {_fmt(metric, threshold)}"
    return check


def run_gate(
    gate_input: GateInput,
    *,
    max_latency_ms: float | None = None,
    max_memory_mb: float | None = None,
    min_accuracy: float | None = None,
    baseline: GateInput | None = None,
    tolerance: float = 0.05,
    accuracy_tolerance: float = 0.005,
    source: str = "both",
    use_budget: bool = True,
) -> GateResult:
    """Every check for every subject. Flags override the budget; the baseline adds regression checks.

    Latency and memory are gated on ``source``: "measured" (onnxruntime on the host that made the
    report), "estimated" (the cost model's figure for the profile's device) or "both" (each figure the
    report has is a check of its own; a bench record has only measured ones). Regression: latency,
    memory and size may grow by ``tolerance`` (relative); accuracy may drop by ``accuracy_tolerance``
    (absolute, a fraction: 0.005 = half a point).
    """
    if source not in SOURCES:
        raise ConfigError(f"--source {source!r} is not one of {', '.join(SOURCES)}.")
    for flag, value in (("--max-latency-ms", max_latency_ms), ("--max-memory-mb", max_memory_mb)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} must be positive (got {value}).")
    if min_accuracy is not None and not 0 <= min_accuracy <= 1:
        raise ConfigError(f"--min-accuracy must be a fraction in [0, 1] or a percentage (got {min_accuracy}).")
    budget = (gate_input.budget or {}) if use_budget else {}
    where = gate_input.path
    # A bench record has only measured figures; a run report has both.
    sources = ["measured", "estimated"] if source == "both" else [source]
    if gate_input.kind == "bench":
        sources = ["measured"]
    checks: list[Check] = []
    for subject in gate_input.subjects:
        for base, flag, value in (
            ("latency_ms", "--max-latency-ms", max_latency_ms),
            ("memory_mb", "--max-memory-mb", max_memory_mb),
        ):
            threshold = value if value is not None else _num(budget.get(base))
            if threshold is None:
                continue
            tag = flag if value is not None else "profile budget"
            made = [_check(subject, f"{base}:{src}", "<=", threshold, tag, False, where) for src in sources]
            if value is not None and all(c.status == "skipped" for c in made):
                _check(subject, f"{base}:{sources[0]}", "<=", threshold, tag, True, where)  # raises: asked, absent
            checks += made
        if min_accuracy is not None:
            checks.append(_check(subject, "accuracy", ">=", min_accuracy, "--min-accuracy", True, where))

    notes: list[str] = []
    if baseline is not None:
        base_by_name = {s.name: s for s in baseline.subjects}
        matched = [s for s in gate_input.subjects if s.name in base_by_name]
        if not matched:
            raise ConfigError(
                f"The baseline {baseline.path!r} has none of the models in {where!r} "
                f"({', '.join(s.name for s in gate_input.subjects)} vs "
                f"{', '.join(base_by_name)}).",
                "Compare a run with a run, or a bench record with one of the same models.",
            )
        tag = f"baseline +{100 * tolerance:g}%"
        for subject in matched:
            base = base_by_name[subject.name]
            for metric in [f"{b}:{src}" for b in ("latency_ms", "memory_mb") for src in sources] + ["size_mb"]:
                ref = base.metrics.get(metric)
                if ref is not None:
                    checks.append(_check(subject, metric, "<=", ref * (1 + tolerance), tag, False, where))
            ref = base.metrics.get("accuracy")
            if ref is not None:
                tag_acc = f"baseline -{100 * accuracy_tolerance:g} points"
                checks.append(_check(subject, "accuracy", ">=", ref - accuracy_tolerance, tag_acc, False, where))
        for s in gate_input.subjects:
            if s.name not in base_by_name:
                notes.append(f"{s.name} is not in the baseline: no regression check for it.")
        if baseline.host and gate_input.host and baseline.host != gate_input.host and "measured" in sources:
            notes.append(
                f"The baseline was measured on another host ({baseline.host}) than this report "
                f"({gate_input.host}): latency ratios across hosts mean little."
            )
    notes += _speed_change_notes(gate_input.subjects, checks)
    if not checks:
        raise ConfigError(
            f"Nothing to gate in {where!r}: it carries no budget and no threshold was given.",
            "Pass --max-latency-ms, --max-memory-mb, --min-accuracy or --baseline OTHER.json.",
        )
    return GateResult(checks, gate_input, baseline, notes)


def _speed_change_notes(subjects: list[Subject], checks: list[Check]) -> list[str]:
    """A note for each subject whose measured latency was checked although its timing rounds disagreed."""
    from hwkd.onnx.bench import ROUND_SPREAD_WARN_PCT, speed_moved

    gated = {c.subject for c in checks if c.metric == "latency_ms:measured" and c.status != "skipped"}
    return [
        f"{s.name}: the measured latency's timing rounds differed by {s.round_spread_pct:.0f}% (more than "
        f"{ROUND_SPREAD_WARN_PCT:.0f}%): the host's speed changed while it was timed, so this latency verdict "
        "may not repeat. Gate on a quiet runner, or gate the estimate (--source estimated)."
        for s in subjects
        if s.name in gated and speed_moved(s.round_spread_pct)
    ]


# --------------------------------------------------------------------------------------------- outputs


def junit_xml(result: GateResult) -> str:
    """JUnit XML: one testcase per check, a <failure> for each failed one, <skipped> for skipped."""
    suite = ET.Element(
        "testsuite",
        name="hwkd gate",
        tests=str(len(result.checks)),
        failures=str(len(result.failed)),
        errors="0",
        skipped=str(sum(c.status == "skipped" for c in result.checks)),
    )
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", classname=f"hwkd.gate.{c.subject}", name=c.name)
        if c.status == "failed":
            fail = ET.SubElement(case, "failure", message=c.message, type="GateFailed")
            fail.text = f"{c.message} (threshold from {c.source}; report {result.input.path})"
        elif c.status == "skipped":
            ET.SubElement(case, "skipped", message=c.message)
    root = ET.Element("testsuites", name="hwkd gate", tests=suite.get("tests"), failures=suite.get("failures"))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def markdown_summary(result: GateResult) -> str:
    """A GitHub step summary: verdict, one table row per check, notes."""
    icon = {"passed": "✅", "failed": "❌", "skipped": "⏭️"}
    verdict = "passed" if not result.failed else f"**failed** ({len(result.failed)} of {len(result.checks)} checks)"
    lines = [
        f"### hwkd gate: {verdict}",
        "",
        f"Report `{result.input.path}`" + (f", baseline `{result.baseline.path}`" if result.baseline else "") + ".",
        "",
        "| | check | value | threshold | from |",
        "|---|---|---|---|---|",
    ]
    for c in result.checks:
        metric = c.metric
        lines.append(
            f"| {icon[c.status]} | {c.subject}: {_metric_name(metric)} {c.op} | {_fmt(metric, c.value)} | "
            f"{_fmt(metric, c.threshold)} | {c.source} |"
        )
    lines += [""] + [f"- {n}" for n in result.notes] + ([""] if result.notes else [])
    return "\n".join(lines) + "\n"
