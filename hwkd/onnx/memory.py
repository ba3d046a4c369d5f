"""Memory a model takes in ONNX Runtime: peak RSS growth, in this process or in a fresh one.

``python -m hwkd.onnx.memory '{"path": ..., "shapes": ...}'`` is the fresh process (see isolated_memory).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _memory_kb() -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of this process in KiB, from /proc; None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            text = fh.read()
        rss = re.search(r"VmRSS:\s+(\d+)", text)
        hwm = re.search(r"VmHWM:\s+(\d+)", text)
        return (int(rss.group(1)), int(hwm.group(1))) if rss and hwm else None
    except OSError:
        return None


MEMORY_METHOD = {
    "peak": "growth of the process peak RSS (VmHWM) over loading the session and its warm-up runs",
    "isolated": "peak RSS (VmHWM) growth of a fresh process over loading the session and its warm-up runs",
    "resident": "growth of the process RSS over loading the session and its warm-up runs (a lower bound: "
    "the process peak was set earlier)",
}


def _memory_growth(before: tuple[int, int] | None, after: tuple[int, int] | None) -> dict[str, Any]:
    """Memory a model took, measured without resetting the process peak (``/usr/bin/time`` reads it).

    When the peak rose while this model loaded and warmed up, the rise over the RSS before is exact;
    otherwise the resident growth is reported and labelled a lower bound.
    """
    if before is None or after is None:
        return {"peak_mb": None, "method": "not measured (no /proc/self/status on this OS)"}
    if after[1] > before[1]:
        return {"peak_mb": round((after[1] - before[0]) / 1024, 2), "method": "peak"}
    return {"peak_mb": round(max(0, after[0] - before[0]) / 1024, 2), "method": "resident"}


def isolated_memory(
    path: str | Path, shapes: Mapping[str, Sequence[int]], providers: Sequence[str], threads: int, warmup: int = 3
) -> dict[str, Any]:
    """Peak memory of one model measured in a fresh Python process (``python -m hwkd.onnx.memory``).

    In a long process (hwkd compress after training) the peak RSS was set long before, so the
    in-process figure would only be a lower bound; a fresh process makes it exact.
    """
    import json
    import subprocess
    import sys

    arg = {"path": str(path), "shapes": {k: list(v) for k, v in shapes.items()}, "providers": list(providers),
           "threads": threads, "warmup": warmup}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hwkd.onnx.memory", json.dumps(arg)], capture_output=True, text=True, timeout=600
        )
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        why = str(exc)[:200]
    return {"peak_mb": None, "method": f"not measured (the measuring process failed: {why})"}


def _isolated_main(arg: dict[str, Any]) -> dict[str, Any]:
    from hwkd.onnx import inputs as ortinputs
    from hwkd.onnx.bench import _time_runs, _warm_ort_env, make_session

    _warm_ort_env()
    shapes = {k: tuple(v) for k, v in arg["shapes"].items()}
    ranges = ortinputs.index_ranges(arg["path"])
    gc.collect()
    before = _memory_kb()
    session, _ = make_session(arg["path"], arg["providers"], arg["threads"])
    specs = ortinputs.input_specs(session)
    feed, _ = ortinputs.make_feed_arrays(specs, shapes, np.random.default_rng(0), ranges=ranges)
    _time_runs(session.run, None, feed, max(1, arg["warmup"]))
    after = _memory_kb()
    out = _memory_growth(before, after)
    if out["method"] == "peak":
        out["method"] = "isolated"
    return out



if __name__ == "__main__":  # python -m hwkd.onnx.memory '{"path": ..., "shapes": ...}': see isolated_memory
    import json
    import sys

    print(json.dumps(_isolated_main(json.loads(sys.argv[1]))))
