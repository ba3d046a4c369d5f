"""hwkd QAT INT8 vs onnxruntime static PTQ INT8 vs FP32, on the embedded default, plus the size crossover.

Part 1 (the default run): the three models of one `hwkd compress --profile jetson` run (model_fp32.onnx,
hwkd's QAT INT8, ORT's static PTQ INT8 of the same FP32 file and calibration images): test accuracy
from the run's report, size on disk, and onnxruntime p50 latency at batch 1 measured here in
interleaved rounds (hwkd.ortbench.measure), with the ops ORT really executes.

Part 2 (crossover): where INT8 starts to pay off on this host. MobileNetV2 students of growing width
and input resolution, untrained (BN statistics from a few batches; latency does not depend on the
weights' values), FP32 vs hwkd's quantizer (calibration only, same Q/DQ placement as QAT) vs ORT PTQ.

    python benchmarks/int8_vs_ptq.py                  # runs hwkd compress first (a few minutes)
    python benchmarks/int8_vs_ptq.py --run runs/demo  # reuse a finished default run

Writes benchmarks/results/int8_vs_ptq.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CROSSOVER = ((0.5, 32), (1.0, 32), (2.0, 32), (1.0, 64), (2.0, 64), (4.0, 64))


def default_run(run: str | None) -> Path:
    if run:
        return Path(run)
    import hwkd

    out = Path(tempfile.mkdtemp(prefix="hwkd-int8-bench-")) / "run"
    hwkd.compress(profile="jetson", out=out)
    return out


def part1(run_dir: Path, iterations: int, rounds: int) -> dict:
    from hwkd import onnx_export as ox
    from hwkd import ortbench

    report = json.loads((run_dir / "report.json").read_text())
    quant = report["quantization"]
    files = {"fp32": run_dir / "model_fp32.onnx", "qat": run_dir / "model_qat.onnx", "ptq": run_dir / "model_ptq.onnx"}
    files[quant["chosen"]] = run_dir / "model.onnx"
    stats = ortbench.measure(list(files.values()), batch=1, iterations=iterations, rounds=rounds, threads=0)
    models = {}
    for label, path in files.items():
        rec = quant["models"][label]
        models[label] = {
            "accuracy": rec["accuracy"],
            "agreement_with_fp32": rec["top1_agreement_with_fp32"],
            "size_mb": round(ox.model_size_mb(path), 4),
            "p50_ms": round(stats[path].p50, 4),
            "p90_ms": round(stats[path].p90, 4),
            "executed_ops": dict(ox.ort_executed_ops(path).most_common()),
        }
    parity = quant["models"]["qat"].get("parity_vs_pytorch")
    return {
        "run_dir": str(run_dir),
        "teacher_accuracy": report["teacher"]["accuracy"],
        "chosen": quant["chosen"],
        "models": models,
        "parity_qat": parity,
        "ratios": {
            "qat_over_ptq_latency": round(models["qat"]["p50_ms"] / models["ptq"]["p50_ms"], 3),
            "fp32_over_qat_latency": round(models["fp32"]["p50_ms"] / models["qat"]["p50_ms"], 3),
            "fp32_over_ptq_latency": round(models["fp32"]["p50_ms"] / models["ptq"]["p50_ms"], 3),
            "qat_minus_ptq_accuracy_points": round(100 * (models["qat"]["accuracy"] - models["ptq"]["accuracy"]), 2),
            "fp32_minus_qat_accuracy_points": round(100 * (models["fp32"]["accuracy"] - models["qat"]["accuracy"]), 2),
        },
    }


def part2(iterations: int, rounds: int) -> list[dict]:
    import torch

    from hwkd import onnx_export as ox
    from hwkd import ortbench, ptq
    from hwkd.data import load_dataset
    from hwkd.hardware.cost import estimate
    from hwkd.hardware.profiles import load_profile
    from hwkd.models.zoo import ZOO
    from hwkd.stages import qat

    logging.getLogger("torchao").setLevel(logging.ERROR)
    rows = []
    for width, size in CROSSOVER:
        torch.manual_seed(0)
        ds = load_dataset(None, image_size=size, seed=0)
        model = ZOO.get("mobilenetv2")(ds.num_classes, 1, width=width)
        model.train()
        with torch.no_grad():
            for xb, _ in ds.eval_batches("train", 64, limit=256):
                model(xb)
        model.eval()
        cost = estimate(model, ds.example_input(), load_profile("jetson"))
        macs, params = cost.macs, cost.params
        with tempfile.TemporaryDirectory(prefix="hwkd-xover-") as tmp:
            tmp = Path(tmp)
            ox.export_onnx(model, ds.example_input(), tmp / "fp32.onnx", {}, name="FP32")
            seven_bit = qat.host_needs_reduce_range()  # as the pipeline does with qat.reduce_range=auto
            prepared, _ = qat.prepare_qat(model, ds.example_input(2), "arm", seven_bit)
            with torch.no_grad():
                for xb, _ in ds.eval_batches("train", 64, limit=256):
                    prepared(xb)
            ox.export_onnx(qat.convert(prepared), ds.example_input(), tmp / "hwkd.onnx", {}, name="INT8")
            ptq.quantize_ptq(
                tmp / "fp32.onnx", tmp / "ptq.onnx", ds.sample("train", 256)[0].numpy(), reduce_range=seven_bit
            )
            paths = [tmp / "fp32.onnx", tmp / "hwkd.onnx", tmp / "ptq.onnx"]
            stats = ortbench.measure(paths, batch=1, iterations=iterations, rounds=rounds, threads=0)
            fp32, hw, pt = (stats[p].p50 for p in paths)
        rows.append(
            {
                "width": width,
                "input": f"1x{size}x{size}",
                "params": int(params),
                "macs": int(macs),
                "fp32_p50_ms": round(fp32, 4),
                "hwkd_int8_p50_ms": round(hw, 4),
                "ptq_int8_p50_ms": round(pt, 4),
                "fp32_over_hwkd_int8": round(fp32 / hw, 3),
                "hwkd_over_ptq": round(hw / pt, 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def markdown(res: dict) -> str:
    p1 = res["default"]
    names = {"fp32": "FP32 (model_fp32.onnx)", "qat": "hwkd QAT INT8", "ptq": "onnxruntime static PTQ INT8"}
    lines = [
        "# INT8: hwkd QAT vs onnxruntime static PTQ vs FP32",
        "",
        f"Host: {res['host']['cpu']} ({', '.join(res['host']['cpu_flags'])}), {res['host']['usable_cores']} "
        f"cores, onnxruntime {res['host']['onnxruntime']}, CPU EP. Batch 1, p50 over {res['iterations']} "
        f"runs per model in {res['rounds']} interleaved rounds. Command: `{res['command']}`.",
        "",
        "## Embedded default (`hwkd compress --profile jetson`)",
        "",
        "| model | test accuracy | agreement with FP32 | p50 ms | p90 ms | size MB |",
        "|---|---|---|---|---|---|",
    ]
    for label, m in p1["models"].items():
        lines.append(
            f"| {names[label]} | {100 * m['accuracy']:.2f}% | {100 * m['agreement_with_fp32']:.2f}% | "
            f"{m['p50_ms']:.3f} | {m['p90_ms']:.3f} | {m['size_mb']:.3f} |"
        )
    r = p1["ratios"]
    lines += [
        "",
        f"hwkd INT8 / PTQ latency: **{r['qat_over_ptq_latency']}**; FP32 / hwkd INT8: "
        f"**{r['fp32_over_qat_latency']}x**; hwkd - PTQ accuracy: {r['qat_minus_ptq_accuracy_points']} points; "
        f"FP32 - hwkd INT8: {r['fp32_minus_qat_accuracy_points']} points.",
    ]
    par = p1.get("parity_qat")
    if par:
        lines.append(
            f"Parity (PyTorch quantized vs ONNX INT8, {par['samples']} test images): top-1 agreement "
            f"{100 * par['top1_agreement']:.2f}%, max |logit diff| {par['max_abs_diff']:.4g}."
        )
    ops = {k: v["executed_ops"] for k, v in p1["models"].items() if k != "fp32"}
    lines += ["", "Ops onnxruntime executes (optimized graph):", ""]
    lines += [f"- {names[k]}: " + ", ".join(f"{op} {n}" for op, n in v.items()) for k, v in ops.items()]
    if res.get("crossover"):
        lines += [
            "",
            "## Crossover by model size (MobileNetV2, untrained weights, same quantizers)",
            "",
            "| width | input | params | MACs | FP32 p50 ms | hwkd INT8 p50 ms | PTQ INT8 p50 ms | FP32 / hwkd INT8 | hwkd / PTQ |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in res["crossover"]:
            lines.append(
                f"| {row['width']} | {row['input']} | {row['params'] / 1e3:.1f}k | {row['macs'] / 1e6:.2f}M | "
                f"{row['fp32_p50_ms']:.3f} | {row['hwkd_int8_p50_ms']:.3f} | {row['ptq_int8_p50_ms']:.3f} | "
                f"{row['fp32_over_hwkd_int8']} | {row['hwkd_over_ptq']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    from hwkd import ortbench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished `hwkd compress --profile jetson` run dir to reuse")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-crossover", action="store_true")
    parser.add_argument("--crossover-json", help="reuse crossover rows measured earlier (a JSON list)")
    args = parser.parse_args()
    t0 = time.time()
    res = {
        "command": "python benchmarks/int8_vs_ptq.py " + " ".join(sys.argv[1:]),
        "host": ortbench.host_info(),
        "iterations": args.iterations,
        "rounds": args.rounds,
        "default": part1(default_run(args.run), args.iterations, args.rounds),
    }
    print(json.dumps(res["default"]["ratios"]), flush=True)
    if args.crossover_json:
        res["crossover"] = json.loads(Path(args.crossover_json).read_text())
    elif not args.no_crossover:
        res["crossover"] = part2(max(200, args.iterations // 4), args.rounds)
    res["seconds"] = round(time.time() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int8_vs_ptq.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (RESULTS / "int8_vs_ptq.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
