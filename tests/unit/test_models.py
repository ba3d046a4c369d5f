"""Model zoo and model loaders: every zoo model forwards, exports, prunes and round-trips."""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest
import torch
import torch_pruning as tp
from torch import nn

from hwkd.artifacts import load_model, save_model
from hwkd.errors import ModelError
from hwkd.models.loaders import (
    build_from_spec,
    build_student,
    find_head,
    load_teacher,
    parse_params_share,
    parse_width,
    prune_uniform,
    zoo_spec,
)
from hwkd.models.zoo import ZOO

torch.set_num_threads(2)

NUM_CLASSES = 10
SIZE = 16  # small inputs keep export and pruning fast; the zoo models are size-agnostic (global pool)


def _example(in_channels: int = 1, n: int = 2) -> torch.Tensor:
    return torch.randn(n, in_channels, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ZOO.names())
@pytest.mark.parametrize("in_channels", [1, 3])
def test_zoo_forward_shape(name, in_channels):
    model = ZOO.get(name)(num_classes=NUM_CLASSES, in_channels=in_channels).eval()
    out = model(_example(in_channels))
    assert out.shape == (2, NUM_CLASSES)
    assert find_head(model, NUM_CLASSES) is model.head


@pytest.mark.parametrize("name", ZOO.names())
def test_zoo_uses_relu_modules_and_bn_after_convs(name):
    model = ZOO.get(name)(NUM_CLASSES, 1)
    modules = list(model.modules())
    assert any(isinstance(m, nn.ReLU | nn.ReLU6) for m in modules)
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)  # conv -> BN, bias folded into BN
    assert sum(isinstance(m, nn.BatchNorm2d) for m in modules) == len(convs)


@pytest.mark.parametrize("name", ZOO.names())
def test_zoo_exports_with_torch_export(name):
    model = ZOO.get(name)(NUM_CLASSES, 1).eval()
    x = _example()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("name", ZOO.names())
def test_zoo_prunes_with_torch_pruning(name):
    model = ZOO.get(name)(NUM_CLASSES, 1).eval()
    x = _example()
    before = _nparams(model)
    pruner = tp.pruner.BasePruner(
        model,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[find_head(model, NUM_CLASSES)],
        round_to=8,
    )
    pruner.step()
    assert _nparams(model) < 0.6 * before
    assert model(x).shape == (2, NUM_CLASSES)
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", ZOO.names())
def test_zoo_width_multiplier_shrinks_model(name):
    full = ZOO.get(name)(NUM_CLASSES, 1, width=1.0)
    half = ZOO.get(name)(NUM_CLASSES, 1, width=0.5)
    assert _nparams(half) < _nparams(full)
    assert half(_example()).shape == (2, NUM_CLASSES)


def test_student_is_cheaper_than_teacher():
    x = torch.randn(1, 1, 32, 32)
    t_macs, t_params = tp.utils.count_ops_and_params(ZOO.get("resnet")(10, 1).eval(), x)
    s_macs, s_params = tp.utils.count_ops_and_params(ZOO.get("mobilenetv2")(10, 1).eval(), x)
    assert s_macs < t_macs / 4
    assert s_params < t_params / 4


def test_pruned_model_round_trips_through_save_model(tmp_path):
    spec = zoo_spec("mobilenetv2", NUM_CLASSES, 1)
    model = build_from_spec(spec)
    x = _example()
    # Train-mode forwards give the BN layers non-default statistics, so the round trip checks them too.
    model.train()
    model(torch.randn(8, 1, SIZE, SIZE))
    pruned = model.eval()
    tp.pruner.BasePruner(
        pruned,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[find_head(pruned)],
        round_to=8,
    ).step()
    path = save_model(tmp_path / "m.pt", pruned, spec)
    loaded, loaded_spec, _ = load_model(path, build_from_spec)
    assert loaded_spec == spec
    loaded.eval()
    assert torch.equal(loaded(x), pruned(x))
    assert _nparams(loaded) == _nparams(pruned)


def test_build_from_spec_rejects_torchscript_and_untrusted_factory():
    with pytest.raises(ModelError, match="cannot be rebuilt"):
        build_from_spec({"kind": "torchscript", "path": "/x.ts"})
    with pytest.raises(ModelError, match="--trust-code"):
        build_from_spec({"kind": "factory", "ref": "os:getcwd", "kwargs": {}})
    with pytest.raises(ModelError, match="Unknown model 'nope'"):
        build_from_spec({"kind": "zoo", "name": "nope", "kwargs": {}})


