"""How much memory ONNX Runtime's NCHWc layout transform adds to an FP32 session, per conv, as convs add up.

    python benchmarks/nchwc_memory.py            # ~1 min; results/nchwc_memory.{json,md}

Chains of N identical 3x3 convs (512 -> 512 channels, 9 MiB of FP32 weights each, ReLU between, 7x7
input) are loaded in a fresh process at ``ORT_ENABLE_EXTENDED`` (no NCHWc transform) and ``ORT_ENABLE_ALL``
(with it), 1 thread; the figure is the growth of the process's peak RSS (VmHWM) over session creation and
three runs, and of its RSS right after session creation (held, not transient). Memory does not depend on
the host's speed, so this runs fine beside other work. Why: hwkd's memory model prices weights with one
fitted copies coefficient, and the 224-px FP32 models miss by 25-60% (docs/decisions-issue13.md, stops 23-24).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from hwkd.artifacts import atomic_write, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHANNELS, KERNEL, SIDE = 512, 3, 7

# The child reads /proc itself rather than importing hwkd.onnx.memory._memory_kb: what the allocator keeps
# depends on what the process allocated before, and that import alone moves the two-conv ALL figure from 90 to
# 81 MB (stop 24's review). The measurement is of onnxruntime in a bare process.
CHILD = r"""
import json, sys
import numpy as np, onnxruntime as ort
def mem():
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            d[line.split(":")[0]] = int(line.split()[1]) / 1024
    return d
path, level, shape = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1; opts.inter_op_num_threads = 1
opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
before = mem()
session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
created = mem()
x = np.random.rand(*shape).astype(np.float32)
for _ in range(3):
    session.run(None, {"x": x})
after = mem()
print(json.dumps({"peak_mb": round(after["VmHWM"] - before["VmRSS"], 1),
                  "held_after_creation_mb": round(created["VmRSS"] - before["VmRSS"], 1)}))
"""


def conv_chain(n: int, path: Path) -> list[int]:
    """An ONNX graph of ``n`` 3x3 convs with ReLUs between; returns its input shape."""
    rng = np.random.default_rng(0)
    inits, nodes, cur = [], [], "x"
    for i in range(n):
        w = (rng.standard_normal((CHANNELS, CHANNELS, KERNEL, KERNEL)) * 0.01).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"], pads=[KERNEL // 2] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]  # fmt: skip
        cur = f"r{i}"
    shape = [1, CHANNELS, SIDE, SIDE]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, shape)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return shape


def measure(path: Path, level: str, shape: list[int]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), level, json.dumps(shape)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(out: dict, command: str) -> str:
    w = out["weights_mb_per_conv"]
    lines = ["# NCHWc transform memory, FP32 conv chains", "", f"Command: `{command}`", "",
             f"Host: {out['host']}. Each conv: {w:.2f} MB of weights. Peak RSS growth of a fresh process over session "
             "creation and three runs (held: RSS growth right after session creation).", "",
             "| convs | EXTENDED peak MB (per MB of weights) | ALL peak MB (per MB of weights) | ALL held MB "
             "| ALL added per extra conv (copies) |", "|---|---|---|---|---|"]  # fmt: skip
    prev = None
    for row in out["rows"]:
        ext, full = row["ORT_ENABLE_EXTENDED"], row["ORT_ENABLE_ALL"]
        weights = row["convs"] * w
        added = "-"
        if prev:
            per = (full["peak_mb"] - prev[1]["peak_mb"]) / (row["convs"] - prev[0])
            added = f"{per:.1f} MB ({per / w:.2f})"
        lines.append(f"| {row['convs']} | {ext['peak_mb']} ({ext['peak_mb'] / weights:.2f}) | "
                     f"{full['peak_mb']} ({full['peak_mb'] / weights:.2f}) | {full['held_after_creation_mb']} | {added} |")  # fmt: skip
        prev = (row["convs"], full)
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--convs", default="1,2,4,8", help="chain lengths")
    args = ap.parse_args()
    from hwkd.onnx import host

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(c) for c in args.convs.split(",")]:
            path = Path(tmp) / f"chain{n}.onnx"
            shape = conv_chain(n, path)
            rows.append({"convs": n, **{lvl: measure(path, lvl, shape) for lvl in ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")}})
            print(rows[-1], flush=True)
    info = host.host_info()
    out = {"host": f"{info['cpu']}, onnxruntime {info['onnxruntime']}", "threads": 1,
           "weights_mb_per_conv": CHANNELS * CHANNELS * KERNEL * KERNEL * 4 / 2**20, "rows": rows}  # fmt: skip
    write_json(RESULTS / "nchwc_memory.json", out)
    atomic_write(RESULTS / "nchwc_memory.md", render(out, " ".join(["python benchmarks/nchwc_memory.py", *sys.argv[1:]])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
