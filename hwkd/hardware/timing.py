"""Calibration's timing, and how it knows when its numbers are bad.

``time_interleaved`` times (model, threads) jobs in rounds, every job once per round, so a burst of
host load lands on all of them alike; ``reference`` is called before the first round, between rounds and
after the last, and times one fixed probe network: if those probe timings disagree by more than
``tolerance``, or the host was busy when calibration began (other processes used ``BUSY_CORES`` of a
core or more, ``busy_cores``), ``check_stability`` says so, ``with_retries`` warns and measures again,
and the profile records the spread and whether the fit is to be trusted.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TOLERANCE = 0.05  # probe spread (max - min) / median above which a calibration is not trusted
BUSY_CORES = 0.5  # cores' worth of other processes' work from which the host counts as busy
BUSY_WINDOW_S = 1.0  # how long busy_cores watches the host while calibration waits
MIN_CPU_SHARE = 0.9  # CPU time / wall time of a 1-thread run below which other processes took the core


def load_average() -> float:
    """The host's 1-minute load average (-1 where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return -1.0


def _busy_ticks() -> int | None:
    """Clock ticks all cores spent not idle (user, nice, system, irq, softirq, steal), from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return user + nice + system + irq + softirq + steal


def busy_cores(window_s: float = BUSY_WINDOW_S, ticks=_busy_ticks, own_cpu_s=time.process_time, sleep=time.sleep) -> float:
    """Cores' worth of CPU time that *other* processes used over ``window_s`` while this one waited.

    Read from /proc/stat, less this process's own CPU time over the window (a thread pool still
    spinning down). Unlike the 1-minute load average it does not count what this process itself did
    just before (building and exporting the networks kept a core busy for a minute: on 2 cores that
    alone read as a busy host). Where /proc/stat is missing: the 1-minute load average less the one
    core this process kept busy before (-1 if there is no load average either).
    """
    first = ticks()
    if first is None:
        return _others_from_load_average()
    own = own_cpu_s()
    start = time.perf_counter()
    sleep(window_s)
    elapsed = max(time.perf_counter() - start, window_s, 1e-3)  # sleep returns late, never early
    last = ticks()
    if last is None:
        return _others_from_load_average()
    per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = (last - first) / per_s - (own_cpu_s() - own)
    return max(0.0, others / elapsed)


def _others_from_load_average() -> float:
    load = load_average()
    return load if load < 0 else max(0.0, load - 1.0)


def _session(path: Path, threads: int) -> tuple[Any, dict[str, np.ndarray]]:
    from hwkd.onnx import bench as ortbench

    session, _ = ortbench.make_session(path, (ortbench.CPU_EP,), threads)
    feed = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        feed[inp.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return session, feed


def time_job(path: Path, threads: int, warmup: int, iterations: int, cpu: list[float] | None = None) -> list[float]:
    """Run times (ms) of one fresh session of ``path`` at ``threads``, after ``warmup`` runs.

    ``cpu``: appended with the CPU time (ms) of the calling thread per run, which at one thread is the
    time ORT really computed (it runs a 1-thread session in the caller); the rest of the wall time the
    OS gave to other processes.
    """
    session, feed = _session(path, threads)
    for _ in range(max(1, warmup)):
        session.run(None, feed)
    out = []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for _ in range(iterations):
        c0 = cpu_clock()
        t0 = clock()
        session.run(None, feed)
        out.append((clock() - t0) / 1e6)
        if cpu is not None:
            cpu.append((cpu_clock() - c0) / 1e6)
    return out


def time_interleaved(
    jobs: Sequence[tuple[Path, int]],
    warmup: int,
    iterations: int,
    rounds: int,
    between: Callable[[int], None] | None = None,
    cpu_ms: dict[int, float] | None = None,
) -> list[float]:
    """Median run time (ms) of each (path, threads) job over ``rounds`` interleaved rounds.

    A job's session lives for one round only (hundreds of calibration networks would not fit in memory
    at once); ``between(r)`` runs before round 0, between rounds and after the last (r = rounds).
    ``cpu_ms``: filled with {job index: median CPU time (ms)} for the 1-thread jobs.
    """
    rounds = max(1, rounds)
    per_round = max(1, iterations // rounds)
    samples: list[list[float]] = [[] for _ in jobs]
    cpu_samples: list[list[float]] = [[] for _ in jobs]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            if between is not None:
                between(r)
            order = range(len(jobs))
            for k in (list(order)[r % max(1, len(jobs)):] + list(order)[: r % max(1, len(jobs))]):
                path, threads = jobs[k]
                cpu = cpu_samples[k] if cpu_ms is not None and threads == 1 else None
                samples[k].extend(time_job(path, threads, warmup if r == 0 else max(1, warmup // 2), per_round, cpu))
        if between is not None:
            between(rounds)
    finally:
        if gc_was_enabled:
            gc.enable()
    if cpu_ms is not None:
        cpu_ms.update({k: statistics.median(c) for k, c in enumerate(cpu_samples) if c})
    return [statistics.median(s) for s in samples]


@dataclass
class Verdict:
    """Whether a calibration's timings can be trusted, and why not."""

    trustworthy: bool
    spread_pct: float  # (max - min) / median of the reference probe's timings, %
    load_per_core: float  # other processes' busy cores per usable core when calibration began (-1: unknown)
    probes_ms: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    cpu_share: float = 1.0  # lowest CPU time / wall time of the 1-thread reference probe (1 = had a core to itself)
    causes: list[str] = field(default_factory=list)  # one of CAUSES per reason, for code to read (reasons are for people)

    def to_dict(self) -> dict[str, Any]:
        return {"trustworthy": self.trustworthy, "spread_pct": round(self.spread_pct, 2),
                "load_per_core": round(self.load_per_core, 2), "probes_ms": [round(p, 4) for p in self.probes_ms],
                "cpu_share": round(self.cpu_share, 3), "reasons": list(self.reasons), "causes": list(self.causes)}  # fmt: skip


