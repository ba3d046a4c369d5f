"""End-to-end: the real CLI on the embedded default with tiny settings, and its artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "--set", "teacher.epochs=3",
    "--set", "distill.epochs=2",
    "--set", "prune.steps=1",
    "--set", "prune.recovery_epochs=1",
    "--set", "qat.epochs=1",
    "--set", "bench.iterations=30",
    "--set", "bench.warmup=3",
    "--set", "bench.rounds=2",
    # A 2-epoch student has many near-tied logits, where INT8 rounding flips a few predictions.
    "--set", "export.min_top1_agreement=0.9",
]


def run_cli(*args, env=None, timeout=int(os.environ.get("HWKD_E2E_TIMEOUT", "600"))):  # raise it on a loaded host
    return subprocess.run(
        [sys.executable, "-m", "hwkd", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "demo"
    cache = tmp_path_factory.mktemp("cache")
    proc = run_cli("compress", "--profile", "jetson", "--out", str(out), *TINY, env={"HWKD_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, cache


def test_run_dir_has_every_artifact(tiny_run):
    out, _, _ = tiny_run
    for name in ("manifest.json", "report.json", "report.md", "model.onnx", "model_fp32.onnx", "teacher.onnx"):
        assert (out / name).is_file(), name
    assert (out / "stages" / "distill" / "model.pt").is_file()
    assert (out / "stages" / "prune" / "model.onnx").is_file()
    assert not list(out.rglob("*.tmp")), "temp files left behind"


def test_report_has_all_stages_and_model_fields(tiny_run):
    out, _, _ = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["distill", "prune", "qat", "export", "bench"]
    for record in [report["teacher"], *report["stages"], report["final"]]:
        for key in ("accuracy", "measured_latency_ms", "params", "macs", "model_size_mb"):
            assert record[key] is not None, key
        assert 0.0 <= record["accuracy"] <= 1.0
        assert record["measured_latency_ms"] > 0
    assert report["final"]["precision"] == "int8"
    assert report["final"]["params"] < report["teacher"]["params"]
    assert "measured on this host" in report["measured_on"]["note"]
    md = (out / "report.md").read_text()
    assert "teacher" in md and "final" in md


def test_manifest_records_resolved_config_and_completion(tiny_run):
    out, _, _ = tiny_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["distill"]["epochs"] == 2
    assert set(manifest["stage_seconds"]) == {"distill", "prune", "qat", "export", "bench"}
    assert manifest["versions"]["torch"]


def test_onnx_carries_metadata_and_int8_nodes(tiny_run):
    out, _, _ = tiny_run
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["hwkd.profile"] == "jetson-orin-nano"
    pre = json.loads(props["hwkd.preprocessing"])
    assert pre["resize"] == [32, 32] and pre["scale"] == pytest.approx(1 / 16)
    assert json.loads(props["hwkd.labels"]) == [str(i) for i in range(10)]
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp32 = onnx.load(out / "model_fp32.onnx")
    assert "QuantizeLinear" not in {n.op_type for n in fp32.graph.node}


def test_fp32_model_is_the_pruned_students_export_copied_not_retraced(tiny_run):
    """QAT trains a copy, so the FP32 student after prune is the one exported at the end: its stage
    export is copied (the dynamo exporter is the slowest part of export), with the run's metadata."""
    out, _, _ = tiny_run
    report = json.loads((out / "report.json").read_text())
    export = next(s for s in report["stages"] if s["name"] == "export")
    assert export["details"]["fp32_copied_from"] == "stages/prune/model.onnx"
    fp32, staged = onnx.load(out / "model_fp32.onnx"), onnx.load(out / "stages" / "prune" / "model.onnx")
    assert fp32.graph == staged.graph
    props = {p.key: p.value for p in fp32.metadata_props}
    assert "hwkd.stage" not in props and props["hwkd.profile"] == "jetson-orin-nano"
    bench = next(s for s in report["stages"] if s["name"] == "bench")["details"]["latency"]
    assert bench["fp32"] == bench["prune"], "one graph is timed once, whatever its file name"


def test_separate_script_scores_from_metadata_alone(tiny_run):
    """The metadata alone reproduces hwkd's preprocessing: an outside script (PIL resize, no torch)
    scores the same predictions as hwkd's own pipeline on all 1797 digits."""
    import numpy as np
    from sklearn.datasets import load_digits

    from hwkd.data.dataset import Preprocessing
    from hwkd.onnx.check import onnx_predict
    from hwkd.onnx.export import read_metadata

    out, _, _ = tiny_run
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "score_onnx_digits.py"), str(out / "model.onnx")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    script_acc = json.loads(proc.stdout)["accuracy"]
    digits = load_digits()
    pre = Preprocessing.from_json(read_metadata(out / "model.onnx")["hwkd.preprocessing"])
    logits = onnx_predict(out / "model.onnx", pre.apply(digits.images.astype(np.float32)).numpy())
    hwkd_acc = float((logits.argmax(1) == digits.target).mean())
    assert abs(script_acc - hwkd_acc) <= 0.03, (script_acc, hwkd_acc)


