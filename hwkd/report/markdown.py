"""report.md: the run in one page a reviewer can read in a pull request."""

from __future__ import annotations

# export and bench make no new model; their figures are the final model's, shown in the final row.
MODEL_STAGES = ("distill", "prune", "qat")


def _note(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _ms(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _num(x) -> str:
    if x is None:
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def _mb(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def model_rows(report: dict) -> list[tuple[str, dict]]:
    """``(row name, record)`` for the teacher, each stage that made a model, and the final model."""
    f = report["final"]
    rows = [("teacher", report["teacher"])]
    rows += [(f"after {s['name']}", s) for s in report["stages"] if s["name"] in MODEL_STAGES]
    rows.append((f"final ({f['precision']}, {f.get('path')})", f))
    return rows


def _estimate_mark(m: dict, budget: dict, key: str = "estimated_latency_ms") -> str:
    """`` (fp32)`` where a model's estimate is not at the budget's precision: the teacher and the FP32 stage
    models are priced as they are, while the budget is for the deployed (e.g. INT8) model; else ``""``."""
    prec = m.get("estimated_precision")
    differs = prec and m.get(key) is not None and prec != budget.get("precision", prec)
    return f" ({prec})" if differs else ""


def estimate_cell(m: dict, budget: dict) -> str:
    """A model's estimated ms, marked with its precision where that is not the budget's."""
    return f"{_ms(m.get('estimated_latency_ms'))}{_estimate_mark(m, budget)}"


def memory_cell(m: dict, budget: dict) -> str:
    """A model's estimated memory MB, marked like estimate_cell: an FP32 model's weights are 4x its INT8 ones."""
    return f"{_mb(m.get('estimated_memory_mb'))}{_estimate_mark(m, budget, 'estimated_memory_mb')}"


def estimate_note(report: dict) -> str | None:
    """What the precision marks of estimate_cell mean, when a row has one."""
    budget = report.get("budget") or {}
    if not any(_estimate_mark(m, budget, k) for _, m in model_rows(report)
               for k in ("estimated_latency_ms", "estimated_memory_mb")):
        return None
    relative = "of teacher" in str((budget.get("source") or {}).get("latency_ms", ""))
    return (f"Estimated ms and memory are at the budget's precision ({budget.get('precision')}) except where "
            "marked: a model marked fp32 is priced as the FP32 model it is at that point" + (
                "; the relative latency budget is a share of the teacher's fp32 estimate." if relative else "."))


def bench_warnings(report: dict) -> list[str]:
    """The bench stage's warnings (a p50 whose timing rounds moved), to print beside the measured latencies."""
    bench = next((s for s in report.get("stages", []) if s.get("name") == "bench"), None)
    return list(((bench or {}).get("details") or {}).get("warnings") or [])


def render_markdown(report: dict) -> str:
    t, f = report["teacher"], report["final"]
    prof, budget, host = report["profile"], report["budget"], report.get("measured_on", {})
    lines = [
        f"# hwkd report: {prof['name']}",
        "",
        f"Dataset **{report['dataset'].get('name')}** "
        f"(input {report['dataset'].get('input_shape')}, {report['dataset'].get('num_classes')} classes"
        + (f", training augmentation {report['dataset']['augment']}" if report["dataset"].get("augment") else "")
        + "). "
        f"Budget on the device: latency {budget['latency_ms']:.4g} ms "
        f"({budget.get('source', {}).get('latency_ms', 'profile')}), memory {budget['memory_mb']:.4g} MB, "
        f"batch {budget['batch_size']}, at {budget.get('precision', 'fp32')}.",
        *(("", f"Student: {report['student_note'].removeprefix('student: ')}.") if report.get("student_note") else ()),
        "",
        f"Latency **measured on this host**: {host.get('note', 'not measured')}.",
        "Estimated latency and memory are the cost model's figures for the profile's device; peak memory "
        "is the growth of the process peak RSS while onnxruntime loaded and warmed the model on this host.",
        "Plots: report.html.",
        *(line for w in bench_warnings(report) for line in ("", f"**Warning:** {w}")),
        "",
        "| model | accuracy | measured p50 ms (host) | estimated ms (device) | params | MACs | size MB "
        "| est. memory MB | peak memory MB (host) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name, m):
        return (
            f"| {name} | {_pct(m.get('accuracy'))} | {_ms(m.get('measured_latency_ms'))} | "
            f"{estimate_cell(m, budget)} | {_num(m.get('params'))} | {_num(m.get('macs'))} | "
            f"{_mb(m.get('model_size_mb'))} | {memory_cell(m, budget)} | "
            f"{_mb(m.get('measured_memory_mb'))} |"
        )

    for name, m in model_rows(report):
        lines.append(row(f"**{name}**" if name.startswith("final") else name, m))
    lines.append("")
    note = estimate_note(report)
    if note:
        lines += [note, ""]
    if f.get("speedup_vs_teacher"):
        lines.append(
            f"Final vs teacher: **{f['speedup_vs_teacher']:.2f}x faster** (measured p50, batch 1), "
            f"{f.get('size_reduction_vs_teacher', 0):.2f}x smaller, accuracy "
            f"{_pct(f['accuracy'])} vs {_pct(t['accuracy'])}."
        )
    bc = f.get("budget_check", {})
    if bc.get("latency_within_budget") is not None:
        verdict = "within" if bc["latency_within_budget"] else "**over**"
        lines.append(
            f"Estimated device latency {_ms(bc['estimated_latency_ms'])} ms is {verdict} the "
            f"{bc['latency_budget_ms']:.4g} ms budget."
        )
    lines += _quantization_section(report.get("quantization"))
    lines += ["", "## Stages", "", "| stage | seconds | notes |", "|---|---|---|"]
    for s in report["stages"]:
        d = s.get("details", {})
        notes = ", ".join(
            f"{k}={_note(v)}" for k, v in d.items() if isinstance(v, str | int | float) and not isinstance(v, bool)
        )
        lines.append(f"| {s['name']} | {s['seconds']} | {notes} |")
    lines += _distill_terms(report)
    ch = report.get("channels", {})
    if "before_prune" in ch and "after_prune" in ch:
        lines += ["", "## Channels per layer (pruning)", "", "| layer | before | after |", "|---|---|---|"]
        for layer, before in ch["before_prune"].items():
            lines.append(f"| {layer} | {before} | {ch['after_prune'].get(layer, '–')} |")
    v = report.get("versions", {})
    lines += ["", "_" + ", ".join(f"{k} {val}" for k, val in v.items()) + "_", ""]
    return "\n".join(lines)


def _distill_terms(report: dict) -> list[str]:
    """Per-epoch KD loss terms of the distill stage (temperature, alpha, each loss term, validation)."""
    stage = next((s for s in report["stages"] if s["name"] == "distill"), None)
    rows = (stage or {}).get("history") or []
    if not rows:
        return []
    skip = {"epoch", "lr"}
    keys = [k for k in rows[0] if k not in skip and isinstance(rows[0][k], int | float)]
    out = ["", "## Distillation per epoch", "", "| epoch | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        out.append(f"| {r['epoch']} | " + " | ".join(_note(float(r[k])) if k in r else "–" for k in keys) + " |")
    return out


_QUANT_NAMES = {
    "fp32": "FP32 (model_fp32.onnx)",
    "qat": "hwkd QAT INT8",
    "ptq": "ORT PTQ, defaults (S8S8)",
    "ptq_u8s8": "ORT PTQ, U8S8 (docs, x86)",
    "ptq_tuned": "ORT PTQ, hwkd-tuned",
}


def _executed(e: dict | None) -> str:
    """'20 integer kernels, FP32: Conv 6, Add 3, 12 Transpose' from hwkd.onnx.check.executed_summary."""
    if not e:
        return "–"
    fp = ", ".join(f"{op} {n}" for op, n in e.get("float_compute", {}).items())
    return f"{e['integer_kernels']} integer kernels; FP32 compute: {fp or 'none'}; {e['transpose']} Transpose"


def _quantization_section(q: dict | None) -> list[str]:
    """FP32 vs hwkd QAT vs each ORT PTQ variant: accuracy, latency, size, what ORT runs, model.onnx."""
    if not q:
        return []
    lines = [
        "",
        "## INT8: hwkd QAT vs onnxruntime PTQ",
        "",
        f"Same FP32 source (model_fp32.onnx), {q.get('calibration_images')} calibration images for every PTQ "
        f"variant. model.onnx is **{q['chosen']}**: {q.get('selection')}.",
        "",
        "| model | accuracy (test) | accuracy (val) | agreement with FP32 | measured p50 ms (host) | size MB "
        "| what ORT executes (optimized graph) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, m in q["models"].items():
        name = _QUANT_NAMES.get(label, label) + (" ← model.onnx" if label == q["chosen"] else "")
        lines.append(
            f"| {name} | {_pct(m.get('accuracy'))} | {_pct(m.get('val_accuracy'))} | "
            f"{_pct(m.get('top1_agreement_with_fp32'))} | {_ms(m.get('measured_latency_ms'))} | "
            f"{_mb(m.get('model_size_mb'))} | {_executed(m.get('executed')) if label != 'fp32' else '–'} |"
        )
    recipes = [f"- {_QUANT_NAMES.get(k, k)}: {m['recipe']}" for k, m in q["models"].items() if m.get("recipe")]
    if recipes:
        lines += ["", "Recipes:", "", *recipes]
    par = q["models"].get("qat", {}).get("parity_vs_pytorch")
    if par:
        clear = par.get("clear_top1_agreement", par["top1_agreement"])
        lines += [
            "",
            f"Parity, PyTorch quantized model vs ONNX INT8 on {par['samples']} test images: top-1 agreement "
            f"**{_pct(clear)}** on the {par.get('clear_samples', par['samples'])} images with a clear answer "
            f"({_pct(par['top1_agreement'])} on all; near tie: {par.get('near_tie_rule', 'n/a')}), max |logit diff| "
            f"{par['max_abs_diff']:.4g}, {par['disagreements']} disagreements ({par['near_tie_disagreements']} on near ties).",
        ]
    return lines
