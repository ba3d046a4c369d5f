"""Temperature and alpha schedules: pure functions of training progress (and validation losses).

``progress`` is the fraction of training done when an epoch starts (0 for the first epoch).
Temperature schedules return ``(T, weight)`` pairs: one pair for a single temperature, several for
multi-temperature fusion, where the soft loss is the weighted sum over temperatures.

- ``constant``: T0 throughout.
- ``linear``: T0 -> T_end in a straight line.
- ``adaptive``: T0 during a warm-up, then a linear path to T=1 at the end, pulled back toward T0 (in
  proportion to how far the last validation loss rose above the best so far, fading to nothing at the
  end) when the student starts to overfit: softer targets regularize.
- ``multi``: fixed temperatures fused with weights (e.g. T = 6, 3, 1): several views of the teacher's
  distribution at once, from its dark knowledge (high T) to its decision (T = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hwkd.errors import ConfigError
from hwkd.registry import Registry

TEMPERATURE_SCHEDULES: Registry = Registry("temperature schedule")
ALPHA_SCHEDULES: Registry = Registry("alpha schedule")


def _clip(progress: float) -> float:
    return min(1.0, max(0.0, float(progress)))


@TEMPERATURE_SCHEDULES.register("constant")
def constant_temperature(progress: float, t0: float, **_) -> float:
    return float(t0)


@TEMPERATURE_SCHEDULES.register("linear")
def linear_temperature(progress: float, t0: float, t_end: float = 1.0, **_) -> float:
    return float(t0 + (t_end - t0) * _clip(progress))


@TEMPERATURE_SCHEDULES.register("adaptive")
def adaptive_temperature(
    progress: float,
    t0: float,
    val_losses: Sequence[float] = (),
    warmup: float = 0.2,
    t_end: float = 1.0,
    max_rise: float = 0.1,
    **_,
) -> float:
    """T0 while ``progress < warmup``; then linear to ``t_end``, raised back toward T0 by the last
    validation loss's relative rise over the best before it (``max_rise`` or more = all the way)."""
    p = _clip(progress)
    if p < warmup or warmup >= 1.0:
        return float(t0)
    after = (p - warmup) / (1.0 - warmup)
    base = t0 + (t_end - t0) * after
    rise = 0.0
    if len(val_losses) >= 2:
        best = min(val_losses[:-1])
        if best > 0:
            rise = max(0.0, (val_losses[-1] - best) / best)
    pull = min(1.0, rise / max_rise) * (1.0 - after)
    return float(base + (t0 - base) * pull)


def fusion_weights(temperatures: Sequence[float], weights: Sequence[float] = ()) -> tuple[tuple[float, float], ...]:
    """Pair temperatures with weights normalized to sum to 1 (equal when none are given)."""
    if not temperatures:
        raise ConfigError("Multi-temperature fusion needs at least one temperature.", "e.g. temperatures = [6, 3, 1]")
    weights = list(weights) or [1.0] * len(temperatures)
    if len(weights) != len(temperatures) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"temperature_weights {list(weights)} do not fit temperatures {list(temperatures)}.",
            "Give one non-negative weight per temperature (not all zero), or none for equal weights.",
        )
    total = sum(weights)
    return tuple((float(t), w / total) for t, w in zip(temperatures, weights, strict=True))


@TEMPERATURE_SCHEDULES.register("multi")
def multi_temperature(
    progress: float, t0: float = 4.0, temperatures: Sequence[float] = (6.0, 3.0, 1.0), weights: Sequence[float] = (), **_
) -> tuple[tuple[float, float], ...]:
    """Fixed (T, weight) pairs at every progress: multi-temperature fusion."""
    return fusion_weights(temperatures, weights)


@ALPHA_SCHEDULES.register("constant")
def constant_alpha(progress: float, alpha: float, **_) -> float:
    return float(alpha)


@ALPHA_SCHEDULES.register("linear")
def linear_alpha(progress: float, alpha: float, alpha_end: float = 0.0, **_) -> float:
    """alpha -> alpha_end in a straight line (e.g. lean on the teacher early, on the labels late)."""
    return float(alpha + (alpha_end - alpha) * _clip(progress))


@ALPHA_SCHEDULES.register("warmup")
def warmup_alpha(progress: float, alpha: float, warmup: float = 0.2, **_) -> float:
    """0 -> alpha over the warm-up (as DKD does), so early training is not dominated by the teacher."""
    if warmup <= 0:
        return float(alpha)
    return float(alpha * min(1.0, _clip(progress) / warmup))


@dataclass(frozen=True)
class KDSchedule:
    """The temperature and alpha schedules of one distillation run, from a DistillConfig."""

    temperature: float = 4.0
    temperature_schedule: str = "constant"
    temperature_end: float = 1.0
    temperatures: tuple[float, ...] = (6.0, 3.0, 1.0)
    temperature_weights: tuple[float, ...] = ()
    alpha: float = 0.7
    alpha_schedule: str = "constant"
    alpha_end: float = 0.0
    schedule_warmup: float = 0.2  # fraction of training: adaptive T holds T0, warmup alpha ramps up

    @classmethod
    def from_config(cls, cfg) -> KDSchedule:
        values = {k: getattr(cfg, k) for k in cls.__dataclass_fields__ if hasattr(cfg, k)}
        sched = cls(**values)
        TEMPERATURE_SCHEDULES.get(sched.temperature_schedule)  # unknown names fail here, listing the known
        ALPHA_SCHEDULES.get(sched.alpha_schedule)
        if sched.temperature_schedule == "multi":
            fusion_weights(sched.temperatures, sched.temperature_weights)
        return sched

    def temperatures_at(self, progress: float, val_losses: Sequence[float] = ()) -> tuple[tuple[float, float], ...]:
        fn = TEMPERATURE_SCHEDULES.get(self.temperature_schedule)
        t = fn(
            progress,
            self.temperature,
            t_end=self.temperature_end,
            val_losses=val_losses,
            warmup=self.schedule_warmup,
            temperatures=self.temperatures,
            weights=self.temperature_weights,
        )
        return t if isinstance(t, tuple) else ((max(t, 1e-3), 1.0),)

    def alpha_at(self, progress: float) -> float:
        fn = ALPHA_SCHEDULES.get(self.alpha_schedule)
        return fn(progress, self.alpha, alpha_end=self.alpha_end, warmup=self.schedule_warmup)
