"""Thread model: what a layer costs at the profile's thread count, given what it costs at one thread.

Derived from ONNX Runtime's per-node profile at 1 vs 2 threads (``hwkd.hardware.nodeprofile``;
docs/decisions-issue13.md has the figures):

- a kernel is split over the threads only when it has enough work (MLAS splits a GEMM once its
  M*N*K passes a fixed complexity; elementwise ops split by a per-value cost): small layers run on one
  thread whatever the setting, so a *work threshold* (``mac_grain``, ``value_grain``) decides it;
- a split kernel runs at its own fraction of its 1-thread time: ``ratio_<class>`` per kernel class
  (conv, pointwise, depthwise, gemm, elementwise), 1/threads on an idle host, closer to 1 where the
  other cores are busy (other processes, hyper-threads sharing a core);
- every split kernel pays a fork/join (``sync_ns``): waking the pool and waiting for its slowest
  thread;
- what is not split runs at ``ratio_serial`` (about 1) and each run pays ``run_ns`` (ORT's
  per-run set-up, also outside the kernels in its profile).

So ``t_T = sum(layers not split) t1 * ratio_serial + sum(split) (t1 * ratio_<class> + sync_ns) + run_ns``,
linear in the fitted figures once the thresholds are fixed: calibration fits them by non-negative
least squares on networks timed at both thread counts, the thresholds on a grid.
"""

from __future__ import annotations

from typing import Any

CLASSES = ("conv", "pointwise", "depthwise", "gemm", "elementwise")
# Work at which a kernel is split, tried in turn: MACs for conv / gemm kernels, values for others.
MAC_GRAIN_GRID = (0.0, 1.6e4, 6.4e4, 2.56e5, 1e6)
VALUE_GRAIN_GRID = (0.0, 4e3, 1.6e4, 6.4e4, 2.56e5, 1e6)
COEFFICIENTS = (*(f"ratio_{c}" for c in CLASSES), "ratio_serial", "sync_ns", "run_ns")


def bounds(threads: int) -> tuple[Any, Any]:
    """Limits of the fitted figures (COEFFICIENTS order): a ratio lies in [0.9 / threads, 3] (no kernel
    runs much faster than linear, or three times slower, however noisy the timings); times are >= 0."""
    import numpy as np

    lower = [0.9 / threads if k.startswith("ratio_") else 0.0 for k in COEFFICIENTS]
    upper = [3.0 if k.startswith("ratio_") else np.inf for k in COEFFICIENTS]
    return np.asarray(lower), np.asarray(upper)


def splits(w: Any, mac_grain: float, value_grain: float) -> bool:
    """Whether the runtime splits this layer over its threads (a fused epilogue runs inside its producer)."""
    if w.fused:
        return False
    if w.macs:
        return w.macs >= mac_grain
    return (w.act_in + w.act_out) >= value_grain


def layer_seconds_at(w: Any, t1_s: float, model: dict[str, float]) -> tuple[float, float]:
    """(seconds at the model's thread count, of which fork/join) of a layer that takes ``t1_s`` at one thread."""
    if splits(w, model["mac_grain"], model["value_grain"]):
        sync = model["sync_ns"] * 1e-9
        return t1_s * model[f"ratio_{w.kind}"] + sync, sync
    return t1_s * model["ratio_serial"], 0.0


def features(works: list[Any], t1_layers: list[float], mac_grain: float, value_grain: float) -> list[float]:
    """One network's row for the fit, in COEFFICIENTS order: 1-thread seconds of split layers per class,
    of layers not split, the count of split layers (fork/joins) and 1 (the run)."""
    row = dict.fromkeys(COEFFICIENTS, 0.0)
    for w, t1 in zip(works, t1_layers, strict=True):
        if splits(w, mac_grain, value_grain):
            row[f"ratio_{w.kind}"] += t1
            row["sync_ns"] += 1.0
        else:
            row["ratio_serial"] += t1
    row["run_ns"] = 1.0
    return [row[k] for k in COEFFICIENTS]


def fitted_thread_model(profile: Any, precision: str, threads: int) -> dict[str, float] | None:
    """``[calibration.thread_model.<precision>]`` when it was fitted at ``threads``, else None."""
    from hwkd.errors import ProfileError

    table = profile.calibration.get("thread_model", {})
    model = table.get(precision) if isinstance(table, dict) else None
    if model is None or threads <= 1:
        return None
    if not isinstance(model, dict):
        raise ProfileError(f"{profile.source}: calibration.thread_model.{precision} must be a table.")
    keys = (*COEFFICIENTS, "mac_grain", "value_grain", "threads")
    missing = [k for k in keys if k not in model]
    bad = [k for k in keys if k in model and (isinstance(model[k], bool) or not isinstance(model[k], int | float)
                                              or model[k] < 0)]  # fmt: skip
    if missing or bad:
        raise ProfileError(
            f"{profile.source}: calibration.thread_model.{precision} "
            + (f"lacks {', '.join(missing)}." if missing else f"has negative or non-numeric {', '.join(bad)}."),
            "Re-run `hwkd profiles calibrate` to write a complete profile.",
        )
    if int(model["threads"]) != threads:
        return None
    return {k: float(model[k]) for k in keys}


__all__ = ["CLASSES", "COEFFICIENTS", "features", "fitted_thread_model", "layer_seconds_at", "splits"]
