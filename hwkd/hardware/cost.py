"""Cost model: per-layer roofline latency and memory of a model on a device profile, without running it there.

Two steps, kept apart so either can be deepened alone:

1. *Trace* the model into hardware-free ``LayerWork`` records (MACs, parameters, activation elements,
   output channels, whether the runtime fuses the op away): ``trace_torch`` (forward hooks) or
   ``trace_onnx`` (shape inference).
2. *Price* them on a profile: ``price`` applies, per layer,
   ``max(2*MACs / (peak * efficiency * k/(k + k_half)), bytes / bandwidth) + per-op overhead``,
   plus a fixed per-inference cost (``[calibration] per_run_overhead_us``, 0 unless calibrated),
   charging channel counts that are not a multiple of the profile's vector width as if rounded up.
   ``k`` is the reduction length (MACs per output value): GEMMs with a short one (depthwise, thin 1x1
   convs) cannot amortise their loads and stores, which is why MACs alone mispredict MobileNets.

Cross-check with the defaults on profile rpi4 at 224x224, FP32: ResNet-18 ~121 ms and MobileNetV2
~56 ms (without its residual adds), against 123.1 / 61.9 ms published for ncnn on that board
(DEVICE-FIGURES.md).

The figures are figures of ONNX Runtime's CPU provider, which hwkd always falls back to. A later,
calibrated model (and the differentiable ``penalty``) plugs in at ``price`` and ``layer_seconds``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hwkd.errors import ConfigError, ProfileError

BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "int8": 1}
# Fraction of peak a long-reduction GEMM reaches; overridden by [calibration] efficiency (a number or
# a {precision = number} table). INT8 kernels lose more to packing and requantization.
DEFAULT_EFFICIENCY = {"fp32": 0.6, "fp16": 0.5, "int8": 0.42}
# Reduction length at which a GEMM reaches half that efficiency; [calibration] k_half.
DEFAULT_K_HALF = 96.0
# Session buffers and arena slack beyond weights and live activations; [calibration] runtime_overhead_mb.
DEFAULT_RUNTIME_OVERHEAD_MB = 2.0
_MB = 2**20  # budgets use binary megabytes (see hwkd.hardware.budget)


@dataclass(frozen=True)
class LayerWork:
    """What one op does, independent of hardware: the seam between tracing and pricing."""

    name: str
    op: str
    macs: int
    params: int
    act_in: int  # activation elements read
    act_out: int  # activation elements written
    channels: int = 0  # output channels, for vector-width rounding; 0 = not channel-shaped
    fused: bool = False  # folded into the producing conv/gemm by the runtime: no traffic, no dispatch


@dataclass
class Cost:
    """Estimated cost at batch 1. ``per_layer`` rows: name, op, macs, params, bytes, latency_ms, bound
    ("compute" | "memory" | "overhead", or "fused" when the runtime folds the op into its producer)."""

    latency_ms: float
    memory_mb: float
    macs: int
    params: int
    per_layer: list[dict[str, Any]]
    precision: str
    weight_mb: float = 0.0
    activation_mb: float = 0.0  # peak live activations
    profile: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- pricing


def estimate(model: Any, example_input: Any, profile: Any, precision: str = "fp32") -> Cost:
    """Estimate a torch ``nn.Module`` at batch 1 (the first sample of ``example_input``) on ``profile``."""
    works = trace_torch(model, example_input)
    params = sum(p.numel() for p in model.parameters())
    return price(works, profile, precision, params=params)


def estimate_onnx(path_or_model: Any, profile: Any, precision: str | None = None) -> Cost:
    """Estimate an ONNX graph (path or ModelProto); precision is detected from the graph when not given."""
    from hwkd.hardware.onnx_trace import trace_onnx

    works, params, detected = trace_onnx(path_or_model)
    return price(works, profile, precision or detected, params=params)


def price(works: list[LayerWork], profile: Any, precision: str, params: int | None = None) -> Cost:
    """Roofline-price traced layers on a profile. ``params`` defaults to the sum over layers."""
    nbytes = _bytes_per_value(precision)
    hw = profile.hardware
    peak = _peak_flops(profile, precision)
    bandwidth = hw.memory_bandwidth_gbs * 1e9
    overhead_s = _op_overhead_us(profile, precision) * 1e-6
    run_overhead_s = _calibration_number(
        profile, "per_run_overhead_us", profile.calibration.get("per_run_overhead_us", 0.0), allow_zero=True
    ) * 1e-6
    k_half = _calibration_number(
        profile, "k_half", profile.calibration.get("k_half", DEFAULT_K_HALF), allow_zero=True
    )
    rows, total_s, peak_act = [], run_overhead_s, 0
    for w in works:
        traffic = 0 if w.fused else (w.params + w.act_in + w.act_out) * nbytes
        if w.fused:
            seconds, bound = 0.0, "fused"
        else:
            macs = w.macs * round_up_factor(w.channels, hw.vector_width)
            shape_eff = gemm_efficiency(w.macs / max(w.act_out, 1), k_half) if w.macs else 1.0
            seconds, bound = layer_seconds(2.0 * macs, traffic, peak * shape_eff, bandwidth, overhead_s)
            peak_act = max(peak_act, w.act_in + w.act_out)
        total_s += seconds
        rows.append(
            {
                "name": w.name,
                "op": w.op,
                "macs": w.macs,
                "params": w.params,
                "bytes": traffic,
                "latency_ms": seconds * 1e3,
                "bound": bound,
            }
        )
    params = sum(w.params for w in works) if params is None else int(params)
    weight_mb = params * nbytes / _MB
    activation_mb = peak_act * nbytes / _MB
    return Cost(
        latency_ms=total_s * 1e3,
        memory_mb=weight_mb + activation_mb + _runtime_overhead_mb(profile),
        macs=sum(w.macs for w in works),
        params=params,
        per_layer=rows,
        precision=precision,
        weight_mb=weight_mb,
        activation_mb=activation_mb,
        profile=getattr(profile, "name", ""),
    )


def layer_seconds(
    flops: float, traffic_bytes: float, peak_flops: float, bandwidth: float, overhead_s: float
) -> tuple[float, str]:
    """Roofline time of one kernel and what bounds it: the slower of compute and memory, plus dispatch."""
    compute_s = flops / peak_flops
    memory_s = traffic_bytes / bandwidth
    if overhead_s >= max(compute_s, memory_s):
        bound = "overhead"
    else:
        bound = "compute" if compute_s >= memory_s else "memory"
    return max(compute_s, memory_s) + overhead_s, bound


def gemm_efficiency(reduction: float, k_half: float) -> float:
    """Fraction of a kernel's peak reached with ``reduction`` MACs per output value (1 when k_half is 0)."""
    return reduction / (reduction + k_half) if reduction > 0 else 1.0


