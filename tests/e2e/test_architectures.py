"""Every common torchvision / timm architecture runs all five stages as a student, or fails before training
with a message naming what and the way round it. Tiny settings: a generated 32 px RGB image folder, one
epoch per stage, minimal benchmarking; only the public CLI and a data folder are used.

Wall time per architecture is written to ``$HWKD_ARCH_TIMES`` (JSON lines) when that is set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from image_folders import make_image_folder
from typer.testing import CliRunner

pytestmark = [pytest.mark.e2e, pytest.mark.arch]

_HAVE_VISION = all(importlib.util.find_spec(m) is not None for m in ("torchvision", "timm"))
if not _HAVE_VISION:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        # CI must really run these: a missing extra there is a broken install, not a reason to skip.
        raise RuntimeError("CI=true but torchvision/timm are not installed: install hwkd[vision] (see .ci/run)")
    pytest.skip("torchvision and timm (pip install 'hwkd[vision]') are not installed", allow_module_level=True)

# (student, marks). "pass": all five stages, INT8 model.onnx with parity; a refusal would be listed with
# the text its message must contain and checked to happen before any training.
ARCHS = [
    pytest.param("torchvision:resnet18"),  # crashed torchao's X86InductorQuantizer before hwkd's own quantizer
    pytest.param("torchvision:resnet50"),
    pytest.param("torchvision:mobilenet_v2"),
    pytest.param("torchvision:mobilenet_v3_small"),
    pytest.param("torchvision:mobilenet_v3_large"),
    pytest.param("torchvision:efficientnet_b0"),
    pytest.param("torchvision:shufflenet_v2_x0_5"),  # channel shuffle: those layers stay unpruned
    pytest.param("torchvision:regnet_x_400mf"),
    pytest.param("timm:resnet18"),
    pytest.param("timm:efficientnet_b0"),
    pytest.param("timm:mobilenetv3_small_050"),
]

TINY = [
    "--profile", "x86-avx2",
    "--set", "teacher.epochs=4",
    "--set", "train.batch_size=8",
    "--set", "distill.epochs=1",
    "--set", "prune.mode=ratio",
    "--set", "prune.ratio=0.3",
    "--set", "prune.steps=1",
    "--set", "prune.recovery_epochs=1",
    "--set", "qat.epochs=1",
    "--set", "bench.iterations=3",
    "--set", "bench.warmup=1",
    "--set", "bench.rounds=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("rgb") / "data")


def _invoke(args: list[str]) -> tuple[int, str, BaseException | None]:
    from hwkd.cli import app

    result = CliRunner().invoke(app, args)
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, text, exc


def _record_time(student: str, seconds: float, code: int) -> None:
    path = os.environ.get("HWKD_ARCH_TIMES")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"student": student, "seconds": round(seconds, 1), "exit_code": code}) + "\n")


def _check_reloads_from_run_dir(out: Path) -> None:
    """The pruned student rebuilds from its checkpoint spec alone and computes what its ONNX file does."""
    import onnxruntime as ort
    import torch

    from hwkd.artifacts import load_model
    from hwkd.models.sources import build_from_spec

    model, spec, _ = load_model(out / "stages" / "prune" / "model.pt", build_from_spec)
    assert spec["kind"] in ("torchvision", "timm")
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    sess = ort.InferenceSession(str(out / "stages" / "prune" / "model.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    onnx_out = np.concatenate([sess.run(None, {name: x[i : i + 1].numpy()})[0] for i in range(2)])
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), onnx_out, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("student", ARCHS)
def test_architecture_runs_all_stages_or_refuses_before_training(student, image_folder, tmp_path):
    import onnx

    out = tmp_path / "run"
    t0 = time.perf_counter()
    code, text, exc = _invoke(["compress", "--data", str(image_folder), "--student", student, "--out", str(out), *TINY])
    _record_time(student, time.perf_counter() - t0, code)
    assert exc is None, f"{type(exc).__name__}: {exc}\n{text[-3000:]}"  # a traceback, not a clean error
    assert code == 0, text[-3000:]
    assert "Traceback" not in text and "KernelPreference" not in text
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["distill", "prune", "qat", "export", "bench"]
    assert report["final"]["precision"] == "int8"
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    prune = next(s for s in report["stages"] if s["name"] == "prune")
    assert prune["params"] < report["stages"][0]["params"], "pruning removed nothing"
    _check_reloads_from_run_dir(out)
