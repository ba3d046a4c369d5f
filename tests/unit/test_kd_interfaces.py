"""KD interfaces: the distill stage with schedules and feature KD, CLI flags, teacher weights."""


import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from hwkd.api import parse_teacher_weights, resolve_config, resolve_teacher_weights
from hwkd.config import DistillConfig, TrainConfig
from hwkd.errors import ConfigError
from hwkd.pipeline import PipelineState, RunContext


def _net(widths=(8, 16), classes=3):
    c1, c2 = widths
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, classes),
    )


def test_distill_stage_schedules_logs_terms_and_removes_hooks(tiny_dataset, tmp_path):
    from hwkd.hardware.profiles import load_profile
    from hwkd.stages import distill

    torch.manual_seed(0)
    student, teacher = _net(), _net((16, 32)).eval()
    state = PipelineState(
        student=student, student_spec={}, teachers=[teacher], teacher_weights=[1.0], dataset=tiny_dataset,
        profile=load_profile("jetson"), budget=None,
    )
    cfg = DistillConfig(epochs=2, lr=0.05, kd="hinton+fitnet", temperature=4.0, temperature_schedule="linear",
                        alpha=0.6, alpha_schedule="linear", alpha_end=0.2)
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8))
    new_state, result = distill.run(state, cfg, ctx)
    rows = result.history
    assert [r["temperature"] for r in rows] == pytest.approx([4.0, 2.5])
    assert [r["alpha"] for r in rows] == pytest.approx([0.6, 0.4])
    assert all({"loss", "ce", "kd", "hinton", "fitnet", "val_loss", "val_accuracy"} <= set(r) for r in rows)
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])
    assert new_state.kd.spec == "hinton"  # prune recovery distills on logits
    assert result.metrics["kd"] == "hinton+fitnet"


def test_recipe_toml_sets_kd_and_schedules(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[distill]\nkd = "dkd+at:500"\ntemperature_schedule = "multi"\ntemperatures = [8, 2]\n')
    cfg = resolve_config(recipe)
    assert (cfg.distill.kd, cfg.distill.temperature_schedule, cfg.distill.temperatures) == ("dkd+at:500", "multi", (8.0, 2.0))
    with pytest.raises(ConfigError, match="temperature_scheduel"):
        resolve_config(None, {"distill": {"temperature_scheduel": "linear"}})


@pytest.fixture
def captured(monkeypatch):
    """Run the CLI with hwkd.api.compress replaced by a recorder."""
    from hwkd import api, cli

    calls = []

    def fake_compress(profile, **kwargs):
        calls.append(kwargs)
        raise ConfigError("stop here")

    monkeypatch.setattr(api, "compress", fake_compress)
    return calls, cli.app


def test_cli_kd_flags_reach_the_config(captured):
    calls, app = captured
    args = ["compress", "--kd", "none", "--temperature", "2", "--temperature-schedule", "linear", "--alpha", "0.4",
            "--set", "distill.kd=hinton", "--set", "distill.epochs=3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    distill = calls[0]["overrides"]["distill"]
    # --kd wins over --set, the other --set keys stay
    assert distill == {"kd": "none", "temperature": 2.0, "temperature_schedule": "linear", "alpha": 0.4, "epochs": 3}
    assert calls[0]["teacher"] is None
    assert resolve_config(None, calls[0]["overrides"]).distill.kd == "none"


def test_cli_repeated_teacher_and_weights(captured):
    calls, app = captured
    result = CliRunner().invoke(app, ["compress", "--teacher", "a.pt", "--teacher", "b.pt", "--teacher-weights", "0.6,0.4"])
    assert result.exit_code == 2
    assert calls[0]["teacher"] == ["a.pt", "b.pt"] and calls[0]["teacher_weights"] == "0.6,0.4"


def test_teacher_weight_parsing():
    assert parse_teacher_weights("0.6,0.4", 2) == pytest.approx([0.6, 0.4])
    assert parse_teacher_weights("3,1", 2) == pytest.approx([0.75, 0.25])
    assert parse_teacher_weights([1, 1, 2], 3) == pytest.approx([0.25, 0.25, 0.5])
    assert parse_teacher_weights(None, 2) == [0.5, 0.5]
    assert parse_teacher_weights("equal", 1) == [1.0]
    assert parse_teacher_weights("auto", 2) == "auto"
    for bad in ("0.6", "a,b", "-1,2", "0,0"):
        with pytest.raises(ConfigError, match="teacher-weights"):
            parse_teacher_weights(bad, 2)


def test_auto_teacher_weights_follow_validation_accuracy():
    from hwkd.data import Dataset

    x, y = torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 1, 1])
    ds = Dataset.from_tensors("two", {"train": (x, y), "val": (x, y), "test": (x, y)})

    class Fixed(nn.Module):
        def __init__(self, preds):
            super().__init__()
            self.preds = torch.tensor(preds)

        def forward(self, x):
            return nn.functional.one_hot(self.preds[: len(x)], 2).float()

    right, half = Fixed([0, 0, 1, 1]), Fixed([0, 0, 0, 0])
    # accuracies 1.0 and 0.5 with chance 0.5: all weight on the accurate teacher
    assert resolve_teacher_weights("auto", [right, half], ds) == pytest.approx([1.0, 0.0])
    assert resolve_teacher_weights(None, [right, half], ds) == [0.5, 0.5]


def test_report_markdown_shows_kd_terms_per_epoch():
    from hwkd.report.markdown import _distill_terms

    history = [{"epoch": 1, "lr": 0.1, "temperature": 4.0, "loss": 1.5, "ce": 0.5, "at": 0.002, "val_loss": 0.4}]
    lines = _distill_terms({"stages": [{"name": "distill", "history": history}, {"name": "prune", "history": []}]})
    assert "| epoch | temperature | loss | ce | at | val_loss |" in lines
    assert "| 1 | 4 | 1.5 | 0.5 | 0.002 | 0.4 |" in lines
    assert _distill_terms({"stages": [{"name": "prune", "history": []}]}) == []