def round_up_factor(channels: int, multiple: int) -> float:
    """How much more work the kernel does because ``channels`` is padded up to a multiple of the lanes."""
    if channels <= 0 or multiple <= 1:
        return 1.0
    return math.ceil(channels / multiple) * multiple / channels


def _bytes_per_value(precision: str) -> int:
    try:
        return BYTES_PER_VALUE[precision]
    except KeyError:
        raise ConfigError(
            f"Unknown precision {precision!r}.", f"Choose one of: {', '.join(BYTES_PER_VALUE)}."
        ) from None


def _peak_flops(profile: Any, precision: str) -> float:
    """Usable FLOP/s: the CPU's peak at this precision, scaled to the threads the runtime uses."""
    hw = profile.hardware
    if precision not in hw.peak_gflops:
        raise ProfileError(
            f"Profile {profile.name!r} ({profile.source}) has no {precision} figure in hardware.peak_gflops.",
            f"Add one, or estimate at one of: {', '.join(hw.peak_gflops)}.",
        )
    cores = min(profile.runtime.threads, hw.cpu_cores) / hw.cpu_cores
    return hw.peak_gflops[precision] * 1e9 * cores * _efficiency(profile, precision)


def _efficiency(profile: Any, precision: str) -> float:
    value = profile.calibration.get("efficiency", DEFAULT_EFFICIENCY)
    if isinstance(value, dict):
        value = value.get(precision, DEFAULT_EFFICIENCY[precision])
    return _calibration_number(profile, "efficiency", value, upper=1.0)


def _op_overhead_us(profile: Any, precision: str) -> float:
    """Kernel dispatch cost: [calibration] op_overhead_us (a number or {precision = number}) when
    calibrated, else hardware.per_op_overhead_us."""
    value = profile.calibration.get("op_overhead_us")
    if isinstance(value, dict):
        value = value.get(precision)
    if value is None:
        return profile.hardware.per_op_overhead_us
    return _calibration_number(profile, "op_overhead_us", value, allow_zero=True)


def _runtime_overhead_mb(profile: Any) -> float:
    value = profile.calibration.get("runtime_overhead_mb", DEFAULT_RUNTIME_OVERHEAD_MB)
    return _calibration_number(profile, "runtime_overhead_mb", value, allow_zero=True)


