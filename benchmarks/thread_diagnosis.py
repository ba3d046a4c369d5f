"""Which kernels speed up with threads, and where the fork/join cost sits: ORT's own per-node profile.

For a few models (hwkd zoo, torchvision / timm at 224 px; FP32 and INT8), runs onnxruntime with profiling
at 1 thread and at N threads, interleaved, and reports per op type the summed kernel time at each count,
its speed-up, and the part of a run outside every kernel (session set-up, waiting for the pool). The
thread model (hwkd/hardware/threads.py) is built on what this shows; see docs/decisions-issue13.md.

It also times each model at 1 thread by wall clock *and* by the CPU time of the calling thread (ORT runs
a 1-thread session in it): on a shared host the gap is time the OS gave to other processes, which no
cost model of the kernels can predict. Both are compared with the estimate of the calibrated profile in
benchmarks/results/host-calibrated.toml (written by predictor_accuracy.py).

    python benchmarks/thread_diagnosis.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hwkd.artifacts import atomic_write, write_json
from hwkd.hardware.calibrate import quantize
from hwkd.hardware.cost import estimate_onnx
from hwkd.hardware.nodeprofile import compare_threads
from hwkd.hardware.profiles import load_profile
from hwkd.hardware.timing import load_average
from hwkd.models.zoo import ZOO
from hwkd.onnx import bench as ortbench
from hwkd.onnx.export import export_onnx

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    loads = {"start": round(load_average(), 2)}
    out = []
    with tempfile.TemporaryDirectory(prefix="hwkd-threads-") as tmp:
        root = Path(tmp)
        specs = [("resnet-w1-r64", ZOO.get("resnet")(num_classes=10, in_channels=3, width=1.0), 64),
                 ("mobilenetv2-w1-r96", ZOO.get("mobilenetv2")(num_classes=10, in_channels=3, width=1.0), 96),
                 ("cnn-w2-r96", ZOO.get("cnn")(num_classes=10, in_channels=3, width=2.0), 96)]  # fmt: skip
        import timm
        import torchvision

        specs.append(("resnet18-224", torchvision.models.resnet18(weights=None), 224))
        specs.append(("mobilenet_v3_large-224", torchvision.models.mobilenet_v3_large(weights=None), 224))
        specs.append(("efficientnet_b0-224", timm.create_model("efficientnet_b0", pretrained=False), 224))
        profile = load_profile(RESULTS / "host-calibrated.toml") if (RESULTS / "host-calibrated.toml").is_file() else None
        for label, model, res in specs:
            fp32 = export_onnx(model.eval(), torch.randn(1, 3, res, res), root / f"{label}.onnx", {}, name=label)
            int8 = quantize(fp32, root / f"{label}-int8.onnx", np.random.default_rng(0))
            for path, prec in ((fp32, "fp32"), (int8, "int8")):
                c = compare_threads(path, args.threads, runs=args.runs)
                c.update(model=label, precision=prec, load_average_1min=round(load_average(), 2))
                c["cpu_share"] = cpu_share(path, args.runs)
                if profile is not None:
                    c["cpu_share"]["estimated_ms"] = round(estimate_onnx(path, profile, prec, threads=1).latency_ms, 3)
                out.append(c)
                print(label, prec, c["run_us"], flush=True)
    loads["end"] = round(load_average(), 2)
    result = {"benchmark": "thread_diagnosis", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "host": ortbench.host_info(), "load_average_1min": loads, "seconds": round(time.time() - started, 1),
              "models": out}  # fmt: skip
    write_json(RESULTS / "thread_diagnosis.json", result)
    atomic_write(RESULTS / "thread_diagnosis.md", render(result, args.threads))
    print(render(result, args.threads))
    return 0


def cpu_share(path: Path, runs: int) -> dict:
    """Median wall and calling-thread CPU time (ms) of ``runs`` 1-thread runs, and their ratio."""
    from hwkd.hardware.timing import _session

    session, feed = _session(path, 1)
    for _ in range(3):
        session.run(None, feed)
    wall, cpu = [], []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.thread_time()
        session.run(None, feed)
        cpu.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return {"wall_p50_ms": round(float(np.median(wall)), 3), "cpu_p50_ms": round(float(np.median(cpu)), 3),
            "cpu_share": round(float(np.median(np.asarray(cpu) / np.asarray(wall))), 3)}  # fmt: skip


def render(r: dict, n: int) -> str:
    lines = ["# thread_diagnosis", "",
             f"Command: `python benchmarks/{r['command']}`. Host: {r['host']['cpu']} ({r['host']['usable_cores']} "
             f"usable cores), onnxruntime {r['host']['onnxruntime']}. **Shared host**: 1-minute load average "
             f"{r['load_average_1min']['start']} at the start, {r['load_average_1min']['end']} at the end. "
             "Medians of ORT's per-node profile (20 runs, two interleaved repeats).", "",
             f"| model | precision | load | run us 1t / {n}t | in kernels 1t / {n}t | outside kernels 1t / {n}t | "
             f"speed-up of the run | top ops: speed-up (1t us) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in r["models"]:
        run, ker, outk = m["run_us"], m["kernels_us"], m["outside_kernels_us"]
        tops = ", ".join(f"{op} {v['speedup']} ({v['us_1']:.0f})" for op, v in list(m["per_op"].items())[:3])
        lines.append(
            f"| {m['model']} | {m['precision']} | {m['load_average_1min']} | {run['1']:.0f} / {run[str(n)]:.0f} | "
            f"{ker['1']:.0f} / {ker[str(n)]:.0f} | {outk['1']:.0f} / {outk[str(n)]:.0f} | "
            f"{run['1'] / run[str(n)]:.2f} | {tops} |"
        )
    lines += ["", "## Wall clock vs CPU time at 1 thread", "",
              "CPU share = CPU time of the thread that runs the session / wall time (median over runs); the "
              "estimate is the calibrated profile's 1-thread figure.", "",
              "| model | precision | wall p50 ms | CPU p50 ms | CPU share | estimated ms | est / wall | est / CPU |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in r["models"]:
        c = m["cpu_share"]
        est = c.get("estimated_ms")
        ratios = (f"{est / c['wall_p50_ms']:.2f} | {est / c['cpu_p50_ms']:.2f}" if est else "n/a | n/a")
        lines.append(f"| {m['model']} | {m['precision']} | {c['wall_p50_ms']:.3f} | {c['cpu_p50_ms']:.3f} | "
                     f"{c['cpu_share']:.2f} | {est if est else 'n/a'} | {ratios} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
