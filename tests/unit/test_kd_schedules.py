"""Temperature and alpha schedules: values at chosen progress points."""

import pytest

from hwkd.config import DistillConfig
from hwkd.errors import ConfigError
from hwkd.kd.schedules import (
    ALPHA_SCHEDULES,
    TEMPERATURE_SCHEDULES,
    KDSchedule,
    adaptive_temperature,
    constant_alpha,
    constant_temperature,
    fusion_weights,
    linear_alpha,
    linear_temperature,
    multi_temperature,
    warmup_alpha,
)


def test_constant_temperature():
    assert [constant_temperature(p, 4.0) for p in (0.0, 0.5, 1.0)] == [4.0, 4.0, 4.0]


def test_linear_temperature_decays_and_clips():
    assert linear_temperature(0.0, 4.0, 1.0) == 4.0
    assert linear_temperature(0.5, 4.0, 1.0) == pytest.approx(2.5)
    assert linear_temperature(1.0, 4.0, 1.0) == pytest.approx(1.0)
    assert linear_temperature(1.7, 4.0, 1.0) == pytest.approx(1.0)


def test_adaptive_temperature_warms_up_then_follows_validation_loss():
    # warm-up: T0 whatever the losses say
    assert adaptive_temperature(0.1, 4.0, [1.0, 2.0], warmup=0.2) == 4.0
    # falling validation loss: the straight path from T0 (at 0.2) to 1 (at 1.0)
    assert adaptive_temperature(0.6, 4.0, [1.0, 0.8], warmup=0.2) == pytest.approx(2.5)
    # loss 5% above the best (half of max_rise=0.1): pulled halfway back toward T0, scaled by (1 - 0.5)
    assert adaptive_temperature(0.6, 4.0, [1.0, 1.05], warmup=0.2, max_rise=0.1) == pytest.approx(2.5 + 1.5 * 0.25)
    # a large rise pulls fully (times what is left), and at the end T is 1 regardless
    assert adaptive_temperature(0.6, 4.0, [1.0, 3.0], warmup=0.2) == pytest.approx(2.5 + 1.5 * 0.5)
    assert adaptive_temperature(1.0, 4.0, [1.0, 3.0], warmup=0.2) == pytest.approx(1.0)
    assert adaptive_temperature(0.6, 4.0, [], warmup=0.2) == pytest.approx(2.5)


def test_multi_temperature_fusion_weights():
    pairs = multi_temperature(0.3, temperatures=(6, 3, 1))
    assert [t for t, _ in pairs] == [6.0, 3.0, 1.0]
    assert [w for _, w in pairs] == pytest.approx([1 / 3] * 3)
    assert fusion_weights((6, 1), (3, 1)) == ((6.0, 0.75), (1.0, 0.25))
    with pytest.raises(ConfigError):
        fusion_weights((6, 1), (1,))
    with pytest.raises(ConfigError):
        fusion_weights(())


def test_alpha_schedules():
    assert constant_alpha(0.7, 0.7) == 0.7
    assert linear_alpha(0.0, 0.9, 0.3) == pytest.approx(0.9)
    assert linear_alpha(0.5, 0.9, 0.3) == pytest.approx(0.6)
    assert warmup_alpha(0.0, 0.8, warmup=0.2) == 0.0
    assert warmup_alpha(0.1, 0.8, warmup=0.2) == pytest.approx(0.4)
    assert warmup_alpha(0.5, 0.8, warmup=0.2) == pytest.approx(0.8)


@pytest.mark.parametrize("name", TEMPERATURE_SCHEDULES.names())
def test_every_temperature_schedule_from_config_gives_positive_pairs(name):
    sched = KDSchedule.from_config(DistillConfig(temperature_schedule=name))
    for p in (0.0, 0.5, 1.0):
        pairs = sched.temperatures_at(p, [1.0, 0.9])
        assert pairs and all(t > 0 and w > 0 for t, w in pairs)
        assert sum(w for _, w in pairs) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ALPHA_SCHEDULES.names())
def test_every_alpha_schedule_stays_in_range(name):
    sched = KDSchedule.from_config(DistillConfig(alpha_schedule=name, alpha=0.8, alpha_end=0.2))
    assert all(0.0 <= sched.alpha_at(p) <= 0.8 for p in (0.0, 0.1, 0.5, 1.0))


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="temperature schedule"):
        KDSchedule.from_config(DistillConfig(temperature_schedule="cosine"))
