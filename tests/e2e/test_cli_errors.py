"""Bad input: one clear paragraph, exit code 2, no traceback, nothing half-written. One test per case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hwkd.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def assert_clean_error(code, text, *needles):
    assert code == 2, text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, (needle, text)


def test_unknown_profile_lists_available():
    code, text = invoke("compress", "--profile", "no-such-device")
    assert_clean_error(code, text, "no-such-device", "jetson-orin-nano", "rpi4", "x86-avx2")


def test_debug_shows_traceback():
    code, text = invoke("--debug", "compress", "--profile", "no-such-device")
    assert code == 2 and "Traceback" in text


def test_malformed_profile_file_names_file_and_key(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text('name = "mine"\n[budgets]\nlatency_ms = -1\nmemory_mb = 10\nbatch_size = 1\nspeed = 3\n')
    code, text = invoke("compress", "--profile", str(bad))
    assert_clean_error(code, text, "mine.toml")


def test_missing_teacher_file(tmp_path):
    code, text = invoke("compress", "--teacher", str(tmp_path / "nope.pt"), "--teacher-arch", "resnet", "--out", str(tmp_path / "o"))
    assert_clean_error(code, text, "nope.pt", "does not exist")
    assert not (tmp_path / "o").exists()


def test_corrupt_teacher_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    code, text = invoke("compress", "--teacher", str(bad), "--teacher-arch", "resnet", "--out", str(tmp_path / "o"))
    assert_clean_error(code, text, "bad.pt")


def test_corrupt_teacher_without_arch(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    code, text = invoke("compress", "--teacher", str(bad))
    assert_clean_error(code, text, "bad.pt", "--teacher-arch")


def test_empty_image_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    code, text = invoke("compress", "--data", str(tmp_path / "imgs"))
    assert_clean_error(code, text, "imgs")


def test_single_class_image_folder(tmp_path):
    from PIL import Image

    cls = tmp_path / "imgs" / "cat"
    cls.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 40, dtype=np.uint8)).save(cls / f"{i}.png")
    code, text = invoke("compress", "--data", str(tmp_path / "imgs"))
    assert_clean_error(code, text, "class")


def test_teacher_data_shape_mismatch(tmp_path):
    # A TorchScript teacher built for 3-channel input, given 1-channel digits.
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    path = tmp_path / "rgb_teacher.pt"
    torch.jit.script(net).save(str(path))
    code, text = invoke("compress", "--teacher", str(path), "--out", str(tmp_path / "o"))
    assert_clean_error(code, text, "(1, 32, 32)")


@pytest.mark.parametrize("flag,value", [("--latency-budget", "fast"), ("--latency-budget", "-3ms"), ("--memory-budget", "0MB")])
def test_malformed_budget(flag, value, tmp_path):
    code, text = invoke("compress", flag, value, "--out", str(tmp_path / "o"))
    assert_clean_error(code, text, value)
    assert not (tmp_path / "o").exists()


def test_unknown_stage():
    code, text = invoke("compress", "--stages", "distill,quantize")
    assert_clean_error(code, text, "quantize", "distill, prune, qat, export, bench")


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[distill]\nepochz = 3\n")
    code, text = invoke("compress", "--config", str(recipe))
    assert_clean_error(code, text, "epochz", "epochs")


def test_module_factory_needs_trust_code():
    code, text = invoke("compress", "--teacher", "os:getcwd")
    assert_clean_error(code, text, "--trust-code")


def test_profiles_list_and_show_json():
    import json

    result = runner.invoke(app, ["profiles", "list", "--json"])
    assert result.exit_code == 0
    names = {p["name"] for p in json.loads(result.output)}
    assert {"jetson-orin-nano", "jetson-nano", "jetson-agx-orin", "rpi4", "rpi5", "x86-avx2"} <= names
    result = runner.invoke(app, ["profiles", "show", "jetson", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["name"] == "jetson-orin-nano"


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, hwkd.cli; assert 'torch' not in sys.modules, 'torch imported at CLI import'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_weak_teacher_is_refused_before_training(tmp_path):
    """A teacher at chance (here: all weights zero, so always class 0) names the preprocessing flags."""
    from hwkd.models.zoo import ZOO

    teacher = ZOO.get("cnn")(num_classes=10, in_channels=1)
    torch.save({k: torch.zeros_like(v) for k, v in teacher.state_dict().items()}, tmp_path / "t.pt")
    code, text = invoke("compress", "--teacher", str(tmp_path / "t.pt"), "--teacher-arch", "cnn",
                        "--out", str(tmp_path / "o"))  # fmt: skip
    assert_clean_error(code, text, "t.pt", "below 1.5x chance", "preprocessing", "--mean", "--allow-weak-teacher")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_unavailable_device_and_cpu_amp_are_refused(tmp_path):
    code, text = invoke("compress", "--device", "cuda", "--out", str(tmp_path / "o"))
    assert_clean_error(code, text, "--device cuda", "--device cpu")
    code, text = invoke("compress", "--device", "cpu", "--amp", "bf16", "--out", str(tmp_path / "o"))
    assert_clean_error(code, text, "--amp bf16", "CUDA")
    assert not (tmp_path / "o").exists()
