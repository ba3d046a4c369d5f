"""What is this VM's 2-thread slow mode? Thread placement, spinning, or one vCPU slowing down?

Stops 28-29 (``two_speed_probe.py``) found periods of tens of seconds in which every 2-thread session of
calibration's reference network ran at 0.19 ms instead of 0.089 ms, while 1 thread held 0.108 ms. This
script alternates fresh sessions of that network in variants that would tell the causes apart:

- ``1t``: 1 thread, unpinned (the steady reference);
- ``1t_cpuK``: 1 thread pinned to vCPU K (``os.sched_setaffinity``): if one vCPU slows down, its
  1-thread sessions slow down with the 2-thread ones;
- ``2t``: 2 threads, onnxruntime's defaults (workers spin);
- ``2t_nospin``: ``session.intra_op.allow_spinning=0``;
- ``2t_pinned``: the caller pinned to vCPU 0 and ORT's one worker to vCPU 1
  (``session.intra_op_thread_affinities``): if the OS placing both on one vCPU is the cause, this avoids it.

Per session: its p50 and each vCPU's steal share (/proc/stat) while it ran. A session of a variant counts
as slow when it is more than 1.2x that variant's fastest decile. Writes
benchmarks/results/slow_mode_probe[_TAG].{json,md}.

    python benchmarks/slow_mode_probe.py --seconds 240 --tag stop30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hwkd.artifacts import atomic_write  # noqa: E402
from hwkd.hardware.calib_graphs import reference_network  # noqa: E402
from hwkd.onnx import host  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SLOW = 1.2


def steal_ticks() -> dict[str, tuple[int, int]]:
    """Per vCPU: (steal ticks, all ticks) from /proc/stat; empty where there is none."""
    out = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        if line.startswith("cpu") and line[3].isdigit():
            f = line.split()
            out[f[0]] = (int(f[8]), sum(int(x) for x in f[1:9]))
    return out


def session_p50(path: Path, variant: str, runs: int) -> tuple[float, dict[str, float]]:
    import onnxruntime as ort

    everyone = os.sched_getaffinity(0)
    if variant.startswith("1t_cpu"):
        os.sched_setaffinity(0, {int(variant[len("1t_cpu"):])})
    elif variant == "2t_pinned":
        os.sched_setaffinity(0, {0})
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1 if variant.startswith("1t") else 2
        so.inter_op_num_threads = 1
        if variant == "2t_nospin":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if variant == "2t_pinned":
            so.add_session_config_entry("session.intra_op_thread_affinities", "2")  # 1-based: vCPU 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        feed = {inp.name: np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in inp.shape], np.float32)}
        for _ in range(20):
            sess.run(None, feed)
        before, times = steal_ticks(), []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        after = steal_ticks()
    finally:
        os.sched_setaffinity(0, everyone)
    steal = {c: round(100 * (after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]), 1) for c in after if c in before}
    return statistics.median(times) * 1e3, steal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--variants", default="1t,1t_cpu0,1t_cpu1,2t,2t_nospin,2t_pinned")
    ap.add_argument("--runs", type=int, default=1500, help="timed runs per session (after 20 warm-ups)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    import onnx

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    path = Path(tempfile.mkdtemp()) / "reference.onnx"
    onnx.save(reference_network(), path)
    sessions, t0 = [], time.time()
    while time.time() - t0 < args.seconds:
        for v in variants:
            ms, steal = session_p50(path, v, args.runs)
            sessions.append({"t_s": round(time.time() - t0, 1), "variant": v, "p50_ms": round(ms, 4), "steal_pct": steal})
    summary = {}
    for v in variants:
        x = np.array([s["p50_ms"] for s in sessions if s["variant"] == v])
        fast = float(np.percentile(x, 10))
        summary[v] = {"sessions": len(x), "median_ms": round(float(np.median(x)), 4), "fastest_decile_ms": round(fast, 4),
                      "slow_share_pct": round(float((x > SLOW * fast).mean() * 100), 1)}  # fmt: skip
    # the rounds (one session of each variant) in which the 2-thread default was slow, and what the others did then
    rounds = [{s["variant"]: s["p50_ms"] for s in sessions[i:i + len(variants)]}
              for i in range(0, len(sessions) - len(variants) + 1, len(variants))]  # fmt: skip
    if "2t" in variants:
        limit = SLOW * summary["2t"]["fastest_decile_ms"]
        for v in variants:
            for mode, rows in (("slow", [r[v] for r in rounds if r["2t"] > limit]), ("fast", [r[v] for r in rounds if r["2t"] <= limit])):
                summary[v][f"median_ms_when_2t_{mode}"] = round(float(np.median(rows)), 4) if rows else None
    out = {"command": "python " + " ".join(sys.argv), "host": host.host_info(), "summary": summary, "sessions": sessions}
    stem = RESULTS / f"slow_mode_probe{('_' + args.tag) if args.tag else ''}"
    atomic_write(stem.with_suffix(".json"), json.dumps(out, indent=1) + "\n")
    lines = ["# slow_mode_probe", "", f"Command: `{out['command']}`. Host: {out['host'].get('cpu')}, "
             f"{out['host'].get('usable_cores')} usable cores. Fresh sessions of calibration's reference network, one of "
             f"each variant per round, {args.runs} runs each (p50); slow: > {SLOW}x the variant's fastest decile.", "",
             "| variant | sessions | median ms | fastest decile ms | slow sessions | median ms in rounds where 2t was slow | ... where 2t was fast |",
             "|---|---|---|---|---|---|---|",
             *(f"| {v} | {s['sessions']} | {s['median_ms']} | {s['fastest_decile_ms']} | {s['slow_share_pct']}% | "
               f"{s.get('median_ms_when_2t_slow')} | {s.get('median_ms_when_2t_fast')} |" for v, s in summary.items())]  # fmt: skip
    atomic_write(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