def test_second_run_reuses_cached_teacher(tiny_run, tmp_path):
    _, first, cache = tiny_run
    assert list((cache / "teachers").glob("*.pt"))
    proc = run_cli(
        "compress", "--out", str(tmp_path / "again"), "--stages", "distill", *TINY, "--set", "distill.epochs=1",
        "--json",
        env={"HWKD_CACHE": str(cache)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train built-in teacher" not in proc.stderr
    report = json.loads(proc.stdout)
    assert [s["name"] for s in report["stages"]] == ["distill"]


def test_existing_out_dir_is_refused_without_overwrite(tiny_run):
    out, _, _ = tiny_run
    proc = run_cli("compress", "--out", str(out), *TINY)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr


def _toy_npz_and_teacher(tmp_path: Path) -> tuple[Path, Path]:
    """A user's .npz data (3 classes, 12 px RGB) and an untrained zoo ``cnn`` teacher's state dict."""
    import numpy as np
    import torch

    from hwkd.models.zoo import ZOO

    rng = np.random.default_rng(0)
    n, classes = 90, 3
    y = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, 12, 12, 3), dtype=np.uint8)
    for c in range(classes):  # class-specific bright channel, so there is something to learn
        x[y == c, :, :, c] += 150
    data = tmp_path / "toy.npz"
    np.savez(data, x=x, y=y, labels=np.array(["red", "green", "blue"]))
    teacher = ZOO.get("cnn")(num_classes=classes, in_channels=3)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    return data, tmp_path / "teacher.pt"


