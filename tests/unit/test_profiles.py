"""Device profiles: every built-in loads, aliases resolve, and bad files fail naming the file and key."""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import tomllib
from pathlib import Path

import pytest

from hwkd.errors import ProfileError
from hwkd.hardware.profiles import (
    PRECISIONS,
    Profile,
    builtin_profile_dir,
    dump_profile_toml,
    list_profiles,
    load_profile,
)

BUILTINS = list_profiles()


def _write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _edited(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the rpi4 profile with one line changed."""
    text = (builtin_profile_dir() / "rpi4.toml").read_text(encoding="utf-8")
    assert old in text, old
    return _write(tmp_path, text.replace(old, new, 1))


def test_all_six_builtins_are_found():
    names = {p.name for p in BUILTINS}
    assert names == {"jetson-orin-nano", "jetson-nano", "jetson-agx-orin", "rpi4", "rpi5", "x86-avx2"}
    assert [p.name for p in BUILTINS] == sorted(names)


@pytest.mark.parametrize("profile", BUILTINS, ids=lambda p: p.name)
def test_builtin_loads_and_is_sane(profile: Profile):
    again = load_profile(profile.name)
    assert again == profile
    assert Path(profile.source).stem == profile.name
    hw, rt = profile.hardware, profile.runtime
    assert hw.cpu_family in ("arm", "x86")
    assert set(hw.peak_gflops) <= set(PRECISIONS) and "fp32" in hw.peak_gflops
    assert "int8" in hw.peak_gflops, "every built-in device runs the INT8 model"
    assert rt.providers[-1] == "CPUExecutionProvider"
    assert 1 <= rt.threads <= hw.cpu_cores
    assert profile.budgets.latency_ms > 0 and profile.budgets.memory_mb > 0
    assert profile.budgets.memory_mb < hw.memory_mb
    json.dumps(profile.to_dict())  # JSON-ready for `hwkd profiles show --json`


@pytest.mark.parametrize("profile", BUILTINS, ids=lambda p: p.name)
def test_builtin_figures_have_a_source_comment(profile: Profile):
    """Every hardware figure carries a `# source:` comment so users can check and correct it."""
    lines = Path(profile.source).read_text(encoding="utf-8").splitlines()
    table, comments = "", []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("["):
            table, comments = stripped, []
        elif stripped.startswith("#"):
            comments.append(stripped)
        elif "=" in stripped:
            if table.startswith("[hardware") and not stripped.startswith("cpu_family"):
                assert any("source:" in c for c in comments), f"{profile.name} {table} {stripped}"
            comments = []


def test_jetson_on_cuda_lists_gpu_providers_first():
    for name in ("jetson-orin-nano", "jetson-nano", "jetson-agx-orin"):
        providers = load_profile(name).runtime.providers
        assert providers[0] == "TensorrtExecutionProvider"
        assert "CUDAExecutionProvider" in providers


def test_names_and_aliases_are_unique():
    every = [n for p in BUILTINS for n in p.names]
    assert len(every) == len(set(every))


def test_alias_jetson_is_orin_nano():
    assert load_profile("jetson").name == "jetson-orin-nano"
    assert load_profile("jetson") == load_profile("jetson-orin-nano")


def test_unknown_name_lists_names_aliases_and_path_hint():
    with pytest.raises(ProfileError) as info:
        load_profile("jetsn")
    message = str(info.value)
    assert "'jetsn'" in message
    for profile in BUILTINS:
        assert profile.name in message
        for alias in profile.aliases:
            assert alias in message
    assert ".toml" in message


def test_builtin_dir_holds_the_profiles():
    folder = builtin_profile_dir()
    assert folder.is_dir()
    assert {p.stem for p in folder.glob("*.toml")} == {p.name for p in BUILTINS}


def test_user_toml_path_loads(tmp_path):
    path = _edited(tmp_path, 'name = "rpi4"', 'name = "my-pi"')
    profile = load_profile(str(path))
    assert profile.name == "my-pi"
    assert profile.source == str(path)
    assert profile.hardware.cpu_cores == 4
    assert load_profile(path) == profile  # a Path object works too


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ProfileError, match=re.escape(str(missing))):
        load_profile(str(missing))


def test_broken_toml_names_file_and_parse_error(tmp_path):
    path = _write(tmp_path, 'name = "x"\n[hardware\ncpu_cores = 4\n')
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "not valid TOML" in message and "line 2" in message


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("cpu_cores = 4", "cpu_cores = 4\ncpu_corez = 4", "cpu_corez"),
        ("cpu_cores = 4", "cpu_corez = 4", "cpu_corez"),  # a typo: reported as unknown, not as missing
        ('name = "rpi4"', 'name = "rpi4"\nflavour = "raspberry"', "flavour"),
        ("fp32 = 57.6", "fp32 = 57.6\nbf16 = 1.0", "bf16"),
    ],
)
def test_unknown_key_names_file_key_and_allowed(tmp_path, old, new, key):
    path = _edited(tmp_path, old, new)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message and repr(key) in message
    assert "Allowed keys" in message


@pytest.mark.parametrize(
    "old, new, key, expected",
    [
        ("cpu_cores = 4", 'cpu_cores = "four"', "hardware.cpu_cores", "int"),
        ("threads = 4", "threads = 4.5", "runtime.threads", "int"),
        ("latency_ms = 50.0", 'latency_ms = "50ms"', "budgets.latency_ms", "float"),
        ('cpu_family = "arm"', "cpu_family = 1", "hardware.cpu_family", "str"),
        ("fp32 = 57.6", 'fp32 = "fast"', "peak_gflops.fp32", "float"),
        ('aliases = ["raspberry-pi-4", "pi4"]', 'aliases = "pi4"', "aliases", "list"),
        ("batch_size = 1", "batch_size = true", "budgets.batch_size", "int"),
    ],
)
def test_wrong_type_names_file_key_and_type(tmp_path, old, new, key, expected):
    path = _edited(tmp_path, old, new)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message and key in message and expected in message


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("latency_ms = 50.0", "latency_ms = 0", "budgets.latency_ms"),
        ("memory_mb = 64.0", "memory_mb = -1.0", "budgets.memory_mb"),
        ("batch_size = 1", "batch_size = 0", "budgets.batch_size"),
        ("memory_bandwidth_gbs = 8.0", "memory_bandwidth_gbs = 0.0", "hardware.memory_bandwidth_gbs"),
        ("fp32 = 57.6", "fp32 = -57.6", "peak_gflops.fp32"),
        ("cpu_cores = 4", "cpu_cores = 0", "hardware.cpu_cores"),
        ("per_op_overhead_us = 15.0", "per_op_overhead_us = -1.0", "hardware.per_op_overhead_us"),
        ("memory_mb = 4096.0", "memory_mb = nan", "hardware.memory_mb"),
    ],
)
def test_non_positive_figures_name_file_and_key(tmp_path, old, new, key):
    path = _edited(tmp_path, old, new)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message and key in message


@pytest.mark.parametrize(
    "old, new, needle",
    [
        ("[budgets]", "[budgetz]", "budgets"),  # unknown top-level key, and then no [budgets]
        ("threads = 4\n", "", "'threads'"),
        ('cpu_family = "arm"', 'cpu_family = "risc-v"', "cpu_family"),
        ("fp32 = 57.6\n", "", "fp32"),
        (
            'providers = ["CPUExecutionProvider"]',
            'providers = ["CUDAExecutionProvider"]',
            "CPUExecutionProvider",
        ),
        ('providers = ["CPUExecutionProvider"]', 'providers = ["cuda", "CPUExecutionProvider"]', "'cuda'"),
    ],
)
def test_other_invalid_profiles_name_the_file(tmp_path, old, new, needle):
    path = _edited(tmp_path, old, new)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message and needle in message


@pytest.mark.parametrize("profile", BUILTINS, ids=lambda p: p.name)
def test_dump_then_load_round_trips(tmp_path, profile: Profile):
    path = _write(tmp_path, dump_profile_toml(profile), f"{profile.name}.toml")
    again = load_profile(str(path))
    assert again == dataclasses.replace(profile, source=str(path))


def test_round_trip_keeps_calibration_and_awkward_strings(tmp_path):
    calibration = {
        "efficiency": {"fp32": 0.42, "int8": 0.3},
        "runtime_overhead_mb": 3,
        "host": 'pi "kitchen" \\ 5 – µs',
        "measured": [{"model": "resnet", "latency_ms": 1.25}, {"model": "mbv2", "latency_ms": 0.5}],
        "scale": [1, 2.5, 1e-07],
        "when": datetime.datetime(2025, 1, 2, 3, 4, 5),
        "ok": True,
        "odd key": 1,
    }
    base = load_profile("rpi5")
    profile = dataclasses.replace(base, description='quotes " and\nnewline', calibration=calibration)
    text = dump_profile_toml(profile)
    tomllib.loads(text)  # valid TOML
    path = _write(tmp_path, text)
    again = load_profile(str(path))
    assert again.calibration == calibration
    assert again == dataclasses.replace(profile, source=str(path))


def test_calibration_must_be_a_table(tmp_path):
    path = _edited(tmp_path, 'description = "', 'calibration = 3\ndescription = "')
    with pytest.raises(ProfileError, match="calibration"):
        load_profile(str(path))


@pytest.mark.parametrize("value", [-1.0, 101.0, float("nan")])
def test_budget_percent_cap_is_validated(tmp_path, value):
    from hwkd.hardware.profiles import dump_profile_toml

    text = dump_profile_toml(load_profile("rpi4"))
    assert "latency_pct_of_teacher = 0.0" in text
    text = text.replace("latency_pct_of_teacher = 0.0", f"latency_pct_of_teacher = {value!r}")
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match="latency_pct_of_teacher"):
        load_profile(path)
