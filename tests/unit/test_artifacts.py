import json

import pytest
import torch
import torch.nn as nn

from hwkd.artifacts import atomic_write, load_model, save_model, save_with, torch_load, write_json
from hwkd.errors import ModelError


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "f.json"
    write_json(p, {"a": 1})
    atomic_write(p, "new")
    assert p.read_text() == "new"
    assert [f.name for f in p.parent.iterdir()] == ["f.json"]


def test_failed_writer_leaves_nothing(tmp_path):
    p = tmp_path / "model.onnx"

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError):
        save_with(p, broken)
    assert not p.exists() and list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path):
    p = tmp_path / "report.json"
    write_json(p, {"ok": True})
    with pytest.raises(TypeError):
        write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": True}


def _net(width=8):
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))


def test_pruned_model_round_trips_with_weights_only(tmp_path):
    import torch_pruning as tp

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)
    ).eval()
    x = torch.randn(2, 1, 8, 8)
    tp.pruner.BasePruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[model[5]]
    ).step()
    assert model[0].out_channels == 8
    spec = {"kind": "test"}
    path = save_model(tmp_path / "m.pt", model, spec, extra={"acc": 0.5})

    def build(s):
        assert s == spec
        return nn.Sequential(
            nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)
        )

    loaded, spec2, extra = load_model(path, build)
    loaded.eval()
    assert loaded[0].out_channels == 8 and loaded[1].num_features == 8 and loaded[5].in_features == 8
    assert extra == {"acc": 0.5}
    torch.testing.assert_close(loaded(x), model(x))


def test_torch_load_errors_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        torch_load(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="Could not read"):
        torch_load(bad)
    pickled = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a whole pickled module: refused by weights_only
    with pytest.raises(ModelError):
        torch_load(pickled)
