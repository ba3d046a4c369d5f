"""Cost model: per-layer roofline latency and memory of a model on a device profile, without running it there.

Two steps, kept apart so either can be deepened alone:

1. *Trace* the model into hardware-free ``LayerWork`` records (MACs, parameters, activation elements,
   output channels, whether the runtime fuses the op away): ``trace_torch`` (forward hooks, and a torch
   function mode for ops written in ``forward``) or ``trace_onnx`` (shape inference). The two give the same
   nodes for a model and its export (residual adds, SE gates, INT8's Q/DQ included), so what a run prunes to
   is what ``hwkd estimate model.onnx`` says of the result.
2. *Price* them on a profile: ``price`` applies, per layer,
   ``max(2*MACs / (peak * efficiency * k/(k + k_half)), bytes / bandwidth) + per-op overhead``,
   plus a fixed per-inference cost (``[calibration] per_run_overhead_us``, 0 unless calibrated),
   charging channel counts that are not a multiple of the profile's vector width as if rounded up.
   ``k`` is the reduction length (MACs per output value): GEMMs with a short one (depthwise, thin 1x1
   convs) cannot amortise their loads and stores, which is why MACs alone mispredict MobileNets.

Cross-check with the defaults on profile rpi4 at 224x224, FP32: ResNet-18 ~121 ms and MobileNetV2
~56 ms, against 123.1 / 61.9 ms published for ncnn on that board
(DEVICE-FIGURES.md).

A profile written by ``hwkd profiles calibrate`` carries, per precision, a fitted *kernel model* in
``[calibration.kernel_model.<precision>]`` and ``price`` uses it instead of the roofline: a layer costs
``sum_j ns_per_unit_j * feature_j`` over the ``FEATURES`` below (FLOPs per kernel class, im2col and
activation traffic, weights, one dispatch), plus ``run_ns`` per inference. The fit measures what the
roofline can only assume: that a 1x1 conv, a depthwise conv and an INT8 im2col GEMM each run at their
own speed, and which channel tile (``channel_tile``) the kernels pad to.

At more than one thread a calibrated profile's ``[calibration.thread_model.<precision>]``
(hwkd.hardware.threads) turns each layer's 1-thread time into its time at the thread count it was
fitted at (split or not, per-class speed, fork/join); ``[calibration.memory_model.<precision>]``
(hwkd.hardware.memory) replaces weights + activations + a flat overhead with fitted runtime memory.
Every Cost carries the thread count and the profile's held-out errors, so a figure is never shown
without what to expect of it.

The figures are figures of ONNX Runtime's CPU provider, which hwkd always falls back to. The
differentiable ``penalty`` prices channels through ``price`` too, so it follows whichever model applies.
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
# What the calibrated kernel model charges for, per executed (unfused) layer; see layer_features.
FEATURES = (
    "conv_flops",  # 2*MACs of a k x k conv (channels padded to the tile) / (k/(k + k_half))
    "pointwise_flops",  # the same for a 1x1 conv, and 2*MACs of a Gemm / MatMul: the same GEMM kernel, and
    # calibration's Gemms are classifier heads too small to fit a rate of their own (one draw fitted 0, another
    # 1.4 ns per FLOP, 350x a conv's, which put mobilenet_v3_small at +335%: docs/decisions-issue13.md, stop 19)
    "unaligned_flops",  # 2*MACs (padded) of a conv whose input channels per group are not a multiple
    # of the kernel model's input_align (4 for INT8 packing; for FP32 on x86 the NCHWc block, since ORT's
    # NCHWc convs take such inputs in NCHW), such as an RGB stem: a kernel of its own
    "depthwise_flops",  # 2*MACs of a depthwise conv, channels padded to the tile
    "im2col",  # values gathered to lower a k x k conv to a GEMM: output pixels x reduction length
    "unaligned_im2col",  # the same for convs whose input channels per group are not a multiple of
    # input_align, which the kernels cannot pack directly (an RGB stem is the usual case)
    "conv_activations",  # activation values a conv / gemm reads and writes (epilogue, requantize, layout)
    "conv_pixels",  # output pixels of a k x k conv, whatever its channels: per-pixel set-up (indirection
    # pointers, requantization blocks); INT8 convs at 64-96 px were 20-30% under-estimated without it
    "light_pixels",  # the same for 1x1 and depthwise convs, which set up less per pixel: priced at the k x k
    # rate, narrow INT8 MobileNetV2s were over-estimated by 7-26% (docs/decisions-issue13.md, stop 28)
    "group_pixels",  # output pixels x groups of a grouped conv that is not depthwise (ResNeXt, RegNet): the
    # runtime runs one GEMM per group, each with its own per-pixel set-up; without it unseen grouped INT8
    # networks were under-estimated by 23-29% on every host (docs/decisions-issue13.md, stop 29)
    "unaligned_outputs",  # values written by a conv / gemm whose output channels are not a multiple of
    # the vector lanes (12 or 20 on 8-lane AVX2): the remainder takes a slower path
    "elementwise",  # values an unfused non-MAC op reads and writes (adds, muls, activations, executed (de)quantize)
    "pool",  # the same for a pooling op (max / average / global pool, ReduceMean): a window or a reduction per
    # value, about twice an add's; one rate for both left INT8 residual adds over-priced 1.4-1.7x, and with its
    # own rate the held-out error fell on 17 (FP32) / 15 (INT8) of 18 recorded runs (decisions-issue13.md, stop 31)
    "weights",  # parameter values read
    "ops",  # one per executed kernel: dispatch
    "mac_ops",  # one more per conv / gemm kernel: packing, blocking and epilogue set-up
    "epilogue",  # values a fused activation other than ReLU rewrites after the kernel (ReLU6, sigmoid, ...)
)
# Features a profile calibrated before they existed lacks: priced at 0 there (what that fit assumed).
_OPTIONAL_FEATURES = frozenset({"conv_pixels", "light_pixels", "group_pixels"})
# Features split off from another: a profile fitted before the split prices them at that one's rate (stop 28:
# 1x1 / depthwise conv pixels from the k x k convs'; stop 31: pools from the other elementwise ops').
_SPLIT_FROM = {"light_pixels": "conv_pixels", "pool": "elementwise"}
# Reductions priced by the "pool" feature beside every op named *Pool* (ONNX op types, torch module names).
_POOL_OPS = frozenset({"ReduceMean", "ReduceMax"})
# Fused ops that cost nothing at all: BN is folded into the weights at load time, ReLU runs in-kernel.
_FREE_FUSED = frozenset(
    {"BatchNormalization", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "Relu", "ReLU"}
)
_COMPUTE_FEATURES = frozenset(f for f in FEATURES if f.endswith("_flops"))


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
    kernel: int = 0  # spatial kernel elements of a conv (9 for 3x3); 0 = not a conv
    groups: int = 1  # conv groups (== channels for a depthwise conv)
    in_channels: int = 0  # input channels per group of a conv (its reduction is in_channels x kernel)

    @property
    def kind(self) -> str:
        """Kernel class the calibrated model prices separately: conv | pointwise | depthwise | gemm | elementwise."""
        if not self.macs:
            return "elementwise"
        if not self.kernel:
            return "gemm"
        if self.groups > 1 and self.groups == self.channels:
            return "depthwise"
        return "pointwise" if self.kernel == 1 else "conv"

    @property
    def grouped(self) -> bool:
        """A conv split into groups that is not depthwise (ResNeXt, RegNet): the runtime runs one GEMM per group."""
        return self.kind in ("conv", "pointwise") and self.groups > 1


@dataclass
class Cost:
    """Estimated cost at batch 1. ``per_layer`` rows: name, op, macs, params, bytes, latency_ms, fixed_ms, bound
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
    threads: int = 1  # onnxruntime threads the latency is estimated at
    # What to expect of these figures: the profile's cross-validated error (MAPE, %) at this precision and
    # thread count, None for an uncalibrated profile; and why a calibration is not to be trusted, if so.
    latency_error_pct: float | None = None
    memory_error_pct: float | None = None
    calibration_warning: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- pricing


