"""Which kernels speed up with threads, and where the fork/join cost sits: ORT's own per-node profile.

For a few models (hwkd zoo and torchvision at 224 px, FP32 and INT8), runs onnxruntime with profiling at
1 thread and at N threads, interleaved, and reports per op type the summed kernel time at each count,
its speed-up, and the part of a run outside every kernel (session set-up, waiting for the pool). The
thread model (hwkd/hardware/threads.py) is built on what this shows; see docs/decisions-issue13.md.

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

from hwkd import ortbench
from hwkd.artifacts import atomic_write, write_json
from hwkd.hardware.calibrate import quantize
from hwkd.hardware.nodeprofile import compare_threads
from hwkd.hardware.timing import load_average
from hwkd.models.zoo import ZOO
from hwkd.onnx_export import export_onnx

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
        import torchvision

        specs.append(("resnet18-224", torchvision.models.resnet18(weights=None), 224))
        for label, model, res in specs:
            fp32 = export_onnx(model.eval(), torch.randn(1, 3, res, res), root / f"{label}.onnx", {}, name=label)
            int8 = quantize(fp32, root / f"{label}-int8.onnx", np.random.default_rng(0))
            for path, prec in ((fp32, "fp32"), (int8, "int8")):
                c = compare_threads(path, args.threads, runs=args.runs)
                c.update(model=label, precision=prec, load_average_1min=round(load_average(), 2))
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
