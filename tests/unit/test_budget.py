"""Budget flags: what parses, what is rejected with examples, and how relative budgets resolve."""

from __future__ import annotations

import pytest

from hwkd.errors import BudgetError
from hwkd.hardware.budget import Budget, parse_latency, parse_memory, resolve_budget
from hwkd.hardware.profiles import load_profile


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2.5ms", ("abs", 2.5)),
        ("2.5 ms", ("abs", 2.5)),
        ("2.5", ("abs", 2.5)),
        (" 3MS ", ("abs", 3.0)),
        ("500us", ("abs", 0.5)),
        ("500 µs", ("abs", 0.5)),
        ("0.01s", ("abs", 10.0)),
        (".5ms", ("abs", 0.5)),
        ("1e3us", ("abs", 1.0)),
        ("30%", ("rel", 0.3)),
        ("100%", ("rel", 1.0)),
        (2.5, ("abs", 2.5)),
    ],
)
def test_parse_latency_good(text, expected):
    kind, value = parse_latency(text)
    assert kind == expected[0]
    assert value == pytest.approx(expected[1])


@pytest.mark.parametrize(
    "text",
    ["", "fast", "ms", "0", "0ms", "-1ms", "2.5 min", "150%", "0%", "-5%", "nan", "inf", "1,5ms", "2.5mss"],
)
def test_parse_latency_bad(text):
    with pytest.raises(BudgetError) as info:
        parse_latency(text)
    message = str(info.value)
    assert repr(text) in message
    assert "30%" in message  # shows valid examples (or the valid percent range)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16MB", ("abs", 16.0)),
        ("16 MiB", ("abs", 16.0)),
        ("16", ("abs", 16.0)),
        ("512KB", ("abs", 0.5)),
        ("512 kib", ("abs", 0.5)),
        ("1.5GB", ("abs", 1536.0)),
        ("1GiB", ("abs", 1024.0)),
        ("1048576B", ("abs", 1.0)),
        ("30%", ("rel", 0.3)),
    ],
)
def test_parse_memory_good(text, expected):
    kind, value = parse_memory(text)
    assert kind == expected[0]
    assert value == pytest.approx(expected[1])


@pytest.mark.parametrize("text", ["", "big", "16 TB", "-5MB", "0MB", "0", "101%", "MB", "16 M B"])
def test_parse_memory_bad(text):
    with pytest.raises(BudgetError) as info:
        parse_memory(text)
    message = str(info.value)
    assert repr(text) in message
    assert "16MB" in message or "30%" in message


def test_valid_examples_are_shown():
    with pytest.raises(BudgetError) as info:
        parse_latency("soon")
    assert "2.5ms" in str(info.value) and "500us" in str(info.value)


@pytest.fixture(scope="module")
def rpi4():
    return load_profile("rpi4")


def test_resolve_defaults_come_from_profile(rpi4):
    budget = resolve_budget(rpi4)
    assert budget == Budget(
        latency_ms=rpi4.budgets.latency_ms,
        memory_mb=rpi4.budgets.memory_mb,
        batch_size=rpi4.budgets.batch_size,
        source={"latency_ms": "profile", "memory_mb": "profile", "batch_size": "profile"},
    )


def test_resolve_flags_override(rpi4):
    budget = resolve_budget(rpi4, latency="2.5ms", memory="16MB")
    assert (budget.latency_ms, budget.memory_mb) == (2.5, 16.0)
    assert budget.source["latency_ms"] == "flag" and budget.source["memory_mb"] == "flag"


def test_resolve_relative_scales_the_teacher(rpi4):
    budget = resolve_budget(
        rpi4, latency="30%", memory="50%", teacher_latency_ms=12.0, teacher_memory_mb=40.0
    )
    assert budget.latency_ms == pytest.approx(3.6)
    assert budget.memory_mb == pytest.approx(20.0)
    assert budget.source["latency_ms"] == "relative 30% of teacher"
    assert budget.source["memory_mb"] == "relative 50% of teacher"
    assert budget.to_dict()["source"] == budget.source


@pytest.mark.parametrize("teacher", [None, 0.0, float("nan")])
def test_resolve_relative_without_teacher_fails(rpi4, teacher):
    with pytest.raises(BudgetError, match="teacher"):
        resolve_budget(rpi4, latency="30%", teacher_latency_ms=teacher)
    with pytest.raises(BudgetError, match="teacher"):
        resolve_budget(rpi4, memory="30%", teacher_memory_mb=teacher)


def test_resolve_bad_flag_fails(rpi4):
    with pytest.raises(BudgetError, match="'-3ms'"):
        resolve_budget(rpi4, latency="-3ms")


def _with_pct(profile, latency_pct=0.0, memory_pct=0.0):
    import dataclasses

    budgets = dataclasses.replace(
        profile.budgets, latency_pct_of_teacher=latency_pct, memory_pct_of_teacher=memory_pct
    )
    return dataclasses.replace(profile, budgets=budgets)


def test_profile_relative_cap_binds_when_tighter(rpi4):
    prof = _with_pct(rpi4, latency_pct=15.0)
    small = resolve_budget(prof, teacher_latency_ms=2.0, teacher_memory_mb=10.0)
    assert small.latency_ms == pytest.approx(0.3)
    assert small.source["latency_ms"] == "profile: 15% of teacher"
    assert small.memory_mb == rpi4.budgets.memory_mb  # no memory cap given
    big = resolve_budget(prof, teacher_latency_ms=1000.0)
    assert big.latency_ms == rpi4.budgets.latency_ms and big.source["latency_ms"] == "profile"
    # a flag still wins over the profile's cap, and without a teacher figure the absolute default stays
    assert resolve_budget(prof, latency="5ms", teacher_latency_ms=2.0).latency_ms == 5.0
    assert resolve_budget(prof).latency_ms == rpi4.budgets.latency_ms


def test_budget_carries_deploy_precision(rpi4):
    assert resolve_budget(rpi4).precision == "fp32"
    budget = resolve_budget(rpi4, precision="int8")
    assert budget.precision == "int8" and budget.to_dict()["precision"] == "int8"


def test_jetson_default_budget_binds_on_the_embedded_demo():
    """The shipped default profile must bind on the digits demo: its cap is a share of the teacher."""
    prof = load_profile("jetson")
    assert 0 < prof.budgets.latency_pct_of_teacher < 30
    budget = resolve_budget(prof, teacher_latency_ms=1.6)
    assert budget.latency_ms < 0.3 < prof.budgets.latency_ms
