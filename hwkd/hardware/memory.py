"""Memory model: the peak resident growth of an ONNX Runtime CPU session, from a traced graph.

What a session takes beyond the Python process, as ``hwkd bench`` measures it (peak RSS growth of a
fresh process over loading the session and its warm-up runs, ``ortbench.isolated_memory``):

- ``base_mb``: the session itself (graph, kernel registry, thread pool, allocator bookkeeping);
- ``weight_copies`` x the weight bytes: the initializers as loaded, plus the copies kernels pre-pack
  (MLAS packs GEMM / conv weights into its own layout, so a weight is held about twice);
- ``activation_copies`` x the activation bytes of the widest layer (input + output): the arena the
  memory planner sizes for live tensors, grown in chunks, so more than the live set;
- ``workspace_copies`` x the largest im2col buffer (output pixels x reduction of a k x k conv): the
  per-op scratch the conv kernels allocate.

``hwkd profiles calibrate`` fits the four figures by non-negative least squares on networks whose
memory it measures; without a fit the cost model falls back to weights + live activations + the
profile's ``runtime_overhead_mb``.
"""

from __future__ import annotations

from typing import Any

_MB = 2**20
COEFFICIENTS = ("base_mb", "weight_copies", "activation_copies", "workspace_copies")


def memory_features(works: list[Any], nbytes: int, params: int | None = None) -> list[float]:
    """One network's row for the fit, in COEFFICIENTS order, in MB."""
    executed = [w for w in works if not w.fused]
    weights = (sum(w.params for w in works) if params is None else params) * nbytes
    activations = max((w.act_in + w.act_out for w in executed), default=0) * nbytes
    workspace = max(
        (w.macs // max(w.channels, 1) for w in executed if w.kernel > 1 and w.kind == "conv"), default=0
    ) * nbytes
    return [1.0, weights / _MB, activations / _MB, workspace / _MB]


def memory_mb(works: list[Any], model: dict[str, float], nbytes: int, params: int | None = None) -> float:
    """Estimated peak growth in MB under a fitted memory model."""
    row = memory_features(works, nbytes, params)
    return sum(model[k] * v for k, v in zip(COEFFICIENTS, row, strict=True))


def fitted_memory_model(profile: Any, precision: str) -> dict[str, float] | None:
    """``[calibration.memory_model.<precision>]``, checked, or None."""
    from hwkd.errors import ProfileError

    table = profile.calibration.get("memory_model", {})
    model = table.get(precision) if isinstance(table, dict) else None
    if model is None:
        return None
    ok = isinstance(model, dict) and all(
        isinstance(model.get(k), int | float) and not isinstance(model.get(k), bool) and model[k] >= 0
        for k in COEFFICIENTS
    )
    if not ok:
        raise ProfileError(
            f"{profile.source}: calibration.memory_model.{precision} needs non-negative numbers "
            f"{', '.join(COEFFICIENTS)}.",
            "Re-run `hwkd profiles calibrate` to write a complete profile.",
        )
    return {k: float(model[k]) for k in COEFFICIENTS}


def fit_memory_model(rows: list[list[float]], measured_mb: list[float]) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit COEFFICIENTS to measured peak growths (relative error); (model, stats with leave-one-out error)."""
    import numpy as np
    from scipy.optimize import nnls

    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(measured_mb, dtype=np.float64)
    keep = y > 0
    x, y = x[keep], y[keep]

    def solve(xs, ys):
        a = xs / ys[:, None]
        scale = np.abs(a).max(axis=0)
        scale[scale == 0] = 1.0
        sol, _ = nnls(a / scale, np.ones(len(ys)))
        return sol / scale

    coef = solve(x, y)
    rel = np.abs(x @ coef / y - 1.0)
    loo = [abs(x[i] @ solve(np.delete(x, i, 0), np.delete(y, i)) / y[i] - 1.0) for i in range(len(y))] if len(y) > 4 else []
    stats = {"networks": int(len(y)), "fit_mape_pct": round(float(rel.mean() * 100), 2)}
    if loo:
        stats.update(cv_mape_pct=round(float(np.mean(loo) * 100), 2),
                     cv_within_25pct=round(float(np.mean(np.asarray(loo) <= 0.25)), 3))  # fmt: skip
    return {k: float(f"{v:.6g}") for k, v in zip(COEFFICIENTS, coef, strict=True)}, stats


__all__ = ["COEFFICIENTS", "fit_memory_model", "fitted_memory_model", "memory_features", "memory_mb"]