def estimate(model: Any, example_input: Any, profile: Any, precision: str = "fp32") -> Cost:
    """Estimate a torch ``nn.Module`` at batch 1 (the first sample of ``example_input``) on ``profile``."""
    works = trace_torch(model, example_input, precision)
    params = sum(p.numel() for p in model.parameters())
    return price(works, profile, precision, params=params)


def estimate_onnx(path_or_model: Any, profile: Any, precision: str | None = None, threads: int | None = None) -> Cost:
    """Estimate an ONNX graph (path or ModelProto); precision is detected from the graph when not given."""
    from hwkd.hardware.onnx_trace import trace_onnx

    works, params, detected = trace_onnx(path_or_model)
    return price(works, profile, precision or detected, params=params, threads=threads)


def price(
    works: list[LayerWork], profile: Any, precision: str, params: int | None = None, threads: int | None = None
) -> Cost:
    """Price traced layers on a profile. ``params`` defaults to the sum over layers; ``threads`` to the
    profile's runtime threads (a calibrated profile prices 1 thread and the thread count it was fitted at)."""
    from hwkd.hardware.memory import fitted_memory_model, memory_mb
    from hwkd.hardware.threads import fitted_thread_model, layer_seconds_at

    threads = profile.runtime.threads if threads is None else int(threads)
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
    kernel_model = fitted_kernel_model(profile, precision)
    tile = channel_tile(profile, precision)
    thread_model = fitted_thread_model(profile, precision, threads) if kernel_model is not None else None
    if kernel_model is not None:
        run_overhead_s = (thread_model or kernel_model)["run_ns"] * 1e-9
    rows, total_s, peak_act = [], run_overhead_s, 0
    for w in works:
        traffic = 0 if w.fused else (w.params + w.act_in + w.act_out) * nbytes
        fixed_s = 0.0 if w.fused else overhead_s
        if kernel_model is not None:
            seconds, bound, fixed_s = kernel_seconds(w, kernel_model, tile, hw.vector_width)
            if thread_model is not None:
                seconds, sync_s = layer_seconds_at(w, seconds, thread_model)
                fixed_s = fixed_s * thread_model["ratio_serial"] + sync_s
            if w.fused:
                bound = "fused"
            else:
                peak_act = max(peak_act, w.act_in + w.act_out)
        elif w.fused:
            seconds, bound = 0.0, "fused"
        else:
            macs = w.macs * round_up_factor(w.channels, tile)
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
                "fixed_ms": fixed_s * 1e3,  # the part no channel count changes: dispatch
                "bound": bound,
            }
        )
    params = sum(w.params for w in works) if params is None else int(params)
    weight_mb = params * nbytes / _MB
    activation_mb = peak_act * nbytes / _MB
    memory_model = fitted_memory_model(profile, precision)
    if memory_model is not None:
        total_mb = memory_mb(works, memory_model, nbytes, params, arm=hw.cpu_family == "arm")
    else:
        total_mb = weight_mb + activation_mb + _runtime_overhead_mb(profile)
    latency_err, memory_err, warning = expected_errors(profile, precision, threads)
    return Cost(
        latency_ms=total_s * 1e3,
        memory_mb=total_mb,
        macs=sum(w.macs for w in works),
        params=params,
        per_layer=rows,
        precision=precision,
        weight_mb=weight_mb,
        activation_mb=activation_mb,
        profile=getattr(profile, "name", ""),
        threads=threads,
        latency_error_pct=latency_err,
        memory_error_pct=memory_err,
        calibration_warning=warning,
    )


