"""hwkd INT8 vs every onnxruntime static-PTQ variant vs FP32, on the default student and real-size models.

Models:

- the default student: the models of one `hwkd compress --profile jetson` run (model_fp32.onnx,
  hwkd's QAT INT8, ORT's PTQ variants of the same FP32 file and calibration images). Accuracy is the
  run's own figure on the held-out digits test split (and its validation split).
- torchvision resnet18, mobilenet_v2, efficientnet_b0 at 3x224x224, 1000 classes, random-init weights
  (BN statistics from a few random batches): latency does not depend on the weights' values, so
  there is no accuracy for these. hwkd INT8 = hwkd's quantizer (hwkd.onnx.quantizer) calibrated, not
  trained, on the same random images that calibrate each PTQ variant.

For every model: p50 at batch 1 and 8, with 1 and 2 intra-op threads, all variants of a model timed
in interleaved rounds (hwkd.onnx.bench), so ratios compare numbers measured side by side. The ops ORT
executes (its optimized graph) are recorded for every model; for resnet18 an ORT profile (per op
type, batch 1, 1 thread) of FP32 and hwkd INT8 shows where the time goes.

    python benchmarks/int8_vs_ptq.py                       # runs hwkd compress first (minutes)
    python benchmarks/int8_vs_ptq.py --run runs/demo       # reuse a finished default run
    python benchmarks/int8_vs_ptq.py --run runs/demo --models resnet18

Writes benchmarks/results/int8_vs_ptq.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
VISION = ("resnet18", "mobilenet_v2", "efficientnet_b0")
PTQ_LABELS = ("ptq", "ptq_u8s8", "ptq_tuned")
LABELS = ("fp32", "hwkd", *PTQ_LABELS)
NAMES = {
    "fp32": "FP32",
    "hwkd": "hwkd INT8",
    "ptq": "ORT PTQ, defaults (S8S8, per-tensor)",
    "ptq_u8s8": "ORT PTQ, U8S8 (its docs' types for x86)",
    "ptq_tuned": "ORT PTQ, hwkd-tuned (U8S8, per-channel)",
}


def default_run(run: str | None) -> Path:
    if run:
        return Path(run)
    import hwkd

    out = Path(tempfile.mkdtemp(prefix="hwkd-int8-bench-")) / "run"
    hwkd.compress(profile="jetson", out=out)
    return out


def student_files(run_dir: Path) -> tuple[dict[str, Path], dict]:
    report = json.loads((run_dir / "report.json").read_text())
    quant = report["quantization"]
    files = {"fp32": run_dir / "model_fp32.onnx", "hwkd": run_dir / "model_qat.onnx"}
    files.update({label: run_dir / f"model_{label}.onnx" for label in PTQ_LABELS})
    chosen = "hwkd" if quant["chosen"] == "qat" else quant["chosen"]
    files[chosen] = run_dir / "model.onnx"
    acc = {}
    for label in LABELS:
        rec = quant["models"]["qat" if label == "hwkd" else label]
        acc[label] = {
            "test": rec["accuracy"],
            "val": rec["val_accuracy"],
            "agreement_with_fp32": rec["top1_agreement_with_fp32"],
            "recipe": rec.get("recipe"),
        }
    data = report["dataset"]
    return files, {"accuracy": acc, "accuracy_data": data, "chosen": quant["chosen"], "run_dir": str(run_dir)}


def vision_files(name: str, work: Path, calib: int, seed: int = 0) -> dict[str, Path]:
    """FP32, hwkd INT8 and each PTQ variant of a random-init torchvision model at 224 px."""
    import torch
    import torchvision

    from hwkd.onnx import export as ox
    from hwkd.onnx import ptq
    from hwkd.stages import qat

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(calib, 3, 224, 224, generator=g)
    model.train()
    with torch.no_grad():
        for i in range(0, calib, 8):
            model(images[i : i + 8])  # BN statistics of the input distribution, as training leaves them
    model.eval()
    x = images[:2]
    files = {"fp32": work / f"{name}_fp32.onnx", "hwkd": work / f"{name}_hwkd.onnx"}
    ox.export_onnx(model, x, files["fp32"], {}, name=f"{name} FP32")
    seven_bit = qat.host_needs_reduce_range()  # what qat.reduce_range=auto does
    prepared, _ = qat.prepare_qat(model, x, "x86", seven_bit)
    with torch.no_grad():
        for i in range(0, calib, 8):
            prepared(images[i : i + 8])
    ox.export_onnx(qat.convert(prepared), x, files["hwkd"], {}, name=f"{name} INT8")
    for label in PTQ_LABELS:
        files[label] = work / f"{name}_{label}.onnx"
        ptq.quantize_ptq(files["fp32"], files[label], images.numpy(), variant=label, reduce_range=seven_bit)
    return files


def time_models(files: dict[str, Path], batches, threads, iterations, rounds) -> dict:
    from hwkd.onnx import bench

    out = {}
    for t in threads:
        models = bench.bench_models(
            list(files.values()), batches=list(batches), warmup=3, iterations=iterations, rounds=rounds, threads=t
        )
        by_path = {m.path: m for m in models}
        for label, path in files.items():
            for run in by_path[Path(path)].runs:
                out.setdefault(f"b{run.batch}_t{t}", {})[label] = round(run.stats.p50, 4)
    return out


def ratios(p50: dict) -> dict:
    out = {}
    for key, row in p50.items():
        best = min(PTQ_LABELS, key=lambda k: row[k])
        out[key] = {
            "best_ptq": best,
            "hwkd_over_best_ptq": round(row["hwkd"] / row[best], 3),
            "fp32_over_hwkd": round(row["fp32"] / row["hwkd"], 3),
            # each variant on its own too: "best" is the faster of two variants that run the same kernels,
            # and the minimum of two noisy timings is biased low
            "hwkd_over": {k: round(row["hwkd"] / row[k], 3) for k in PTQ_LABELS},
        }
    return out


def executed(files: dict[str, Path]) -> dict:
    from hwkd.onnx import check

    return {label: check.executed_summary(path) for label, path in files.items()}


def ort_profile(path: Path, runs: int = 20) -> dict:
    """Share of time per op type in ORT's own profile (batch 1, 1 thread), in ms per run."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="hwkd-prof-") as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "p")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        feed = {inp.name: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
        for _ in range(3 + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values())
    # the first 3 runs are warm-up; the profile holds all runs, so divide by all of them
    return {
        "ms_per_run": round(total / 1e3 / (3 + runs), 3),
        "by_op_ms": {op: round(us / 1e3 / (3 + runs), 3) for op, us in per_op.most_common(8)},
    }