# Why a calibration attempt is not trusted, as recorded in the profile's stability table (``causes``):
# its speed moved between the probes, the host was busy when it began, the OS gave the probe's time away.
CAUSES = ("speed_moved", "host_busy", "cpu_taken")
OTHER_WORK = frozenset({"host_busy", "cpu_taken"})


def probe_spread(probes: Sequence[float]) -> float:
    """(max - min) / median of a probe's timings (0 for fewer than two): how far the host's speed moved."""
    return (max(probes) - min(probes)) / statistics.median(probes) if len(probes) > 1 else 0.0


def check_stability(
    probes_ms: Sequence[float], load: float, cores: int, tolerance: float = DEFAULT_TOLERANCE,
    busy: float = BUSY_CORES, cpu_shares: Sequence[float] = (),
) -> Verdict:
    """Judge one calibration attempt from its reference-probe timings, the host load at its start
    (``load``: cores' worth of other processes' work, ``busy_cores``; -1 unknown) and (``cpu_shares``)
    the CPU time / wall time of the 1-thread reference probe."""
    probes = [float(p) for p in probes_ms]
    share = min(cpu_shares) if cpu_shares else 1.0
    spread = probe_spread(probes)
    per_core = load / max(1, cores) if load >= 0 else -1.0
    reasons, causes = [], []
    if spread > tolerance:
        causes.append("speed_moved")
        reasons.append(
            f"the reference probe's timings at start, middle and end differ by {100 * spread:.1f}% "
            f"(more than {100 * tolerance:.0f}%): the host's speed changed during calibration"
        )
    if load >= busy:
        causes.append("host_busy")
        reasons.append(
            f"the host was busy: other processes used {load:.2f} of its {cores} cores when calibration began"
        )
    if share < MIN_CPU_SHARE:
        causes.append("cpu_taken")
        reasons.append(
            f"the OS gave {100 * (1 - share):.0f}% of the reference probe's run time to other processes"
        )
    return Verdict(not reasons, 100 * spread, per_core, probes, reasons, share, causes)


def one_thread_probe(probes_ms: Sequence[float]) -> dict[str, Any]:
    """The reference probe timed at 1 thread beside the N-thread one (calibrations at N > 1 threads): its
    timings and spread, so a profile whose N-thread probe moved says whether 1 thread held (stop 28: on a VM
    whose 2-thread speed flipped 0.09 <-> 0.20 ms, the 1-thread probe held within 1%). Empty when not timed."""
    probes = [float(p) for p in probes_ms]
    if len(probes) < 2:
        return {}
    return {"probes_1thread_ms": [round(p, 4) for p in probes], "spread_1thread_pct": round(100 * probe_spread(probes), 2)}


def with_retries(
    attempt: Callable[[], tuple[Any, list[float]] | tuple[Any, list[float], list[float]]],
    load: Callable[[], float],
    cores: int,
    retries: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    warn: Callable[[str], None] | None = None,
    pause_s: float = 0.0,
) -> tuple[Any, Verdict, int]:
    """Run ``attempt`` (returns its result, its probe timings and optionally the probe's CPU shares) until it is trustworthy or ``retries``
    are spent; warn on every bad attempt. Returns the best attempt's result (the smallest probe spread),
    its verdict and the number of attempts."""
    say = warn or (lambda msg: None)
    best = None
    for n in range(1, retries + 2):
        start_load = load()
        result, probes, *shares = attempt()
        verdict = check_stability(probes, start_load, cores, tolerance, cpu_shares=shares[0] if shares else ())
        if best is None or verdict.spread_pct < best[1].spread_pct:
            best = (result, verdict)
        if verdict.trustworthy:
            return result, verdict, n
        say("warning: " + "; ".join(verdict.reasons) + (" - measuring again" if n <= retries else ""))
        if n <= retries and pause_s:
            time.sleep(pause_s)
    result, verdict = best
    return result, verdict, retries + 1


__all__ = ["CAUSES", "OTHER_WORK", "Verdict", "busy_cores", "check_stability", "load_average", "one_thread_probe", "time_interleaved", "time_job", "with_retries"]
