"""Latency and memory budgets: parse flags like ``2.5ms`` or ``30%`` and resolve them against a profile.

A budget comes from the profile by default; a flag overrides it; a percentage is relative to the
teacher (modelopt's ``constraints={"params": "60%"}``), so it needs the teacher's measured figure.
Memory units are binary: KB/KiB = 1024 bytes, MB/MiB = 2**20 bytes, as memory tools report them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from hwkd.errors import BudgetError

_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_LATENCY_RE = re.compile(rf"^\s*{_NUMBER}\s*(ms|us|µs|s|%)?\s*$", re.IGNORECASE)
_MEMORY_RE = re.compile(rf"^\s*{_NUMBER}\s*(b|kb|kib|mb|mib|gb|gib|%)?\s*$", re.IGNORECASE)
_LATENCY_UNIT_MS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}
_MEMORY_UNIT_MB = {
    "b": 1 / 2**20,
    "kb": 1 / 1024,
    "kib": 1 / 1024,
    "mb": 1.0,
    "mib": 1.0,
    "gb": 1024.0,
    "gib": 1024.0,
}
LATENCY_EXAMPLES = "2.5ms, 2.5 ms, 2.5 (ms), 500us, 0.01s, 30% (of the teacher)"
MEMORY_EXAMPLES = "16MB, 16 MiB, 512KB, 1.5GB, 16 (MB), 30% (of the teacher)"


@dataclass(frozen=True)
class Budget:
    """Absolute budgets for one run, and where each figure came from (shown in reports)."""

    latency_ms: float
    memory_mb: float
    batch_size: int = 1
    source: dict[str, str] = field(default_factory=dict)  # e.g. {"latency_ms": "relative 30% of teacher"}
    precision: str = "fp32"  # of the deployed model: what pruning and the budget check estimate at

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "memory_mb": self.memory_mb,
            "batch_size": self.batch_size,
            "source": dict(self.source),
            "precision": self.precision,
        }


def parse_latency(text: str | float) -> tuple[str, float]:
    """``("abs", milliseconds)`` or ``("rel", fraction of the teacher)``; a bare number is ms."""
    return _parse(text, _LATENCY_RE, _LATENCY_UNIT_MS, "latency", LATENCY_EXAMPLES)


def parse_memory(text: str | float) -> tuple[str, float]:
    """``("abs", MB)`` or ``("rel", fraction of the teacher)``; a bare number is MB."""
    return _parse(text, _MEMORY_RE, _MEMORY_UNIT_MB, "memory", MEMORY_EXAMPLES)


def _parse(text: str | float, pattern: re.Pattern, units: dict[str, float], what: str, examples: str):
    if isinstance(text, bool):
        text = str(text)  # never a number; falls through to the malformed message
    raw = str(text)
    match = pattern.match(raw)
    if not match:
        raise BudgetError(f"Cannot read the {what} budget {raw!r}.", f"Valid examples: {examples}.")
    value = float(match.group(1))
    unit = (match.group(2) or "").lower()
    if not (value > 0 and math.isfinite(value)):
        raise BudgetError(f"The {what} budget {raw!r} must be positive.", f"Valid examples: {examples}.")
    if unit == "%":
        if value > 100:
            raise BudgetError(
                f"The {what} budget {raw!r} is over 100% of the teacher.",
                "A relative budget must be in (0, 100]%, e.g. 30%.",
            )
        return "rel", value / 100.0
    return "abs", value * units.get(unit, 1.0)


def resolve_budget(
    profile: Any,
    latency: str | float | None = None,
    memory: str | float | None = None,
    teacher_latency_ms: float | None = None,
    teacher_memory_mb: float | None = None,
    precision: str = "fp32",
) -> Budget:
    """Absolute budgets: the profile's by default, flags override, percentages scale the teacher's figure.

    The teacher's figures are the cost model's estimates on the same profile the budget is checked on,
    so a relative budget is a ratio of like to like (on a host-calibrated profile, estimate ~ measured).
    A profile may also cap its default at a share of the teacher (``[budgets] latency_pct_of_teacher``);
    the tighter of that and the absolute default applies.

    Example::

        resolve_budget(load_profile("rpi4"), latency="30%", teacher_latency_ms=12.0).latency_ms  # 3.6
    """
    b = profile.budgets
    latency_ms, latency_src = _resolve(
        latency, parse_latency, b.latency_ms, teacher_latency_ms, "latency", "ms",
        getattr(b, "latency_pct_of_teacher", 0.0),
    )  # fmt: skip
    memory_mb, memory_src = _resolve(
        memory, parse_memory, b.memory_mb, teacher_memory_mb, "memory", "MB",
        getattr(b, "memory_pct_of_teacher", 0.0),
    )  # fmt: skip
    return Budget(
        latency_ms=latency_ms,
        memory_mb=memory_mb,
        batch_size=b.batch_size,
        source={"latency_ms": latency_src, "memory_mb": memory_src, "batch_size": "profile"},
        precision=precision,
    )


def _resolve(
    flag, parse, default: float, teacher: float | None, what: str, unit: str, default_pct: float = 0.0
) -> tuple[float, str]:
    if flag is None:
        known = teacher is not None and teacher > 0 and math.isfinite(teacher)
        if default_pct > 0 and known and teacher * default_pct / 100.0 < default:
            return teacher * default_pct / 100.0, f"profile: {default_pct:g}% of teacher"
        return float(default), "profile"
    kind, value = parse(flag)
    if kind == "abs":
        return value, "flag"
    if teacher is None or not (teacher > 0 and math.isfinite(teacher)):
        raise BudgetError(
            f"The {what} budget {flag!r} is relative to the teacher, but the teacher's {what} "
            f"is not known{'' if teacher is None else f' (got {teacher!r})'}.",
            f"Give an absolute budget (e.g. {'2.5ms' if unit == 'ms' else '16MB'}) or measure the teacher first.",
        )
    return teacher * value, f"relative {value * 100:g}% of teacher"
