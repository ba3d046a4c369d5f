"""Fuzzing the parsers a user's text reaches: profile TOML, recipe files, --set, budgets, --shape.

Each property: whatever the input, the parser returns a value or raises a HwkdError with a message
(never another exception, never an empty message). Examples are bounded so the suite stays fast.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwkd.api import resolve_config
from hwkd.cli import parse_sets
from hwkd.config import PipelineConfig, numeric_keys
from hwkd.errors import HwkdError
from hwkd.hardware.budget import parse_latency, parse_memory, resolve_budget
from hwkd.hardware.profiles import builtin_profile_dir, load_profile, profile_from_dict
from hwkd.onnx.inputs import parse_shape_flags

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=6)  # fmt: skip


def toml_value(v) -> str:
    """A TOML literal for a Python value (inline tables and arrays); None has no TOML form -> a string."""
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_text(d: dict) -> str:
    return "".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}\n" for k, v in d.items())


def assert_clear(exc: HwkdError) -> None:
    text = str(exc)
    assert text.strip() and "Traceback" not in text and len(text) < 2000, text


BASE_PROFILE = tomllib.loads((builtin_profile_dir() / "rpi4.toml").read_text())


def _paths(d: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


PROFILE_PATHS = _paths(BASE_PROFILE)


@st.composite
def mutated_profiles(draw):
    """The rpi4 profile with a few keys replaced, deleted or added (names and values drawn at random)."""
    data = json.loads(json.dumps(BASE_PROFILE))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PROFILE_PATHS))
        node = data
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[path[-1]] = draw(values)
        elif action == "delete":
            node.pop(path[-1], None)
        else:
            node[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return data


@FUZZ
@given(mutated_profiles())
def test_profile_dicts_parse_or_fail_clearly(data):
    try:
        profile_from_dict(data, source="fuzz.toml")
    except HwkdError as exc:
        assert_clear(exc)


@FUZZ
@given(mutated_profiles())
def test_profile_files_parse_or_fail_clearly_naming_the_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("p") / "mine.toml"
    path.write_text(toml_text(data), encoding="utf-8")
    try:
        load_profile(path)
    except HwkdError as exc:
        assert_clear(exc)
        assert "mine.toml" in str(exc)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_profile_file_bytes_never_crash(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("p") / "junk.toml"
    path.write_bytes(raw)
    try:
        load_profile(path)
    except HwkdError as exc:
        assert_clear(exc)


SECTIONS = {k: v for k, v in PipelineConfig().to_dict().items() if isinstance(v, dict)}
CONFIG_KEYS = [f"{s}.{k}" for s, d in SECTIONS.items() for k in d] + ["seed", "stages", "device"]


@st.composite
def recipes(draw):
    """Known keys (mostly) with random values, sometimes an unknown key or a section of the wrong type."""
    out: dict = {}
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS) | st.text(min_size=1, max_size=8), max_size=4)):
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = draw(values)
    return out


@FUZZ
@given(recipes())
def test_recipe_mappings_validate_or_fail_naming_the_key(data):
    try:
        cfg = PipelineConfig.from_dict(data)
    except HwkdError as exc:
        assert_clear(exc)
    else:
        assert set(cfg.stages) <= {"distill", "prune", "qat", "export", "bench"}


@FUZZ
@given(recipes())
def test_recipe_files_validate_or_fail_clearly(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("r") / "recipe.toml"
    path.write_text(toml_text(data), encoding="utf-8")
    try:
        resolve_config(path)
    except HwkdError as exc:
        assert_clear(exc)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS) | st.text(max_size=10), st.text(max_size=12)), max_size=3))
def test_set_values_parse_and_validate_or_fail_clearly(items):
    try:
        resolve_config(None, parse_sets([f"{k}={v}" for k, v in items]))
    except HwkdError as exc:
        assert_clear(exc)


@FUZZ
@given(st.sampled_from(numeric_keys()), st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**80), 2**80))
def test_numeric_keys_are_in_range_or_rejected_by_name(key, value):
    try:
        resolve_config(None, parse_sets([f"{key}={toml_value(value)}"]))
    except HwkdError as exc:
        assert_clear(exc)
        assert key in str(exc)


budget_text = st.one_of(
    st.text(max_size=12),
    st.builds(lambda n, u: f"{n}{u}", st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 10**6),
              st.sampled_from(["", "ms", "s", "us", "%", "MB", "GB", "KB", " ms", "mb", "x"])),  # fmt: skip
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)


@FUZZ
@given(budget_text, budget_text, st.floats(allow_nan=True, allow_infinity=True) | st.none())
def test_budgets_parse_or_fail_clearly(latency, memory, teacher):
    for parse, text in ((parse_latency, latency), (parse_memory, memory)):
        try:
            kind, value = parse(text)
        except HwkdError as exc:
            assert_clear(exc)
        else:
            assert kind in ("abs", "rel") and value > 0 and math.isfinite(value)
    try:
        b = resolve_budget(load_profile("rpi4"), latency, memory, teacher, teacher)
    except HwkdError as exc:
        assert_clear(exc)
    else:
        assert b.latency_ms > 0 and b.memory_mb > 0


@FUZZ
@given(st.lists(st.text(max_size=16) | st.builds(lambda n, d: f"{n}={d}", st.text(max_size=5), st.text("0123456789,-", max_size=10)),
                max_size=3))  # fmt: skip
def test_shape_flags_parse_or_fail_clearly(items):
    try:
        shapes = parse_shape_flags(items)
    except HwkdError as exc:
        assert_clear(exc)
        assert "--shape" in str(exc)
    else:
        assert all(all(isinstance(d, int) and d > 0 for d in dims) for dims in shapes.values())


def test_toml_writer_round_trips_the_profile():
    """The fuzzers' TOML writer is faithful, so what they generate is what the parser sees."""
    assert tomllib.loads(toml_text(BASE_PROFILE)) == BASE_PROFILE
    assert Path(builtin_profile_dir()).is_dir()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
