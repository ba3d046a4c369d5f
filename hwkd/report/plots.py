"""The report's plots, drawn with matplotlib and returned as SVG text (embedded in report.html).

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot, so nothing touches
matplotlib's global backend or figure registry. Each function returns None when the report lacks the
data for its plot (e.g. no pruning stage), and the HTML says why instead.
"""

from __future__ import annotations

import io
from typing import Any

MODEL_STAGES = ("distill", "prune", "qat")
COLORS = {"teacher": "#6b7280", "distill": "#2563eb", "prune": "#16a34a", "qat": "#d97706", "final": "#dc2626"}


def model_points(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, color key, record)`` for the teacher, each stage that made a model, and the final."""
    points = [("teacher", "teacher", report["teacher"])]
    points += [(f"after {s['name']}", s["name"], s) for s in report["stages"] if s["name"] in MODEL_STAGES]
    final = report["final"]
    points.append((f"final ({final.get('precision', '?')})", "final", final))
    return points


def _merge_same(pts: list[tuple[str, str, dict[str, Any]]], xkey: str, ykey: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Points at the same spot (qat and final are often one model) become one point with both labels."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for lbl, key, m in pts:
        same = next((i for i, (_, _, o) in enumerate(out) if (o.get(xkey), o.get(ykey)) == (m.get(xkey), m.get(ykey))), None)
        if same is None:
            out.append((lbl, key, m))
        else:
            old_lbl, _, old = out[same]
            out[same] = (f"{old_lbl} = {lbl}", key, old)
    return out


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _svg(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "hwkd", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: the SVG goes inside HTML


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.25)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _wide_range(values: list[float]) -> bool:
    pos = [v for v in values if v and v > 0]
    return len(pos) > 1 and max(pos) / min(pos) > 20


def accuracy_vs_latency(report: dict[str, Any]) -> str | None:
    """Accuracy against measured p50 per stage, with the device latency budget as a vertical line."""
    pts = [(lbl, key, m) for lbl, key, m in model_points(report) if m.get("measured_latency_ms") and m.get("accuracy") is not None]
    pts = _merge_same(pts, "measured_latency_ms", "accuracy")
    if not pts:
        return None
    fig, ax = _figure(7.5, 4.2)
    xs = [m["measured_latency_ms"] for _, _, m in pts]
    for i, (lbl, key, m) in enumerate(pts):
        x, y = m["measured_latency_ms"], 100 * m["accuracy"]
        ax.scatter([x], [y], s=60, color=COLORS.get(key, "#111"), zorder=3, label=lbl, gid=f"point-{key}")
        # Alternate labels above and below: neighbouring stages often sit close together.
        ax.annotate(lbl, (x, y), textcoords="offset points", xytext=(6, 7 if i % 2 == 0 else -13), fontsize=8)
    ax.plot(xs, [100 * m["accuracy"] for _, _, m in pts], color="#9ca3af", lw=1, zorder=2)
    budget = (report.get("budget") or {}).get("latency_ms")
    if budget:
        ax.axvline(budget, color="#dc2626", ls="--", lw=1.2, gid="latency-budget")
        ax.annotate(f"latency budget {budget:g} ms (device)", (budget, 0.02), xycoords=("data", "axes fraction"),
                    rotation=90, ha="right", va="bottom", fontsize=8, color="#dc2626")
    if _wide_range(xs + ([budget] if budget else [])):
        ax.set_xscale("log")
    _style(ax, "Accuracy vs measured latency, per stage", "measured p50 latency on this host (ms)", "test accuracy (%)")
    ys = [100 * m["accuracy"] for _, _, m in pts]
    pad = max(0.5, (max(ys) - min(ys)) * 0.3)
    ax.set_ylim(min(ys) - pad, min(100.0, max(ys) + pad) + 0.2)
    return _svg(fig)


def estimated_vs_measured(report: dict[str, Any]) -> str | None:
    """The cost model's device estimate against the host measurement, with the y = x line."""
    pts = [
        (lbl, key, m) for lbl, key, m in model_points(report)
        if m.get("measured_latency_ms") and m.get("estimated_latency_ms")
    ]
    pts = _merge_same(pts, "measured_latency_ms", "estimated_latency_ms")
    if not pts:
        return None
    fig, ax = _figure(6.0, 4.4)
    xs = [m["measured_latency_ms"] for _, _, m in pts]
    ys = [m["estimated_latency_ms"] for _, _, m in pts]
    for (lbl, key, _), x, y in zip(pts, xs, ys, strict=True):
        ax.scatter([x], [y], s=60, color=COLORS.get(key, "#111"), zorder=3)
        ax.annotate(f"{lbl} ({y / x:.2g}x)", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
    lo, hi = min(xs + ys) / 1.5, max(xs + ys) * 1.5
    ax.plot([lo, hi], [lo, hi], color="#9ca3af", ls=":", lw=1, label="estimate = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    _style(ax, "Estimated (device) vs measured (host) latency", "measured p50 on this host (ms)",
           f"estimated on {report['profile']['name']} (ms)")
    return _svg(fig)


def channels_per_layer(report: dict[str, Any]) -> str | None:
    """Output channels of every conv/linear layer before and after pruning, as horizontal bars."""
    ch = report.get("channels") or {}
    before, after = ch.get("before_prune"), ch.get("after_prune")
    if not before or not after:
        return None
    layers = list(before)
    n = len(layers)
    fig, ax = _figure(7.5, max(2.5, 0.22 * n + 1.2))
    idx = list(range(n))
    h = 0.4
    ax.barh([i - h / 2 for i in idx], [before[k] for k in layers], height=h, color="#93c5fd", label="before pruning",
            gid="before")
    ax.barh([i + h / 2 for i in idx], [after.get(k, 0) for k in layers], height=h, color="#16a34a",
            label="after pruning", gid="after")
    ax.set_yticks(idx, layers, fontsize=7 if n > 20 else 8)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    kept = sum(after.get(k, 0) for k in layers) / max(1, sum(before.values()))
    _style(ax, f"Channels per layer (kept {100 * kept:.0f}% overall)", "output channels", "")
    ax.grid(True, axis="x", alpha=0.25)
    ax.grid(False, axis="y")
    return _svg(fig)


def size_and_memory(report: dict[str, Any]) -> str | None:
    """File size, estimated memory (device) and measured peak memory (host) per model, grouped bars."""
    pts = model_points(report)
    series = [
        ("model_size_mb", "ONNX file size", "#6b7280"),
        ("estimated_memory_mb", "estimated memory (device)", "#93c5fd"),
        ("measured_memory_mb", "measured peak memory (host)", "#2563eb"),
    ]
    series = [s for s in series if any(m.get(s[0]) is not None for _, _, m in pts)]
    if not series:
        return None
    fig, ax = _figure(7.5, 4.0)
    width = 0.8 / len(series)
    for j, (key, label, color) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(pts))]
        vals = [m.get(key) or 0 for _, _, m in pts]
        bars = ax.bar(xs, vals, width=width, color=color, label=label, gid=f"bars-{key}")
        for bar, (_, _, m) in zip(bars, pts, strict=True):
            v = m.get(key)
            if v is not None:
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7, textcoords="offset points", xytext=(0, 1))
    ax.set_xticks(range(len(pts)), [lbl for lbl, _, _ in pts], fontsize=8)
    mem_budget = (report.get("budget") or {}).get("memory_mb")
    top = max((m.get(k) or 0) for _, _, m in pts for k, _, _ in series)
    if mem_budget and mem_budget <= 3 * top:  # a budget far above every bar would squash them
        ax.axhline(mem_budget, color="#dc2626", ls="--", lw=1.2, label=f"memory budget {mem_budget:g} MB",
                   gid="memory-budget")
    ax.legend(fontsize=8, frameon=False)
    _style(ax, "Size and memory per model", "", "MB")
    ax.grid(False, axis="x")
    return _svg(fig)


PLOTS = (
    ("accuracy-latency", accuracy_vs_latency, "No model has both a measured latency and an accuracy."),
    ("estimated-measured", estimated_vs_measured, "No model has both an estimate and a measurement."),
    ("channels", channels_per_layer, "The prune stage did not run, so no channels changed."),
    ("size-memory", size_and_memory, "No size or memory figures were recorded."),
)
