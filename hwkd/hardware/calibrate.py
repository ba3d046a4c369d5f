"""``hwkd profiles calibrate``: measure this host with onnxruntime and write a profile that predicts it.

Run it on the target itself. It times, with hwkd.ortbench (interleaved rounds, medians):

1. a long-reduction conv per precision (FP32, INT8 QDQ): the throughput the CPU reaches, ``peak_gflops``;
2. a large elementwise Add: the memory bandwidth onnxruntime sees;
3. a chain of tiny ops: the fixed cost of dispatching one kernel;
4. a set of small random networks (plain, depthwise-separable, inverted residual, residual; several
   widths and resolutions; FP32 and INT8) built directly as ONNX graphs.

The cost model's free figures (efficiency per precision, ``k_half``, per-op and per-run overheads) are
then fitted to (4) by least squares on log latency, the measured figures from (1)-(3) serving as the
starting point. The fit's own error on (4) is written into ``[calibration]`` so a reader sees how well
the profile describes its host. Nothing from the models it will later predict is used.

Example::

    profile = calibrate(name="my-laptop")
    Path("my-laptop.toml").write_text(dump_profile_toml(profile))
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import math
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwkd.errors import ConfigError

OPSET = 17
_MB = 2**20


@dataclass(frozen=True)
class CalibrationSettings:
    """How much to measure; the defaults finish in about two minutes on two cores."""

    networks: int = 24  # random networks per precision for the fit
    warmup: int = 10
    iterations: int = 60
    rounds: int = 3
    precisions: tuple[str, ...] = ("fp32", "int8")
    seed: int = 0
    threads: int = 0  # onnxruntime intra-op threads; 0 = every usable core (written into the profile)


TINY = CalibrationSettings(networks=3, warmup=2, iterations=6, rounds=2)


# ---------------------------------------------------------------------------------------------- graphs


class _Graph:
    """A small builder of FP32 ONNX graphs with random (fixed-seed) weights."""

    def __init__(self, shape: tuple[int, ...], rng: np.random.Generator):
        from onnx import TensorProto, helper

        self.helper, self.tp = helper, TensorProto
        self.rng = rng
        self.nodes, self.inits = [], []
        self.shape = shape  # current activation shape (N, C, H, W)
        self.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
        self.cur = "x"
        self.n = 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def _const(self, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._name("w")
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, cout: int, k: int = 3, stride: int = 1, depthwise: bool = False, relu: bool = True) -> str:
        n, c, h, w = self.shape
        groups = c if depthwise else 1
        cout = c if depthwise else cout
        fan_in = (c // groups) * k * k
        weight = self.rng.standard_normal((cout, c // groups, k, k)) * math.sqrt(2.0 / fan_in)
        bias = self.rng.standard_normal(cout) * 0.1
        out = self._name("conv")
        self.nodes.append(
            self.helper.make_node(
                "Conv", [self.cur, self._const(weight), self._const(bias)], [out],
                kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=groups,
            )
        )  # fmt: skip
        self.cur = out
        self.shape = (n, cout, (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1)
        if relu:
            self.unary("Relu")
        return self.cur

    def unary(self, op: str) -> str:
        out = self._name(op.lower())
        self.nodes.append(self.helper.make_node(op, [self.cur], [out]))
        self.cur = out
        return out

    def add(self, other: str, relu: bool = False) -> str:
        out = self._name("add")
        self.nodes.append(self.helper.make_node("Add", [self.cur, other], [out]))
        self.cur = out
        if relu:
            self.unary("Relu")
        return out

    def head(self, classes: int = 10) -> None:
        self.unary("GlobalAveragePool")
        flat = self._name("flat")
        self.nodes.append(self.helper.make_node("Flatten", [self.cur], [flat]))
        c = self.shape[1]
        weight = self.rng.standard_normal((c, classes)) * 0.1
        out = self._name("logits")
        self.nodes.append(
            self.helper.make_node("Gemm", [flat, self._const(weight), self._const(np.zeros(classes))], [out])
        )
        self.cur = out
        self.shape = (self.shape[0], classes)

    def model(self) -> Any:
        h = self.helper
        graph = h.make_graph(
            self.nodes, "calib", self.inputs, [h.make_tensor_value_info(self.cur, self.tp.FLOAT, list(self.shape))],
            initializer=self.inits,
        )  # fmt: skip
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model


def random_network(rng: np.random.Generator) -> Any:
    """A small random CNN: a stem, 2-5 blocks of a random kind and width, a pooled linear head."""
    widths = (8, 16, 24, 32, 48, 64, 96, 128)
    res = int(rng.choice((16, 24, 32, 48, 64)))
    cin = int(rng.choice((1, 3)))
    g = _Graph((1, cin, res, res), rng)
    g.conv(int(rng.choice(widths[:5])), 3, int(rng.choice((1, 2))))
    for _ in range(int(rng.integers(2, 6))):
        kind = rng.choice(("plain", "pointwise", "separable", "inverted", "residual"))
        stride = 2 if g.shape[2] >= 8 and rng.random() < 0.35 else 1
        cout = int(rng.choice(widths))
        if kind == "plain":
            g.conv(cout, 3, stride)
        elif kind == "pointwise":
            g.conv(cout, 1, 1)
        elif kind == "separable":
            g.conv(0, 3, stride, depthwise=True)
            g.conv(cout, 1, 1)
        elif kind == "inverted":
            skip, c = g.cur, g.shape[1]
            g.conv(c * int(rng.choice((2, 4))), 1, 1)
            g.conv(0, 3, 1, depthwise=True)
            g.conv(c, 1, 1, relu=False)
            g.add(skip)
        else:
            skip, c = g.cur, g.shape[1]
            g.conv(c, 3, 1)
            g.conv(c, 3, 1, relu=False)
            g.add(skip, relu=True)
    g.head()
    return g.model()


def throughput_network(precision_hint: str, rng: np.random.Generator) -> tuple[Any, int]:
    """One long-reduction 3x3 conv (reduction 576): close to the best a CPU GEMM reaches. (model, MACs)"""
    g = _Graph((1, 64, 56, 56), rng)
    g.conv(64, 3, 1, relu=False)
    return g.model(), 64 * 56 * 56 * 64 * 9


def bandwidth_network(rng: np.random.Generator, elements: int = 4 * 2**20) -> tuple[Any, int]:
    """x + x on a 16 MB tensor: two reads and a write per element, far beyond the caches. (model, bytes)"""
    g = _Graph((1, elements // 1024, 32, 32), rng)
    g.add("x")
    return g.model(), 3 * elements * 4


def overhead_network(rng: np.random.Generator, ops: int) -> Any:
    """``ops`` Relu/Neg kernels on an 8-element tensor: what they cost is dispatch alone."""
    g = _Graph((1, 8, 1, 1), rng)
    for i in range(ops):
        g.unary("Neg" if i % 2 else "Relu")
    return g.model()


def quantize(fp32_path: Path, out_path: Path, rng: np.random.Generator) -> Path:
    """INT8 QDQ copy of a graph with onnxruntime's static quantizer (8 random calibration samples)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = onnx.load(fp32_path)
    inp = model.graph.input[0]
    shape = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]  # batch 1

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.items, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger every time
    try:
        quantize_static(
            str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=False,
        )  # fmt: skip
    finally:
        root.setLevel(level)
    return out_path


