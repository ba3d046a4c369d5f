"""Model sources (zoo, torchvision:, timm:, factory, torchscript): specs, weights, errors, round trips."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from hwkd.artifacts import load_model, save_model
from hwkd.errors import ModelError
from hwkd.models.loaders import build_student, load_teacher, zoo_spec
from hwkd.models.sources import (
    IMAGENET_MEAN,
    SOURCES,
    build_from_spec,
    default_preprocessing,
    import_vision,
    parse_ref,
    spec_for,
)
from hwkd.models.zoo import ZOO

pytest.importorskip("torchvision")
pytest.importorskip("timm")

torch.set_num_threads(2)
K = 3  # classes


def _x(n: int = 2, c: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(0))


def test_registry_lists_every_source_kind():
    assert SOURCES.names() == ["factory", "timm", "torchscript", "torchvision", "zoo"]


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("torchvision:resnet18", ("torchvision", "resnet18")),
        ("timm:efficientnet_b0", ("timm", "efficientnet_b0")),
        ("zoo:mobilenetv2", ("zoo", "mobilenetv2")),
        ("resnet", ("zoo", "resnet")),
        ("mypkg.models:build", ("factory", "mypkg.models:build")),
        ("0.5x", None),
    ],
)
def test_parse_ref(ref, expected):
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    ("ref", "kwargs"),
    [("torchvision:resnet18", {"num_classes": K}), ("timm:resnet18", {"num_classes": K, "in_chans": 3})],
)
def test_spec_format_and_round_trip_through_a_checkpoint(ref, kwargs, tmp_path):
    kind, name = parse_ref(ref)
    spec = spec_for(ref, K, 3)
    assert spec == {"kind": kind, "name": name, "kwargs": kwargs}  # the format in INTERFACES.md
    model = build_from_spec(spec).eval()
    path = save_model(tmp_path / "m.pt", model, spec)
    loaded, loaded_spec, _ = load_model(path, build_from_spec)
    loaded.eval()
    assert loaded_spec == spec
    x = _x()
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("ref", ["torchvision:mobilenet_v3_small", "timm:mobilenetv3_small_050"])
def test_pruned_vision_student_reloads_from_its_checkpoint(ref, tmp_path):
    """A width-multiplier student of a torchvision/timm teacher is pruned; the run dir rebuilds it."""
    teacher_spec = spec_for(ref, K, 3)
    teacher = build_from_spec(teacher_spec).eval()
    student, spec = build_student("0.5x", teacher, teacher_spec, K, 3, False, _x(1))
    assert spec == teacher_spec
    n = sum(p.numel() for p in student.parameters())
    assert n < 0.8 * sum(p.numel() for p in teacher.parameters())
    student.eval()
    path = save_model(tmp_path / "pruned.pt", student, spec)
    loaded, _, _ = load_model(path, build_from_spec)
    loaded.eval()
    assert sum(p.numel() for p in loaded.parameters()) == n
    x = _x()
    assert torch.equal(loaded(x), student(x))


def test_builds_never_download_weights(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for ref in ("torchvision:resnet18", "timm:resnet18"):
        assert build_from_spec(spec_for(ref, K, 3))(_x()).shape == (2, K)


def test_teacher_arch_loads_a_torchvision_state_dict(tmp_path):
    ref = build_from_spec(spec_for("torchvision:resnet18", K, 3)).eval()
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)  # DDP-style file
    model, spec = load_teacher(str(path), "torchvision:resnet18", K, 3, trust_code=False)
    assert spec["kind"] == "torchvision" and not model.training
    x = _x()
    assert torch.equal(model(x), ref(x))


def test_teacher_head_size_mismatch_names_the_head_and_classes(tmp_path):
    path = tmp_path / "imagenet_head.pt"
    torch.save(build_from_spec(spec_for("torchvision:resnet18", 1000, 3)).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_teacher(str(path), "torchvision:resnet18", K, 3, trust_code=False)
    msg = str(info.value)
    assert "shape mismatches fc.weight: file (1000, 512) vs model (3, 512)" in msg
    assert "1000 outputs" in msg and f"{K} classes" in msg


def test_teacher_wrong_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "timm.pt"
    torch.save(build_from_spec(spec_for("timm:efficientnet_b0", K, 3)).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_teacher(str(path), "torchvision:resnet18", K, 3, trust_code=False)
    msg = str(info.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "'torchvision:resnet18'" in msg


def test_teacher_given_as_architecture_name_points_at_teacher_arch():
    with pytest.raises(ModelError, match="--teacher WEIGHTS.pt --teacher-arch timm:resnet18"):
        load_teacher("timm:resnet18", None, K, 3, trust_code=False)


def test_student_weights_state_dict_and_checkpoint(tmp_path):
    ref = build_from_spec(spec_for("timm:resnet18", K, 3)).eval()
    sd = tmp_path / "student.pt"
    torch.save(ref.state_dict(), sd)
    teacher = ZOO.get("cnn")(K, 3)
    model, spec = build_student("timm:resnet18", teacher, zoo_spec("cnn", K, 3), K, 3, False, _x(1), weights=str(sd))
    model.eval()
    x = _x()
    assert spec["kind"] == "timm" and torch.equal(model(x), ref(x))
    # an hwkd checkpoint (e.g. a pruned student from an earlier run) brings its own structure
    ckpt = save_model(tmp_path / "ckpt.pt", ref, spec)
    model, spec2 = build_student(None, teacher, zoo_spec("cnn", K, 3), K, 3, False, _x(1), weights=str(ckpt))
    assert spec2 == spec and torch.equal(model.eval()(x), ref(x))
    with pytest.raises(ModelError, match="not of --student 'torchvision:resnet18'"):
        build_student("torchvision:resnet18", teacher, zoo_spec("cnn", K, 3), K, 3, False, _x(1), weights=str(ckpt))
    with pytest.raises(ModelError, match="does not fit the 'timm:efficientnet_b0' architecture"):
        build_student("timm:efficientnet_b0", teacher, zoo_spec("cnn", K, 3), K, 3, False, _x(1), weights=str(sd))


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("torchvision:resnet181", "Did you mean resnet18"),
        ("timm:efficientnet_b00", "Did you mean"),
        ("torchvision:", "names no architecture"),
        ("vgg", "Unknown model 'vgg'"),
    ],
)
def test_unknown_architectures_are_clear_errors(ref, needle):
    with pytest.raises(ModelError, match=needle):
        spec_for(ref, K, 3)


def test_torchvision_refuses_grayscale_and_points_at_timm():
    with pytest.raises(ModelError, match="3-channel.*1 channel.*timm"):
        spec_for("torchvision:resnet18", K, 1)
    assert build_from_spec(spec_for("timm:resnet18", K, 1))(_x(c=1)).shape == (2, K)  # timm takes in_chans


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_missing_vision_extra_names_the_extra(package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ModuleNotFoundError
    with pytest.raises(ModelError) as info:
        spec_for(f"{package}:resnet18", K, 3)
    assert f"needs {package}, which is not installed" in str(info.value)
    assert "pip install 'hwkd[vision]'" in str(info.value)


def test_broken_torchvision_install_names_the_matching_pin(monkeypatch):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ModelError, match=r"does not import with torch .*torchvision::nms.*torchvision==0\.29\.1"):
        import_vision("torchvision", "torchvision:resnet18")


def test_factory_refs_need_trust_code():
    with pytest.raises(ModelError, match="--trust-code"):
        build_from_spec(spec_for("os.path:join", K, 3))
    with pytest.raises(ModelError, match="--trust-code"):
        build_student("os.path:join", ZOO.get("cnn")(K, 3), zoo_spec("cnn", K, 3), K, 3, False, _x(1))


def test_default_preprocessing_per_source():
    tv = default_preprocessing(spec_for("torchvision:resnet18", K, 3))
    assert tv["mean"] == list(IMAGENET_MEAN)
    timm_pre = default_preprocessing(spec_for("timm:inception_v3", K, 3))
    assert timm_pre["mean"] == [0.5, 0.5, 0.5]  # timm's own pretrained_cfg, not ImageNet's
    assert default_preprocessing(zoo_spec("cnn", K, 3)) is None
