"""Tiny synthetic report.json records with the fields hwkd/report/build.py writes (no full run)."""

from __future__ import annotations

import copy
import json


def model(acc, p50, est, params, size, est_mem=None, mem=None):
    return {
        "accuracy": acc,
        "measured_latency_ms": p50,
        "estimated_latency_ms": est,
        "params": params,
        "macs": params * 30,
        "model_size_mb": size,
        "estimated_memory_mb": est_mem,
        "measured_memory_mb": mem,
    }


BASE = {
    "format": "hwkd.report/1",
    "hwkd_version": "0.1.0",
    "run_dir": "runs/demo",
    "profile": {"name": "jetson-orin-nano", "source": "profiles/jetson-orin-nano.toml", "description": "Jetson"},
    "budget": {"latency_ms": 2.0, "memory_mb": 16.0, "batch_size": 1},
    "dataset": {"name": "digits", "input_shape": [1, 8, 8], "num_classes": 10},
    "measured_on": {"note": "measured on this host (Test CPU, CPUExecutionProvider, 2 threads)", "cpu": "Test CPU"},
    "latency": {},
    "teacher": model(0.99, 1.2, 1.6, 308_000, 1.18, 3.0, 9.5),
    "stages": [
        {"name": "distill", "seconds": 30.0, **model(0.985, 0.19, 0.43, 52_000, 0.22, 1.0, 4.0), "details": {}},
        {"name": "prune", "seconds": 12.0, **model(0.982, 0.14, 0.30, 16_000, 0.08, 0.6, 3.1), "details": {}},
        {"name": "qat", "seconds": 8.0, **model(0.98, 0.21, 0.22, 16_000, 0.044, 0.4, 2.9), "details": {}},
        {"name": "export", "seconds": 9.0, **model(0.98, 0.21, 0.22, 16_000, 0.044, 0.4, 2.9), "details": {}},
        {"name": "bench", "seconds": 1.0, **model(0.98, 0.21, 0.22, 16_000, 0.044, 0.4, 2.9), "details": {}},
    ],
    "final": {"path": "model.onnx", "precision": "int8", **model(0.98, 0.21, 0.22, 16_000, 0.044, 0.4, 2.9)},
    "channels": {
        "student_initial": {"conv1": 32, "conv2": 64, "fc": 10},
        "before_prune": {"conv1": 32, "conv2": 64, "fc": 10},
        "after_prune": {"conv1": 16, "conv2": 40, "fc": 10},
    },
    "versions": {"hwkd": "0.1.0"},
}


def report(path, **final_changes):
    """Write a report.json whose final record has ``final_changes`` applied; returns the path."""
    data = copy.deepcopy(BASE)
    budget = final_changes.pop("budget", None)
    if budget is not None:
        data["budget"] = budget
    data["final"].update(final_changes)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
