"""How well does the cost model predict onnxruntime latency on the host it was calibrated on?

1. A varied set of models from hwkd's zoo, exported with hwkd's own exporter: plain (cnn), residual
   (resnet), depthwise + inverted residual (mobilenetv2); widths 0.5 / 1 / 2; inputs 32 / 64 / 96;
   FP32 and INT8 (onnxruntime static QDQ quantization).
2. ``hwkd profiles calibrate`` on this host: its kernel model is fitted to random synthetic networks
   only; the models of (1) are timed in the same interleaved rounds (p50 at batch 1) but not fitted,
   and timed once more after calibration, as a user who calibrates once and measures later would.
3. Every model estimated with
   - the cost model on the calibrated profile,
   - a MACs / peak baseline: 2 * MACs / (calibrated peak GFLOP/s at that precision),
   - the cost model on the uncalibrated built-in x86-avx2 profile (what you get without calibrating).

Writes benchmarks/results/predictor_accuracy.json and .md, and the calibrated profile beside them.

    python benchmarks/predictor_accuracy.py --threads 1   # ~5 min on an idle 2-core host
    python benchmarks/predictor_accuracy.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hwkd.artifacts import atomic_write, write_json
from hwkd.hardware.calibrate import CalibrationSettings, calibrate, quantize
from hwkd.hardware.cost import estimate_onnx
from hwkd.hardware.profiles import dump_profile_toml, load_profile
from hwkd.models.zoo import ZOO
from hwkd.onnx import bench as ortbench
from hwkd.onnx.export import export_onnx

RESULTS = Path(__file__).resolve().parent / "results"


def model_grid(quick: bool) -> list[tuple[str, float, int, int]]:
    """(arch, width, resolution, in_channels)."""
    if quick:
        return [("cnn", 1.0, 32, 1), ("resnet", 0.5, 32, 3), ("mobilenetv2", 1.0, 32, 3)]
    grid = []
    for arch in ("cnn", "resnet", "mobilenetv2"):
        for width in (0.5, 1.0, 2.0):
            for res in (32, 64, 96):
                grid.append((arch, width, res, 3))
    return grid


def errors(pred: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    rel = np.abs(pred / measured - 1.0)
    return {
        "within_10pct": round(float((rel <= 0.10).mean()), 3),
        "within_25pct": round(float((rel <= 0.25).mean()), 3),
        "mape_pct": round(float(rel.mean() * 100), 1),
        "median_ape_pct": round(float(np.median(rel) * 100), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = every usable core)")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--tag", default="", help="write results/predictor_accuracy_<tag>.* instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    settings = CalibrationSettings(threads=args.threads)
    if args.quick:
        settings = dataclasses.replace(settings, networks=4, iterations=10, warmup=3)
    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="hwkd-predictor-") as tmp:
        root = Path(tmp)
        paths = []
        print("exporting the models ...", flush=True)
        for arch, width, res, cin in model_grid(args.quick):
            model = ZOO.get(arch)(num_classes=10, in_channels=cin, width=width).eval()
            x = torch.randn(1, cin, res, res)
            label = f"{arch}-w{width:g}-r{res}"
            fp32 = export_onnx(model, x, root / f"{label}-fp32.onnx", {}, name=label)
            int8 = quantize(fp32, root / f"{label}-int8.onnx", rng)
            kind = {"cnn": "plain", "resnet": "residual", "mobilenetv2": "depthwise"}[arch]
            for path, prec in ((fp32, "fp32"), (int8, "int8")):
                paths.append(path)
                rows.append({"model": label, "kind": kind, "width": width, "resolution": res, "precision": prec,
                             "path": path})  # fmt: skip
        print("calibrating this host (the models timed in the same rounds, not fitted) ...", flush=True)
        t0 = time.time()
        interleaved: dict[Path, float] = {}
        host = calibrate(name="host-calibrated", settings=settings, log=lambda m: print("  " + m, flush=True),
                         also_time=paths, timings=interleaved)  # fmt: skip
        calibrate_s = time.time() - t0
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write(RESULTS / f"host-calibrated{'-' + args.tag if args.tag else ''}.toml", dump_profile_toml(host))
        builtin = load_profile("x86-avx2")
        builtin = dataclasses.replace(builtin, runtime=dataclasses.replace(builtin.runtime, threads=host.runtime.threads))
        print(f"timing {len(paths)} models again, after calibration ...", flush=True)
        later = ortbench.measure(
            paths, warmup=10, iterations=args.iterations, rounds=5, threads=host.runtime.threads, seed=0
        )
        for row in rows:
            path = row.pop("path")
            est = estimate_onnx(path, host, row["precision"])
            peak = host.hardware.peak_gflops[row["precision"]] * 1e9
            row.update(
                measured_p50_ms=round(interleaved[path], 4),
                later_p50_ms=round(later[path].p50, 4),
                estimated_ms=round(est.latency_ms, 4),
                macs_peak_ms=round(2 * est.macs / peak * 1e3, 4),
                builtin_profile_ms=round(estimate_onnx(path, builtin, row["precision"]).latency_ms, 4),
                macs=est.macs,
            )
    measured = np.array([r["measured_p50_ms"] for r in rows])
    later_ms = np.array([r["later_p50_ms"] for r in rows])
    summary = {}
    predictors = (
        ("estimated_ms", measured, "cost model, calibrated"),
        ("estimated_ms", later_ms, "cost model, calibrated; measured in a later run"),
        ("macs_peak_ms", measured, "MACs / peak, calibrated peak"),
        ("builtin_profile_ms", measured, "cost model, built-in x86-avx2 (uncalibrated)"),
    )
    for key, truth, label in predictors:
        pred = np.array([r[key] for r in rows])
        summary[label] = {
            "all": errors(pred, truth),
            **{p: errors(pred[m], truth[m]) for p in ("fp32", "int8")
               if (m := np.array([r["precision"] == p for r in rows])).any()},  # fmt: skip
        }
    # The ceiling any predictor can reach here: how well one timing of a model predicts the next
    summary["a second timing of the same model (repeatability)"] = {"all": errors(later_ms, measured)}
    drift = float(np.median(later_ms / measured))
    result = {
        "benchmark": "predictor_accuracy",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "host": ortbench.host_info(),
        "threads": host.runtime.threads,
        "models": len(rows),
        "calibration_seconds": round(calibrate_s, 1),
        "host_drift_later_over_calibration": round(drift, 3),
        "total_seconds": round(time.time() - started, 1),
        "calibrated_profile": host.to_dict(),
        "summary": summary,
        "rows": rows,
    }
    stem = f"predictor_accuracy_{args.tag}" if args.tag else "predictor_accuracy"
    write_json(RESULTS / f"{stem}.json", result)
    atomic_write(RESULTS / f"{stem}.md", render(result))
    print(render(result))
    return 0


def render(r: dict) -> str:
    h = r["host"]
    lines = [
        "# predictor_accuracy",
        "",
        f"Command: `python benchmarks/{r['command']}`. Host: {h['cpu']} ({h['usable_cores']} usable cores, "
        f"{r['threads']} onnxruntime threads), onnxruntime {h['onnxruntime']}, 1-min load average at the end "
        f"{h['load_average_1min']}. Calibration took {r['calibration_seconds']} s; the whole run "
        f"{r['total_seconds']} s. {r['models']} models, p50 at batch 1.",
        "",
        "\"Measured\" is each model's p50 timed in the same interleaved rounds as calibration's random networks "
        "(only those are fitted), so the host's drift in speed between two runs does not pass for prediction "
        "error. The \"later run\" row compares the same estimates with a second timing after calibration, as a "
        "user who calibrates once would see them; median later / calibration-time latency: "
        f"{r['host_drift_later_over_calibration']:.3f}.",
        "",
        "| predictor | precision | within ±10% | within ±25% | MAPE | median APE |",
        "|---|---|---|---|---|---|",
    ]
    for name, parts in r["summary"].items():
        for part, e in parts.items():
            lines.append(
                f"| {name} | {part} | {100 * e['within_10pct']:.0f}% | {100 * e['within_25pct']:.0f}% | "
                f"{e['mape_pct']:.1f}% | {e['median_ape_pct']:.1f}% |"
            )
    lines += ["", "| model | kind | precision | measured p50 ms | later run p50 ms | cost model ms | MACs/peak ms "
              "| built-in ms |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        lines.append(
            f"| {row['model']} | {row['kind']} | {row['precision']} | {row['measured_p50_ms']:.3f} | "
            f"{row['later_p50_ms']:.3f} | {row['estimated_ms']:.3f} | {row['macs_peak_ms']:.3f} | "
            f"{row['builtin_profile_ms']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
