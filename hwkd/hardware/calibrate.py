"""``hwkd profiles calibrate``: measure this host with onnxruntime and write a profile that predicts it.

Run it on the target itself. It times, with hwkd.onnx.bench (interleaved rounds, medians):

1. a long-reduction conv per precision (FP32, INT8 QDQ): the throughput the CPU reaches, ``peak_gflops``;
2. a large elementwise Add: the memory bandwidth onnxruntime sees;
3. a chain of tiny ops: the fixed cost of dispatching one kernel;
4. one 3x3 conv at 1..8 x the vector width of output channels: the channel tile each precision's
   kernels pad to (16 for INT8 on AVX2, where 8 channels cost as much as 16);
5. a set of random networks (plain, 1x1, depthwise-separable, inverted residual, residual; 8-256
   channels, 16-128 pixels; FP32 and INT8) built directly as ONNX graphs.

(1)-(3) become the profile's hardware figures. The kernel model that ``cost.price`` uses on a
calibrated profile (ns per unit of each cost.FEATURES entry, per precision) is fitted to (5) by
non-negative least squares on relative error, with the GEMM half-efficiency reduction ``k_half``
chosen on a grid. The fit's own error and a 5-fold cross-validated error are written into
``[calibration.measured]`` so a reader sees how well the profile describes its host. Nothing from the
models it will later predict is used.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwkd.errors import ConfigError

OPSET = 17
_MB = 2**20


@dataclass(frozen=True)
class CalibrationSettings:
    """How much to measure; the defaults take about two minutes on an idle two-core host."""

    networks: int = 192  # random networks per precision for the fit (fewer: a noisier fit)
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
        self.macs = 0
        self.activation = "Relu"

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
        self.macs += self.shape[1] * self.shape[2] * self.shape[3] * fan_in
        if relu:
            self.activate()
        return self.cur

    def activate(self) -> str:
        """The graph's activation: Relu, or Clip(0, 6) (ReLU6, which runtimes fuse less cheaply)."""
        if self.activation == "Relu":
            return self.unary("Relu")
        out = self._name("clip")
        lo, hi = self._const(np.array(0.0)), self._const(np.array(6.0))
        self.nodes.append(self.helper.make_node("Clip", [self.cur, lo, hi], [out]))
        self.cur = out
        return out

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
            self.activate()
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


def random_network(rng: np.random.Generator, max_macs: float = 300e6) -> Any:
    """A random CNN: a stem, 2-10 blocks of a random kind and width, a pooled linear head.

    Spans what the cost model is asked about (8-256 channels, some off the usual multiples; 16-128
    pixels; RGB and grey inputs; plain, 1x1, separable, inverted-residual and residual blocks; ReLU or
    ReLU6), and is
    redrawn until it has at most ``max_macs`` multiply-accumulates, so calibration stays quick.
    """
    widths = (8, 12, 16, 24, 32, 40, 48, 64, 96, 128, 192, 256)
    while True:
        res = int(rng.choice((16, 24, 32, 48, 64, 96, 128)))
        cin = int(rng.choice((1, 3, 3, 4, 8)))
        g = _Graph((1, cin, res, res), rng)
        g.activation = str(rng.choice(("Relu", "Clip")))
        g.conv(int(rng.choice(widths[:7])), 3, int(rng.choice((1, 2))))
        for _ in range(int(rng.integers(2, 11))):
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
                g.conv(c * int(rng.choice((2, 4, 6))), 1, 1)
                g.conv(0, 3, 1, depthwise=True)
                g.conv(c, 1, 1, relu=False)
                g.add(skip)
            else:
                skip, c = g.cur, g.shape[1]
                g.conv(c, 3, 1)
                g.conv(c, 3, 1, relu=False)
                g.add(skip, relu=True)
        g.head()
        if g.macs <= max_macs:
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