def goals(res: dict) -> list[dict]:
    rows = []
    for name, m in res["models"].items():
        for t in res["threads"]:
            r = m["ratios"][f"b1_t{t}"]
            rows.append({"goal": f"{name}: hwkd INT8 / best PTQ <= 1.00 (batch 1, {t} thread{'s' * (t > 1)})",
                         "value": r["hwkd_over_best_ptq"], "met": r["hwkd_over_best_ptq"] <= 1.0})
        worst = min(r["fp32_over_hwkd"] for r in m["ratios"].values())
        need = 1.5 if name == "resnet18" else 1.0
        rows.append({"goal": f"{name}: INT8 faster than FP32{' by >= 1.5x' if need > 1 else ''} "
                     "(FP32 / hwkd INT8, every batch and thread count)", "value": worst, "met": worst >= need})
        if name == "resnet18":
            b1 = m["ratios"]["b1_t1"]["fp32_over_hwkd"]
            rows.append({"goal": "resnet18: >= 1.5x at batch 1, 1 thread", "value": b1, "met": b1 >= 1.5})
        acc = m.get("accuracy")
        if acc:
            best = max(acc[k]["test"] for k in PTQ_LABELS)
            rows.append({"goal": f"{name}: hwkd INT8 accuracy >= best PTQ (test)",
                         "value": round(100 * (acc["hwkd"]["test"] - best), 2), "met": acc["hwkd"]["test"] >= best})
            gap = 100 * (acc["fp32"]["test"] - acc["hwkd"]["test"])
            rows.append({"goal": f"{name}: hwkd INT8 within 0.5 pt of FP32 (test)", "value": round(gap, 2),
                         "met": gap <= 0.5})
    return rows


def _ops(e: dict) -> str:
    fp = ", ".join(f"{op} {n}" for op, n in e["float_compute"].items()) or "none"
    return f"{e['integer_kernels']} int kernels; FP32: {fp}; {e['transpose']} Transpose"


def _data(res: dict) -> str:
    d = res["models"].get("student", {}).get("accuracy_data")
    if not d:
        return "no student in this run"
    return f"{d['name']}, {d['test']} test images of {d['train'] + d['val'] + d['test']}, input {d['input_shape']}"


def _setting(key: str) -> str:
    """'b8_t2' -> 'batch 8, 2 threads'."""
    b, t = key[1:].split("_t")
    return f"batch {b}, {t} thread{'s' if t != '1' else ''}"