# ---------------------------------------------------------------------------------------------- fit

# The fitted figures, as logs so every one stays positive: effective peak GFLOP/s per precision (what an
# infinitely long reduction reaches), k_half, dispatch cost per op per precision, fixed cost per
# inference, and memory bandwidth.
_PRECS = ("fp32", "int8")


def _with_params(profile: Any, theta: np.ndarray, precisions: tuple[str, ...]) -> Any:
    v = np.exp(theta)
    hardware = dataclasses.replace(
        profile.hardware,
        peak_gflops={p: float(v[i]) for i, p in enumerate(_PRECS) if p in precisions},
        memory_bandwidth_gbs=float(v[6]),
    )
    calibration = {
        **profile.calibration,
        "efficiency": 1.0,
        "k_half": float(v[2] - 1.0),
        "op_overhead_us": {p: float(v[3 + i] - 0.01) for i, p in enumerate(_PRECS) if p in precisions},
        "per_run_overhead_us": float(v[5] - 0.01),
    }
    return dataclasses.replace(profile, hardware=hardware, calibration=calibration)


def _theta(peak: dict[str, float], k_half: float, op_us: float, run_us: float, bandwidth: float) -> np.ndarray:
    return np.log(
        [peak["fp32"], peak.get("int8", peak["fp32"]), k_half + 1.0, op_us + 0.01, op_us + 0.01, run_us + 0.01,
         bandwidth]
    )  # fmt: skip