def _calibration_number(profile, key, value, upper=math.inf, allow_zero=False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value <= upper
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ProfileError(
            f"{profile.source}: calibration.{key} must be a number in "
            f"{'[0' if allow_zero else '(0'}, {upper:g}], got {value!r}."
        )
    return float(value)


# ---------------------------------------------------------------------------------------------- torch


def trace_torch(model: Any, example_input: Any) -> list[LayerWork]:
    """Run the model once at batch 1 in eval mode with hooks on conv/linear/norm/activation/pool leaves.

    Functional ops in ``forward`` (``F.relu``, residual ``+``) are not modules and are not seen here;
    ``trace_onnx`` on the exported graph sees everything.
    """
    import torch

    kinds = _torch_kinds()
    works: list[LayerWork] = []
    calls: Counter[str] = Counter()
    fusable_out: list[Any] = [None]  # last output a following BN/activation may fold into

    def hook(name, module, args, output):
        kind = next(k for k, classes in kinds.items() if isinstance(module, classes))
        x = args[0] if args else None
        y = output[0] if isinstance(output, tuple | list) else output
        if not isinstance(y, torch.Tensor):
            return
        calls[name] += 1
        label = name if calls[name] == 1 else f"{name}#{calls[name]}"
        in_numel = x.numel() if isinstance(x, torch.Tensor) else 0
        fused = kind == "fusable" and x is not None and x is fusable_out[0]
        macs, channels = _torch_macs(module, kind, x, y)
        works.append(
            LayerWork(
                name=label,
                op=type(module).__name__,
                macs=macs,
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                act_in=in_numel,
                act_out=y.numel(),
                channels=channels,
                fused=fused,
            )
        )
        if kind in ("conv", "linear") or fused:
            fusable_out[0] = y

    traced = tuple(c for classes in kinds.values() for c in classes)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, traced):
            label = name or type(module).__name__
            handles.append(module.register_forward_hook(lambda m, a, o, _n=label: hook(_n, m, a, o)))
    was_training = model.training
    inputs = _batch_one(example_input, _device_of(model))
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return works


def _torch_kinds() -> dict[str, tuple[type, ...]]:
    """Module classes by role; 'fusable' ones fold into a preceding conv/linear in ONNX Runtime."""
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
    from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

    return {
        "convT": (_ConvTransposeNd,),
        "conv": (_ConvNd,),
        "linear": (nn.Linear,),
        "fusable": (_BatchNorm, nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid),
        "elementwise": (
            nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
            nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Softmax, nn.LogSoftmax,
        ),
        "pool": (_MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd),
    }  # fmt: skip


def _torch_macs(module: Any, kind: str, x: Any, y: Any) -> tuple[int, int]:
    """(MACs, output channels) of one call; only conv and linear layers multiply-accumulate."""
    if kind == "conv":
        per_out = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return y.numel() * per_out, module.out_channels
    if kind == "convT":
        per_in = (module.out_channels // module.groups) * math.prod(module.kernel_size)
        return x.numel() * per_in, module.out_channels
    if kind == "linear":
        return y.numel() * module.in_features, module.out_features
    return 0, 0


def _batch_one(example_input: Any, device: Any) -> tuple[Any, ...]:
    """The first sample of each input tensor, on the model's device: the estimate is per sample."""
    import torch

    items = example_input if isinstance(example_input, tuple | list) else (example_input,)
    out = []
    for item in items:
        if isinstance(item, torch.Tensor):
            item = item[:1] if item.dim() > 0 else item
            item = item.to(device) if device is not None else item
        out.append(item)
    return tuple(out)


def _device_of(model: Any) -> Any:
    for tensor in model.parameters():
        return tensor.device
    return None


__all__ = [
    "BYTES_PER_VALUE",
    "DEFAULT_EFFICIENCY",
    "DEFAULT_K_HALF",
    "DEFAULT_RUNTIME_OVERHEAD_MB",
    "Cost",
    "LayerWork",
    "estimate",
    "estimate_onnx",
    "gemm_efficiency",
    "layer_seconds",
    "price",
    "round_up_factor",
    "trace_onnx",
    "trace_torch",
]


def trace_onnx(path_or_model: Any):
    """See hwkd.hardware.onnx_trace.trace_onnx (kept importable from here)."""
    from hwkd.hardware.onnx_trace import trace_onnx as _trace

    return _trace(path_or_model)
