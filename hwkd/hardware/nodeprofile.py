"""ONNX Runtime's own per-node profile of a model, and a 1-thread vs N-thread comparison of it.

The thread model in ``hwkd.hardware.threads`` was derived from this: which kernels speed up with
threads, which do not, and how much of a run sits outside the kernels (the per-run fork/join and
session overhead). ``compare_threads`` gives the evidence per op type and per node, so the model can
be re-checked on another host or onnxruntime version::

    python -m hwkd.hardware.nodeprofile model.onnx --threads 2
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def node_profile(path: str | Path, threads: int, runs: int = 30, warmup: int = 5) -> dict[str, Any]:
    """Median per-node kernel time (us) and median whole-run time (us) from ORT's profiler.

    Returns ``{"run_us": float, "nodes": {node: {"op": str, "us": float}}}``; node names are those of
    the optimized graph (fused nodes carry the fused op type, e.g. ``FusedConv``).
    """
    return summarise(profile_events(path, threads, runs, warmup), skip_runs=warmup)


def profile_events(path: str | Path, threads: int, runs: int = 30, warmup: int = 5) -> list[dict[str, Any]]:
    """ORT's profiler events (chronological) over ``warmup`` + ``runs`` runs of ``path`` at ``threads``."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="hwkd-nodeprofile-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        for _ in range(warmup):
            session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        return json.loads(Path(session.end_profiling()).read_text())


def summarise(events: list[dict[str, Any]], skip_runs: int = 0) -> dict[str, Any]:
    """Medians over runs of ORT profiler events (``cat`` Session ``model_run``; Node ``*_kernel_time``)."""
    run_us = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    per_node: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            per_node[node].append(float(e["dur"]))
            ops[node] = e.get("args", {}).get("op_name", "?")
    nodes = {}
    for node, durs in per_node.items():
        durs = durs[skip_runs:] if len(durs) > skip_runs else durs
        nodes[node] = {"op": ops[node], "us": statistics.median(durs)}
    run = run_us[skip_runs:] if len(run_us) > skip_runs else run_us
    return {"run_us": statistics.median(run) if run else 0.0, "nodes": nodes}


def compare_threads(path: str | Path, threads: int, runs: int = 30, repeats: int = 2) -> dict[str, Any]:
    """Per-node and per-op-type speed-up from 1 to ``threads`` threads, interleaved ``repeats`` times.

    ``outside_kernels_us``: the part of a run no node accounts for (session and fork/join overhead);
    ``per_op``: summed kernel time at each thread count and the speed-up of that sum.
    """
    one: list[dict] = []
    many: list[dict] = []
    for _ in range(repeats):  # interleaved, so a burst of host load hits both thread counts alike
        one.append(node_profile(path, 1, runs))
        many.append(node_profile(path, threads, runs))

    def merged(profiles: list[dict]) -> dict[str, Any]:
        nodes = {n: {"op": profiles[0]["nodes"][n]["op"],
                     "us": statistics.median(p["nodes"][n]["us"] for p in profiles if n in p["nodes"])}
                 for n in profiles[0]["nodes"]}  # fmt: skip
        return {"run_us": statistics.median(p["run_us"] for p in profiles), "nodes": nodes}

    a, b = merged(one), merged(many)
    rows, per_op = [], defaultdict(lambda: [0.0, 0.0, 0])
    for node, info in a["nodes"].items():
        if node not in b["nodes"]:
            continue
        t1, tn = info["us"], b["nodes"][node]["us"]
        rows.append({"node": node, "op": info["op"], "us_1": round(t1, 2), f"us_{threads}": round(tn, 2),
                     "speedup": round(t1 / tn, 3) if tn > 0 else None})  # fmt: skip
        agg = per_op[info["op"]]
        agg[0] += t1
        agg[1] += tn
        agg[2] += 1
    kernels_1 = sum(r["us_1"] for r in rows)
    kernels_n = sum(r[f"us_{threads}"] for r in rows)
    return {
        "model": str(path),
        "threads": threads,
        "run_us": {"1": round(a["run_us"], 2), str(threads): round(b["run_us"], 2)},
        "kernels_us": {"1": round(kernels_1, 2), str(threads): round(kernels_n, 2)},
        "outside_kernels_us": {"1": round(a["run_us"] - kernels_1, 2),
                               str(threads): round(b["run_us"] - kernels_n, 2)},  # fmt: skip
        "per_op": {op: {"nodes": n, "us_1": round(s1, 2), f"us_{threads}": round(sn, 2),
                        "speedup": round(s1 / sn, 3) if sn else None}
                   for op, (s1, sn, n) in sorted(per_op.items(), key=lambda kv: -kv[1][0])},  # fmt: skip
        "nodes": rows,
    }


if __name__ == "__main__":  # pragma: no cover - a diagnosis tool
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps(compare_threads(args.model, args.threads, args.runs), indent=1))
