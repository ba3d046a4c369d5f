"""The CLI on architectures by name: bad names, head-size mismatches and missing trust are clean exit-2 errors
at teacher loading, before anything is scored or trained."""

from __future__ import annotations

import pytest
import torch
from image_folders import make_image_folder
from typer.testing import CliRunner

from hwkd.cli import app

pytestmark = pytest.mark.e2e
pytest.importorskip("torchvision")
pytest.importorskip("timm")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("rgb") / "data", per_class=8)


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory):
    from hwkd.models.zoo import ZOO

    path = tmp_path_factory.mktemp("t") / "cnn.pt"
    torch.save(ZOO.get("cnn")(3, 3).state_dict(), path)
    return path


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def assert_clean(code, text, *needles, out=None):
    assert code == 2, text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in " ".join(text.split()), (needle, text)
    if out is not None:
        assert not (out / "stages").exists(), "a stage ran before the error"


def test_unknown_torchvision_arch_suggests_names(data, cnn_teacher, tmp_path):
    out = tmp_path / "o"
    code, text = invoke("compress", "--data", str(data), "--teacher", str(cnn_teacher),
                        "--teacher-arch", "torchvision:mobilenet_v3_smal", "--out", str(out))  # fmt: skip
    assert_clean(code, text, "torchvision has no classification model 'mobilenet_v3_smal'", "mobilenet_v3_small", out=out)


def test_imagenet_head_teacher_names_the_head_and_classes(data, tmp_path):
    path = tmp_path / "r18.pt"
    from hwkd.models.sources import build_from_spec

    torch.save(build_from_spec({"kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 1000}}).state_dict(), path)
    out = tmp_path / "o"
    code, text = invoke("compress", "--data", str(data), "--teacher", str(path), "--teacher-arch", "torchvision:resnet18",
                        "--out", str(out))  # fmt: skip
    assert_clean(code, text, "fc.weight: file (1000, 512) vs model (3, 512)", "1000 outputs", "3 classes", out=out)


def test_factory_without_trust_code(data, tmp_path):
    out = tmp_path / "o"
    code, text = invoke("compress", "--data", str(data), "--teacher", "os.path:join", "--out", str(out))
    assert_clean(code, text, "--trust-code", out=out)
