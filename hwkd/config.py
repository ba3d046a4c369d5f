"""Frozen stage and pipeline configs. Unknown keys and wrong types are errors that name the key.

Precedence (lowest first): built-in defaults < recipe file (--config) < profile < CLI flags.
``PipelineConfig.from_dict`` takes the merged mapping; ``asdict`` goes into manifest.json so a run can
be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from hwkd.errors import ConfigError

STAGE_ORDER = ("distill", "prune", "qat", "export", "bench")


@dataclass(frozen=True)
class TrainConfig:
    """Shared knobs of the one training loop (distill, prune recovery, QAT); epochs and lr are per stage."""

    batch_size: int = 64
    weight_decay: float = 5e-4
    grad_clip: float = 5.0
    augment: bool = True


@dataclass(frozen=True)
class DataConfig:
    """How images become tensors: the teacher's preprocessing (flags --mean, --std, --resize, --crop,
    --interpolation, --channel-order) and the data loader. Empty / 0 values mean "default" (see
    hwkd.data.preprocess: the teacher architecture's documented normalisation, else fitted)."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    resize: int = 0  # 0 = --image-size or the source's default; with crop: the shorter side
    crop: int = 0  # center crop (square) after the resize; 0 = none
    interpolation: str = ""  # nearest | bilinear | bicubic; "" = bilinear (timm: its pretrained_cfg's)
    channel_order: str = "rgb"  # rgb | bgr
    # auto (affine for digits/.npz, crop_flip for image folders) | affine | crop_flip (RandomResizedCrop + flip)
    # | pad_crop_flip (pad an eighth, random crop + flip: the CIFAR recipe) | none
    augment: str = "auto"
    workers: int = -1  # DataLoader worker processes; -1 = auto (0 for in-memory arrays)
    stats_images: int = 2000  # training images the fitted mean/std of an image folder is computed on


@dataclass(frozen=True)
class TeacherConfig:
    """The built-in teacher, trained when no --teacher is given (cached, keyed by this config)."""

    arch: str = "resnet"
    epochs: int = 10
    lr: float = 0.05


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation teacher(s) -> student."""

    epochs: int = 14
    lr: float = 0.05
    # Default recipe: Hinton KD, alpha 0.7, fixed T=4 (since stop 48; adaptive T before). On CIFAR-10 against the
    # converged (160-epoch) teacher, 40 epochs, 3 seeds, the adaptive schedule cooled toward T=1 and trailed T=4 on
    # validation on every seed (+0.77 over the student alone against +1.55; level on test); against the 30-epoch
    # teacher adaptive led on test (+0.36) and at 10 epochs they were level. T=4 is the one recipe whose gain
    # clears +0.5 on every reading; the 14-epoch pipelines end lower with it on one seed (-0.24 rpi4, -1.44
    # jetson), so it is level, not better. benchmarks/cifar10.py; docs/decisions-issue14.md (stops 17, 43, 48).
    kd: str = "hinton"  # KD loss spec: hinton | dkd | fitnet | at | rkd | sp | none, combined as "hinton+at:500"
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft (teacher) term; 1 - alpha goes to the hard labels
    penalty_weight: float = 1.0  # hardware budget penalty in the loss (0 = off); see hwkd.hardware.penalty
    # What the penalty shrinks: "cost" = every channel's BN scale weighted by its device cost (MorphNet);
    # "plan" = only the channels the pruner would remove now to meet the budget, re-planned as it trains;
    # "mask" = those channels held at zero (BN scale and shift), so the student trains as the pruned network.
    # Default "mask" from 30% of distillation on: on CIFAR-10 it beat penalty-off at both binding budgets (+0.97 at
    # 15%, 4 seeds; +1.74 at 30%, 2 seeds; every seed ahead, five of six by >= +0.88, one by +0.36) and "cost" at
    # 30% (+0.90) and in the jetson pipeline (+0.84), level with it at 15% (+0.08), with fewer epochs; the "cost"
    # arm was measured with penalty_start 0 (docs/decisions-issue14.md, stops 38-41).
    penalty_target: str = "mask"
    penalty_start: float = 0.3  # fraction of distillation before the penalty starts (0 = from the first step)
    temperature_schedule: str = "constant"  # constant | linear | adaptive | multi (see hwkd.kd.schedules)
    temperature_end: float = 1.0  # linear / adaptive: T at the end of training
    temperatures: tuple[float, ...] = (6.0, 3.0, 1.0)  # multi: fused temperatures
    temperature_weights: tuple[float, ...] = ()  # multi: their weights (empty = equal)
    alpha_schedule: str = "constant"  # constant | linear (alpha -> alpha_end) | warmup (0 -> alpha)
    alpha_end: float = 0.0
    schedule_warmup: float = 0.3  # fraction of training: adaptive T holds T0, warmup alpha ramps up
    student_layers: tuple[str, ...] = ()  # feature KD layers by name (empty = the last three stages)
    teacher_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PruneConfig:
    """Channel pruning by importance with torch-pruning, in steps, with KD recovery between them."""

    importance: str = "bn_scale"  # bn_scale | l2 | taylor
    ratio: float = 0.4  # mode "ratio": fraction of prunable channels removed in total
    steps: int = 2
    recovery_epochs: int = 3
    lr: float = 0.02
    round_to: int = 0  # 0 -> the profile's channel rounding
    # "budget": prune until the estimated latency and memory meet the budget, per-layer amounts by
    # importance per unit of latency saved; "ratio": remove `ratio` of the channels, whatever the device.
    mode: str = "budget"
    max_layer_ratio: float = 0.75  # mode "budget": at most this share of a layer's channels goes per step
    penalty_weight: float = 1.0  # budget penalty in the recovery loss (0 = off)
    penalty_target: str = "mask"  # cost | plan | mask, as distill.penalty_target


@dataclass(frozen=True)
class QatConfig:
    """INT8 quantization-aware training (torchao PT2E) with the FP32 model as teacher."""

    epochs: int = 3
    lr: float = 0.005
    freeze_observers_at: float = 0.6  # fraction of training after which observers stop moving
    freeze_bn_at: float = 0.6
    quantizer: str = "auto"  # auto (from profile cpu family) | x86 | arm
    method: str = "qat"  # qat | ptq (onnxruntime static PTQ only) | auto (the more accurate within budget)
    reduce_range: str = "auto"  # auto (7-bit weights on x86 hosts without VNNI) | on | off; PTQ follows it


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export of the FP32 and INT8 students, with parity checks against PyTorch."""

    opset: int = 18
    min_top1_agreement: float = 0.99  # top-1 agreement on images with a clear answer; below = broken
    precision: str = "int8"  # int8 | fp16 (GPU profiles) | fp32: the precision of the final model.onnx
    ptq_calibration_images: int = 256  # training images that calibrate the onnxruntime PTQ peer


@dataclass(frozen=True)
class BenchConfig:
    """onnxruntime latency measurement on this host."""

    warmup: int = 20
    iterations: int = 200
    rounds: int = 5  # models are timed in interleaved rounds, since hosts are noisy


@dataclass(frozen=True)
class PipelineConfig:
    stages: tuple[str, ...] = STAGE_ORDER
    seed: int = 0
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    amp: str = "off"  # bf16 | fp16 | off: torch.autocast mixed precision, CUDA only
    allow_weak_teacher: bool = False  # go on when a teacher scores below 1.5x chance on val
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> PipelineConfig:
        cfg = from_mapping(cls, data, where)
        unknown = [s for s in cfg.stages if s not in STAGE_ORDER]
        if unknown:
            raise ConfigError(
                f"Unknown stage {unknown[0]!r} in {where}.", f"Stages are: {', '.join(STAGE_ORDER)}."
            )
        order = [s for s in STAGE_ORDER if s in cfg.stages]
        cfg = dataclasses.replace(cfg, stages=tuple(order))
        check_ranges(cfg, where)
        check_choices(cfg, where)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric key: ``lo``/``hi`` bounds (None = open), inclusive or not."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # True: value > lo; False: value >= lo
    hi_open: bool = False
    meaning: str = ""  # e.g. "0 = skip the stage", shown in the error

    def admits(self, value: float) -> bool:
        try:
            value = float(value)
        except (OverflowError, TypeError, ValueError):  # an int past float range is never a sane value
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and not (value > self.lo if self.lo_open else value >= self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        lo = None if self.lo is None else f"{num(self.lo)} {'<' if self.lo_open else '<='} value"
        hi = None if self.hi is None else f"value {'<' if self.hi_open else '<='} {num(self.hi)}"
        if lo and hi:
            text = f"{lo}{hi[5:]}"
        elif lo:
            text = f"value {'>' if self.lo_open else '>='} {num(self.lo)}"
        else:
            text = hi or "a finite number"
        return text + (f" ({self.meaning})" if self.meaning else "")


def _ge(lo: float, meaning: str = "") -> Range:
    return Range(lo=lo, meaning=meaning)


def _gt(lo: float, meaning: str = "") -> Range:
    return Range(lo=lo, lo_open=True, meaning=meaning)


_POSITIVE = _gt(0)
_FRACTION = Range(0.0, 1.0)  # [0, 1]
_OPEN_FRACTION = Range(0.0, 1.0, lo_open=True, hi_open=True)  # (0, 1)

# Every numeric key of every config, with its allowed values. A new numeric key must be added here
# (tests/unit/test_config.py checks that none is missing); tuple keys apply the range to each item.
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**32 - 1),  # scikit-learn's split takes 0 .. 2**32 - 1
    "data.mean": Range(),  # any finite value (NaN / inf would poison every input)
    "data.std": _POSITIVE,
    "data.resize": _ge(0, "0 = --image-size or the source's default"),
    "data.crop": _ge(0, "0 = no crop"),
    "data.workers": _ge(-1, "-1 = auto"),
    "data.stats_images": _ge(1),
    "train.batch_size": _ge(1),
    "train.weight_decay": _ge(0),
    "train.grad_clip": _ge(0, "0 = no clipping"),
    "teacher.epochs": _ge(1),
    "teacher.lr": _POSITIVE,
    "distill.epochs": _ge(0, "0 = skip distillation training"),
    "distill.lr": _POSITIVE,
    "distill.temperature": _POSITIVE,
    "distill.alpha": _FRACTION,
    "distill.penalty_weight": _ge(0, "0 = off"),
    "distill.penalty_start": Range(0.0, 1.0, hi_open=True),
    "distill.temperature_end": _POSITIVE,
    "distill.temperatures": _POSITIVE,
    "distill.temperature_weights": _ge(0),
    "distill.alpha_end": _FRACTION,
    "distill.schedule_warmup": _FRACTION,
    "prune.ratio": _OPEN_FRACTION,
    "prune.steps": _ge(1),
    "prune.recovery_epochs": _ge(0, "0 = no recovery training"),
    "prune.lr": _POSITIVE,
    "prune.round_to": _ge(0, "0 = the profile's channel rounding"),
    "prune.max_layer_ratio": _OPEN_FRACTION,
    "prune.penalty_weight": _ge(0, "0 = off"),
    "qat.epochs": _ge(0, "0 = no QAT training: onnxruntime static PTQ makes the INT8 model"),
    "qat.lr": _POSITIVE,
    "qat.freeze_observers_at": _FRACTION,
    "qat.freeze_bn_at": _FRACTION,
    "export.opset": Range(13, 23),  # torch.onnx's dynamo exporter and the QDQ ops hwkd writes
    "export.min_top1_agreement": _FRACTION,
    "export.ptq_calibration_images": _ge(1),
    "bench.warmup": _ge(0),
    "bench.iterations": _ge(1),
    "bench.rounds": _ge(1),
}


