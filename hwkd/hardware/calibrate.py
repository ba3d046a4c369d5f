"""``hwkd profiles calibrate``: measure this host with onnxruntime and write a profile that predicts it.

Run it on the target itself. It times (interleaved rounds, medians; hwkd.hardware.timing over hwkd.onnx.bench):

1. a long-reduction conv per precision (FP32, INT8 QDQ): the throughput the CPU reaches, ``peak_gflops``;
2. a large elementwise Add: the memory bandwidth onnxruntime sees;
3. a chain of tiny ops: the fixed cost of dispatching one kernel;
4. one 3x3 conv at 1..8 x the vector width of output channels: the channel tile each precision's
   kernels pad to (16 for INT8 on AVX2, where 8 channels cost as much as 16);
5. networks of four families (hwkd.hardware.calib_graphs: random blocks; ResNet basic / bottleneck
   stages; inverted residuals with SE and hardswish / SiLU; grouped convs and concat branches), FP32 and
   INT8, at one thread and, when the profile runs more, at its thread count;
6. the peak memory growth of a few of them (and of three large probes) in fresh processes.

(1)-(3) become the profile's hardware figures. The 1-thread kernel model (``cost.FEATURES``) is fitted to
the 1-thread timings of (5), the thread model (hwkd.hardware.threads) to the timings at the profile's
thread count, the memory model (hwkd.hardware.memory) to (6). The held-out error written into
``[calibration.measured]`` leaves out a whole *family* at a time: what to expect on architectures the
fit has not seen. A reference probe timed before, between and after the rounds, and the host's load,
say whether the timings can be trusted (hwkd.hardware.timing): a bad attempt is warned about and
retried, and the profile records the spread. Nothing from the models it will later predict is used.

Example::

    profile = calibrate(name="my-laptop")
    Path("my-laptop.toml").write_text(dump_profile_toml(profile))
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwkd.errors import ConfigError
from hwkd.hardware.calib_graphs import (
    FAMILIES,
    OPSET,
    _Graph,
    bandwidth_network,
    overhead_network,
    random_network,
    reference_network,
    throughput_network,
)
from hwkd.hardware.fit import (
    K_HALF_GRID,
    feature_matrix,
    fit_channel_tile,
    fit_kernel_model,
    fit_thread_model,
)

_MB = 2**20


@dataclass(frozen=True)
class CalibrationSettings:
    """How much to measure; the defaults take about five minutes on an idle two-core host at 2 threads."""

    networks: int = 160  # networks per precision for the fit, spread over the families
    warmup: int = 10
    iterations: int = 60
    rounds: int = 3
    precisions: tuple[str, ...] = ("fp32", "int8")
    seed: int = 0
    threads: int = 0  # onnxruntime intra-op threads; 0 = every usable core (written into the profile)
    memory_networks: int = 8  # networks per precision whose peak memory is measured (fresh processes)
    retries: int = 1  # re-measurements when the reference probe or the host load says the timings are bad
    tolerance: float = 0.05  # probe spread above which timings are not trusted
    # fit the 1-thread kernel model to each network's CPU time rather than its wall time: on a shared
    # host the two differ by the time the OS gave other processes, which is not the model's cost
    fit_cpu_time: bool = True


TINY = CalibrationSettings(networks=4, warmup=2, iterations=6, rounds=2, memory_networks=0, retries=0)


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


# ---------------------------------------------------------------------------------------------- probes


def tile_probe_networks(vector_width: int, rng: np.random.Generator) -> list[tuple[Any, int]]:
    """(model, output channels) of one 3x3 conv with 1..8 x vector-width outputs, for fit_channel_tile."""
    out = []
    for mult in range(1, 9):
        g = _Graph((1, 32, 32, 32), rng)
        g.conv(mult * vector_width, 3, 1, relu=False)
        out.append((g.model(), mult * vector_width))
    return out


# ---------------------------------------------------------------------------------------------- run


def calibrate(
    name: str = "",
    settings: CalibrationSettings = CalibrationSettings(),
    base: str = "",
    log: Callable[[str], None] | None = None,
    also_time: Sequence[Path] = (),
    timings: dict[Any, float] | None = None,
    load: Callable[[], float] | None = None,
    record: dict[str, list[dict[str, Any]]] | None = None,
) -> Any:
    """Measure this host and return a complete, validated Profile (write it with dump_profile_toml).

    ``also_time``: ONNX files to time in the same interleaved rounds as the networks, at every thread
    count calibration times (their p50 in ms goes into ``timings[(path, threads)]``; they play no part
    in the fit), so a benchmark compares estimates with measurements taken under the same host load.
    ``load``: the host-load reading, cores' worth of other processes' work (default: ``timing.busy_cores``,
    sampled for a second before each attempt), replaceable in tests.
    ``record``: filled per precision with what the fits saw (each network's family, traced layers and
    timings), so a change to the models can be tried offline on one calibration's measurements.
    """
    import onnx

    from hwkd.hardware import timing
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
    cores = ortbench.effective_threads(0)
    arm = platform.machine().lower() in ("aarch64", "arm64") or platform.machine().lower().startswith("arm")
    base_profile = load_profile(base or ("rpi5" if arm else "x86-avx2"))
    flags = set(host["cpu_flags"])
    vector_width = 16 if "avx512f" in flags else 8 if ("avx2" in flags or not arm) else 4
    rng = np.random.default_rng(settings.seed)
    counts = (1, threads) if threads > 1 else (1,)

    with tempfile.TemporaryDirectory(prefix="hwkd-calibrate-") as tmp:
        root = Path(tmp)

        def save(model: Any, label: str) -> Path:
            path = root / f"{label}.onnx"
            onnx.save(model, path)
            return path

        say("building the probes and the networks")
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
        nets: list[tuple[Path, str, str]] = []  # (path, precision, family)
        for i in range(settings.networks):
            family = FAMILIES[i % len(FAMILIES)]
            fp32 = save(random_network(rng, family=family), f"net{i}_fp32")
            nets.append((fp32, "fp32", family))
            if "int8" in settings.precisions:
                nets.append((quantize(fp32, root / f"net{i}_int8.onnx", rng), "int8", family))
        reference = save(reference_network(), "reference")
        extra = [Path(p) for p in also_time]
        fixed = [*probes.values(), *(p for pairs in tile_paths.values() for p, _ in pairs)]
        jobs = [(p, threads) for p in fixed]
        jobs += [(probes[k], 1) for k in ("peak_fp32", "peak_int8") if k in probes and threads > 1]
        jobs += [(p, n) for p, _, _ in nets for n in counts] + [(p, n) for p in extra for n in counts]
        ref_iterations = max(5, settings.iterations // 2)

        def attempt() -> tuple[tuple[list[float], dict[int, float], list[float]], list[float], list[float]]:
            probe_ms: list[float] = []
            probe_1thread_ms: list[float] = []  # the same probe at 1 thread: does the host hold there?
            shares: list[float] = []

            def between(r: int) -> None:
                probe_ms.append(float(np.median(timing.time_job(reference, threads, settings.warmup, ref_iterations))))
                if threads > 1:
                    probe_1thread_ms.append(
                        float(np.median(timing.time_job(reference, 1, settings.warmup, ref_iterations)))
                    )
                # CPU share over a block of ~10 x 2-3 ms runs at 1 thread: longer than a scheduler slice,
                # so other processes taking the core show (a 0.1 ms probe fits inside one slice)
                cpu: list[float] = []
                wall = timing.time_job(probes["peak_fp32"], 1, 2, 10, cpu)
                shares.append(float(sum(cpu) / sum(wall)))
                if r < settings.rounds:
                    say(f"round {r + 1} of {settings.rounds}: {len(jobs)} timings (reference probe "
                        f"{probe_ms[-1]:.3f} ms, CPU share {shares[-1]:.2f})")  # fmt: skip

            cpu_ms: dict[int, float] = {}
            result = timing.time_interleaved(
                jobs, settings.warmup, settings.iterations, settings.rounds, between, cpu_ms=cpu_ms
            )
            return (result, cpu_ms, probe_1thread_ms), probe_ms, shares

        say(f"timing {len(nets)} networks at {' and '.join(map(str, counts))} thread(s), "
            f"{len(extra)} extra models, the probes")  # fmt: skip
        (times, cpu_by_index, probe_1thread_ms), verdict, attempts = timing.with_retries(
            attempt, load or timing.busy_cores, cores, settings.retries, settings.tolerance, warn=say
        )
        t = dict(zip(jobs, times, strict=True))
        # 1-thread CPU time: what the kernels cost, without the time the OS gave other processes
        cpu_t = {jobs[k]: v for k, v in cpu_by_index.items()}
        if timings is not None:
            timings.update({(p, n): t[(p, n)] for p in extra for n in counts})
            timings.update({(p, "cpu"): cpu_t[(p, 1)] for p in extra if (p, 1) in cpu_t})
        peak = {"fp32": 2 * conv_macs / (t[(probes["peak_fp32"], threads)] * 1e-3) / 1e9}
        if "peak_int8" in probes:
            peak["int8"] = 2 * conv_macs / (t[(probes["peak_int8"], threads)] * 1e-3) / 1e9
        peak_1 = {k[5:]: 2 * conv_macs / (t[(probes[k], 1)] * 1e-3) / 1e9 for k in probes
                  if k.startswith("peak_") and (probes[k], 1) in t}  # fmt: skip
        bandwidth_gbs = bw_bytes / (t[(probes["bandwidth"], threads)] * 1e-3) / 1e9
        op_overhead_us = max(0.05, (t[(probes["ops_41"], threads)] - t[(probes["ops_1"], threads)]) / 40 * 1e3)
        run_overhead_us = max(0.0, t[(probes["ops_1"], threads)] * 1e3 - op_overhead_us)
        candidates = (vector_width, 2 * vector_width, 4 * vector_width)
        tiles = {
            prec: fit_channel_tile([c for _, c in pairs], [t[(p, threads)] for p, _ in pairs], candidates)
            for prec, pairs in tile_paths.items()
        }

        say("fitting the kernel, thread and memory models")
        kernel_model, fit_stats, thread_model, thread_stats = {}, {}, {}, {}
        traced = {p: trace_onnx(p) for p, _, _ in nets}
        for prec in settings.precisions:
            mine = [(p, fam) for p, q, fam in nets if q == prec]
            works = [traced[p][0] for p, _ in mine]
            families = [fam for _, fam in mine]
            one = [cpu_t.get((p, 1), t[(p, 1)]) if settings.fit_cpu_time else t[(p, 1)] for p, _ in mine]
            if record is not None:
                record[prec] = [{"family": fam, "works": w, "fit_ms": m, "wall_1_ms": t[(p, 1)],
                                 "wall_n_ms": t[(p, threads)], "threads": threads, "tile": tiles[prec],
                                 "lanes": vector_width}
                                for (p, fam), w, m in zip(mine, works, one, strict=True)]  # fmt: skip
            kernel_model[prec], fit_stats[prec] = fit_kernel_model(
                works, one, tiles[prec], seed=settings.seed, lanes=vector_width, families=families,
                input_align=input_align(prec, arm, vector_width),
            )
            if threads > 1:
                thread_model[prec], thread_stats[prec] = fit_thread_model(
                    works, [t[(p, 1)] for p, _ in mine], [t[(p, threads)] for p, _ in mine], kernel_model[prec],
                    threads, vector_width, families,
                )  # fmt: skip
        memory_model, memory_stats = {}, {}
        if settings.memory_networks > 0:
            memory_model, memory_stats = _calibrate_memory(nets, traced, settings, threads, root, rng, say, arm)

    every = list(fit_stats.values())
    networks = sum(s_["networks"] for s_ in every)
    measured: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": host["cpu"],
        "cpu_flags": list(host["cpu_flags"]),
        "onnxruntime": host["onnxruntime"],
        "threads": threads,
        "load_average_1min": host["load_average_1min"] if host["load_average_1min"] is not None else -1.0,
        "fit_networks": networks,
        "families": list(FAMILIES),
        "fit_mape_pct": round(sum(s_["fit_mape_pct"] * s_["networks"] for s_ in every) / networks, 2),
        "fit_within_10pct": round(sum(s_["fit_within_10pct"] * s_["networks"] for s_ in every) / networks, 3),
        "fit": fit_stats,
        "fit_target": "1-thread CPU time" if settings.fit_cpu_time else "1-thread wall time",
        "stability": {**verdict.to_dict(), "attempts": attempts, "tolerance_pct": 100 * settings.tolerance,
                      **timing.one_thread_probe(probe_1thread_ms)},
    }
    if thread_stats:
        measured["threads_fit"] = thread_stats
    if memory_stats:
        measured["memory"] = memory_stats
    calibration = {
        "runtime_overhead_mb": base_profile.calibration.get("runtime_overhead_mb", 2.0),
        "kernel_model": {prec: {k: _round(v) for k, v in m.items()} for prec, m in kernel_model.items()},
        "probes": {
            "peak_gflops": {k: round(v, 2) for k, v in peak.items()},
            "peak_gflops_1thread": {k: round(v, 2) for k, v in peak_1.items()},
            "memory_bandwidth_gbs": round(bandwidth_gbs, 3),
            "op_overhead_us": round(op_overhead_us, 3),
            "per_run_overhead_us": round(run_overhead_us, 3),
            "channel_tile": tiles,
        },
        "measured": measured,
    }
    if thread_model:
        calibration["thread_model"] = {prec: {k: _round(v) for k, v in m.items()} for prec, m in thread_model.items()}
    if memory_model:
        calibration["memory_model"] = memory_model
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


def input_align(precision: str, arm: bool, vector_width: int) -> int:
    """Input channels per group a conv needs, as a multiple, to run the runtime's main kernel.

    INT8: 4 (the u8s8 GEMM packs input bytes in fours). FP32 on x86: ORT's NCHWc layout, whose block is
    the vector width; a conv whose inputs are not a multiple of it reads them in NCHW through a kernel
    of its own (ORT's optimized graph of an 8-channel stem shows a ReorderOutput and the NCHW-input
    conv). Leave-one-family-out error of the FP32 fit: 24.0% with 4, 22.3% with the block.
    """
    return vector_width if precision == "fp32" and not arm else 4


def memory_probe_networks(rng: np.random.Generator) -> list[Any]:
    """Three networks far larger than the timed ones, so the memory fit spans 224-px models: one
    weight-heavy in convs (512-channel 3x3 convs at 7 px, ~9M parameters), one activation-heavy (64 channels
    at 224 px), and one whose weights sit in a classifier Gemm (1280 -> 1000, as torchvision's heads): the
    timed networks' heads are too small for the fit to tell how many copies of a Gemm's weights a session holds."""
    heavy = _Graph((1, 256, 7, 7), rng)
    for _ in range(4):
        heavy.conv(512, 3, 1)
    heavy.head()
    wide = _Graph((1, 3, 224, 224), rng)
    wide.conv(64, 3, 1)
    wide.conv(64, 3, 2)
    wide.head()
    classifier = _Graph((1, 160, 7, 7), rng)
    classifier.conv(1280, 1, 1)
    classifier.head(classes=1000)
    return [heavy.model(), wide.model(), classifier.model()]


def _calibrate_memory(nets, traced, settings, threads, root, rng, say, arm: bool = False):
    """Measure peak memory growth of a spread of networks in fresh processes; fit the memory model."""
    from hwkd.hardware.cost import BYTES_PER_VALUE
    from hwkd.hardware.memory import fit_memory_model, memory_features
    from hwkd.hardware.onnx_trace import trace_onnx
    from hwkd.onnx import bench as ortbench

    probes = []
    for i, model in enumerate(memory_probe_networks(rng)):
        import onnx

        fp32 = root / f"mem{i}_fp32.onnx"
        onnx.save(model, fp32)
        probes.append((fp32, "fp32"))
        if "int8" in settings.precisions:
            probes.append((quantize(fp32, root / f"mem{i}_int8.onnx", rng), "int8"))
    models, stats = {}, {}
    for prec in settings.precisions:
        mine = [p for p, q, _ in nets if q == prec]
        mine.sort(key=lambda p: traced[p][1])  # by parameter count: take an even spread
        step = max(1, len(mine) // max(1, settings.memory_networks))
        chosen = mine[::step][: settings.memory_networks] + [p for p, q in probes if q == prec]
        say(f"measuring the memory of {len(chosen)} {prec} networks in fresh processes")
        rows, measured = [], []
        for p in chosen:
            works, params, _ = traced[p] if p in traced else trace_onnx(p)
            shape = {"x": tuple(int(d) for d in _input_dims(p))}
            result = ortbench.isolated_memory(p, shape, (ortbench.CPU_EP,), threads, warmup=3)
            if result.get("peak_mb"):
                rows.append(memory_features(works, BYTES_PER_VALUE[prec], params, arm=arm))
                measured.append(float(result["peak_mb"]))
        if len(rows) >= 2:
            models[prec], stats[prec] = fit_memory_model(rows, measured)
    return models, stats


def _input_dims(path: Path) -> list[int]:
    import onnx

    dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.dim_value > 0 else 1 for d in dims]


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
    "FAMILIES", "K_HALF_GRID", "OPSET", "TINY", "CalibrationSettings", "bandwidth_network", "calibrate",
    "feature_matrix", "fit_channel_tile", "fit_kernel_model", "fit_thread_model", "overhead_network",
    "random_network", "throughput_network",
]  # fmt: skip