def expected_errors(profile: Any, precision: str, threads: int) -> tuple[float | None, float | None, str]:
    """(latency CV MAPE %, memory CV MAPE %, warning) the profile's calibration recorded for this case.

    The latency figure is the held-out error at ``threads`` (``fit.<precision>`` at 1 thread,
    ``threads_fit.<precision>`` at the calibrated count); None where the profile has none.
    """
    measured = profile.calibration.get("measured", {})
    if not isinstance(measured, dict):
        return None, None, ""
    fits = measured.get("threads_fit" if threads > 1 else "fit", {})
    if threads > 1 and measured.get("threads") != threads:
        fits = {}
    stats = fits.get(precision, {}) if isinstance(fits, dict) else {}
    latency = stats.get("cv_mape_pct") if isinstance(stats, dict) else None
    mem = measured.get("memory", {})
    mem = mem.get(precision, {}) if isinstance(mem, dict) else {}
    memory = mem.get("cv_mape_pct") if isinstance(mem, dict) else None
    stability = measured.get("stability", {})
    warning = ""
    if isinstance(stability, dict) and stability.get("trustworthy") is False:
        warning = "calibration flagged untrustworthy: " + "; ".join(stability.get("reasons", []))
    return latency, memory, warning


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


def layer_features(
    w: LayerWork, tile: int, k_half: float, lanes: int = 8, threads: int = 1, grain: float = 0.0,
    input_align: int = 4,
) -> dict[str, float]:
    """The kernel model's features of one layer (a fused layer costs only its epilogue, if any).

    With ``threads`` > 1, every feature but the dispatch counts is scaled by ``1 - s * (1 - 1/threads)``,
    ``s = work / (work + grain)``: a kernel splits over the threads only once it has enough work (FLOPs,
    or values for non-MAC ops), so small layers run nearly serially and large ones nearly ``threads``
    times faster.
    """
    f = _layer_features(w, tile, k_half, lanes, input_align)
    if threads > 1 and grain > 0:
        work = 2.0 * w.macs if w.macs else float(w.act_out if w.fused else w.act_in + w.act_out)
        scale = 1.0 - work / (work + grain) * (1.0 - 1.0 / threads)
        f = {k: v if k in ("ops", "mac_ops") else v * scale for k, v in f.items()}
    return f


def _layer_features(w: LayerWork, tile: int, k_half: float, lanes: int, input_align: int = 4) -> dict[str, float]:
    f = dict.fromkeys(FEATURES, 0.0)
    if w.fused:
        if w.op not in _FREE_FUSED:
            f["epilogue"] = float(w.act_out)
        return f
    f["ops"] = 1.0
    f["weights"] = float(w.params)
    kind = w.kind
    if kind == "elementwise":
        f["pool" if is_pool(w.op) else "elementwise"] = float(w.act_in + w.act_out)
        return f
    f["conv_activations"] = float(w.act_in + w.act_out)
    if w.kernel:
        pixels = w.act_out / max(w.channels, 1)
        f["conv_pixels" if kind == "conv" else "light_pixels"] = pixels
        if w.grouped:
            f["group_pixels"] = pixels * w.groups
    if w.channels % lanes:
        f["unaligned_outputs"] = float(w.act_out)
    f["mac_ops"] = 1.0
    flops = 2.0 * w.macs * round_up_factor(w.channels, tile)
    if kind in ("conv", "pointwise"):
        im2col = w.macs / max(w.channels, 1)  # output pixels x reduction length
        if kind == "conv":
            f["im2col"] = im2col
        if w.in_channels % input_align:
            f["unaligned_flops"] = flops
            f["unaligned_im2col"] = im2col
        else:
            f[f"{kind}_flops"] = flops / gemm_efficiency(w.macs / max(w.act_out, 1), k_half)
    elif kind == "depthwise":
        f["depthwise_flops"] = flops
    else:  # Gemm / MatMul, priced as a pointwise conv (see FEATURES); a profile's older gemm_flops is ignored
        f["pointwise_flops"] = 2.0 * w.macs / gemm_efficiency(w.macs / max(w.act_out, 1), k_half)
    return f


def is_pool(op: str) -> bool:
    """A pooling op (MaxPool, GlobalAveragePool, AdaptiveAvgPool2d, ...) or a mean / max reduction."""
    return "Pool" in op or op in _POOL_OPS


