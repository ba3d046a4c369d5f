"""Device profiles: plain TOML files describing hardware, runtime and default budgets.

A profile is data only (DESIGN.md section 3). Built-ins live in the top-level ``profiles/`` folder and
ship inside the wheel as ``hwkd/profiles``; a user copies one, edits it and passes its path. Validation
is strict, and every error names the file and the key, because a typo in a figure silently skews every
estimate made from it.

Example::

    profile = load_profile("jetson")          # alias of jetson-orin-nano
    profile = load_profile("my-board.toml")   # a user's copy
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwkd.config import from_mapping
from hwkd.errors import ConfigError, ProfileError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib  # type: ignore[no-redef]

PRECISIONS = ("fp32", "fp16", "int8")
CPU_FAMILIES = ("x86", "arm")
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class Hardware:
    """CPU figures (hwkd runs on ONNX Runtime's CPU provider at least) and an optional accelerator."""

    cpu_family: str  # "x86" | "arm": picks the INT8 quantizer and kernels
    cpu_cores: int
    cpu_name: str
    peak_gflops: dict[str, float]  # precision -> peak GFLOP/s of the whole CPU; fp32 required
    memory_bandwidth_gbs: float
    memory_mb: float
    per_op_overhead_us: float  # fixed cost of dispatching one kernel
    vector_width: int  # channels per SIMD lane group; other counts are charged as if rounded up
    accelerator: str = ""
    accelerator_peak_gflops: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Runtime:
    """How ONNX Runtime runs the model on this device."""

    providers: tuple[str, ...]  # preference order; the CPU provider comes last
    threads: int  # intra-op threads; the cost model scales the CPU peak by threads / cores
    channel_multiple: int  # pruning rounds channel counts to this


@dataclass(frozen=True)
class Budgets:
    """Default budgets for a compressed model on this device (flags override them)."""

    latency_ms: float
    memory_mb: float
    batch_size: int = 1
    # Optional caps relative to the teacher's estimate on this profile, in percent (0 = none): the default
    # budget is the tighter of the absolute figure and this share, so it also binds on small models.
    latency_pct_of_teacher: float = 0.0
    memory_pct_of_teacher: float = 0.0


@dataclass(frozen=True)
class Profile:
    name: str
    aliases: tuple[str, ...]
    description: str
    hardware: Hardware
    runtime: Runtime
    budgets: Budgets
    source: str  # the file it was loaded from
    calibration: dict[str, Any] = field(default_factory=dict)  # free-form, written by calibrate

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping (manifest.json, `hwkd profiles show --json`)."""
        return _jsonable(dataclasses.asdict(self))


_TOP_KEYS = ("name", "aliases", "description", "hardware", "runtime", "budgets", "calibration")
_TABLES: dict[str, type] = {"hardware": Hardware, "runtime": Runtime, "budgets": Budgets}
_POSITIVE = {
    "hardware": ("cpu_cores", "memory_bandwidth_gbs", "memory_mb", "vector_width"),
    "runtime": ("threads", "channel_multiple"),
    "budgets": ("latency_ms", "memory_mb", "batch_size"),
}
_NON_NEGATIVE = {"hardware": ("per_op_overhead_us",)}
_PERCENT = {"budgets": ("latency_pct_of_teacher", "memory_pct_of_teacher")}


# ---------------------------------------------------------------------------------------------- finding


def builtin_profile_dir() -> Path:
    """Folder of the built-in profiles: hwkd/profiles in a wheel, top-level profiles/ in a checkout."""
    here = Path(__file__).resolve()
    candidates = (here.parent.parent / "profiles", here.parents[2] / "profiles")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise ProfileError(
        f"The built-in profiles folder is missing (looked in {candidates[0]} and {candidates[1]}).",
        "Reinstall hwkd, or pass a path to a profile .toml file.",
    )


def list_profiles() -> list[Profile]:
    """All built-in profiles, sorted by name."""
    profiles = [_load_file(path) for path in builtin_profile_dir().glob("*.toml")]
    return sorted(profiles, key=lambda p: p.name)


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A built-in profile by name or alias, or a user's TOML file by path.

    Anything ending in ``.toml`` or containing a path separator is taken as a path.
    """
    text = os.fspath(name_or_path)
    if _looks_like_path(text):
        return _load_file(Path(text).expanduser())
    profiles = list_profiles()
    for profile in profiles:
        if text in profile.names:
            return profile
    listing = "; ".join(
        p.name + (f" (aliases: {', '.join(p.aliases)})" if p.aliases else "") for p in profiles
    )
    raise ProfileError(
        f"Unknown profile {text!r}.",
        f"Built-in profiles: {listing}. A path to a profile .toml file also works "
        f"(copy one from {builtin_profile_dir()} and edit it).",
    )


def _looks_like_path(text: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return text.endswith(".toml") or any(sep in text for sep in seps)


# ---------------------------------------------------------------------------------------------- parsing


def _load_file(path: Path) -> Profile:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ProfileError(
            f"Profile file {path} does not exist.",
            "Check the path, or give a built-in profile name (`hwkd profiles list`).",
        ) from None
    except OSError as exc:
        raise ProfileError(f"Cannot read profile file {path}: {exc.strerror or exc}.") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProfileError(f"Profile file {path} is not UTF-8 text ({exc.reason}).") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(
            f"Profile file {path} is not valid TOML: {exc}.",
            "Fix the syntax; a built-in profile shows the layout.",
        ) from None
    return profile_from_dict(data, source=str(path))


def profile_from_dict(data: dict[str, Any], source: str) -> Profile:
    """Validate a parsed TOML mapping into a Profile; ``source`` names the file in every error."""
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ProfileError(
            f"Unknown key {unknown[0]!r} at the top of {source}.",
            f"Allowed keys: {', '.join(_TOP_KEYS)}.",
        )
    name = _required(data, "name", str, source, "")
    if not name.strip():
        raise ProfileError(f"{source}: name must not be empty.")
    aliases = _optional(data, "aliases", tuple[str, ...], (), source)
    description = _optional(data, "description", str, "", source)
    tables = {}
    for table, cls in _TABLES.items():
        value = data.get(table)
        if value is None:
            raise ProfileError(
                f"{source} has no [{table}] table.",
                f"Add it with the keys: {', '.join(f.name for f in dataclasses.fields(cls))}.",
            )
        tables[table] = _table(cls, value, table, source)
    calibration = data.get("calibration", {})
    if not isinstance(calibration, dict):
        raise ProfileError(f"{source}: calibration must be a table ([calibration]).")
    profile = Profile(
        name=name,
        aliases=aliases,
        description=description,
        hardware=tables["hardware"],
        runtime=tables["runtime"],
        budgets=tables["budgets"],
        source=source,
        calibration=calibration,
    )
    _check_semantics(profile)
    return profile


def _required(data: dict[str, Any], key: str, tp: Any, source: str, table: str) -> Any:
    if key not in data:
        where = f"[{table}] in {source}" if table else source
        raise ProfileError(f"{where} is missing the key {key!r}.")
    return _typed(data[key], tp, source, f"{table}.{key}" if table else key)


def _optional(data: dict[str, Any], key: str, tp: Any, default: Any, source: str) -> Any:
    return _typed(data[key], tp, source, key) if key in data else default


def _typed(value: Any, tp: Any, source: str, key: str) -> Any:
    """One key through hwkd.config's strict type check, re-raised naming the file."""

    one = dataclasses.make_dataclass("_One", [("v", tp)], frozen=True)
    try:
        return from_mapping(one, {"v": value}, key).v
    except ConfigError as exc:
        raise _in_file(exc, source, f"{key}.v", key) from None


def _table(cls: type, value: Any, table: str, source: str) -> Any:
    if not isinstance(value, dict):
        raise ProfileError(f"{source}: {table} must be a table ([{table}]), got {type(value).__name__}.")
    fields = dataclasses.fields(cls)
    unknown = sorted(set(value) - {f.name for f in fields})
    if unknown:  # before the missing-key check: a typo'd key is the cause, the missing one the symptom
        raise ProfileError(
            f"Unknown key {unknown[0]!r} in [{table}] of {source}.",
            f"Allowed keys: {', '.join(sorted(f.name for f in fields))}.",
        )
    missing = [
        f.name
        for f in fields
        if f.name not in value
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ProfileError(
            f"[{table}] in {source} is missing the key {missing[0]!r}.",
            f"Keys of [{table}]: {', '.join(f.name for f in fields)}.",
        )
    try:
        obj = from_mapping(cls, value, table)
    except ConfigError as exc:
        raise _in_file(exc, source) from None
    hints = typing.get_type_hints(cls)
    updates = {}
    for f in fields:
        if typing.get_origin(hints[f.name]) is dict:
            updates[f.name] = _precision_table(getattr(obj, f.name), f"{table}.{f.name}", source)
    return dataclasses.replace(obj, **updates) if updates else obj


def _precision_table(value: Any, key: str, source: str) -> dict[str, float]:
    """A {precision: positive number} table such as peak_gflops."""
    if not isinstance(value, dict):
        raise ProfileError(
            f"{source}: {key} must be a table of precision = GFLOP/s, got {type(value).__name__}.",
            f"For example, under [{key}]: fp32 = 144.0",
        )
    out = {}
    for prec, number in value.items():
        if prec not in PRECISIONS:
            raise ProfileError(
                f"Unknown key {prec!r} in {key} of {source}.", f"Allowed keys: {', '.join(PRECISIONS)}."
            )
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ProfileError(
                f"{source}: {key}.{prec} must be float, got {type(number).__name__} {number!r}."
            )
        if not (number > 0 and math.isfinite(number)):
            raise ProfileError(f"{source}: {key}.{prec} must be a positive number, got {number!r}.")
        out[prec] = float(number)
    return out


def _in_file(exc: ConfigError, source: str, old: str = "", new: str = "") -> ProfileError:
    """Re-raise a config error so it names the profile file (and the real key)."""
    problem = exc.problem.replace(old, new) if old else exc.problem
    return ProfileError(f"{source}: {problem}", exc.fix)


def _check_semantics(p: Profile) -> None:
    """Value checks the type system cannot express: positive figures, known families, CPU last."""
    for table, keys in _POSITIVE.items():
        for key in keys:
            value = getattr(getattr(p, table), key)
            if not (value > 0 and math.isfinite(value)):
                raise ProfileError(f"{p.source}: {table}.{key} must be positive, got {value!r}.")
    for table, keys in _NON_NEGATIVE.items():
        for key in keys:
            value = getattr(getattr(p, table), key)
            if not (value >= 0 and math.isfinite(value)):
                raise ProfileError(f"{p.source}: {table}.{key} must be zero or positive, got {value!r}.")
    for table, keys in _PERCENT.items():
        for key in keys:
            value = getattr(getattr(p, table), key)
            if not (0 <= value <= 100):
                raise ProfileError(
                    f"{p.source}: {table}.{key} must be a percentage in [0, 100] (0 = no cap), got {value!r}."
                )
    hw, rt = p.hardware, p.runtime
    if hw.cpu_family not in CPU_FAMILIES:
        raise ProfileError(
            f"{p.source}: hardware.cpu_family is {hw.cpu_family!r}.",
            f"Use one of: {', '.join(CPU_FAMILIES)}.",
        )
    if "fp32" not in hw.peak_gflops:
        raise ProfileError(
            f"{p.source}: hardware.peak_gflops has no fp32 figure.", "Add fp32 = <GFLOP/s of the CPU>."
        )
    bad = [prov for prov in rt.providers if not prov.endswith("ExecutionProvider")]
    if bad:
        raise ProfileError(
            f"{p.source}: runtime.providers has {bad[0]!r}, which is not an ONNX Runtime provider name.",
            "Names end in 'ExecutionProvider', e.g. 'CUDAExecutionProvider'.",
        )
    if not rt.providers or rt.providers[-1] != CPU_PROVIDER:
        raise ProfileError(
            f"{p.source}: runtime.providers must end with {CPU_PROVIDER!r}.",
            "hwkd falls back to the CPU provider, so list it last.",
        )
    _check_writable(p.calibration, "calibration", p.source)


def _check_writable(value: Any, key: str, source: str) -> None:
    """Calibration data must survive dump_profile_toml, so only TOML-writable values are allowed."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_writable(v, f"{key}.{k}", source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_writable(v, f"{key}[{i}]", source)
    elif not isinstance(value, str | int | float | bool | datetime.date | datetime.time):
        raise ProfileError(f"{source}: {key} has an unsupported value type {type(value).__name__}.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return value


# ---------------------------------------------------------------------------------------------- writing

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def dump_profile_toml(profile: Profile) -> str:
    """TOML text that load_profile reads back to an equal profile (comments are not kept).

    Written by hand because the standard library only reads TOML; `hwkd profiles calibrate` uses it
    to save a profile with measured calibration data.
    """
    lines = [
        f"# hwkd device profile {profile.name!r}" + (f", from {profile.source}" if profile.source else ""),
        "",
        f"name = {_value(profile.name)}",
        f"aliases = {_value(list(profile.aliases))}",
        f"description = {_value(profile.description)}",
    ]
    for table in _TABLES:
        lines += _table_lines(table, dataclasses.asdict(getattr(profile, table)))
    if profile.calibration:
        lines += _table_lines("calibration", profile.calibration)
    return "\n".join(lines) + "\n"


def _table_lines(header: str, mapping: dict[str, Any]) -> list[str]:
    lines = ["", f"[{header}]"]
    subtables = {k: v for k, v in mapping.items() if isinstance(v, dict) and v}
    for key, value in mapping.items():
        if not isinstance(value, dict):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subtables.items():
        lines += _table_lines(f"{header}.{_key(key)}", value)
    return lines


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise ProfileError(f"Cannot write a {type(value).__name__} value to a profile TOML file.")
