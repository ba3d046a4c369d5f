"""Execution providers, threads, and what this host's CPU is (so reports say where they measured)."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

CPU_EP = "CPUExecutionProvider"

# Short names a profile may use for execution providers.
_EP_ALIASES = {
    "cpu": CPU_EP,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
}


def provider_name(name: str) -> str:
    """The ORT name of an execution provider given by its ORT name or a short alias ("cuda")."""
    return _EP_ALIASES.get(name.lower().removesuffix("executionprovider"), name)


def missing_providers(requested: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """Requested EPs this onnxruntime build lacks (they fall back to the CPU EP)."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    return [name for name in requested if provider_name(name) not in available]


def resolve_providers(requested: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """Requested EPs (ORT names or short aliases) that this onnxruntime has, in order; CPU always last.

    Example: ``resolve_providers(["tensorrt", "cuda"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]``
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    out: list[str] = []
    for name in requested:
        full = provider_name(name)
        if full in available and full not in out:
            out.append(full)
    if CPU_EP in out:
        out.remove(CPU_EP)
    out.append(CPU_EP)
    return out


def effective_threads(threads: int) -> int:
    """Threads to give ORT: the profile's count, capped at the cores this process may use.

    A device profile may say 6 threads; on a 2-core host that would oversubscribe and time noise.
    0 or less means all usable cores.
    """
    usable = _usable_cores()
    if threads <= 0:
        return usable
    return min(threads, usable)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1



def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The ISA extensions that decide INT8/FP32 kernel speed (VNNI makes INT8 conv much faster)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith(("flags", "features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def host_info() -> dict[str, Any]:
    """What this host is, so a report can say honestly where its latencies were measured."""
    import onnxruntime as ort

    return {
        "cpu": _cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count() or 1,
        "usable_cores": _usable_cores(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        # Other processes on the host inflate tail latencies; a load above usable_cores means noise.
        "load_average_1min": _load_average(),
        "available_providers": list(ort.get_available_providers()),
    }

