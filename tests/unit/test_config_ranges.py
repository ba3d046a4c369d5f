"""Every numeric config key has a range, checked before any training; errors name key, value, range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hwkd.config import RANGES, PipelineConfig, check_ranges, numeric_keys
from hwkd.data import load_dataset
from hwkd.data.sources import check_finite
from hwkd.errors import ConfigError, DataError


def test_every_numeric_key_has_a_range():
    assert sorted(numeric_keys()) == sorted(RANGES)


def test_defaults_are_in_range():
    check_ranges(PipelineConfig())


def _nested(key: str, value):
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("distill.epochs", -1, "value >= 0 (0 = skip distillation training)"),
        ("distill.lr", 0, "value > 0"),
        ("distill.lr", math.nan, "value > 0"),
        ("qat.lr", math.inf, "value > 0"),
        ("prune.ratio", 1.0, "0 < value < 1"),
        ("prune.max_layer_ratio", 0.0, "0 < value < 1"),
        ("distill.temperature", -2.0, "value > 0"),
        ("distill.alpha", 1.5, "0 <= value <= 1"),
        ("train.batch_size", 0, "value >= 1"),
        ("prune.steps", 0, "value >= 1"),
        ("seed", -1, "0 <= value <= 4294967295"),
        ("bench.iterations", 0, "value >= 1"),
        ("export.opset", 7, "13 <= value <= 23"),
    ],
)
def test_out_of_range_names_key_value_and_range(key, value, needle):
    with pytest.raises(ConfigError) as info:
        PipelineConfig.from_dict(_nested(key, value))
    text = str(info.value)
    assert text.startswith(f"{key} = ") and needle in text and f"--set {key}=" in text


def test_tuple_items_are_checked_one_by_one():
    with pytest.raises(ConfigError, match=r"distill\.temperatures\[1\] = 0\.0"):
        PipelineConfig.from_dict({"distill": {"temperatures": [4, 0]}})


def test_zero_epochs_mean_skip_and_are_accepted():
    cfg = PipelineConfig.from_dict({"distill": {"epochs": 0}, "prune": {"recovery_epochs": 0}, "qat": {"epochs": 0}})
    assert (cfg.distill.epochs, cfg.prune.recovery_epochs, cfg.qat.epochs) == (0, 0, 0)


def test_huge_integer_is_rejected_with_a_short_message():
    with pytest.raises(ConfigError, match=r"digits\) is out of range"):
        PipelineConfig.from_dict({"train": {"batch_size": 10**400}})


def test_npz_with_a_nan_pixel_names_file_and_index(tmp_path):
    x = np.random.default_rng(0).random((40, 6, 6)).astype(np.float32)
    x[17, 2, 3] = np.nan
    x[30, 0, 0] = np.inf
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=np.arange(40) % 2)
    with pytest.raises(DataError, match=r"Image 17 of '.*bad\.npz' holds a non-finite value \(nan\); 2 image"):
        load_dataset(str(path))


def test_huge_but_finite_pixels_normalise_to_finite_inputs(tmp_path):
    """Statistics are fitted in float64, so float32 values near the top of their range stay usable."""
    x = np.full((40, 6, 6), 3e38, dtype=np.float32)
    x[::2] = -3e38
    path = tmp_path / "big.npz"
    np.savez(path, x=x, y=np.arange(40) % 2)
    xb, _ = load_dataset(str(path)).sample("train", 8)
    assert torch.isfinite(xb).all()


def test_check_finite_per_item_uses_the_offset():
    """A lazy dataset checks one decoded item at a time; the message names its index and file."""
    check_finite(np.zeros((1, 3, 4, 4), np.float32), "a.png", offset=5)
    check_finite(np.zeros((2, 4), np.uint8), "ints.npz")
    with pytest.raises(DataError, match=r"Image 5 of 'cat/1\.png'"):
        check_finite(np.full((1, 3, 4, 4), np.nan, np.float32), "cat/1.png", offset=5)


@pytest.mark.parametrize("item", ["distill.epochs=-1", "distill.lr=0", "qat.lr=nan", "prune.ratio=inf"])
def test_cli_rejects_bad_numbers_before_any_work(tmp_path, item):
    from typer.testing import CliRunner

    from hwkd.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["compress", "--out", str(out), "--set", item])
    assert result.exit_code == 2, result.output
    assert item.split("=")[0] in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_rejects_a_nan_npz_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from hwkd.cli import app

    x = np.zeros((40, 6, 6), np.float32)
    x[3, 1, 1] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 2)
    result = CliRunner().invoke(app, ["compress", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Image 3 of" in result.output, result.output