def test_bring_your_own_npz_and_state_dict_teacher(tmp_path):
    """A user's .npz data, a state-dict teacher with --teacher-arch, and a 0.5x student, no QAT."""
    data, _ = _toy_npz_and_teacher(tmp_path)
    out = tmp_path / "run"
    proc = run_cli(
        "compress", "--profile", "x86-avx2", "--data", str(data), "--teacher", str(tmp_path / "teacher.pt"),
        "--teacher-arch", "cnn", "--student", "0.5x", "--stages", "distill,prune,export",
        "--allow-weak-teacher",  # an untrained teacher: the check before training would refuse it
        "--set", "distill.epochs=2", "--set", "prune.steps=1", "--set", "prune.recovery_epochs=1",
        "--out", str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = __import__("json").loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["distill", "prune", "export"]
    assert report["final"]["precision"] == "fp32"
    props = {p.key: p.value for p in onnx.load(out / "model.onnx").metadata_props}
    assert json.loads(props["hwkd.labels"]) == ["red", "green", "blue"]
    assert json.loads(props["hwkd.input_shape"]) == [3, 12, 12]


def test_params_share_student_says_which_width_it_chose_or_why_none_fits(tmp_path):
    """--student params:N%: the widest width of the teacher with at most N% of its parameters, printed as a
    note and kept in the manifest; a share no width reaches is exit 2 before any training, nothing written."""
    data, teacher = _toy_npz_and_teacher(tmp_path)
    common = ["compress", "--profile", "x86-avx2", "--data", str(data), "--teacher", str(teacher),
              "--teacher-arch", "cnn", "--allow-weak-teacher", "--stages", "distill", "--set", "distill.epochs=1"]  # fmt: skip
    out = tmp_path / "run"
    proc = run_cli(*common, "--student", "params:40%", "--set", "prune.round_to=1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "x of the teacher, the widest with at most 40% of its parameters" in manifest["student_note"]
    assert "note: " + manifest["student_note"] in " ".join(proc.stderr.split())
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["params"] <= 0.40 * report["teacher"]["params"]
    assert report["student_note"] == manifest["student_note"]
    assert "Student: " + manifest["student_note"].removeprefix("student: ") in (out / "report.md").read_text()
    refused = run_cli(*common, "--student", "params:0.1%", "--out", str(tmp_path / "none"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "No width of the teacher keeps at most 0.1%" in " ".join(refused.stderr.split())
    assert not (tmp_path / "none").exists()


def test_report_html_memory_and_gate_on_a_real_run(tiny_run, tmp_path):
    out, _, _ = tiny_run
    page = (out / "report.html").read_text()
    assert page.count("data:image/svg+xml;base64,") == 4 and "<script" not in page
    report = json.loads((out / "report.json").read_text())
    for record in [report["teacher"], report["final"]]:
        assert record["measured_memory_mb"] is not None and record["measured_memory_mb"] >= 0
        assert record["estimated_memory_mb"] > 0
    # How far the timing rounds moved reaches the final record (for the gate) from the bench stage's stats.
    final_stats = report["latency"]["int8"]
    assert len(final_stats["round_p50"]) == final_stats["rounds"] > 1
    assert report["final"]["measured_latency_round_spread_pct"] == final_stats["round_spread_pct"] >= 0
    # The gate reads the real report: a threshold above the measured p50 passes, one below fails.
    p50 = report["final"]["measured_latency_ms"]
    junit = tmp_path / "gate.xml"
    ok = run_cli("gate", str(out / "report.json"), "--max-latency-ms", str(p50 * 10), "--junit", str(junit))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "<testcase" in junit.read_text() and "<failure" not in junit.read_text()
    bad = run_cli("gate", str(out / "report.json"), "--max-latency-ms", str(p50 / 10))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    # hwkd report regenerates the Markdown and HTML from report.json alone.
    (out / "report.md").unlink()
    regen = run_cli("report", str(out))
    assert regen.returncode == 0, regen.stderr
    assert "final (int8, model.onnx)" in (out / "report.md").read_text()
    # hwkd bench times the run's model and reports the same fields as the gate reads.
    bench = run_cli("bench", str(out / "model.onnx"), "--iterations", "20", "--warmup", "2", "--json")
    assert bench.returncode == 0, bench.stderr
    rec = json.loads(bench.stdout)
    assert rec["latency_ms"]["p50"] <= rec["latency_ms"]["p99"]


def test_int8_run_reports_fp32_qat_and_ptq_side_by_side(tiny_run):
    out, _, _ = tiny_run
    report = json.loads((out / "report.json").read_text())
    q = report["quantization"]
    assert q["method"] == "qat" and q["chosen"] == "qat"
    assert set(q["models"]) == {"fp32", "qat", "ptq", "ptq_u8s8", "ptq_tuned"}
    for m in q["models"].values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["measured_latency_ms"] > 0 and m["model_size_mb"] > 0
    assert q["models"]["qat"]["parity_vs_pytorch"]["top1_agreement"] >= 0.9
    # every INT8 model's executed graph is in the report; hwkd's has no FP32 conv/add island
    for label in ("qat", "ptq", "ptq_u8s8", "ptq_tuned"):
        assert q["models"][label]["executed"]["integer_kernels"] > 0
    assert q["models"]["qat"]["executed"]["float_compute"] == {}
    assert "hwkd-tuned" in q["models"]["ptq_tuned"]["recipe"]
    assert all((out / f"model_{label}.onnx").is_file() for label in ("ptq", "ptq_u8s8", "ptq_tuned"))
    md = (out / "report.md").read_text()
    assert "hwkd QAT vs onnxruntime PTQ" in md and "FP32 compute: none" in md


@pytest.mark.parametrize("method", ["ptq", "auto"])
def test_quant_modes_choose_the_final_model(tiny_run, tmp_path, method):
    _, _, cache = tiny_run
    out = tmp_path / method
    proc = run_cli(
        "compress", "--out", str(out), "--stages", "distill,qat,export", "--quant", method, *TINY, "--json",
        env={"HWKD_CACHE": str(cache)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    q = json.loads(proc.stdout)["quantization"]
    assert q["method"] == method
    ptqs = ("ptq", "ptq_u8s8", "ptq_tuned")
    if method == "ptq":
        assert q["chosen"] in ptqs and set(q["models"]) == {"fp32", *ptqs}
        best = max(q["models"][k]["val_accuracy"] for k in ptqs)
        assert q["models"][q["chosen"]]["val_accuracy"] == best
        assert not (out / "model_qat.onnx").exists()
    else:
        val = {k: q["models"][k]["val_accuracy"] for k in ("qat", *ptqs)}
        assert val[q["chosen"]] == max(val.values())  # auto chooses among all INT8 models
        for other in set(val) - {q["chosen"]}:
            assert (out / f"model_{other}.onnx").is_file()
    assert onnx.load(out / "model.onnx").metadata_props


def test_fp16_on_a_cpu_profile_is_refused(tmp_path):
    proc = run_cli("compress", "--profile", "x86-avx2", "--precision", "fp16", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "GPU profile" in proc.stderr and "Traceback" not in proc.stderr
