"""Where a calibrated kernel model's estimate of a model falls short, layer by layer: ORT's own per-node kernel
times (its profiler, 1 thread) against the profile's per-layer estimate, summed by kernel class and by the
layer's parameter count. For INT8 graphs, whose optimized nodes keep the name of the Conv they replace
(``node_Conv_12_token_3``); FP32's NCHWc nodes are renamed after their outputs and are not matched.

The profiler adds a few microseconds to every node, so small layers read slower than they run: read the
ratios of large classes, and the unmatched nodes (Transposes the INT8 graph adds, ops the trace does not
price) for what no layer accounts for. Writes benchmarks/results/node_vs_estimate<_tag>.{json,md}.

    python benchmarks/node_vs_estimate.py --export-224 /tmp/tv224 --profile benchmarks/results/host-calibrated-stop29.toml --tag stop29
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hwkd.artifacts import atomic_write  # noqa: E402
from hwkd.hardware.cost import price  # noqa: E402
from hwkd.hardware.nodeprofile import node_profile  # noqa: E402
from hwkd.hardware.onnx_trace import trace_onnx  # noqa: E402
from hwkd.hardware.profiles import load_profile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PARAM_BINS = (0, 3e4, 1e5, 3e5, 1e6, float("inf"))


def export_224(root: Path) -> list[Path]:
    """predictor_accuracy's torchvision/timm models at 224 px, INT8 as it quantizes them (kept if already there)."""
    import predictor_accuracy as pa
    import torch

    from hwkd.onnx.export import export_onnx

    root.mkdir(parents=True, exist_ok=True)
    paths, rng = [], np.random.default_rng(0)
    for name in pa.TORCHVISION + pa.TIMM:
        int8 = root / f"{name}-int8.onnx"
        if not int8.exists():
            fp32 = export_onnx(pa.build_224(name).eval(), torch.randn(1, 3, 224, 224), root / f"{name}-fp32.onnx", {}, name=name)
            pa.quantize(fp32, int8, rng)
        paths.append(int8)
    return paths


def kind_of(w) -> str:
    return w.kind + ("/grouped" if w.grouped else "")


def compare(path: Path, profile, runs: int) -> tuple[dict, list[dict]]:
    works, params, precision = trace_onnx(path)
    by_name = {w.name: w for w in works}
    estimate = price(works, profile, precision, params=params, threads=1)
    per_layer = {r["name"]: r for r in estimate.per_layer if r.get("bound") != "fused"}
    measured = node_profile(path, 1, runs=runs)
    classes: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    layers, matched = [], set()
    for node, info in measured["nodes"].items():
        name = node.split("_token_")[0]
        if name in per_layer:
            w, est_us = by_name[name], per_layer[name]["latency_ms"] * 1e3
            row = classes[kind_of(w)]
            layers.append({"model": path.stem, "layer": name, "kind": kind_of(w), "params": w.params,
                           "activations": w.act_in + w.act_out, "measured_us": info["us"], "estimated_us": est_us})  # fmt: skip
            matched.add(name)
        else:
            row, est_us = classes[f"unmatched {info['op']}"], 0.0
        row[0] += info["us"]
        row[1] += est_us
        row[2] += 1
    for name, r in per_layer.items():
        if name not in matched and r["latency_ms"] > 0:
            row = classes[f"estimated only: {kind_of(by_name[name])}"]
            row[1] += r["latency_ms"] * 1e3
            row[2] += 1
    summary = {"model": path.stem, "precision": precision, "run_us": round(measured["run_us"], 1),
               "kernels_us": round(sum(i["us"] for i in measured["nodes"].values()), 1),
               "estimated_us": round(estimate.latency_ms * 1e3, 1),
               "classes": {k: {"nodes": n, "measured_us": round(m, 1), "estimated_us": round(e, 1)}
                           for k, (m, e, n) in sorted(classes.items(), key=lambda kv: -kv[1][0])}}  # fmt: skip
    return summary, layers


def by_params(layers: list[dict]) -> list[dict]:
    """Matched MAC layers binned by parameter count: time-weighted estimated / measured."""
    rows = []
    for lo, hi in itertools.pairwise(PARAM_BINS):
        sel = [r for r in layers if lo <= r["params"] < hi and r["kind"] != "elementwise"]
        if sel:
            m, e = sum(r["measured_us"] for r in sel), sum(r["estimated_us"] for r in sel)
            rows.append({"params": f"{lo:.0f}-{hi:.0f}", "layers": len(sel), "measured_us": round(m, 1),
                         "estimated_us": round(e, 1), "ratio": round(e / m, 3)})  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="*")
    ap.add_argument("--export-224", type=Path, help="export predictor_accuracy's 224 px models (INT8) here and compare them")
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    paths = list(args.models) + (export_224(args.export_224) if args.export_224 else [])
    profile = load_profile(str(args.profile))
    models, layers = [], []
    for path in paths:
        summary, rows = compare(path, profile, args.runs)
        models.append(summary)
        layers += rows
        print(json.dumps({k: summary[k] for k in ("model", "run_us", "kernels_us", "estimated_us")}), flush=True)
    command = "python benchmarks/node_vs_estimate.py " + " ".join(sys.argv[1:])
    out = {"command": command, "models": models, "by_params": by_params(layers), "layers": layers}
    stem = RESULTS / f"node_vs_estimate{('_' + args.tag) if args.tag else ''}"
    atomic_write(stem.with_suffix(".json"), json.dumps(out, indent=1) + "\n")
    atomic_write(stem.with_suffix(".md"), markdown(out))
    return 0


def markdown(out: dict) -> str:
    lines = ["# node_vs_estimate", "", f"Command: `{out['command']}`. 1 thread; ORT profiler medians.", "",
             "| model | class | nodes | measured us | estimated us | est / measured |", "|---|---|---|---|---|---|"]  # fmt: skip
    for m in out["models"]:
        lines.append(f"| {m['model']} | **whole run** (kernels {m['kernels_us']}) | | {m['run_us']} | {m['estimated_us']} | "
                     f"{m['estimated_us'] / m['run_us']:.2f} |")  # fmt: skip
        for k, c in m["classes"].items():
            ratio = f"{c['estimated_us'] / c['measured_us']:.2f}" if c["measured_us"] else "-"
            lines.append(f"| | {k} | {c['nodes']} | {c['measured_us']} | {c['estimated_us']} | {ratio} |")
    lines += ["", "MAC layers of every model by parameter count (time-weighted):", "",
              "| params | layers | measured us | estimated us | est / measured |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['params']} | {r['layers']} | {r['measured_us']} | {r['estimated_us']} | {r['ratio']} |" for r in out["by_params"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
