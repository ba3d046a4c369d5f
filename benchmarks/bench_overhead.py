"""Overhead of `hwkd bench` against a bare onnxruntime timing loop, on the same models, interleaved.

For each model, rounds alternate (order rotated each round) between:
- bare: ``sess = ort.InferenceSession(path, opts)``, numpy feeds, ``perf_counter_ns`` around
  ``sess.run(None, feeds)``: the loop anyone would write by hand;
- hwkd: ``hwkd.api.benchmark([path], ...)``, the function ``hwkd bench`` is a thin CLI over.
Both use the same intra-op thread count and the same iterations per round. The overhead ratio is the
median over rounds of hwkd's p50 divided by the median of the bare loop's p50 (goal: within 3%).

Models are built here (no downloads): a detection-style graph with two inputs and dynamic H/W, a
text-style graph with int64 token ids into an embedding, and a small conv stack.

    python benchmarks/bench_overhead.py [--rounds 7] [--iterations 300] [--threads 1]

Writes benchmarks/results/bench_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from onnx_graphs import detector, text_classifier  # noqa: E402

import hwkd  # noqa: E402
from hwkd import api  # noqa: E402
from hwkd.onnx import bench as ortbench  # noqa: E402


def conv_stack(path: Path, width: int = 32, depth: int = 6, seed: int = 0) -> Path:
    """``x [batch, 3, 64, 64]`` through ``depth`` 3x3 conv + ReLU layers and a pooled linear head."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, cin = [], [], "x", 3
    for i in range(depth):
        w = (rng.standard_normal((width, cin, 3, 3)) * 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        prev, cin = f"r{i}", width
    inits.append(numpy_helper.from_array(rng.standard_normal((width, 10)).astype(np.float32), "fc"))
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def bare_loop(path: Path, feeds: dict[str, np.ndarray], threads: int, warmup: int, iterations: int) -> float:
    """p50 (ms) of a hand-written onnxruntime loop."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        sess.run(None, feeds)
        times.append(time.perf_counter_ns() - t0)
    return float(np.percentile(np.asarray(times) / 1e6, 50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hwkd-overhead-"))
    rng = np.random.default_rng(0)
    cases = [
        # (name, path, shapes for hwkd, numpy feeds for the bare loop)
        (
            "detector 2 inputs, dynamic H/W (1x3x96x128)",
            detector(tmp / "detector.onnx", channels=32),
            {"images": (1, 3, 96, 128)},
            {"images": rng.standard_normal((1, 3, 96, 128)).astype(np.float32),
             "scale": rng.standard_normal((1, 2)).astype(np.float32)},
        ),
        (
            "text int64 ids + mask (1x128)",
            text_classifier(tmp / "text.onnx", vocab=1000, dim=64),
            {"seq": (128,)},
            {"input_ids": rng.integers(0, 1000, (1, 128), dtype=np.int64),
             "attention_mask": np.ones((1, 128), dtype=np.int64)},
        ),
        (
            "conv stack 6x32ch (1x3x64x64)",
            conv_stack(tmp / "convs.onnx"),
            {},
            {"x": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)},
        ),
    ]
    rows = []
    for name, path, shapes, feeds in cases:
        bare, ours = [], []
        for r in range(args.rounds):
            order = ("bare", "hwkd") if r % 2 == 0 else ("hwkd", "bare")  # rotate who goes first
            for who in order:
                if who == "bare":
                    bare.append(bare_loop(path, feeds, args.threads, args.warmup, args.iterations))
                else:
                    rec = api.benchmark(
                        [path], shapes=shapes, threads=args.threads, warmup=args.warmup,
                        iterations=args.iterations, rounds=1,
                    )
                    ours.append(rec["latency_ms"]["p50"])
        ratio = statistics.median(ours) / statistics.median(bare)
        per_round = [o / b for o, b in zip(ours, bare, strict=True)]
        rows.append({
            "model": name,
            "bare_p50_ms": round(statistics.median(bare), 4),
            "hwkd_p50_ms": round(statistics.median(ours), 4),
            "overhead_ratio": round(ratio, 4),
            "per_round_ratio_min": round(min(per_round), 4),
            "per_round_ratio_max": round(max(per_round), 4),
            "bare_p50_per_round": [round(x, 4) for x in bare],
            "hwkd_p50_per_round": [round(x, 4) for x in ours],
        })
        print(f"{name}: bare {rows[-1]['bare_p50_ms']:.4f} ms, hwkd {rows[-1]['hwkd_p50_ms']:.4f} ms, "
              f"ratio {ratio:.4f}", flush=True)

    worst = max(abs(r["overhead_ratio"] - 1) for r in rows)
    result = {
        "benchmark": "bench_overhead",
        "command": "python benchmarks/bench_overhead.py " + " ".join(sys.argv[1:]),
        "goal": "hwkd bench p50 within 3% of a bare onnxruntime loop",
        "met": worst <= 0.03,
        "worst_abs_deviation": round(worst, 4),
        "settings": {"rounds": args.rounds, "iterations": args.iterations, "warmup": args.warmup,
                     "threads": args.threads},
        "host": {**ortbench.host_info(), "python": platform.python_version(), "hwkd": hwkd.__version__},
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_overhead.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    host = result["host"]
    md = [
        "# bench_overhead: `hwkd bench` p50 vs a bare onnxruntime loop",
        "",
        f"Host: {host['cpu']}, {host['usable_cores']} usable cores, load average {host['load_average_1min']} "
        f"(shared build machine), onnxruntime {host['onnxruntime']}, {args.threads} intra-op thread(s).",
        f"{args.rounds} rounds per model, alternating bare/hwkd (order rotated), {args.iterations} timed runs "
        f"after {args.warmup} warm-up each; medians over rounds.",
        "",
        "| model | bare loop p50 ms | hwkd bench p50 ms | ratio | per-round ratio range |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(f"| {r['model']} | {r['bare_p50_ms']:.4f} | {r['hwkd_p50_ms']:.4f} | {r['overhead_ratio']:.3f} | "
                  f"{r['per_round_ratio_min']:.3f}–{r['per_round_ratio_max']:.3f} |")
    md += ["", f"Goal (within 3%): **{'met' if result['met'] else 'not met'}**, worst deviation "
           f"{100 * worst:.1f}%.", "", f"Reproduce: `{result['command'].strip()}`", ""]
    (args.out / "bench_overhead.md").write_text("\n".join(md), encoding="utf-8")


if __name__ == "__main__":
    main()
