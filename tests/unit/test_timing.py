"""Calibration knows when its numbers are bad: probe spread and host load, with injected timings."""

from __future__ import annotations

import dataclasses

import pytest

from hwkd.hardware.timing import busy_cores, check_stability, with_retries


def test_steady_probes_on_an_idle_host_are_trusted():
    v = check_stability([1.00, 1.02, 0.99], load=0.3, cores=2)
    assert v.trustworthy and v.reasons == []
    assert v.spread_pct == pytest.approx(3.0)
    assert v.load_per_core == pytest.approx(0.15)


def test_probes_that_disagree_are_not_trusted():
    v = check_stability([1.0, 1.3, 1.0], load=0.3, cores=2)
    assert not v.trustworthy
    assert v.spread_pct == pytest.approx(30.0)
    assert "differ by 30.0%" in v.reasons[0]


def test_a_busy_host_is_not_trusted_even_with_steady_probes():
    v = check_stability([1.0, 1.0, 1.0], load=2.5, cores=2)
    assert not v.trustworthy and len(v.reasons) == 1 and "busy" in v.reasons[0] and "2.50" in v.reasons[0]
    assert check_stability([1.0, 1.0], load=-1.0, cores=2).trustworthy  # no load reading on this OS
    assert not check_stability([1.0, 1.0], load=0.5, cores=16).trustworthy  # half a core taken on any host


def _attempts(probe_sets):
    calls = iter(probe_sets)

    def attempt():
        probes = next(calls)
        return {"probes": probes}, probes

    return attempt


def test_a_bad_attempt_is_warned_about_and_retried_to_a_good_one():
    warnings = []
    result, verdict, attempts = with_retries(
        _attempts([[1.0, 1.4, 1.0], [1.0, 1.01, 1.0]]), load=lambda: 0.2, cores=2, retries=2, warn=warnings.append
    )
    assert attempts == 2 and verdict.trustworthy and result["probes"] == [1.0, 1.01, 1.0]
    assert len(warnings) == 1 and "measuring again" in warnings[0] and "differ by 40.0%" in warnings[0]


def test_when_every_attempt_is_bad_the_steadiest_is_kept_and_flagged():
    warnings = []
    result, verdict, attempts = with_retries(
        _attempts([[1.0, 1.5, 1.0], [1.0, 1.2, 1.0]]), load=lambda: 3.0, cores=2, retries=1, warn=warnings.append
    )
    assert attempts == 2 and not verdict.trustworthy
    assert result["probes"] == [1.0, 1.2, 1.0] and verdict.spread_pct == pytest.approx(20.0)
    assert any("busy" in r for r in verdict.reasons)
    assert len(warnings) == 2 and "measuring again" not in warnings[-1]


def test_calibration_on_a_loaded_host_says_its_fit_is_not_trustworthy():
    """A real (tiny) calibration with the load reading injected: the profile and every estimate say so."""
    import numpy as np

    from hwkd.hardware.calibrate import TINY, calibrate, random_network
    from hwkd.hardware.cost import estimate_onnx

    settings = dataclasses.replace(TINY, threads=1, precisions=("fp32",), retries=1)
    messages, record = [], {}
    profile = calibrate(name="loaded", settings=settings, log=messages.append, load=lambda: 8.0, record=record)
    stability = profile.calibration["measured"]["stability"]
    assert stability["trustworthy"] is False and stability["attempts"] == 2
    assert len(stability["probes_ms"]) == settings.rounds + 1  # start, between rounds, end
    assert any("busy" in r for r in stability["reasons"])
    assert sum("warning:" in m for m in messages) == 2
    cost = estimate_onnx(random_network(np.random.default_rng(0), max_macs=2e6), profile)
    assert "untrustworthy" in cost.calibration_warning and cost.threads == 1
    # what the fit saw, for offline work on the model: one row per network, its layers and timings
    rows = record["fp32"]
    assert [r["family"] for r in rows] == ["random", "resnet", "mobile", "grouped"]
    assert all(r["works"] and r["fit_ms"] > 0 and r["wall_1_ms"] > 0 and r["threads"] == 1 for r in rows)


def test_a_probe_that_did_not_get_its_core_is_not_trusted():
    v = check_stability([1.0, 1.0, 1.0], load=0.1, cores=2, cpu_shares=[1.0, 0.4, 0.95])
    assert not v.trustworthy and v.cpu_share == pytest.approx(0.4)
    assert v.reasons == ["the OS gave 60% of the reference probe's run time to other processes"]
    assert check_stability([1.0, 1.0], load=0.1, cores=2, cpu_shares=[0.97, 0.99]).trustworthy


def test_retries_pass_the_probe_cpu_shares_through():
    calls = iter([({"n": 1}, [1.0, 1.0], [0.5, 0.5]), ({"n": 2}, [1.0, 1.0], [1.0, 0.98])])
    result, verdict, attempts = with_retries(lambda: next(calls), load=lambda: 0.0, cores=2, retries=1)
    assert result == {"n": 2} and attempts == 2 and verdict.trustworthy and verdict.cpu_share == pytest.approx(0.98)


