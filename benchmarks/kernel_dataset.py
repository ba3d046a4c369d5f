"""Per-layer times from onnxruntime's own profiler: the data a per-kernel latency predictor would fit.

The kernel model (hwkd.hardware.cost) is fitted to whole-network times, so its coefficients absorb
each other's errors (docs/decisions-issue13.md, stop 19). This records, per network, each MAC layer's
kernel time from ORT's per-node profile at 1 thread (the NCHWc reorders ORT inserts before a layer
charged to that layer), beside the network's 1-thread CPU and wall time and its traced layers:

    python benchmarks/kernel_dataset.py --networks 80 --out /tmp/kernels.json.gz

Networks: calibration's own families (hwkd.hardware.calib_graphs, a seed of their own) and the
benchmark models of predictor_accuracy.py, FP32 and INT8 QDQ. ``kernel_fit.py`` fits and scores
predictors on the file, nothing timed again.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from hwkd.hardware import nodeprofile, timing  # noqa: E402
from hwkd.hardware.calib_graphs import FAMILIES, random_network  # noqa: E402
from hwkd.hardware.calibrate import quantize  # noqa: E402
from hwkd.hardware.onnx_trace import trace_onnx  # noqa: E402

# Node op types that run a traced MAC layer (conv / gemm), FP32 and INT8, NCHWc or not.
MAC_OPS = frozenset({"Conv", "FusedConv", "QLinearConv", "Gemm", "FusedGemm", "MatMul", "QGemm", "ConvInteger",
                     "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "NhwcFusedConv", "ConvTranspose"})  # fmt: skip
# Layout changes ORT inserts: NCHWc reorders (FP32 on x86), NCHW <-> NHWC transposes (INT8 on x86).
REORDER_OPS = frozenset({"ReorderInput", "ReorderOutput", "Transpose"})


def profile_nodes(path: Path, runs: int = 30, warmup: int = 5) -> list[dict]:
    """Each executed node in execution order: op type, kernel time (us, trimmed mean), output shape."""
    order: list[str] = []
    durs: dict[str, list[float]] = {}
    info: dict[str, tuple[str, list[int]]] = {}
    for e in nodeprofile.profile_events(path, 1, runs, warmup):
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        if node not in durs:
            order.append(node)
            durs[node] = []
            out = (e["args"].get("output_type_shape") or [{}])[0]
            info[node] = (e["args"].get("op_name", "?"), next(iter(out.values()), []) if out else [])
        durs[node].append(float(e["dur"]))
    return [{"node": n, "op": info[n][0], "us": trimmed_mean(durs[n][warmup:] or durs[n]), "out": info[n][1]}
            for n in order]  # fmt: skip


def trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    """Mean of the middle 80%: the profiler reports whole microseconds, so the median of a 0.4 us
    kernel is 0 or 1, while the mean of many runs resolves it; the trim drops preemptions."""
    v = np.sort(np.asarray(values, dtype=float))
    k = int(len(v) * cut)
    return float(v[k : len(v) - k].mean()) if len(v) > 2 * k else float(v.mean())


def mac_layers(works: list) -> list[int]:
    """Indices of the traced layers ORT runs as a MAC node: unfused convs and gemms."""
    return [i for i, w in enumerate(works) if not w.fused and w.macs > 0]


def layer_times(works: list, nodes: list[dict]) -> tuple[dict[int, float], float, str]:
    """Kernel time (us) of each traced MAC layer (index into ``works``), the time of the other nodes,
    and why the nodes could not be matched ("" when they were).

    ORT keeps the graph's order, so the i-th MAC node runs the i-th unfused MAC layer; each match is
    checked on its output's spatial size. A layout node (reorder, transpose) is charged to the MAC layer
    after it (ORT puts one before a conv that takes NCHW input from an NCHWc producer), a trailing one to
    the last.
    """
    macs = mac_layers(works)
    mac_nodes = [n for n in nodes if n["op"] in MAC_OPS]
    if len(macs) != len(mac_nodes):
        return {}, 0.0, f"{len(macs)} MAC layers traced, {len(mac_nodes)} MAC nodes executed"
    for i, n in zip(macs, mac_nodes, strict=True):
        w = works[i]
        out = n["out"]  # NCHW, NCHWc or (INT8) NHWC
        if w.kind != "gemm" and len(out) == 4 and w.act_out // max(w.channels, 1) not in (out[2] * out[3], out[1] * out[2]):
            return {}, 0.0, f"{w.name}: {w.act_out // max(w.channels, 1)} output pixels traced, node {n['node']} {n['out']}"
    times: dict[int, float] = {}
    k, pending = 0, 0.0
    for n in nodes:
        if n["op"] in REORDER_OPS:
            pending += n["us"]
        elif n["op"] in MAC_OPS:
            times[macs[k]] = n["us"] + pending
            pending, k = 0.0, k + 1
    if macs:
        times[macs[-1]] += pending
    other = sum(n["us"] for n in nodes if n["op"] not in MAC_OPS and n["op"] not in REORDER_OPS)
    return times, other, ""


def main() -> int:
    import predictor_accuracy as pa

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=80, help="calibration-family networks per precision")
    parser.add_argument("--seed", type=int, default=7, help="the networks' seed (calibration's own is 0)")
    parser.add_argument("--runs", type=int, default=30, help="profiled runs per network")
    parser.add_argument("--no-torchvision", action="store_true", help="leave out the 224 px torchvision/timm models")
    parser.add_argument("--out", type=Path, required=True, help="the dataset (JSON, gzipped if it ends in .gz)")
    args = parser.parse_args()
    started = time.time()
    load_start = timing.load_average()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="hwkd-kernels-") as tmp:
        root = Path(tmp)
        items: list[dict] = []
        import onnx

        for i in range(args.networks):
            family = FAMILIES[i % len(FAMILIES)]
            fp32 = root / f"net{i}_fp32.onnx"
            onnx.save(random_network(rng, family=family), fp32)
            items.append({"model": f"net{i}", "group": f"calibration:{family}", "precision": "fp32", "path": fp32})
            items.append({"model": f"net{i}", "group": f"calibration:{family}", "precision": "int8",
                          "path": quantize(fp32, root / f"net{i}_int8.onnx", rng)})  # fmt: skip
        items += pa.export_models(root, quick=False, torchvision=not args.no_torchvision)
        print(f"timing {len(items)} models at 1 thread ...", flush=True)
        jobs = [(it["path"], 1) for it in items]
        cpu: dict[int, float] = {}
        walls = timing.time_interleaved(jobs, 10, 60, 3, cpu_ms=cpu)
        print(f"profiling their nodes ({time.time() - started:.0f} s) ...", flush=True)
        out = []
        for k, it in enumerate(items):
            works = trace_onnx(it["path"])[0]
            nodes = profile_nodes(it["path"], runs=args.runs)
            times, other, why = layer_times(works, nodes)
            out.append({**{key: it[key] for key in ("model", "group", "precision")},
                        "wall_ms": walls[k], "cpu_ms": cpu.get(k, walls[k]),
                        "works": [dataclasses.asdict(w) for w in works], "nodes": nodes,
                        "layer_us": {str(i): us for i, us in times.items()}, "other_us": other, "unmatched": why})  # fmt: skip
    data = {"command": " ".join(["python benchmarks/kernel_dataset.py", *sys.argv[1:]]),
            "load_average_1min": {"start": load_start, "end": timing.load_average()},
            "seconds": round(time.time() - started, 1), "models": out}  # fmt: skip
    raw = json.dumps(data).encode()
    args.out.write_bytes(gzip.compress(raw) if args.out.suffix == ".gz" else raw)
    bad = [f"{m['model']} {m['precision']}: {m['unmatched']}" for m in out if m["unmatched"]]
    print(f"wrote {args.out}: {len(out)} models, {len(bad)} unmatched, {data['seconds']} s")
    for line in bad[:10]:
        print("  unmatched:", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
