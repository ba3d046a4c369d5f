"""torchrun DDP: ``torchrun --nproc-per-node 2 -m hwkd compress`` on a tiny run (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_resume import BUDGET, tiny_npz  # the same 8x8 data and a budget pruning can reach

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_train_one_model_and_rank_0_writes_it(tmp_path):
    data, run = tiny_npz(tmp_path / "tiny.npz"), tmp_path / "run"
    args = [
        "--data", str(data), "--latency-budget", BUDGET, "--stages", "distill,prune,qat,export",
        "--set", "teacher.epochs=3", "--set", "distill.epochs=3", "--set", "prune.steps=2",
        "--set", "prune.recovery_epochs=1", "--set", "qat.epochs=1", "--set", "train.batch_size=16",
        "--set", "export.min_top1_agreement=0.5",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "hwkd", "compress", *args, "--out", str(run), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
        env={**os.environ, "HWKD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    assert manifest["stages_done"] == ["distill", "prune", "qat", "export"]
    report = json.loads(proc.stdout)  # one report: only rank 0 prints and writes
    assert 0.0 <= report["final"]["accuracy"] <= 1.0
    prune = next(s for s in report["stages"] if s["name"] == "prune")
    assert prune["params"] < next(s for s in report["stages"] if s["name"] == "distill")["params"]
    assert (run / "model.onnx").is_file() and not list(run.rglob("*.tmp"))
    from hwkd.onnx.check import onnx_predict

    out = onnx_predict(run / "model.onnx", np.zeros((2, 1, 8, 8), np.float32))
    assert out.shape == (2, 3)