# --- teachers ---------------------------------------------------------------------------------------


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A user module ``hwkd_test_factory`` with ``build()`` (tiny CNN teacher) on sys.path."""
    (tmp_path / "hwkd_test_factory.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build(num_classes=10, in_channels=1):
                return nn.Sequential(
                    nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
                    nn.BatchNorm2d(16),
                    nn.ReLU(),
                    nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False),
                    nn.BatchNorm2d(32),
                    nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                    nn.Linear(32, num_classes),
                )

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hwkd_test_factory"
    sys.modules.pop("hwkd_test_factory", None)


def test_load_teacher_from_state_dict_with_arch(tmp_path):
    ref = ZOO.get("cnn")(NUM_CLASSES, 1).eval()
    path = tmp_path / "teacher.pt"
    torch.save(ref.state_dict(), path)
    model, spec = load_teacher(str(path), "cnn", NUM_CLASSES, 1, trust_code=False)
    assert spec == zoo_spec("cnn", NUM_CLASSES, 1)
    assert not model.training
    x = _example()
    assert torch.equal(model(x), ref(x))
    # a checkpoint dict wrapping the state dict also works
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, path)
    model, _ = load_teacher(str(path), "cnn", NUM_CLASSES, 1, trust_code=False)
    assert torch.equal(model(x), ref(x))


def test_load_teacher_wrong_arch_names_keys_and_suggests_arch(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save(ZOO.get("cnn")(NUM_CLASSES, 1).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_teacher(str(path), "resnet", NUM_CLASSES, 1, trust_code=False)
    msg = str(info.value)
    assert str(path) in msg and "missing keys" in msg and "--teacher-arch cnn" in msg


def test_load_teacher_state_dict_shape_mismatch(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save(ZOO.get("cnn")(5, 1).state_dict(), path)
    with pytest.raises(ModelError, match=r"shape mismatches head\.weight"):
        load_teacher(str(path), "cnn", NUM_CLASSES, 1, trust_code=False)


def test_load_teacher_from_torchscript(tmp_path):
    ref = ZOO.get("cnn")(NUM_CLASSES, 1).eval()
    path = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.trace(ref, _example()), str(path))
    model, spec = load_teacher(str(path), None, NUM_CLASSES, 1, trust_code=False)
    assert spec == {"kind": "torchscript", "path": str(path.resolve())}
    x = _example()
    torch.testing.assert_close(model(x), ref(x))
    # a TorchScript teacher cannot become a width-multiplier student
    with pytest.raises(ModelError, match="TorchScript"):
        build_student("0.5x", model, spec, NUM_CLASSES, 1, False, x)


def test_load_teacher_state_dict_without_arch_asks_for_it(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save(ZOO.get("cnn")(NUM_CLASSES, 1).state_dict(), path)
    with pytest.raises(ModelError, match="--teacher-arch") as info:
        load_teacher(str(path), None, NUM_CLASSES, 1, trust_code=False)
    assert "not a TorchScript file" in str(info.value) and "cnn" in str(info.value)


def test_load_teacher_from_hwkd_checkpoint(tmp_path):
    spec = zoo_spec("cnn", NUM_CLASSES, 1)
    ref = build_from_spec(spec).eval()
    path = save_model(tmp_path / "student.pt", ref, spec)
    model, loaded_spec = load_teacher(str(path), None, NUM_CLASSES, 1, trust_code=False)
    assert loaded_spec == spec
    x = _example()
    assert torch.equal(model(x), ref(x))


def test_load_teacher_from_factory_requires_trust(factory_module):
    ref = f"{factory_module}:build"
    with pytest.raises(ModelError, match="--trust-code"):
        load_teacher(ref, None, NUM_CLASSES, 1, trust_code=False)
    model, spec = load_teacher(ref, None, NUM_CLASSES, 1, trust_code=True)
    assert spec == {"kind": "factory", "ref": ref, "kwargs": {}}
    assert not model.training and model(_example()).shape == (2, NUM_CLASSES)


def test_load_teacher_factory_errors(factory_module):
    with pytest.raises(ModelError, match="Could not import module 'no_such_module_xyz'"):
        load_teacher("no_such_module_xyz:build", None, NUM_CLASSES, 1, trust_code=True)
    with pytest.raises(ModelError, match="has no attribute 'missing'"):
        load_teacher(f"{factory_module}:missing", None, NUM_CLASSES, 1, trust_code=True)
    with pytest.raises(ModelError, match="not callable"):
        load_teacher(f"{factory_module}:NOT_CALLABLE", None, NUM_CLASSES, 1, trust_code=True)


def test_load_teacher_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match="does not exist") as info:
        load_teacher(str(missing), None, NUM_CLASSES, 1, trust_code=False)
    assert str(missing) in str(info.value)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a model" * 10)
    for arch in (None, "cnn"):
        with pytest.raises(ModelError) as info:
            load_teacher(str(corrupt), arch, NUM_CLASSES, 1, trust_code=False)
        assert str(corrupt) in str(info.value)


def test_load_teacher_unknown_arch(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save(ZOO.get("cnn")(NUM_CLASSES, 1).state_dict(), path)
    with pytest.raises(ModelError, match="Unknown model 'vgg'.*resnet"):
        load_teacher(str(path), "vgg", NUM_CLASSES, 1, trust_code=False)


# --- students ---------------------------------------------------------------------------------------


def test_build_student_default_and_zoo_name():
    teacher_spec = zoo_spec("resnet", NUM_CLASSES, 1)
    teacher = build_from_spec(teacher_spec)
    x = _example()
    model, spec = build_student(None, teacher, teacher_spec, NUM_CLASSES, 1, False, x)
    assert spec == zoo_spec("mobilenetv2", NUM_CLASSES, 1)
    assert model(x).shape == (2, NUM_CLASSES)
    _, spec = build_student("cnn", teacher, teacher_spec, NUM_CLASSES, 1, False, x)
    assert spec["name"] == "cnn"
    with pytest.raises(ModelError, match="Unknown student 'vgg'.*cnn, mobilenetv2, resnet"):
        build_student("vgg", teacher, teacher_spec, NUM_CLASSES, 1, False, x)


@pytest.mark.parametrize("text", ["0.5x", "0.5", ".5X"])
def test_build_student_width_of_zoo_teacher_prunes_a_trained_copy(text):
    teacher_spec = zoo_spec("resnet", NUM_CLASSES, 1)
    teacher = build_from_spec(teacher_spec)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model, spec = build_student(text, teacher, teacher_spec, NUM_CLASSES, 1, False, _example(), round_to=1)
    assert spec == teacher_spec  # rebuilt from the teacher's spec plus the saved structure
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # teacher untouched
    assert _nparams(model) < 0.4 * _nparams(teacher)
    # it starts from the teacher's weights: the stem's kept filters are rows of the teacher's stem
    stem_t, stem_s = (next(m for m in net.modules() if isinstance(m, nn.Conv2d)) for net in (teacher, model))
    assert stem_s.out_channels == stem_t.out_channels // 2
    rows = [any(torch.equal(r, t) for t in stem_t.weight) for r in stem_s.weight]
    assert all(rows)


def test_build_student_width_rounds_channels_as_told():
    teacher_spec = zoo_spec("resnet", NUM_CLASSES, 1)
    teacher = build_from_spec(teacher_spec)
    widths = {}
    for round_to in (1, 8):
        model, _ = build_student("0.3x", teacher, teacher_spec, NUM_CLASSES, 1, False, _example(), round_to=round_to)
        widths[round_to] = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths[8])
    assert any(w % 8 for w in widths[1])  # unrounded: 30% of a width, e.g. 9 of 32
    one, _ = build_student("1x", teacher, teacher_spec, NUM_CLASSES, 1, False, _example())
    assert one is not teacher and _nparams(one) == _nparams(teacher)


def test_parse_params_share():
    assert parse_params_share("params:10%") == pytest.approx(0.10)
    assert parse_params_share(" PARAMS = 2.5 % ") == pytest.approx(0.025)
    assert parse_params_share("params:10") is None  # the % says it is a share, not a count
    assert parse_params_share("0.3x") is None and parse_params_share("pkg.mod:fn") is None


def test_params_share_student_is_the_widest_width_under_the_share():
    """params:N% picks the widest width (in steps of 0.01) whose copy keeps at most N% of the teacher's
    parameters: checked against the next width up, pruned here by hand."""
    teacher_spec = zoo_spec("resnet", NUM_CLASSES, 1)
    teacher = build_from_spec(teacher_spec)
    total, x, logged = _nparams(teacher), _example(), []
    model, spec = build_student("params:20%", teacher, teacher_spec, NUM_CLASSES, 1, False, x, round_to=1,
                                log=logged.append)  # fmt: skip
    assert spec == teacher_spec and _nparams(teacher) == total  # a pruned copy; the teacher untouched
    assert _nparams(model) <= 0.20 * total
    width = float(logged[0].split("x of the teacher")[0].split()[-1])
    assert f"({_nparams(model):,} of {total:,}" in logged[0]
    same = prune_uniform(copy.deepcopy(teacher), x, width, NUM_CLASSES, round_to=1)
    wider = prune_uniform(copy.deepcopy(teacher), x, width + 0.01, NUM_CLASSES, round_to=1)
    assert _nparams(same) == _nparams(model) and _nparams(wider) > 0.20 * total


def test_params_share_out_of_reach_names_the_floor_and_the_fix():
    """Narrower than some width, channel counts rounded down to round_to reach 0 and torch-pruning leaves
    those layers whole: the copy grows again, so such widths do not count and a tiny share is refused."""
    teacher_spec = zoo_spec("resnet", NUM_CLASSES, 1)
    teacher = build_from_spec(teacher_spec)
    with pytest.raises(ModelError, match=r"at most 1% .*narrowest that shrinks every layer.*prune.round_to=8") as err:
        build_student("params:1%", teacher, teacher_spec, NUM_CLASSES, 1, False, _example(), round_to=8)
    assert "--set prune.round_to=1" in err.value.fix
    for text in ("params:0%", "params:150%"):
        with pytest.raises(ModelError, match="must be in"):
            build_student(text, teacher, teacher_spec, NUM_CLASSES, 1, False, _example())


@pytest.mark.parametrize("text", ["0", "1.5x", "-0.5"])
def test_build_student_rejects_bad_width(text):
    teacher_spec = zoo_spec("cnn", NUM_CLASSES, 1)
    with pytest.raises(ModelError):
        build_student(text, build_from_spec(teacher_spec), teacher_spec, NUM_CLASSES, 1, False, _example())


def test_build_student_width_of_factory_teacher_prunes_a_copy(factory_module, tmp_path):
    ref = f"{factory_module}:build"
    teacher, teacher_spec = load_teacher(ref, None, NUM_CLASSES, 1, trust_code=True)
    before = _nparams(teacher)
    x = _example()
    student, spec = build_student("0.5x", teacher, teacher_spec, NUM_CLASSES, 1, True, x)
    assert spec == teacher_spec
    assert _nparams(teacher) == before  # the teacher itself is untouched
    assert _nparams(student) < 0.5 * before
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]
    assert student(x).shape == (2, NUM_CLASSES)
    # the pruned student rebuilds from the teacher's spec + saved structure
    path = save_model(tmp_path / "s.pt", student, spec)
    loaded, _, _ = load_model(path, lambda s: build_from_spec(s, trust_code=True))
    student.eval()
    assert torch.equal(loaded.eval()(x), student(x))


def test_build_student_from_factory(factory_module):
    teacher_spec = zoo_spec("cnn", NUM_CLASSES, 1)
    teacher = build_from_spec(teacher_spec)
    ref = f"{factory_module}:build"
    with pytest.raises(ModelError, match="--trust-code"):
        build_student(ref, teacher, teacher_spec, NUM_CLASSES, 1, False, _example())
    model, spec = build_student(ref, teacher, teacher_spec, NUM_CLASSES, 1, True, _example())
    assert spec == {"kind": "factory", "ref": ref, "kwargs": {}}


def test_parse_width():
    assert parse_width("0.25x") == 0.25
    assert parse_width("1") == 1.0
    assert parse_width("resnet") is None
    assert parse_width("pkg.mod:fn") is None


def test_find_head_prefers_num_classes_output():
    model = nn.Sequential(nn.Linear(4, 10), nn.Linear(10, 3), nn.Linear(3, 3))
    assert find_head(model, 10) is model[0]
    assert find_head(model) is model[2]
    with pytest.raises(ModelError):
        find_head(nn.Sequential(nn.ReLU()))