# "cost": every channel's |gamma| weighted by what it costs (MorphNet); "plan": only the channels the prune
# stage's planner would remove now to meet the budget, re-planned as training goes; "mask": those channels
# held at zero instead of pulled towards it (hwkd.hardware.penalty).
PENALTY_TARGETS = ("cost", "plan", "mask")
PRUNE_MODES = ("budget", "ratio")
# String keys with a fixed set of values, checked with the ranges (before any training, not at the stage).
CHOICES: dict[str, tuple[str, ...]] = {
    "distill.penalty_target": PENALTY_TARGETS,
    "prune.penalty_target": PENALTY_TARGETS,
    "prune.mode": PRUNE_MODES,
}


def _lookup(cfg: Any, key: str) -> Any:
    """The value of a dotted key (``prune.mode``) in a nested config."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_choices(cfg: Any, where: str = "config") -> None:
    """Raise ConfigError naming the first string key whose value is not one of its choices."""
    for key, allowed in CHOICES.items():
        value = _lookup(cfg, key)
        if value not in allowed:
            raise ConfigError(
                f"{key} = {value!r} in {where} is not one of {', '.join(allowed)}.",
                f"Fix it in the recipe or with --set {key}={allowed[0]}.",
            )


def numeric_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Dotted names of every int / float (or tuple of them) field, nested configs included."""
    cls = cls or PipelineConfig
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += numeric_keys(tp, f"{prefix}{f.name}.")
        elif tp in (int, float) or (typing.get_origin(tp) is tuple and typing.get_args(tp)[0] in (int, float)):
            keys.append(prefix + f.name)
    return keys