def _layer_arrays(samples: list[tuple[list, int, str, float]], profile: Any) -> dict[str, np.ndarray]:
    """The traced layers of every sample as flat arrays, so a fit evaluates price() without Python loops.

    Mirrors hwkd.hardware.cost.price: fused layers cost nothing; others pay
    max(2*MACs*roundup / (peak * k/(k + k_half)), bytes / bandwidth) + per-op overhead.
    """
    from hwkd.hardware.cost import BYTES_PER_VALUE, round_up_factor

    rows = {"sample": [], "flops": [], "k": [], "traffic": [], "int8": [], "mac": []}
    for i, (works, _params, prec, _ms) in enumerate(samples):
        nbytes = BYTES_PER_VALUE[prec]
        for w in works:
            if w.fused:
                continue
            rows["sample"].append(i)
            rows["flops"].append(2.0 * w.macs * round_up_factor(w.channels, profile.hardware.vector_width))
            rows["k"].append(w.macs / max(w.act_out, 1) if w.macs else 0.0)
            rows["traffic"].append((w.params + w.act_in + w.act_out) * nbytes)
            rows["int8"].append(prec == "int8")
            rows["mac"].append(bool(w.macs))
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["sample_int8"] = np.array([s[2] == "int8" for s in samples])
    return out


def _vector_price_ms(theta: np.ndarray, arrays: dict[str, np.ndarray], n: int) -> np.ndarray:
    v = np.exp(theta)
    peak = np.where(arrays["int8"], v[1], v[0]) * 1e9
    k_half = v[2] - 1.0
    k = arrays["k"]
    eff = np.where(arrays["mac"] & (k > 0), k / np.maximum(k + k_half, 1e-12), 1.0)
    compute = arrays["flops"] / (peak * eff)
    memory = arrays["traffic"] / (v[6] * 1e9)
    op = np.where(arrays["int8"], v[4], v[3]) - 0.01
    per_layer = np.maximum(compute, memory) + op * 1e-6
    total = np.bincount(arrays["sample"], weights=per_layer, minlength=n)
    return (total + (v[5] - 0.01) * 1e-6) * 1e3


def fit_profile(
    profile: Any, samples: list[tuple[list, int, str, float]], theta0: np.ndarray
) -> tuple[Any, dict[str, float]]:
    """Fit the free figures to ``samples`` = [(works, params, precision, measured_ms)], from ``theta0``.

    Robust least squares (soft L1) on log(estimate / measured), so a 10% miss weighs the same on a
    0.05 ms and a 5 ms network, and one network timed during a burst of load does not drag the rest.
    Returns the fitted profile and the fit's error on the samples (priced by cost.price itself).
    """
    from scipy.optimize import least_squares

    from hwkd.hardware.cost import price

    precisions = tuple(p for p in _PRECS if any(s[2] == p for s in samples))
    measured = np.array([s[3] for s in samples])
    base = dataclasses.replace(
        profile, runtime=dataclasses.replace(profile.runtime, threads=profile.hardware.cpu_cores)
    )
    arrays = _layer_arrays(samples, base)

    def residuals(theta: np.ndarray) -> np.ndarray:
        est = _vector_price_ms(theta, arrays, len(samples))
        return np.log(np.maximum(est, 1e-9) / measured)

    lower = np.log([1e-2, 1e-2, 1.0, 0.01, 0.01, 0.01, 1e-3])
    upper = np.log([1e6, 1e6, 4097.0, 1e4, 1e4, 1e5, 1e4])
    # The roofline's max() makes the surface piecewise and lets peak, k_half and bandwidth trade off
    # (a low bandwidth can mimic a slow short-reduction GEMM), so start from a small grid around theta0.
    best = None
    for peak_mult, k_half, bw_mult in itertools.product((1.0, 4.0, 16.0), (4.0, 32.0, 256.0), (1.0, 10.0)):
        start = theta0.copy()
        start[[0, 1]] += math.log(peak_mult)
        start[2] = math.log(k_half + 1.0)
        start[6] += math.log(bw_mult)
        result = least_squares(
            residuals, np.clip(start, lower + 1e-6, upper - 1e-6), bounds=(lower, upper), loss="soft_l1",
            f_scale=0.1, max_nfev=400,
        )  # fmt: skip
        if best is None or result.cost < best.cost:
            best = result
    fitted = _with_params(base, best.x, precisions)
    est = np.array([price(w, fitted, prec, params=n).latency_ms for w, n, prec, _ in samples])
    errors = np.abs(est / measured - 1.0)
    stats = {
        "fit_networks": len(samples),
        "fit_mape_pct": round(float(errors.mean() * 100), 2),
        "fit_within_10pct": round(float((errors <= 0.10).mean()), 3),
    }
    return fitted, stats