def kernel_seconds(
    w: LayerWork, model: dict[str, float], tile: int, lanes: int = 8
) -> tuple[float, str, float]:
    """Time of one layer under a fitted kernel model, its largest share (compute | memory | overhead),
    and the overhead share alone (dispatch, which no channel count changes)."""
    parts = {"compute": 0.0, "memory": 0.0, "overhead": 0.0}
    features = layer_features(w, tile, model["k_half"], lanes, int(model["threads"]), model["grain"],
                              int(model.get("input_align", 4)))
    for name, value in features.items():
        if value:
            share = "compute" if name in _COMPUTE_FEATURES else "overhead" if name.endswith("ops") else "memory"
            parts[share] += value * model[name] * 1e-9
    return sum(parts.values()), max(parts, key=parts.get), parts["overhead"]


def fitted_kernel_model(profile: Any, precision: str) -> dict[str, float] | None:
    """``[calibration.kernel_model.<precision>]`` checked and complete, or None (the roofline applies)."""
    table = profile.calibration.get("kernel_model", {})
    model = table.get(precision) if isinstance(table, dict) else None
    if model is None:
        return None
    if not isinstance(model, dict):
        raise ProfileError(f"{profile.source}: calibration.kernel_model.{precision} must be a table.")
    for feature, parent in _SPLIT_FROM.items():  # fitted before the split: the feature keeps its parent's rate
        if feature not in model and parent in model:
            model = {**model, feature: model[parent]}
    model = {**dict.fromkeys(_OPTIONAL_FEATURES, 0.0), **model}
    missing = [k for k in (*FEATURES, "run_ns", "k_half") if k not in model]
    if missing:
        raise ProfileError(
            f"{profile.source}: calibration.kernel_model.{precision} lacks {', '.join(missing)}.",
            "Re-run `hwkd profiles calibrate` to write a complete profile.",
        )
    out = {
        k: _calibration_number(profile, f"kernel_model.{precision}.{k}", model[k], allow_zero=True)
        for k in (*FEATURES, "run_ns", "k_half")
    }
    # threads the fit was timed with and the work at which a kernel reaches half its parallel speed-up
    # (absent in a 1-thread fit: no speed-up to model)
    out["threads"] = _calibration_number(profile, f"kernel_model.{precision}.threads", model.get("threads", 1))
    out["grain"] = _calibration_number(
        profile, f"kernel_model.{precision}.grain", model.get("grain", 0.0), allow_zero=True
    )
    # input channels per group a conv needs, as a multiple, for the runtime's main kernel (4 before it was fitted)
    out["input_align"] = _calibration_number(profile, f"kernel_model.{precision}.input_align", model.get("input_align", 4))
    return out


def channel_tile(profile: Any, precision: str) -> int:
    """Channel multiple the kernels pad to at this precision: measured by calibration, else the vector width."""
    model = profile.calibration.get("kernel_model", {})
    model = model.get(precision) if isinstance(model, dict) else None
    tile = model.get("channel_tile") if isinstance(model, dict) else None
    if tile is None:
        return profile.hardware.vector_width
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ProfileError(f"{profile.source}: calibration.kernel_model.{precision}.channel_tile must be a positive integer.")
    return tile


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
    kernel_model = fitted_kernel_model(profile, precision)
    if kernel_model is not None:
        return kernel_model["ops"] * 1e-3
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