# Reduction lengths at which a 1x1 / k x k GEMM reaches half its peak, tried in turn: the one
# nonlinear figure of the kernel model, so a grid and a linear fit per point beat a nonlinear solver.
K_HALF_GRID = (0.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
# Work (FLOPs, or values) at which a kernel reaches half its parallel speed-up; tried with > 1 thread.
GRAIN_GRID = (1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7)


def feature_matrix(
    works_list: list[list], tile: int, k_half: float, lanes: int = 8, threads: int = 1, grain: float = 0.0
) -> np.ndarray:
    """Per network, its layers' kernel-model features summed (columns: cost.FEATURES, then 1 per run)."""
    from hwkd.hardware.cost import FEATURES, layer_features

    rows = []
    for works in works_list:
        total = dict.fromkeys(FEATURES, 0.0)
        for w in works:
            for key, value in layer_features(w, tile, k_half, lanes, threads, grain).items():
                total[key] += value
        rows.append([total[k] for k in FEATURES] + [1.0])
    return np.asarray(rows, dtype=np.float64)


def _relative_nnls(x: np.ndarray, y: np.ndarray, rounds: int = 4) -> np.ndarray:
    """Non-negative coefficients minimising the *relative* error of x @ c against y, robustly.

    Rows are divided by y (a 10% miss weighs the same on a 0.05 ms and a 5 ms network); a few
    reweighting rounds shrink the pull of networks missed by more than 10% (Huber weights), so one
    network timed during a burst of load does not drag the rest.
    """
    from scipy.optimize import nnls

    a = x / y[:, None]
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    weights = np.ones(len(y))
    coef = np.zeros(x.shape[1])
    for _ in range(rounds):
        sol, _ = nnls(a / scale * weights[:, None], weights, maxiter=50 * x.shape[1])
        coef = sol / scale
        rel = np.abs(x @ coef / y - 1.0)
        weights = np.sqrt(1.0 / np.maximum(1.0, rel / 0.1))
    return coef


def _huber(rel: np.ndarray, delta: float = 0.1) -> float:
    return float(np.where(rel <= delta, 0.5 * rel**2, delta * (rel - 0.5 * delta)).sum())


def fit_kernel_model(
    works_list: list[list], measured_ms: list[float], tile: int, folds: int = 5, seed: int = 0, lanes: int = 8,
    threads: int = 1,
) -> tuple[dict[str, float], dict[str, float]]:
    """Fit one precision's kernel model to networks timed on the host: (model table, fit statistics).

    Returns ns per unit of every cost.FEATURES entry, ``run_ns``, the chosen ``k_half`` and the tile;
    the statistics are the fit's error on its own networks and a ``folds``-fold cross-validated error,
    which is what to expect on networks it has not seen.
    """
    from hwkd.hardware.cost import FEATURES

    y = np.asarray(measured_ms, dtype=np.float64) * 1e6  # ns
    best = None
    for k_half, grain in itertools.product(K_HALF_GRID, GRAIN_GRID if threads > 1 else (0.0,)):
        x = feature_matrix(works_list, tile, k_half, lanes, threads, grain)
        coef = _relative_nnls(x, y)
        loss = _huber(np.abs(x @ coef / y - 1.0))
        if best is None or loss < best[0]:
            best = (loss, k_half, grain, x, coef)
    _, k_half, grain, x, coef = best
    rel = np.abs(x @ coef / y - 1.0)
    cv = np.full(len(y), np.nan)
    if folds > 1 and len(y) >= 2 * folds:
        order = np.random.default_rng(seed).permutation(len(y))
        for fold in np.array_split(order, folds):
            train = np.setdiff1d(order, fold)
            cv[fold] = np.abs(x[fold] @ _relative_nnls(x[train], y[train]) / y[fold] - 1.0)
    model = {k: float(v) for k, v in zip(FEATURES, coef[:-1], strict=True)}
    model.update(run_ns=float(coef[-1]), k_half=float(k_half), channel_tile=int(tile), threads=int(threads))
    if threads > 1:
        model["grain"] = float(grain)
    stats = {
        "networks": len(y),
        "fit_mape_pct": round(float(rel.mean() * 100), 2),
        "fit_within_10pct": round(float((rel <= 0.10).mean()), 3),
    }
    if not np.isnan(cv).any():
        stats.update(cv_mape_pct=round(float(cv.mean() * 100), 2), cv_within_10pct=round(float((cv <= 0.10).mean()), 3))
    return model, stats


def tile_probe_networks(vector_width: int, rng: np.random.Generator) -> list[tuple[Any, int]]:
    """(model, output channels) of one 3x3 conv with 1..8 x vector-width outputs, for fit_channel_tile."""
    out = []
    for mult in range(1, 9):
        g = _Graph((1, 32, 32, 32), rng)
        g.conv(mult * vector_width, 3, 1, relu=False)
        out.append((g.model(), mult * vector_width))
    return out


def fit_channel_tile(channels: list[int], measured_ms: list[float], candidates: tuple[int, ...]) -> int:
    """The channel multiple the kernels pad to: the candidate t for which latency ~ a + b * roundup(c, t)
    fits best (relative error); a larger tile must fit clearly (25%) better to be chosen."""
    y = np.asarray(measured_ms, dtype=np.float64)
    best_tile, best_err = candidates[0], math.inf
    for tile in sorted(candidates):
        padded = np.array([math.ceil(c / tile) * tile for c in channels], dtype=np.float64)
        a = np.stack([np.ones_like(padded), padded], axis=1) / y[:, None]
        coef, *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
        err = float(np.sqrt(np.mean((a @ coef - 1.0) ** 2)))
        if err < 0.75 * best_err:
            best_tile, best_err = tile, err
    return best_tile


# ---------------------------------------------------------------------------------------------- run


def calibrate(
    name: str = "",
    settings: CalibrationSettings = CalibrationSettings(),
    base: str = "",
    log: Callable[[str], None] | None = None,
    also_time: Sequence[Path] = (),
    timings: dict[Path, float] | None = None,
) -> Any:
    """Measure this host and return a complete, validated Profile (write it with dump_profile_toml).

    ``also_time``: ONNX files to time in the same interleaved rounds as the random networks (their p50
    in ms goes into ``timings``; they play no part in the fit). For benchmarks that compare estimates
    with measurements without the host's drift in speed between two runs getting in the way.
    """
    import onnx

    from hwkd.hardware.onnx_trace import trace_onnx
    from hwkd.hardware.profiles import load_profile, profile_from_dict
    from hwkd.onnx import bench as ortbench

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
        tile_paths: dict[str, list[tuple[Path, int]]] = {p: [] for p in settings.precisions}
        for i, (model, channels) in enumerate(tile_probe_networks(vector_width, rng)):
            fp32 = save(model, f"tile{i}_fp32")
            tile_paths["fp32"].append((fp32, channels))
            if "int8" in settings.precisions:
                tile_paths["int8"].append((quantize(fp32, root / f"tile{i}_int8.onnx", rng), channels))
        t = timed([*probes.values(), *(p for pairs in tile_paths.values() for p, _ in pairs)])
        peak = {"fp32": 2 * conv_macs / (t[probes["peak_fp32"]] * 1e-3) / 1e9}
        if "peak_int8" in probes:
            peak["int8"] = 2 * conv_macs / (t[probes["peak_int8"]] * 1e-3) / 1e9
        bandwidth_gbs = bw_bytes / (t[probes["bandwidth"]] * 1e-3) / 1e9
        op_overhead_us = max(0.05, (t[probes["ops_41"]] - t[probes["ops_1"]]) / 40 * 1e3)
        run_overhead_us = max(0.0, t[probes["ops_1"]] * 1e3 - op_overhead_us)
        candidates = (vector_width, 2 * vector_width, 4 * vector_width)
        tiles = {
            prec: fit_channel_tile([c for _, c in pairs], [t[p] for p, _ in pairs], candidates)
            for prec, pairs in tile_paths.items()
        }

        say(f"timing {settings.networks} random networks per precision")
        paths: list[tuple[Path, str]] = []
        for i in range(settings.networks):
            fp32 = save(random_network(rng), f"net{i}_fp32")
            paths.append((fp32, "fp32"))
            if "int8" in settings.precisions:
                paths.append((quantize(fp32, root / f"net{i}_int8.onnx", rng), "int8"))
        extra = [Path(p) for p in also_time]
        t = timed([p for p, _ in paths] + extra)
        if timings is not None:
            timings.update({p: t[p] for p in extra})
        say("fitting the kernel model")
        kernel_model, fit_stats = {}, {}
        for prec in settings.precisions:
            mine = [p for p, q in paths if q == prec]
            works = [trace_onnx(p)[0] for p in mine]
            kernel_model[prec], fit_stats[prec] = fit_kernel_model(
                works, [t[p] for p in mine], tiles[prec], seed=settings.seed, lanes=vector_width, threads=threads
            )

    every = list(fit_stats.values())
    networks = sum(s_["networks"] for s_ in every)
    calibration = {
        "runtime_overhead_mb": base_profile.calibration.get("runtime_overhead_mb", 2.0),
        "kernel_model": {prec: {k: _round(v) for k, v in m.items()} for prec, m in kernel_model.items()},
        "probes": {
            "peak_gflops": {k: round(v, 2) for k, v in peak.items()},
            "memory_bandwidth_gbs": round(bandwidth_gbs, 3),
            "op_overhead_us": round(op_overhead_us, 3),
            "per_run_overhead_us": round(run_overhead_us, 3),
            "channel_tile": tiles,
        },
        "measured": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": host["cpu"],
            "cpu_flags": list(host["cpu_flags"]),
            "onnxruntime": host["onnxruntime"],
            "threads": threads,
            "load_average_1min": host["load_average_1min"] if host["load_average_1min"] is not None else -1.0,
            "fit_networks": networks,
            "fit_mape_pct": round(sum(s_["fit_mape_pct"] * s_["networks"] for s_ in every) / networks, 2),
            "fit_within_10pct": round(sum(s_["fit_within_10pct"] * s_["networks"] for s_ in every) / networks, 3),
            "fit": fit_stats,
        },
    }
    hardware = {
        "cpu_family": "arm" if arm else "x86",
        "cpu_cores": threads,
        "cpu_name": f"{host['cpu']} (calibrated with {threads} threads)",
        "peak_gflops": {k: round(v, 2) for k, v in peak.items()},
        "memory_bandwidth_gbs": round(bandwidth_gbs, 2),
        "memory_mb": float(_host_memory_mb() or base_profile.hardware.memory_mb),
        "per_op_overhead_us": round(kernel_model["fp32"]["ops"] * 1e-3, 4),
        "vector_width": vector_width,
    }
    data = {
        "name": name or f"host-{platform.node() or 'calibrated'}",
        "aliases": [],
        "description": f"Calibrated on {host['cpu']} with onnxruntime {host['onnxruntime']}, {threads} threads",
        "hardware": hardware,
        "runtime": {
            "providers": [ortbench.CPU_EP],
            "threads": threads,
            # pruning keeps channel counts on the widest tile any calibrated precision pads to
            "channel_multiple": max(tiles.values()),
        },
        "budgets": dataclasses.asdict(base_profile.budgets),
        "calibration": calibration,
    }
    return profile_from_dict(data, source="<calibrate>")


def _round(value: float) -> float:
    """Six significant figures: enough for a fitted coefficient, short enough to read in the TOML."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


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


__all__ = [
    "TINY", "CalibrationSettings", "calibrate", "fit_channel_tile", "fit_kernel_model", "random_network",
]  # fmt: skip
