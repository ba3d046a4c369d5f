"""How well does the cost model predict onnxruntime latency and memory on the host it was calibrated on?

1. Two sets of models, FP32 and INT8 (onnxruntime static QDQ quantization), exported with hwkd's exporter:
   - *benchmark models* from hwkd's zoo: plain (cnn), residual (resnet), depthwise + inverted residual
     (mobilenetv2); widths 0.5 / 1 / 2; inputs 32 / 64 / 96;
   - *torchvision / timm models at 224 px*, random init (nothing is downloaded): resnet18, mobilenet_v2,
     mobilenet_v3_small, mobilenet_v3_large, efficientnet_b0.
2. ``hwkd profiles calibrate`` on this host at its default thread count (every usable core): it fits
   on its own synthetic networks only; the models of (1) are timed in the same interleaved rounds, at 1
   thread and at the profile's count, but not fitted. They are timed once more afterwards (the
   repeatability row: how well one timing predicts the next under this host's load).
3. Every model estimated at 1 thread and at the profile's thread count from that one profile with
   - the cost model on the calibrated profile,
   - a MACs / peak baseline: 2 * MACs / (calibrated peak GFLOP/s at that precision),
   - the cost model on the uncalibrated built-in x86-avx2 profile;
   and its memory estimate against the peak memory growth measured in a fresh process (as hwkd bench does).

The host's 1-minute load average is recorded at every phase: on a shared host the timings are noisy.
Writes benchmarks/results/predictor_accuracy.json and .md, and the calibrated profile beside them.

    python benchmarks/predictor_accuracy.py            # ~15 min on a 2-core host
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
from hwkd.hardware import timing
from hwkd.hardware.calibrate import CalibrationSettings, calibrate, quantize
from hwkd.hardware.cost import estimate_onnx
from hwkd.hardware.profiles import dump_profile_toml, load_profile
from hwkd.models.zoo import ZOO
from hwkd.onnx import bench as ortbench
from hwkd.onnx.export import export_onnx

RESULTS = Path(__file__).resolve().parent / "results"
TORCHVISION = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "regnet_x_400mf")
TIMM = ("efficientnet_b0",)


def zoo_grid(quick: bool) -> list[tuple[str, float, int]]:
    """(arch, width, resolution) of the benchmark models."""
    if quick:
        return [("cnn", 1.0, 32), ("resnet", 0.5, 32), ("mobilenetv2", 1.0, 32)]
    return [(a, w, r) for a in ("cnn", "resnet", "mobilenetv2") for w in (0.5, 1.0, 2.0) for r in (32, 64, 96)]


def build_224(name: str) -> torch.nn.Module:
    """A torchvision or timm model with random weights (no download), 1000 classes."""
    if name in TIMM:
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def errors(pred: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    rel = np.abs(pred / measured - 1.0)
    return {
        "n": int(len(rel)),
        "within_10pct": round(float((rel <= 0.10).mean()), 3),
        "within_15pct": round(float((rel <= 0.15).mean()), 3),
        "within_25pct": round(float((rel <= 0.25).mean()), 3),
        "mape_pct": round(float(rel.mean() * 100), 1),
        "median_ape_pct": round(float(np.median(rel) * 100), 1),
    }


def export_models(root: Path, quick: bool, torchvision: bool = True) -> list[dict]:
    rows, rng = [], np.random.default_rng(0)
    specs = [(f"{a}-w{w:g}-r{r}", "benchmark", a, w, r) for a, w, r in zoo_grid(quick)]
    if torchvision:
        specs += [(n, "torchvision/timm 224px", n, 0.0, 224) for n in (TORCHVISION[:1] + TIMM if quick else TORCHVISION + TIMM)]
    for label, group, arch, width, res in specs:
        model = (ZOO.get(arch)(num_classes=10, in_channels=3, width=width) if group == "benchmark" else build_224(arch))
        fp32 = export_onnx(model.eval(), torch.randn(1, 3, res, res), root / f"{label}-fp32.onnx", {}, name=label)
        int8 = quantize(fp32, root / f"{label}-int8.onnx", rng)
        for path, prec in ((fp32, "fp32"), (int8, "int8")):
            rows.append({"model": label, "group": group, "resolution": res, "precision": prec, "path": path})
        print(f"  exported {label}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="profile threads (0 = every usable core)")
    parser.add_argument("--tag", default="", help="write results/predictor_accuracy_<tag>.* instead")
    parser.add_argument("--networks", type=int, default=0, help="calibration networks per precision (0 = default)")
    parser.add_argument("--memory-networks", type=int, default=0,
                        help="networks per precision whose memory calibration measures (0 = default)")
    parser.add_argument("--dump", type=Path, default=None,
                        help="also write what was measured (calibration networks and these models: traced layers, "
                             "timings) to this JSON file (gzipped if it ends in .gz), to try a change of the cost model offline "
                             "(predictor_refit.py)")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    started = time.time()
    loads = {"start": timing.load_average()}
    settings = CalibrationSettings(threads=args.threads)
    if args.networks:
        settings = dataclasses.replace(settings, networks=args.networks)
    if args.memory_networks:
        settings = dataclasses.replace(settings, memory_networks=args.memory_networks)
    if args.quick:
        settings = dataclasses.replace(settings, networks=8, iterations=10, warmup=3, memory_networks=3)
    with tempfile.TemporaryDirectory(prefix="hwkd-predictor-") as tmp:
        root = Path(tmp)
        print("exporting the models ...", flush=True)
        rows = export_models(root, args.quick)
        paths = [r["path"] for r in rows]
        print("calibrating this host (the models timed in the same rounds, not fitted) ...", flush=True)
        loads["calibration_start"] = timing.load_average()
        t0 = time.time()
        interleaved: dict = {}
        record: dict = {}
        host = calibrate(name="host-calibrated", settings=settings, log=lambda m: print("  " + m, flush=True),
                         also_time=paths, timings=interleaved, record=record)  # fmt: skip
        calibrate_s = time.time() - t0
        loads["calibration_end"] = timing.load_average()
        threads = host.runtime.threads
        counts = sorted({1, threads})
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = f"-{args.tag}" if args.tag else ""
        atomic_write(RESULTS / f"host-calibrated{suffix}.toml", dump_profile_toml(host))
        builtin = load_profile("x86-avx2")
        print(f"timing {len(paths)} models again at {counts} threads ...", flush=True)
        jobs = [(p, n) for p in paths for n in counts]
        later = dict(zip(jobs, timing.time_interleaved(jobs, 5, 30 if not args.quick else 6, 3), strict=True))
        loads["second_timing_end"] = timing.load_average()
        print("measuring memory in fresh processes ...", flush=True)
        for row in rows:
            path = row["path"]
            mem = ortbench.isolated_memory(path, {"input": (1, 3, row["resolution"], row["resolution"])},
                                           (ortbench.CPU_EP,), threads, warmup=3)  # fmt: skip
            row["measured_memory_mb"] = mem.get("peak_mb")
        loads["memory_end"] = timing.load_average()
        if args.dump:
            dump(args.dump, record, rows, interleaved, later, counts)
        for row in rows:
            path = row.pop("path")
            prec = row["precision"]
            peaks = {1: host.calibration["probes"]["peak_gflops_1thread"].get(prec, 0.0) * 1e9,
                     threads: host.hardware.peak_gflops[prec] * 1e9}  # fmt: skip
            for n in counts:
                est = estimate_onnx(path, host, prec, threads=n)
                bi = dataclasses.replace(builtin, runtime=dataclasses.replace(builtin.runtime, threads=n))
                row[f"t{n}"] = {
                    "measured_p50_ms": round(interleaved[(path, n)], 4),
                    # at 1 thread, also the CPU time of the thread that ran it (the rest: other processes)
                    **({"measured_cpu_ms": round(interleaved[(path, "cpu")], 4)} if n == 1 else {}),
                    "later_p50_ms": round(later[(path, n)], 4),
                    "estimated_ms": round(est.latency_ms, 4),
                    "macs_peak_ms": round(2 * est.macs / peaks[n] * 1e3, 4),  # peak measured at n threads
                    "builtin_profile_ms": round(estimate_onnx(path, bi, prec).latency_ms, 4),
                    "expected_error_pct": est.latency_error_pct,
                }
            row["estimated_memory_mb"] = round(est.memory_mb, 3)
            row["builtin_memory_mb"] = round(estimate_onnx(path, builtin, prec).memory_mb, 3)
            row["macs"] = est.macs
    summary = summarise(rows, counts)
    result = {
        "benchmark": "predictor_accuracy",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "host": ortbench.host_info(),
        "threads": threads,
        "load_average_1min": {k: round(v, 2) for k, v in loads.items()},
        "calibration_stability": host.calibration["measured"]["stability"],
        "models": len(rows),
        "calibration_seconds": round(calibrate_s, 1),
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


def dump(target: Path, record: dict, rows: list[dict], interleaved: dict, later: dict, counts: list[int]) -> None:
    """Write the calibration's fit data and every model's traced layers and timings as JSON (offline model
    work: benchmarks/predictor_refit.py)."""
    import gzip
    import json

    from hwkd.hardware.onnx_trace import trace_onnx

    def layers(works: list) -> list[dict]:
        return [dataclasses.asdict(w) for w in works]

    calibration = {prec: [{**r, "works": layers(r["works"])} for r in nets] for prec, nets in record.items()}
    models = [{**{k: v for k, v in r.items() if k != "path"}, "works": layers(trace_onnx(r["path"])[0]),
               **{f"t{n}_ms": interleaved[(r["path"], n)] for n in counts},
               **{f"later_t{n}_ms": later[(r["path"], n)] for n in counts}}
              for r in rows]  # fmt: skip
    text = json.dumps({"calibration": calibration, "models": models})
    atomic_write(target, gzip.compress(text.encode(), mtime=0) if target.suffix == ".gz" else text)  # ~1.4 MB -> 90 kB
    print(f"wrote {target}", flush=True)


def summarise(rows: list[dict], counts: list[int]) -> dict:
    out: dict = {"latency": {}, "memory": {}}
    groups = list(dict.fromkeys(r["group"] for r in rows))
    predictors = (
        ("estimated_ms", "measured_p50_ms", "cost model, calibrated"),
        ("estimated_ms", "later_p50_ms", "cost model, calibrated; measured again later"),
        ("estimated_ms", "measured_cpu_ms", "cost model, calibrated; against CPU time"),
        ("macs_peak_ms", "measured_p50_ms", "MACs / peak, calibrated peak"),
        ("builtin_profile_ms", "measured_p50_ms", "cost model, built-in x86-avx2 (uncalibrated)"),
        ("later_p50_ms", "measured_p50_ms", "a second timing of the same model (repeatability)"),
    )
    for n in counts:
        for key, truth, label in predictors:
            for group in groups:
                for prec in ("fp32", "int8"):
                    mine = [r[f"t{n}"] for r in rows if r["group"] == group and r["precision"] == prec]
                    if mine and truth in mine[0]:
                        pred = np.array([m[key] for m in mine])
                        meas = np.array([m[truth] for m in mine])
                        out["latency"][f"{n} thread{'s' if n > 1 else ''} | {label} | {group} | {prec}"] = errors(pred, meas)
    for label, key in (("cost model, calibrated", "estimated_memory_mb"), ("built-in x86-avx2", "builtin_memory_mb")):
        for group in groups:
            for prec in ("fp32", "int8"):
                mine = [r for r in rows if r["group"] == group and r["precision"] == prec and r["measured_memory_mb"]]
                if mine:
                    out["memory"][f"{label} | {group} | {prec}"] = errors(
                        np.array([r[key] for r in mine]), np.array([r["measured_memory_mb"] for r in mine])
                    )
    return out


def render(r: dict) -> str:
    h, s = r["host"], r["calibration_stability"]
    loads = ", ".join(f"{k} {v}" for k, v in r["load_average_1min"].items())
    lines = [
        "# predictor_accuracy",
        "",
        f"Command: `python benchmarks/{r['command']}`. Host: {h['cpu']} ({h['usable_cores']} usable cores), "
        f"onnxruntime {h['onnxruntime']}; profile threads {r['threads']}. Calibration took "
        f"{r['calibration_seconds']} s; the whole run {r['total_seconds']} s. {r['models']} models, p50 at batch 1.",
        "",
        f"**Shared host.** 1-minute load average: {loads}. Calibration's own verdict: "
        f"{'trustworthy' if s['trustworthy'] else 'NOT trustworthy'} after {s['attempts']} attempt(s); reference "
        f"probe spread {s['spread_pct']}% (tolerance {s['tolerance_pct']:.0f}%)"
        + (f"; {'; '.join(s['reasons'])}" if s["reasons"] else "") + ".",
        "",
        "\"Measured\" is each model's p50 timed in the same interleaved rounds as calibration's networks (only "
        "those are fitted). The repeatability row compares that with a second timing taken after calibration: "
        "no predictor can be expected to beat it. At 1 thread the CPU time of the thread that ran each model "
        "is recorded too: the rest of its wall time the OS gave to other processes (the 1-thread kernel model is "
        "fitted to CPU time; see docs/decisions-issue13.md).",
        "",
        "## Latency",
        "",
        "| threads | predictor | models | precision | n | within ±10% | within ±15% | within ±25% | MAPE | median APE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in r["summary"]["latency"].items():
        t, pred, group, prec = name.split(" | ")
        lines.append(
            f"| {t} | {pred} | {group} | {prec} | {e['n']} | {100 * e['within_10pct']:.0f}% | "
            f"{100 * e['within_15pct']:.0f}% | {100 * e['within_25pct']:.0f}% | {e['mape_pct']:.1f}% | "
            f"{e['median_ape_pct']:.1f}% |"
        )
    lines += ["", "## Memory (peak growth of a fresh process over session load + warm-up)", "",
              "| predictor | models | precision | n | within ±10% | within ±25% | MAPE | median APE |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in r["summary"]["memory"].items():
        pred, group, prec = name.split(" | ")
        lines.append(
            f"| {pred} | {group} | {prec} | {e['n']} | {100 * e['within_10pct']:.0f}% | "
            f"{100 * e['within_25pct']:.0f}% | {e['mape_pct']:.1f}% | {e['median_ape_pct']:.1f}% |"
        )
    counts = sorted(int(k[1:]) for k in r["rows"][0] if k.startswith("t") and k[1:].isdigit())
    head = "| model | precision | " + " | ".join(
        f"{n}t measured{' / CPU' if n == 1 else ''} / later / est / MACs-peak ms" for n in counts
    ) + " | memory measured / est MB |"
    lines += ["", "## Per model", "", head, "|---|---|" + "---|" * (len(counts) + 1)]
    for row in r["rows"]:
        cells = [
            f"{row[f't{n}']['measured_p50_ms']:.3f} / "
            + (f"{row[f't{n}']['measured_cpu_ms']:.3f} / " if "measured_cpu_ms" in row[f"t{n}"] else "")
            + f"{row[f't{n}']['later_p50_ms']:.3f} / "
            f"{row[f't{n}']['estimated_ms']:.3f} / {row[f't{n}']['macs_peak_ms']:.3f}"
            for n in counts
        ]
        mem = row["measured_memory_mb"]
        lines.append(
            f"| {row['model']} | {row['precision']} | " + " | ".join(cells)
            + f" | {mem if mem is not None else 'n/a'} / {row['estimated_memory_mb']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
