import pytest

from hwkd.api import resolve_config
from hwkd.cli import parse_sets
from hwkd.config import STAGE_ORDER, PipelineConfig, merge
from hwkd.errors import ConfigError


def test_defaults_run_all_stages_in_order():
    assert PipelineConfig().stages == STAGE_ORDER


def test_unknown_top_level_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match="Unknown key 'distil'.*Allowed keys:.*distill"):
        PipelineConfig.from_dict({"distil": {}})


def test_unknown_nested_key_names_full_path():
    with pytest.raises(ConfigError, match=r"Unknown key 'epoch' in config\.distill"):
        PipelineConfig.from_dict({"distill": {"epoch": 3}})


def test_wrong_type_is_rejected_and_int_coerces_to_float():
    with pytest.raises(ConfigError, match=r"config\.distill\.epochs must be int"):
        PipelineConfig.from_dict({"distill": {"epochs": "three"}})
    with pytest.raises(ConfigError, match="boolean"):
        PipelineConfig.from_dict({"distill": {"epochs": True}})
    cfg = PipelineConfig.from_dict({"distill": {"temperature": 2}})
    assert cfg.distill.temperature == 2.0 and isinstance(cfg.distill.temperature, float)


def test_unknown_stage_is_an_error_listing_stages():
    with pytest.raises(ConfigError, match="Unknown stage 'quantize'.*distill, prune, qat, export, bench"):
        PipelineConfig.from_dict({"stages": ["distill", "quantize"]})


def test_stages_are_reordered_to_pipeline_order():
    assert PipelineConfig.from_dict({"stages": ["export", "qat"]}).stages == ("qat", "export")


def test_merge_is_deep_and_pure():
    base = {"a": {"x": 1, "y": 2}, "b": 1}
    out = merge(base, {"a": {"y": 3}})
    assert out == {"a": {"x": 1, "y": 3}, "b": 1}
    assert base == {"a": {"x": 1, "y": 2}, "b": 1}


def test_precedence_recipe_then_flags(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("seed = 3\n[distill]\nepochs = 5\ntemperature = 2.0\n")
    cfg = resolve_config(recipe, {"distill": {"epochs": 7}})
    assert (cfg.seed, cfg.distill.epochs, cfg.distill.temperature) == (3, 7, 2.0)
    assert cfg.to_dict()["distill"]["epochs"] == 7


def test_recipe_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[distill\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        resolve_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "missing.toml")


def test_parse_sets_types_and_nesting():
    assert parse_sets(["distill.epochs=2", "prune.importance=taylor", "train.augment=false"]) == {
        "distill": {"epochs": 2},
        "prune": {"importance": "taylor"},
        "train": {"augment": False},
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_sets(["distill.epochs"])