def check_ranges(cfg: Any, where: str = "config") -> None:
    """Raise ConfigError naming the first key whose value is outside its range (before any training)."""
    for key, rng in RANGES.items():
        value = _lookup(cfg, key)
        items = value if isinstance(value, tuple) else (value,)
        for i, item in enumerate(items):
            if not rng.admits(item):
                name = f"{key}[{i}]" if isinstance(value, tuple) else key
                shown = repr(item) if len(repr(item)) <= 40 else f"{repr(item)[:20]}... ({len(repr(item))} digits)"
                raise ConfigError(
                    f"{name} = {shown} is out of range in {where}: it must be {rng.describe()}.",
                    f"Fix it in the recipe or with --set {key}=VALUE.",
                )


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and lightly coerce: int->float, list->tuple) one value against a type hint."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} has the wrong type ({type(value).__name__}).", f"Expected {tp}.")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}.")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{where} must be {tp.__name__}, got a boolean.")
        if not isinstance(value, tp):
            raise ConfigError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}.")
        return value
    return value


def from_mapping(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    """Build a (nested) frozen dataclass from a mapping, rejecting unknown keys and wrong types."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table of keys.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown key {unknown[0]!r} in {where}.", f"Allowed keys: {', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a table of keys.")
            kwargs[name] = from_mapping(tp, value, key)
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two plain mappings; override wins. Neither input is mutated."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
