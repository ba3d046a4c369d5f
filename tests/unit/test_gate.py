"""`hwkd gate`: exit codes, thresholds from budget and flags, baseline regression, JUnit, step summary."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from report_fixtures import report
from typer.testing import CliRunner

from hwkd import api
from hwkd.cli import app
from hwkd.errors import ConfigError
from hwkd.report import gate as gates

runner = CliRunner()


def invoke(*args, env=None):
    result = runner.invoke(app, ["gate", *[str(a) for a in args]], env=env)
    return result.exit_code, result.stdout, result.stderr


def test_passes_against_the_profile_budget(tmp_path):
    code, out, _ = invoke(report(tmp_path / "r.json"))
    assert code == 0, out
    assert "PASS final: latency p50 (measured on host) <= 2 ms [profile budget]" in out
    assert "gate passed" in out


def test_fails_over_budget_with_exit_1(tmp_path):
    code, out, err = invoke(report(tmp_path / "r.json", measured_latency_ms=2.5))
    assert code == 1, err
    assert "FAIL final: latency p50" in out and "gate failed" in out


def test_flags_override_the_budget(tmp_path):
    path = report(tmp_path / "r.json", measured_latency_ms=0.21)
    assert invoke(path, "--max-latency-ms", "0.2")[0] == 1
    assert invoke(path, "--max-latency-ms", "0.25")[0] == 0
    assert invoke(path, "--min-accuracy", "98%")[0] == 0
    assert invoke(path, "--min-accuracy", "0.99")[0] == 1
    assert invoke(path, "--max-memory-mb", "2.5")[0] == 1  # measured peak 2.9 MB
    assert invoke(path, "--max-memory-mb", "2.5", "--source", "estimated")[0] == 0  # estimate 0.4 MB
    assert invoke(path, "--max-memory-mb", "3", "--source", "measured")[0] == 0


def test_sources_gate_the_host_measurement_and_the_device_estimate(tmp_path):
    path = report(tmp_path / "r.json", measured_latency_ms=0.1, estimated_latency_ms=3.0)
    code, out, _ = invoke(path)  # both by default: each figure is a check of its own
    assert code == 1
    assert "PASS final: latency p50 (measured on host) <= 2 ms" in out
    assert "FAIL final: latency (estimated for device) <= 2 ms" in out
    assert invoke(path, "--source", "measured")[0] == 0
    assert invoke(path, "--source", "estimated")[0] == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--min-accuracy", "98"], "--min-accuracy"),  # ambiguous: 98 what?
        (["--tolerance", "five"], "--tolerance"),
        (["--max-latency-ms", "-1"], "positive"),
        (["--source", "guessed"], "--source"),
    ],
)
def test_bad_flags_are_exit_2(tmp_path, args, needle):
    code, _, err = invoke(report(tmp_path / "r.json"), *args)
    assert code == 2 and needle in err and "Traceback" not in err


def test_bad_input_files_are_exit_2(tmp_path):
    code, _, err = invoke(tmp_path / "missing.json")
    assert code == 2 and "does not exist" in err
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = invoke(tmp_path / "bad.json")
    assert code == 2 and "not valid JSON" in err
    (tmp_path / "other.json").write_text('{"format": "something/1"}')
    code, _, err = invoke(tmp_path / "other.json")
    assert code == 2 and "neither" in err


def test_nothing_to_gate_is_exit_2(tmp_path):
    code, _, err = invoke(report(tmp_path / "r.json"), "--no-budget")
    assert code == 2 and "Nothing to gate" in err


def test_missing_metric_asked_by_flag_is_exit_2_but_budget_skips(tmp_path):
    path = report(tmp_path / "r.json", measured_latency_ms=None)
    code, out, _ = invoke(path)
    assert code == 0 and "SKIP final: latency p50" in out
    code, _, err = invoke(path, "--max-latency-ms", "5", "--source", "measured")
    assert code == 2 and "does not have it" in " ".join(err.split())
    assert invoke(path, "--max-latency-ms", "5")[0] == 0  # the estimate is there


def test_baseline_regression_with_tolerance(tmp_path):
    base = report(tmp_path / "base.json", measured_latency_ms=0.20)
    ok = report(tmp_path / "ok.json", measured_latency_ms=0.209)  # +4.5%
    slow = report(tmp_path / "slow.json", measured_latency_ms=0.212)  # +6%
    assert invoke(ok, "--baseline", base, "--tolerance", "5%", "--no-budget")[0] == 0
    code, out, _ = invoke(slow, "--baseline", base, "--tolerance", "5%", "--no-budget")
    assert code == 1 and "FAIL final: latency p50 (measured on host) <= 0.21 ms [baseline +5%]" in out
    assert invoke(slow, "--baseline", base, "--tolerance", "10%", "--no-budget")[0] == 0
    worse = report(tmp_path / "worse.json", accuracy=0.97)  # base 0.98, a 1-point drop
    assert invoke(worse, "--baseline", base, "--no-budget")[0] == 1
    assert invoke(worse, "--baseline", base, "--no-budget", "--accuracy-tolerance", "2%")[0] == 0


def test_junit_has_one_testcase_per_check_and_failures(tmp_path):
    base = report(tmp_path / "base.json")
    path = report(tmp_path / "r.json", measured_latency_ms=2.5, model_size_mb=0.05)
    xml_path = tmp_path / "out" / "gate.xml"
    code, _, _ = invoke(path, "--baseline", base, "--min-accuracy", "0.9", "--junit", xml_path)
    assert code == 1
    root = ET.parse(xml_path).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    result = api.gate(path, baseline=base, min_accuracy=0.9)
    assert len(cases) == len(result.checks) == int(suite.get("tests"))
    failed = [c for c in cases if c.find("failure") is not None]
    assert len(failed) == len(result.failed) == int(suite.get("failures")) == 3  # budget, baseline latency, size
    names = {c.get("name") for c in failed}
    assert any("latency p50" in n and "[profile budget]" in n for n in names)
    assert any("model size" in n and "baseline" in n for n in names)
    assert all(c.find("failure").get("message") for c in failed)
    passed = [c for c in cases if c.find("failure") is None]
    assert any("accuracy" in c.get("name") for c in passed)


def test_step_summary_is_appended(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    code, _, _ = invoke(report(tmp_path / "r.json", measured_latency_ms=3.0), env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert code == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    assert "### hwkd gate: **failed** (1 of 4 checks)" in text
    assert "| ❌ | final: latency p50 (measured on host) <= | 3 ms | 2 ms | profile budget |" in text


def test_gates_a_bench_record(tmp_path, monkeypatch):
    rec = {
        "format": "hwkd.bench/1",
        "budget": None,
        "measured_on": {"cpu": "Test CPU"},
        "results": [
            {"model": "a.onnx", "batch": 1, "latency_ms": {"p50": 1.0}, "peak_memory_mb": 5.0, "file_size_mb": 1.0},
            {"model": "a.onnx", "batch": 8, "latency_ms": {"p50": 6.0}, "peak_memory_mb": 9.0, "file_size_mb": 1.0},
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(rec))
    result = api.gate(path, max_latency_ms=5.0)
    assert [c.status for c in result.checks] == ["passed", "failed"]
    assert result.checks[1].subject == "a.onnx (batch 8)"
    assert invoke(path, "--max-latency-ms", "5", "--json")[0] == 1
    with pytest.raises(ConfigError, match="accuracy"):
        api.gate(path, min_accuracy=0.5)


def test_a_latency_verdict_from_timing_rounds_that_moved_carries_a_note(tmp_path):
    moved = report(tmp_path / "moved.json", measured_latency_round_spread_pct=24.0)
    result = api.gate(moved)
    assert result.exit_code == 0  # the verdict stands; the note says it may not repeat
    (note,) = [n for n in result.notes if "timing rounds" in n]
    assert note.startswith("final: ") and "24%" in note and "--source estimated" in note
    code, out, _ = invoke(moved)
    assert code == 0 and "differed by 24%" in out
    assert not [n for n in api.gate(moved, source="estimated").notes if "timing rounds" in n]  # not gated: no note
    steady = report(tmp_path / "steady.json", measured_latency_round_spread_pct=3.0)
    assert not [n for n in api.gate(steady).notes if "timing rounds" in n]
    assert not [n for n in api.gate(report(tmp_path / "old.json")).notes if "timing rounds" in n]  # older reports


def test_a_bench_records_round_spread_reaches_the_gate(tmp_path):
    rows = [{"model": "a.onnx", "batch": 1, "latency_ms": {"p50": 1.0}, "round_spread_pct": 30.0},
            {"model": "b.onnx", "batch": 1, "latency_ms": {"p50": 1.0}, "round_spread_pct": 2.0}]  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"format": "hwkd.bench/1", "measured_on": {}, "results": rows}))
    notes = [n for n in api.gate(path, max_latency_ms=5.0).notes if "timing rounds" in n]
    assert len(notes) == 1 and notes[0].startswith("a.onnx (batch 1): ")


def test_parse_fraction():
    assert gates.parse_fraction("5%", "--tolerance") == pytest.approx(0.05)
    assert gates.parse_fraction("0.05", "--tolerance") == pytest.approx(0.05)
    with pytest.raises(ConfigError):
        gates.parse_fraction("150%", "--tolerance")
