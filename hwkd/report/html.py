"""report.html: one self-contained page (inline CSS, plots as base64 SVG images, no scripts, no network)."""

from __future__ import annotations

import base64
import html
from typing import Any

from hwkd.report.markdown import (
    _mb,
    _ms,
    _num,
    _pct,
    bench_warnings,
    estimate_cell,
    estimate_note,
    memory_cell,
    model_rows,
)
from hwkd.report.plots import PLOTS

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111827;
       max-width: 1100px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.sub { color: #4b5563; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 4px 10px; text-align: right; }
th { background: #f9fafb; font-weight: 600; } td:first-child, th:first-child { text-align: left; }
tr.final td { font-weight: 600; background: #fef2f2; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 12px 0; }
.card { border: 1px solid #e5e7eb; border-radius: 8px; padding: 10px 14px; min-width: 150px; }
.card b { display: block; font-size: 20px; } .card span { color: #6b7280; font-size: 12px; }
.ok { color: #15803d; } .over { color: #b91c1c; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px; }
figure img { width: 100%; height: auto; } figcaption { color: #4b5563; font-size: 12px; }
.missing { color: #6b7280; font-style: italic; } footer { color: #6b7280; font-size: 12px; margin-top: 32px; }
"""

CAPTIONS = {
    "accuracy-latency": "Each stage's model: test accuracy against its onnxruntime p50 on this host. The dashed "
    "line is the profile's latency budget, which is for the target device.",
    "estimated-measured": "The cost model's latency for the profile's device against the host measurement; "
    "the ratio is in brackets. On the same hardware (a calibrated profile) points sit on the dotted line.",
    "channels": "Output channels of every conv / linear layer before and after structured pruning.",
    "size-memory": "ONNX file size; the cost model's memory (weights + peak live activations) on the device; "
    "the growth of the process peak RSS while onnxruntime loaded and warmed the model on this host.",
}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(svg: str, alt: str) -> str:
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/svg+xml;base64,{data}">'


def render_html(report: dict[str, Any]) -> str:
    t, f = report["teacher"], report["final"]
    prof, budget, host = report["profile"], report.get("budget") or {}, report.get("measured_on") or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>hwkd report: {_e(prof['name'])}</title><style>{CSS}</style></head><body>",
        f"<h1>hwkd report: {_e(prof['name'])}</h1>",
        f'<p class="sub">{_e(prof.get("description", ""))}. Dataset <b>{_e(report["dataset"].get("name"))}</b> '
        f"(input {_e(report['dataset'].get('input_shape'))}, {_e(report['dataset'].get('num_classes'))} classes). "
        f"Budget on the device: latency {_e(budget.get('latency_ms'))} ms, memory {_e(budget.get('memory_mb'))} MB.</p>",
    ]
    cards = [
        (_pct(f.get("accuracy")), f"final accuracy (teacher {_pct(t.get('accuracy'))})"),
        (f"{_ms(f.get('measured_latency_ms'))} ms", "final p50, measured on this host"),
        (f"{_ms(f.get('estimated_latency_ms'))} ms", f"estimated on {prof['name']}"),
    ]
    if f.get("speedup_vs_teacher"):
        cards.append((f"{f['speedup_vs_teacher']:.2f}x", "faster than the teacher (measured)"))
    if f.get("size_reduction_vs_teacher"):
        cards.append((f"{f['size_reduction_vs_teacher']:.2f}x", "smaller than the teacher (file)"))
    parts.append('<div class="cards">' + "".join(f"<div class=card><b>{_e(v)}</b><span>{_e(k)}</span></div>" for v, k in cards) + "</div>")
    bc = f.get("budget_check") or {}
    if bc.get("latency_within_budget") is not None:
        ok = bc["latency_within_budget"]
        parts.append(
            f'<p class="{"ok" if ok else "over"}">Estimated device latency {_ms(bc["estimated_latency_ms"])} ms is '
            f'{"within" if ok else "over"} the {_e(bc["latency_budget_ms"])} ms budget.</p>'
        )
    parts.append(f"<p>Latency <b>measured on this host</b>: {_e(host.get('note', 'not measured'))}.</p>")
    parts += [f'<p class="over"><b>Warning:</b> {_e(w)}</p>' for w in bench_warnings(report)]

    parts.append("<h2>Models</h2><table><tr>" + "".join(
        f"<th>{_e(h)}</th>" for h in ("model", "accuracy", "measured p50 ms (host)", "estimated ms (device)",
                                      "params", "MACs", "size MB", "est. memory MB", "peak memory MB (host)")
    ) + "</tr>")
    for name, m in model_rows(report):
        cls = ' class="final"' if name.startswith("final") else ""
        cells = (name, _pct(m.get("accuracy")), _ms(m.get("measured_latency_ms")), estimate_cell(m, budget),
                 _num(m.get("params")), _num(m.get("macs")), _mb(m.get("model_size_mb")),
                 memory_cell(m, budget), _mb(m.get("measured_memory_mb")))
        parts.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    note = estimate_note(report)
    if note:
        parts.append(f"<p>{_e(note)}</p>")

    parts.append('<h2>Plots</h2><div class="plots">')
    for key, fn, why_missing in PLOTS:
        svg = fn(report)
        if svg is None:
            parts.append(f'<figure id="{key}"><p class="missing">{_e(why_missing)}</p></figure>')
        else:
            parts.append(f'<figure id="{key}">{_img(svg, key)}<figcaption>{_e(CAPTIONS[key])}</figcaption></figure>')
    parts.append("</div>")

    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th><th>notes</th></tr>")
    for s in report["stages"]:
        d = s.get("details", {})
        notes = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in d.items() if isinstance(v, str | int | float) and not isinstance(v, bool)
        )
        parts.append(f"<tr><td>{_e(s['name'])}</td><td>{_e(s['seconds'])}</td><td style='text-align:left'>{_e(notes)}</td></tr>")
    parts.append("</table>")
    ch = report.get("channels") or {}
    if ch.get("before_prune") and ch.get("after_prune"):
        parts.append("<h2>Channels per layer</h2><table><tr><th>layer</th><th>before</th><th>after</th></tr>")
        for layer, before in ch["before_prune"].items():
            parts.append(f"<tr><td>{_e(layer)}</td><td>{_e(before)}</td><td>{_e(ch['after_prune'].get(layer, '–'))}</td></tr>")
        parts.append("</table>")
    v = report.get("versions", {})
    parts.append(
        "<footer>" + _e(", ".join(f"{k} {val}" for k, val in v.items()))
        + ("<br>host: " + _e(", ".join(
            str(x) for x in (
                host.get("cpu"),
                host.get("usable_cores") and f"{host['usable_cores']} usable cores",
                host.get("onnxruntime") and f"onnxruntime {host['onnxruntime']}",
            ) if x
        )) if host.get("cpu") else "")
        + "</footer></body></html>"
    )
    return "\n".join(parts) + "\n"
