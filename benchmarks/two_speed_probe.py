"""Is this host's speed steady right now, at 1 and at 2 (or N) threads? Run it before timing anything.

Calibration's reference network (``calib_graphs.reference_network``), one fresh onnxruntime session after
another, alternating 1 thread and ``--threads``, each timed ``--runs`` times (p50), for ``--seconds``.
Reports every session's p50 and, per thread count, the median, the spread ((max - min) / median) and the
share of sessions more than 20% slower than that thread count's fastest decile: a VM whose cores are
shared shows it as periods in which the N-thread runs slow down (stop 28: 0.089 -> 0.195 ms at 2 threads,
slower than 1 thread's steady 0.108 ms, with no steal time reported). Writes
benchmarks/results/two_speed_probe[_TAG].{json,md}.

    python benchmarks/two_speed_probe.py --seconds 90 --tag stop28
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hwkd.artifacts import atomic_write  # noqa: E402
from hwkd.hardware import timing  # noqa: E402
from hwkd.hardware.calib_graphs import reference_network  # noqa: E402
from hwkd.onnx import host  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SLOW = 1.2  # a session this much slower than its thread count's fastest decile counts as slow


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2000, help="timed runs per session (after 20 warm-ups)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    import onnx

    path = Path(tempfile.mkdtemp()) / "reference.onnx"
    onnx.save(reference_network(), path)
    sessions = []
    t0 = time.time()
    while time.time() - t0 < args.seconds:
        for n in (1, args.threads):
            p50 = statistics.median(timing.time_job(path, n, 20, args.runs))
            sessions.append({"t_s": round(time.time() - t0, 1), "threads": n, "p50_ms": round(p50, 4)})
    summary = {}
    for n in (1, args.threads):
        v = np.array([s["p50_ms"] for s in sessions if s["threads"] == n])
        fast = float(np.percentile(v, 10))
        summary[str(n)] = {"sessions": len(v), "median_ms": round(float(np.median(v)), 4), "fastest_decile_ms": round(fast, 4),
                           "spread_pct": round(float((v.max() - v.min()) / np.median(v) * 100), 1),
                           "slow_share_pct": round(float((v > SLOW * fast).mean() * 100), 1)}  # fmt: skip
    out = {"command": "python " + " ".join(sys.argv), "host": host.host_info(), "summary": summary, "sessions": sessions}
    stem = RESULTS / f"two_speed_probe{('_' + args.tag) if args.tag else ''}"
    atomic_write(stem.with_suffix(".json"), json.dumps(out, indent=1) + "\n")
    lines = ["# two_speed_probe", "", f"Command: `{out['command']}`. Host: {out['host'].get('cpu')}, "
             f"{out['host'].get('usable_cores')} usable cores. Fresh sessions of calibration's reference network, "
             f"alternating thread counts, {args.runs} runs each (p50).", "",
             "| threads | sessions | median ms | fastest decile ms | spread | sessions > 1.2x the fastest decile |",
             "|---|---|---|---|---|---|",
             *(f"| {n} | {s['sessions']} | {s['median_ms']} | {s['fastest_decile_ms']} | {s['spread_pct']}% | {s['slow_share_pct']}% |"
               for n, s in summary.items()),
             "", f"p50 per session at {args.threads} threads, in order: "
             + " ".join(f"{s['p50_ms']:.3f}" for s in sessions if s["threads"] == args.threads)]  # fmt: skip
    atomic_write(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines[:9]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