# ---------------------------------------------------------------------------------------------- run


def calibrate(
    name: str = "",
    settings: CalibrationSettings = CalibrationSettings(),
    base: str = "",
    log: Callable[[str], None] | None = None,
) -> Any:
    """Measure this host and return a complete, validated Profile (write it with dump_profile_toml)."""
    import onnx

    from hwkd import ortbench
    from hwkd.hardware.onnx_trace import trace_onnx
    from hwkd.hardware.profiles import Budgets, Hardware, Profile, Runtime, load_profile, profile_from_dict

    say = log or (lambda msg: None)
    bad = [p for p in settings.precisions if p not in ("fp32", "int8")]
    if bad or "fp32" not in settings.precisions:
        raise ConfigError(f"Calibration precisions must include fp32 and be among fp32, int8; got {bad}.")
    if settings.networks < 1 or settings.iterations < 1:
        raise ConfigError("Calibration needs at least one network and one iteration.")
    host = ortbench.host_info()
    threads = ortbench.effective_threads(settings.threads)
    arm = platform.machine().lower() in ("aarch64", "arm64") or platform.machine().lower().startswith("arm")
    base_profile = load_profile(base or ("rpi5" if arm else "x86-avx2"))
    flags = set(host["cpu_flags"])
    vector_width = 16 if "avx512f" in flags else 8 if ("avx2" in flags or not arm) else 4
    rng = np.random.default_rng(settings.seed)

    def timed(paths: list[Path]) -> dict[Path, float]:
        stats = ortbench.measure(
            paths, warmup=settings.warmup, iterations=settings.iterations, rounds=settings.rounds,
            threads=threads, seed=settings.seed,
        )  # fmt: skip
        return {p: s.p50 for p, s in stats.items()}

    with tempfile.TemporaryDirectory(prefix="hwkd-calibrate-") as tmp:
        root = Path(tmp)

        def save(model: Any, label: str) -> Path:
            path = root / f"{label}.onnx"
            onnx.save(model, path)
            return path

        say("measuring peak throughput, memory bandwidth and dispatch overhead")
        conv_model, conv_macs = throughput_network("fp32", rng)
        conv32 = save(conv_model, "peak_fp32")
        probes = {"peak_fp32": conv32}
        if "int8" in settings.precisions:
            probes["peak_int8"] = quantize(conv32, root / "peak_int8.onnx", rng)
        bw_model, bw_bytes = bandwidth_network(rng)
        probes["bandwidth"] = save(bw_model, "bandwidth")
        probes["ops_1"] = save(overhead_network(rng, 1), "ops_1")
        probes["ops_41"] = save(overhead_network(rng, 41), "ops_41")
        t = timed(list(probes.values()))
        peak = {"fp32": 2 * conv_macs / (t[probes["peak_fp32"]] * 1e-3) / 1e9}
        if "peak_int8" in probes:
            peak["int8"] = 2 * conv_macs / (t[probes["peak_int8"]] * 1e-3) / 1e9
        bandwidth_gbs = bw_bytes / (t[probes["bandwidth"]] * 1e-3) / 1e9
        op_overhead_us = max(0.05, (t[probes["ops_41"]] - t[probes["ops_1"]]) / 40 * 1e3)
        run_overhead_us = max(0.0, t[probes["ops_1"]] * 1e3 - op_overhead_us)

        hardware = Hardware(
            cpu_family="arm" if arm else "x86",
            cpu_cores=threads,
            cpu_name=f"{host['cpu']} (calibrated with {threads} threads)",
            peak_gflops={k: round(v, 2) for k, v in peak.items()},
            memory_bandwidth_gbs=round(bandwidth_gbs, 2),
            memory_mb=float(_host_memory_mb() or base_profile.hardware.memory_mb),
            per_op_overhead_us=round(op_overhead_us, 3),
            vector_width=vector_width,
        )
        profile = Profile(
            name=name or f"host-{platform.node() or 'calibrated'}",
            aliases=(),
            description=f"Calibrated on {host['cpu']} with onnxruntime {host['onnxruntime']}, {threads} threads",
            hardware=hardware,
            runtime=Runtime(providers=(ortbench.CPU_EP,), threads=threads, channel_multiple=vector_width),
            budgets=Budgets(**dataclasses.asdict(base_profile.budgets)),
            source="<calibrate>",
            calibration={"runtime_overhead_mb": base_profile.calibration.get("runtime_overhead_mb", 2.0)},
        )

        say(f"timing {settings.networks} random networks per precision")
        paths: list[tuple[Path, str]] = []
        for i in range(settings.networks):
            fp32 = save(random_network(rng), f"net{i}_fp32")
            paths.append((fp32, "fp32"))
            if "int8" in settings.precisions:
                paths.append((quantize(fp32, root / f"net{i}_int8.onnx", rng), "int8"))
        t = timed([p for p, _ in paths])
        samples = []
        for path, prec in paths:
            works, params, _ = trace_onnx(path)
            samples.append((works, params, prec, t[path]))
        say("fitting the cost model")
        theta0 = _theta(peak, 32.0, op_overhead_us, run_overhead_us, bandwidth_gbs)
        fitted, stats = fit_profile(profile, samples, theta0)

    calibration = {
        **fitted.calibration,
        "k_half": round(fitted.calibration["k_half"], 3),
        "op_overhead_us": {k: round(v, 3) for k, v in fitted.calibration["op_overhead_us"].items()},
        "per_run_overhead_us": round(fitted.calibration["per_run_overhead_us"], 3),
        "probes": {
            "peak_gflops": {k: round(v, 2) for k, v in peak.items()},
            "memory_bandwidth_gbs": round(bandwidth_gbs, 3),
            "op_overhead_us": round(op_overhead_us, 3),
            "per_run_overhead_us": round(run_overhead_us, 3),
        },
        "measured": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": host["cpu"],
            "cpu_flags": list(host["cpu_flags"]),
            "onnxruntime": host["onnxruntime"],
            "threads": threads,
            "load_average_1min": host["load_average_1min"] if host["load_average_1min"] is not None else -1.0,
            **stats,
        },
    }
    hardware = dataclasses.asdict(fitted.hardware)
    hardware["peak_gflops"] = {k: round(v, 3) for k, v in hardware["peak_gflops"].items()}
    hardware["memory_bandwidth_gbs"] = round(hardware["memory_bandwidth_gbs"], 3)
    hardware["per_op_overhead_us"] = calibration["op_overhead_us"]["fp32"]
    data = {
        "name": profile.name,
        "aliases": [],
        "description": profile.description,
        "hardware": hardware,
        "runtime": {**dataclasses.asdict(profile.runtime), "providers": list(profile.runtime.providers)},
        "budgets": dataclasses.asdict(profile.budgets),
        "calibration": calibration,
    }
    if not hardware["accelerator_peak_gflops"]:
        data["hardware"].pop("accelerator_peak_gflops")
    return profile_from_dict(data, source="<calibrate>")


def _host_memory_mb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _MB
    except (ValueError, OSError, AttributeError):
        return None


__all__ = ["TINY", "CalibrationSettings", "calibrate", "fit_profile", "random_network"]