def test_busy_cores_counts_other_processes_and_not_this_one(monkeypatch):
    """Ticks of every core over the window, less this process's own CPU time: 250 ticks (2.5 core-seconds
    at 100 ticks/s) in a 1 s window of which this process used 1.0 s leaves 1.5 cores to others."""
    import os

    ticks = iter([1000, 1250])
    own = iter([10.0, 11.0])
    slept = []
    busy = busy_cores(1.0, ticks=lambda: next(ticks), own_cpu_s=lambda: next(own), sleep=slept.append)
    per_s = os.sysconf("SC_CLK_TCK")
    assert slept == [1.0]
    assert busy == pytest.approx(max(0.0, 250 / per_s - 1.0), rel=0.05, abs=0.05)
    # no /proc/stat: the load average stands in, less the core this process kept busy itself
    import hwkd.hardware.timing as timing

    for load, others in ((2.3, 1.3), (0.4, 0.0), (-1.0, -1.0)):
        monkeypatch.setattr(timing, "load_average", lambda load=load: load)
        assert busy_cores(1.0, ticks=lambda: None, sleep=lambda _s: None) == pytest.approx(others)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/stat"), reason="reads /proc/stat")
def test_a_busy_loop_in_another_process_reads_as_about_one_core():
    import subprocess
    import sys
    import time

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
    try:
        time.sleep(0.3)  # the interpreter is up and spinning
        busy = busy_cores(1.0)
    finally:
        spin.kill()
        spin.wait()
    assert busy >= 0.8  # the loop's core (plus whatever else this host runs)


def test_the_untrustworthy_warning_keeps_its_brackets_and_advises_by_reason():
    """Printed through rich, the table name in brackets survives (it was eaten as markup), and the VM advice
    comes only when nothing else was running."""
    import io

    from rich.console import Console

    from hwkd.cli import untrustworthy_calibration_warning

    def shown(stability):
        console = Console(file=io.StringIO(), width=400)
        console.print(untrustworthy_calibration_warning(stability), highlight=False)
        return console.file.getvalue()

    moved = shown({"attempts": 2, "reasons": ["the reference probe's timings [at start] differ by 73.6%"]})
    assert "[calibration.measured.stability]" in moved and "[at start]" in moved
    assert "--threads 1" in moved
    busy = shown({"attempts": 2, "reasons": ["the host was busy: other processes used 1.02 of its 2 cores"]})
    assert "--threads 1" not in busy and "after 2 attempt(s)" in busy
    # a 2-thread calibration also timed the probe at 1 thread: the advice follows what it measured
    held = shown({"attempts": 2, "reasons": ["differ by 73.6%"], "spread_1thread_pct": 0.8, "tolerance_pct": 5.0})
    assert "at 1 thread held within 0.8%" in held and "--threads 1" in held
    moved = shown({"attempts": 2, "reasons": ["differ by 73.6%"], "spread_1thread_pct": 12.0, "tolerance_pct": 5.0})
    assert "at 1 thread too (12.0%)" in moved and "--threads 1" not in moved
    # profiles record why (causes), and the advice reads that, not the reasons' wording
    busy = shown({"attempts": 2, "reasons": ["reworded: 1.02 of 2 cores taken"], "causes": ["host_busy"]})
    assert "--threads 1" not in busy
    moved = shown({"attempts": 2, "reasons": ["reworded: other processes were not busy"], "causes": ["speed_moved"]})
    assert "--threads 1" in moved


def test_each_reason_records_its_cause():
    from hwkd.hardware.timing import CAUSES

    v = check_stability([1.0, 1.3, 1.0], load=2.5, cores=2, cpu_shares=[0.4])
    assert v.causes == ["speed_moved", "host_busy", "cpu_taken"] == list(CAUSES) and len(v.reasons) == 3
    assert v.to_dict()["causes"] == v.causes
    assert check_stability([1.0, 1.0], load=0.1, cores=2).causes == []


def test_one_thread_probe_records_the_spread_only_when_timed():
    from hwkd.hardware.timing import one_thread_probe

    assert one_thread_probe([]) == {}
    rec = one_thread_probe([0.108, 0.1085, 0.1078])
    assert rec["probes_1thread_ms"] == [0.108, 0.1085, 0.1078]
    assert rec["spread_1thread_pct"] == pytest.approx(100 * 0.0007 / 0.108, abs=0.01)


def test_a_calibration_at_two_threads_also_times_its_probe_at_one():
    """The profile of a 2-thread calibration records the reference probe at 1 thread beside it (start,
    between rounds, end), which the untrustworthy warning reads."""
    from hwkd.hardware.calibrate import TINY, calibrate

    settings = dataclasses.replace(TINY, threads=2, precisions=("fp32",), retries=0)
    profile = calibrate(name="two", settings=settings, log=lambda _m: None, load=lambda: 0.0)
    stability = profile.calibration["measured"]["stability"]
    assert len(stability["probes_1thread_ms"]) == len(stability["probes_ms"]) == settings.rounds + 1
    assert stability["spread_1thread_pct"] >= 0