def markdown(res: dict) -> str:
    h = res["host"]
    keys = [f"b{b}_t{t}" for b in res["batches"] for t in res["threads"]]
    lines = [
        "# INT8: hwkd vs onnxruntime static PTQ (every variant) vs FP32",
        "",
        f"Host: {h['cpu']} ({', '.join(h['cpu_flags'])}), {h['usable_cores']} usable cores, onnxruntime "
        f"{h['onnxruntime']}, CPU EP, 1-min load average {h['load_average_1min']} at the start"
        + (" (**the host was shared with other work**)" if h["load_average_1min"] > 1.5 else " (nothing else running)")
        + f". Numbers are medians (p50) of runs timed in {res['rounds']} interleaved rounds, "
        "and each ratio compares numbers measured side by side in the same rounds.",
        f"Command: `{res['command']}`" + (f" (rows of the models it did not run come from `{res['reused']}`, "
                                          "run earlier on the same host)" if res.get("reused") else ""),
        "",
        "Accuracy: the default student only, on the held-out digits test split of its run "
        f"({_data(res)}); the torchvision models have random-init weights (latency only).",
        "",
        "| model | variant | " + " | ".join(f"p50 ms {_setting(k)}" for k in keys) + " | test acc | what ORT executes |",
        "|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for name, m in res["models"].items():
        for label in LABELS:
            acc = m.get("accuracy", {}).get(label)
            shown = "–" if not acc else f"{100 * acc['test']:.2f}%"
            lines.append(
                f"| {name} | {NAMES[label]} | " + " | ".join(f"{m['p50'][k][label]:.3f}" for k in keys)
                + f" | {shown} | {_ops(m['executed'][label])} |"
            )
    lines += ["", "## Ratios (same rounds)", "", "| model | setting | best PTQ | hwkd / best PTQ | hwkd / U8S8 | hwkd / tuned | FP32 / hwkd |",
              "|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        for k in keys:
            r = m["ratios"][k]
            each = r.get("hwkd_over", {})
            lines.append(f"| {name} | {_setting(k)} | {r['best_ptq']} | {r['hwkd_over_best_ptq']} | "
                         f"{each.get('ptq_u8s8', '–')} | {each.get('ptq_tuned', '–')} | {r['fp32_over_hwkd']} |")
    lines += ["", "## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else '**no**'} |" for g in res["goals"]]
    prof = res.get("resnet18_profile")
    if prof:
        lines += ["", "## resnet18, ORT's profile (batch 1, 1 thread, kernel time per run)", ""]
        for label, p in prof.items():
            lines.append(f"- {NAMES[label]}: {p['ms_per_run']} ms; " + ", ".join(f"{op} {ms}" for op, ms in p["by_op_ms"].items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    from hwkd.onnx import bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished `hwkd compress --profile jetson` run dir to reuse")
    parser.add_argument("--models", default="student," + ",".join(VISION))
    parser.add_argument("--iterations", type=int, default=1000, help="per variant and batch, default student")
    parser.add_argument("--vision-iterations", type=int, default=100, help="per variant and batch, 224 px models")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calibration", type=int, default=32, help="random images calibrating the 224 px models")
    parser.add_argument("--reuse", help="results JSON of an earlier run: its models are kept (with its command)")
    parser.add_argument("--out", default="int8_vs_ptq", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    logging.getLogger("torchao").setLevel(logging.ERROR)
    t0 = time.time()
    res = {
        "command": "python benchmarks/int8_vs_ptq.py " + " ".join(sys.argv[1:]),
        "host": bench.host_info(),
        "batches": [1, 8],
        "threads": [1, 2],
        "rounds": args.rounds,
        "models": {},
    }
    names = [n for n in args.models.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="hwkd-int8-") as tmp:
        for name in names:
            t1 = time.time()
            if name == "student":
                files, extra = student_files(default_run(args.run))
                iterations = args.iterations
            else:
                files, extra = vision_files(name, Path(tmp), args.calibration), {}
                iterations = args.vision_iterations
            prep = round(time.time() - t1, 1)
            p50 = time_models(files, res["batches"], res["threads"], iterations, args.rounds)
            res["models"][name] = {**extra, "iterations": iterations, "prep_seconds": prep, "p50": p50,
                                   "ratios": ratios(p50), "executed": executed(files)}
            if name == "resnet18":
                res["resnet18_profile"] = {k: ort_profile(files[k]) for k in ("fp32", "hwkd", "ptq_u8s8")}
            print(name, json.dumps(res["models"][name]["ratios"]), flush=True)
    if args.reuse:
        old = json.loads(Path(args.reuse).read_text())
        for name, m in old["models"].items():
            res["models"].setdefault(name, {**m, "measured_by": old["command"], "host_load_then": old["host"]["load_average_1min"]})
        if "resnet18_profile" in old and "resnet18_profile" not in res:
            res["resnet18_profile"] = old["resnet18_profile"]
        res["reused"] = old["command"]
    res["goals"] = goals(res)
    res["seconds"] = round(time.time() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