def trace_torch(model: Any, example_input: Any, precision: str = "fp32") -> list[LayerWork]:
    """Run the model once at batch 1 in eval mode with hooks on conv/linear/norm/activation/pool leaves, and
    a torch function mode for the ops ``forward`` calls outside them (residual ``+``, SE's ``*``, ``cat``,
    ``F.relu``, ``x.mean((2, 3))``): the same nodes ``trace_onnx`` sees in the exported graph, so the
    estimate a run prunes to is the estimate ``hwkd estimate model.onnx`` gives. At ``int8`` the exported
    graph also quantizes its input and dequantizes its output, and those two nodes are added here.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    from hwkd.hardware.onnx_trace import EPILOGUE_OPS  # its fusion rule, applied to functional ops below

    kinds = _torch_kinds()
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.instancenorm._InstanceNorm)
    functional = _torch_functional_ops()
    works: list[LayerWork] = []
    calls: Counter[str] = Counter()
    fusable_out: list[Any] = [None]  # last output a following BN/activation may fold into
    depth = [0]  # > 0 inside a traced module: its own functional calls are that module's work
    norms_in_float: set[str] = set()  # at INT8: norms run in float between a DequantizeLinear and a QuantizeLinear
    quantized_after: set[str] = set()  # at INT8: works whose float output a QuantizeLinear converts (it runs)
    float_only: dict[int, Any] = {}  # at INT8: activations no quantized op produced (a class token's Expand)
    int8 = precision == "int8"
    # The traced module each activation comes from (through functional ops too): a functional op is named
    # "<module>#<op>", so the penalty's per-channel weights (penalty.channel_groups, by module name) count a
    # residual add in the channel group of the layer that feeds it. Tensors are kept alive so ids stay unique.
    owner: dict[int, tuple[Any, str]] = {}
    constants: dict[int, Any] = {}  # results computed from weights alone (``gamma.mean()``): graph constants
    counted: set[int] = set()  # weights already priced by a functional op

    def source_of(tensor: Any) -> str | None:
        """The traced module whose output ``tensor`` is (directly or through functional ops), if any."""
        entry = owner.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def label_for(name: str) -> str:
        calls[name] += 1
        return name if calls[name] == 1 else f"{name}#{calls[name]}"

    def bias_add(name: str, bias: Any, out: Any) -> None:
        """The bias of a linear layer on tokens: an Add node of its own (onnx_trace's _batched_matmul), whose float
        output a QuantizeLinear converts at INT8 (ORT runs the linear as MatMulIntegerToFloat)."""
        works.append(LayerWork(name=label_for(f"{name}#add"), op="Add", macs=0, params=bias.numel(),
                               act_in=out.numel(), act_out=out.numel()))  # fmt: skip
        quantized_after.add(works[-1].name)

    def enter(module, args):
        depth[0] += 1

    def hook(name, module, args, output):
        depth[0] -= 1
        kind = next(k for k, classes in kinds.items() if isinstance(module, classes))
        x = args[0] if args else None
        y = output[0] if isinstance(output, tuple | list) else output
        if not isinstance(y, torch.Tensor):
            return
        label = label_for(name)
        in_numel = x.numel() if isinstance(x, torch.Tensor) else 0
        fused = kind == "fusable" and x is not None and x is fusable_out[0]
        macs, channels = _torch_macs(module, kind, x, y)
        conv = kind in ("conv", "convT")
        # a linear layer on tokens (rank > 2) exports as MatMul + Add, which ORT leaves apart (onnx_trace's
        # _batched_matmul): the bias is a node of its own and nothing after it folds into the MatMul
        on_tokens = kind == "linear" and isinstance(x, torch.Tensor) and x.dim() > 2
        bias = module.bias if on_tokens and isinstance(getattr(module, "bias", None), torch.Tensor) else None
        works.append(
            LayerWork(
                name=label,
                op=_module_op(module),
                macs=macs,
                params=sum(p.numel() for p in module.parameters(recurse=False)) - (bias.numel() if bias is not None else 0),
                act_in=in_numel,
                act_out=y.numel(),
                channels=channels,
                fused=fused,
                kernel=math.prod(module.kernel_size) if conv else 0,
                groups=module.groups if conv else 1,
                in_channels=module.in_channels // module.groups if conv else 0,
            )
        )
        if bias is not None:
            bias_add(name, bias, y)
        if (kind in ("conv", "linear") and not on_tokens) or fused:
            fusable_out[0] = y
        elif on_tokens:
            fusable_out[0] = None
        owner[id(y)] = (y, name)
        # a norm runs in float in ORT, converting at both ends (through the transposes of a channels-last
        # LayerNorm2d too: ORT moves the DQ / Q past them)
        if isinstance(module, norms):
            norms_in_float.add(label)

    class FunctionalOps(TorchFunctionMode):
        """Records the ops of ``functional`` that run outside traced modules, priced as their ONNX nodes."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            op = functional.get(func)
            # Inside a traced module its own work is priced by the hook, except a transpose (timm's LayerNorm2d
            # permutes around F.layer_norm): the export writes it as a Transpose node of its own.
            if depth[0] and op != "Transpose":
                return out
            tensors = [a for x in args for a in (x if isinstance(x, list | tuple) else (x,)) if isinstance(a, torch.Tensor)]
            # weights (a layer scale's gamma) and Python numbers are constants of the graph, not inputs
            data = [a for a in tensors if not isinstance(a, torch.nn.Parameter) and constants.get(id(a)) is not a]
            if op == "Split" and isinstance(out, tuple | list) and data:
                source = source_of(data[0])
                for part in out:  # qkv.unbind(0): one Slice per part, each reading the whole input
                    works.append(LayerWork(name=label_for(f"{source}#slice" if source else "slice"), op="Slice",
                                           macs=0, params=0, act_in=data[0].numel(), act_out=part.numel()))  # fmt: skip
                return out
            if not isinstance(out, torch.Tensor):
                return out
            if op == "Expand" and not data:  # a class token expanded to the batch (timm's ViT): batch-dependent
                works.extend(_expand_nodes(label_for("expand"), args[0], out))
                float_only[id(out)] = out
                return out
            if op == "Index" and data:  # x[:, 0] (a ViT's class token): a Gather per integer index, a Slice per slice
                if (source := source_of(args[0])) is not None:
                    owner[id(out)] = (out, source)
                works.extend(_index_nodes(label_for, source, args[0], args[1] if len(args) > 1 else ()))
                return out
            if tensors and not data:  # on constants only (any op: a weight's std too): the exporter folds it
                constants[id(out)] = out  # (trace_onnx skips such nodes), and so is its result
                return out
            if op is None:
                return out
            if op in ("ReduceMean", "ReduceMax") and out.dim() == data[0].dim() and out.numel() == data[0].numel():
                return out
            fused = len(data) == 1 and data[0] is fusable_out[0] and op in EPILOGUE_OPS
            source = next((src for a in data if (src := source_of(a)) is not None), None)
            if source is not None:
                owner[id(out)] = (out, source)
            name = label_for(f"{source}#{op.lower()}" if source else op.lower())
            if op in ("Conv", "Gemm", "MatMul"):  # F.conv2d / F.linear / ``@`` written in forward
                works.append(_functional_product(name, op, args, kwargs or {}, data, out))
                on_tokens = op != "Conv" and out.dim() > 2  # MatMul (+ Add) left apart by ORT, as for nn.Linear
                bias = (args[2] if len(args) > 2 else (kwargs or {}).get("bias")) if op == "Gemm" else None
                if on_tokens and isinstance(bias, torch.Tensor) and not any(bias is a for a in data):
                    works[-1] = dataclasses.replace(works[-1], params=works[-1].params - bias.numel())
                    bias_add(name, bias, out)
                fusable_out[0] = None if on_tokens else out
                return out
            if op == "Gelu" and (kwargs or {}).get("approximate", args[1] if len(args) > 1 else "none") == "tanh":
                op = "GeluTanh"
            if op == "Attention":  # F.scaled_dot_product_attention: the nodes the exporter writes for it
                works.extend(_attention_nodes(name, args[0], args[1], args[2], out, int8))
                fusable_out[0] = None
                return out
            # an elementwise op's weight (a layer scale's gamma; not a scalar), counted once, as trace_onnx counts
            weights = [a for a in tensors if op in ("Add", "Mul", "Sub", "Div") and a.numel() > 1
                       and not any(a is d for d in data) and id(a) not in counted]  # fmt: skip
            counted.update(id(a) for a in weights)
            floats = [a for a in data if float_only.get(id(a)) is a]
            if int8 and op == "Concat" and floats:  # with a float input (a class token) the Concat runs in float
                works.extend(LayerWork(name=f"{name}/dequantize", op="DequantizeLinear", macs=0, params=0,
                                       act_in=a.numel(), act_out=a.numel()) for a in data if not any(a is f for f in floats))  # fmt: skip
                quantized_after.add(name)
            works.append(LayerWork(name=name, op=op, macs=0, params=sum(a.numel() for a in weights),
                                   act_in=sum(a.numel() for a in data), act_out=out.numel(), fused=fused))  # fmt: skip
            if fused or out is fusable_out[0]:  # an in-place op (``out += identity``) ends the conv's epilogue
                fusable_out[0] = out if fused else None
            return out

    traced = tuple(c for classes in kinds.values() for c in classes)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, traced):
            label = name or type(module).__name__
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(lambda m, a, o, _n=label: hook(_n, m, a, o)))
    was_training = model.training
    inputs = _batch_one(example_input, _device_of(model))
    try:
        model.eval()
        with torch.no_grad(), FunctionalOps():
            output = model(*inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if precision != "int8":
        return _gelu_as_exported(works)
    # the exported QDQ graph's QuantizeLinear of the input, DequantizeLinear of the output
    works = _as_int8_graph(works, norms_in_float, quantized_after)
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    last = output[0] if isinstance(output, tuple | list) else output
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        works.insert(0, LayerWork(name="input_quantize", op="QuantizeLinear", macs=0, params=0,
                                  act_in=first.numel(), act_out=first.numel()))  # fmt: skip
    if isinstance(last, torch.Tensor):
        works.append(LayerWork(name="output_dequantize", op="DequantizeLinear", macs=0, params=0,
                               act_in=last.numel(), act_out=last.numel()))  # fmt: skip
    return works


def _module_op(module: Any) -> str:
    """A traced module's op: its class name, but GELU(approximate="tanh") exports as other nodes than exact GELU."""
    return "GeluTanh" if type(module).__name__ == "GELU" and getattr(module, "approximate", "none") == "tanh" \
        else type(module).__name__


# GELU as the exporter writes it below opset 20 (hwkd exports at 18), elementwise nodes ONNX Runtime's CPU
# provider runs one by one: (suffix, op, inputs read in units of the activation). Exact: x * 0.5 * (1 + erf(x /
# sqrt 2)); tanh: x * (0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))).
_GELU_NODES = {
    "exact": (("div", "Div", 1), ("erf", "Erf", 1), ("add", "Add", 1), ("mul", "Mul", 2), ("half", "Mul", 1)),
    "tanh": (("pow", "Pow", 1), ("cubic", "Mul", 1), ("add", "Add", 2), ("scale", "Mul", 1), ("tanh", "Tanh", 1),
             ("one", "Add", 1), ("half", "Mul", 1), ("mul", "Mul", 2)),
}  # fmt: skip
# GELU's op names (module class, functional, tanh form). At INT8 its nodes run in float: ORT dequantizes x once per
# node reading it (exact: Div and the Mul; tanh: Pow, Add and the Mul) and quantizes the result.
_GELU_OPS = {"GELU", "Gelu", "GeluTanh"}
_GELU_X_READERS = {"exact": 2, "tanh": 3}


def _gelu_as_exported(works: list[LayerWork]) -> list[LayerWork]:
    """GELU (exact or tanh) as the nodes of its export (_GELU_NODES); at INT8 they follow a DequantizeLinear
    (_as_int8_graph)."""
    out: list[LayerWork] = []
    for w in works:
        if w.op not in _GELU_OPS:
            out.append(w)
            continue
        n = w.act_out
        out += [LayerWork(name=f"{w.name}/{suffix}", op=op, macs=0, params=0, act_in=reads * n, act_out=n)
                for suffix, op, reads in _GELU_NODES["tanh" if w.op == "GeluTanh" else "exact"]]  # fmt: skip
    return out


# How an INT8 QDQ graph runs activations (what trace_onnx sees in the exported graph): ReLU-like clamps fold into
# the quantized conv / add's output range; Sigmoid and LeakyRelu run as quantized ops of their own; the rest run
# in float between a DequantizeLinear and a QuantizeLinear; SiLU is exported as Sigmoid and Mul.
_INT8_FOLDED = {"ReLU", "ReLU6", "Hardtanh", "Relu", "Clip"}
_INT8_OWN_OP = {"Sigmoid", "LeakyReLU", "LeakyRelu"}
_INT8_IN_FLOAT = {"Hardswish", "HardSwish", "Hardsigmoid", "HardSigmoid", "Tanh", "Mish", "ELU"}


def _as_int8_graph(works: list[LayerWork], norms_in_float: set[str] = frozenset(),
                   quantized_after: set[str] = frozenset()) -> list[LayerWork]:  # fmt: skip
    """Module-level works rewritten as ONNX Runtime runs the INT8 QDQ graph (as trace_onnx reads it, checked
    against ORT's optimised graph): ReLU-like clamps fold (_INT8_FOLDED); the norms named in ``norms_in_float``,
    GELU and the float-only activations convert at both ends; a QuantizeLinear runs after each work named in
    ``quantized_after`` (a token linear's bias Add, a Concat with a class token)."""

    def convert(op: str, w: LayerWork, size: int, suffix: str) -> LayerWork:
        return LayerWork(name=f"{w.name}/{suffix}", op=op, macs=0, params=0, act_in=size, act_out=size)

    out: list[LayerWork] = []
    for w in works:
        if w.op in _INT8_FOLDED:
            out.append(dataclasses.replace(w, fused=True))
        elif w.op in _INT8_OWN_OP:
            out.append(dataclasses.replace(w, fused=False))
        elif w.op == "SiLU":
            out += [LayerWork(name=f"{w.name}/sigmoid", op="Sigmoid", macs=0, params=0, act_in=w.act_in, act_out=w.act_out),
                    LayerWork(name=f"{w.name}/mul", op="Mul", macs=0, params=0, act_in=w.act_in + w.act_out,
                              act_out=w.act_out)]  # fmt: skip
        elif w.op in _GELU_OPS:  # a DequantizeLinear per node reading x (ORT copies it per consumer)
            form = "tanh" if w.op == "GeluTanh" else "exact"
            out += [convert("DequantizeLinear", w, w.act_in, f"dequantize{'' if k == 0 else f'#{k + 1}'}")
                    for k in range(_GELU_X_READERS[form])]  # fmt: skip
            out += [*_gelu_as_exported([dataclasses.replace(w, fused=False)]),
                    convert("QuantizeLinear", w, w.act_out, "quantize")]
        elif w.op in _INT8_IN_FLOAT or w.name in norms_in_float:
            out += [convert("DequantizeLinear", w, w.act_in, "dequantize"), dataclasses.replace(w, fused=False),
                    convert("QuantizeLinear", w, w.act_out, "quantize")]
        elif w.op == "Gather" and out and out[-1].op == "QuantizeLinear" and out[-1].name.endswith("/quantize"):
            out[-1:] = [w, convert("QuantizeLinear", w, w.act_out, "quantize")]  # a norm's Q moves past x[:, 0]
        else:
            out.append(w)
            if w.name in quantized_after:
                out.append(convert("QuantizeLinear", w, w.act_out, "quantize"))
    return out


def _functional_product(name: str, op: str, args: tuple, kwargs: dict, data: list, out: Any) -> LayerWork:
    """The work of a conv / linear / matmul called as a function: as its module would be, or its ONNX node."""
    import torch

    weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    params = sum(t.numel() for t in (weight, bias) if isinstance(t, torch.Tensor) and not any(t is a for a in data))
    act_in = sum(a.numel() for a in data)
    if op == "Conv":  # weight (out, in / groups, *kernel)
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        return LayerWork(name=name, op=op, macs=out.numel() * weight[0].numel(), params=params, act_in=act_in,
                         act_out=out.numel(), channels=weight.shape[0], kernel=math.prod(weight.shape[2:]),
                         groups=groups, in_channels=weight.shape[1])  # fmt: skip
    reduce = weight.shape[-1] if op == "Gemm" else args[0].shape[-1]  # linear: W (out, in); matmul: a (..., k)
    return LayerWork(name=name, op=op, macs=out.numel() * reduce, params=params, act_in=act_in,
                     act_out=out.numel(), channels=out.shape[-1] if out.dim() else 0)  # fmt: skip


def _attention_nodes(name: str, q: Any, k: Any, v: Any, out: Any, int8: bool = False) -> list[LayerWork]:
    """F.scaled_dot_product_attention as torch.onnx writes it: k transposed, q and k^T each scaled by
    sqrt(scale), q @ k^T, Softmax, @ v (no fused attention kernel on ONNX Runtime's CPU provider). At INT8 all of
    it runs in float: q, k and v are dequantized (k a second time at rank 4, for the Shape its reshape reads) and
    the context is quantized."""
    scores = q.numel() // q.shape[-1] * k.shape[-2]  # (..., L, S)

    def node(suffix: str, op: str, act_in: int, act_out: int, macs: int = 0, channels: int = 0) -> LayerWork:
        return LayerWork(name=f"{name}/{suffix}", op=op, macs=macs, params=0, act_in=act_in, act_out=act_out,
                         channels=channels)  # fmt: skip

    # rank-4 (batch, heads, tokens, dim): k is reshaped to rank 3 to transpose, its new shape sliced and
    # concatenated from k's shape at run time (the batch is dynamic in hwkd's export)
    shape_nodes = [node("shape_slice", "Slice", 4, 1), node("shape_slice#2", "Slice", 4, 1),
                   node("shape_slice#3", "Slice", 4, 2), node("shape_concat", "Concat", 2, 3),
                   node("shape_concat#2", "Concat", 4, 4)] if k.dim() == 4 else []  # fmt: skip
    dequantize = [node(f"dequantize_{t}", "DequantizeLinear", x.numel(), x.numel())
                  for t, x in (("q", q), ("k", k), *((("k_shape", k),) if k.dim() == 4 else ()), ("v", v))]  # fmt: skip
    return [
        *(dequantize if int8 else []),
        *shape_nodes,
        node("transpose_k", "Transpose", k.numel(), k.numel()),
        node("scale_q", "Mul", q.numel(), q.numel()),
        node("scale_k", "Mul", k.numel(), k.numel()),
        node("scores", "MatMul", q.numel() + k.numel(), scores, scores * q.shape[-1], k.shape[-2]),
        node("softmax", "Softmax", scores, scores),
        node("context", "MatMul", scores + v.numel(), out.numel(), scores * v.shape[-1], v.shape[-1]),
        *([node("quantize", "QuantizeLinear", out.numel(), out.numel())] if int8 else []),
    ]


def _expand_nodes(name: str, tensor: Any, out: Any) -> list[LayerWork]:
    """A weight expanded in ``forward`` (``cls_token.expand(x.shape[0], -1, -1)``) exports, with hwkd's dynamic
    batch, as a Concat building the shape from the input's batch size and an Expand reading that shape."""
    rank = out.dim()
    return [
        LayerWork(name=f"{name}/shape", op="Concat", macs=0, params=0, act_in=1, act_out=rank),
        LayerWork(name=name, op="Expand", macs=0, params=tensor.numel(), act_in=rank, act_out=out.numel()),
    ]


def _index_nodes(label_for: Any, source: str | None, tensor: Any, index: Any) -> list[LayerWork]:
    """``x[...]`` as the exporter writes it: a Gather per integer index (aten.select), a Slice per slice that
    takes less than the whole dimension (aten.slice), each reading what the previous one left. An index with
    ``None``, ``...``, a bool or a tensor (advanced indexing) is not priced."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(type(i) in (int, slice) for i in index):
        return []
    shape, works, dim = list(tensor.shape), [], 0
    for i in index:  # aten.select drops its dim, so the next index applies at the same position
        if dim >= len(shape):
            return works
        before = math.prod(shape)
        if isinstance(i, int):
            op = "Gather"
            del shape[dim]
        elif isinstance(i, slice):
            kept = len(range(*i.indices(shape[dim])))
            op = "Slice" if kept < shape[dim] else None
            shape[dim], dim = kept, dim + 1
        else:
            return works
        if op is not None:
            works.append(LayerWork(name=label_for(f"{source}#{op.lower()}" if source else op.lower()), op=op,
                                   macs=0, params=0, act_in=before, act_out=math.prod(shape)))  # fmt: skip
    return works


def _torch_functional_ops() -> dict[Any, str]:
    """torch functions and Tensor methods a model's ``forward`` calls outside modules, by their ONNX op."""
    import torch
    import torch.nn.functional as F
    from torch import Tensor

    ops: dict[Any, str] = {}
    for onnx_op, funcs in {
        "Add": (torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__),
        "Sub": (torch.sub, Tensor.sub, Tensor.sub_, Tensor.__sub__, Tensor.__rsub__, Tensor.__isub__),
        "Mul": (torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__),
        "Div": (torch.div, Tensor.div, Tensor.div_, Tensor.__truediv__, Tensor.__itruediv__),
        "Concat": (torch.cat, torch.concat),
        "Relu": (torch.relu, torch.relu_, F.relu, Tensor.relu, Tensor.relu_),
        "Clip": (F.relu6, F.hardtanh, F.hardtanh_, torch.clamp, Tensor.clamp, Tensor.clamp_),
        "Sigmoid": (torch.sigmoid, F.sigmoid, Tensor.sigmoid, Tensor.sigmoid_),
        "HardSigmoid": (F.hardsigmoid,),
        "HardSwish": (F.hardswish,),
        "SiLU": (F.silu,),
        "Gelu": (F.gelu,),
        "Tanh": (torch.tanh, Tensor.tanh),
        "ReduceMean": (torch.mean, Tensor.mean),
        "ReduceMax": (torch.amax, Tensor.amax),
        "GlobalAveragePool": (F.adaptive_avg_pool2d,),
        "AveragePool": (F.avg_pool2d,),
        "MaxPool": (F.max_pool2d,),
        "Transpose": (torch.transpose, Tensor.transpose, torch.permute, Tensor.permute),
        "Conv": (F.conv1d, F.conv2d, F.conv3d),
        "Gemm": (F.linear,),
        "MatMul": (torch.matmul, torch.mm, torch.bmm, Tensor.matmul, Tensor.__matmul__),
        "Attention": (F.scaled_dot_product_attention,),
        "Split": (torch.unbind, Tensor.unbind),
        "Expand": (Tensor.expand,),
        "Index": (Tensor.__getitem__,),
    }.items():
        ops.update(dict.fromkeys(funcs, onnx_op))
    return ops


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
        "fusable": (_BatchNorm, nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardswish),
        "elementwise": (
            nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
            nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softmax, nn.LogSoftmax,
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
    "FEATURES",
    "Cost",
    "LayerWork",
    "estimate",
    "estimate_onnx",
    "channel_tile",
    "fitted_kernel_model",
    "gemm_efficiency",
    "kernel_seconds",
    "layer_features",
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
