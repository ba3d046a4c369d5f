"""Memory model: the peak resident growth of an ONNX Runtime CPU session, from a traced graph.

What a session takes beyond the Python process, as ``hwkd bench`` measures it (peak RSS growth of a
fresh process over loading the session and its warm-up runs, ``ortbench.isolated_memory``):

- ``base_mb``: the session itself (graph, kernel registry, thread pool, allocator bookkeeping);
- ``weight_copies`` x the weight bytes: the initializers as loaded, plus the copies kernels pre-pack
  (MLAS packs GEMM / conv weights into its own layout, so a weight is held about twice);
- ``activation_copies`` x the activation bytes of the widest layer (input + output): the arena the
  memory planner sizes for live tensors, grown in chunks, so more than the live set;
- ``scratch_copies`` x the largest per-op scratch a conv allocates, by the path ONNX Runtime's CPU
  kernels take (``conv_scratch_bytes``): an INT8 conv on MLAS's symmetric path needs only an indirection
  buffer (8 bytes per kernel tap and output pixel), one off it an int32 copy of its output and an im2col
  buffer; an FP32 conv runs as an NCHWc kernel without scratch unless it is grouped (NCHW copies of its
  input and output, an im2col buffer).

Profiles calibrated before the scratch feature (stop 23) carry ``workspace_copies``, fitted to the largest
im2col buffer of any k x k conv; they still price with that feature.

``hwkd profiles calibrate`` fits the four figures by non-negative least squares on networks whose
memory it measures; without a fit the cost model falls back to weights + live activations + the
profile's ``runtime_overhead_mb``.
"""

from __future__ import annotations

from typing import Any

_MB = 2**20
COEFFICIENTS = ("base_mb", "weight_copies", "activation_copies", "scratch_copies")
LEGACY_SCRATCH = "workspace_copies"  # the fourth figure of profiles calibrated before stop 23


def conv_scratch_bytes(w: Any, nbytes: int, arm: bool = False) -> float:
    """Scratch one conv allocates per run on ONNX Runtime's CPU kernels (INT8 when ``nbytes`` is 1).

    INT8 (qlinearconv.cc; MLAS ``MlasConvSymPackWSize``, read for x86): a group-1 conv with input channels
    a multiple of 4 and output channels >= 16 and a multiple of 8 takes the symmetric path (requantisation
    fused, an indirection buffer of one pointer per kernel tap and output pixel; none for a 1x1); a
    depthwise conv always has the indirection buffer and, unless its groups are a multiple of 16, an int32
    output; any other conv an int32 output and, past 1x1, an im2col buffer. FP32 on x86 runs NCHWc kernels
    without scratch, except a grouped (not depthwise) conv: NCHW copies of its input and output around a
    plain conv, and an im2col buffer for one group. FP32 on ARM (``arm``: no NCHWc kernels) lowers every
    conv past 1x1 to im2col, one group at a time.
    """
    if w.fused or not w.kernel or not w.channels:
        return 0.0
    pixels = w.act_out / w.channels
    cin, cout, k, g = w.in_channels, w.channels, w.kernel, w.groups
    depthwise = g > 1 and g == cout and cin == 1
    if nbytes == 1:
        if depthwise:
            return 8.0 * k * pixels + (0.0 if g % 16 == 0 else 4.0 * cout * pixels)
        if g == 1 and cin % 4 == 0 and cout >= 16 and cout % 8 == 0:
            return 8.0 * k * pixels if k > 1 else 0.0
        return 4.0 * cout * pixels + (cin * k * pixels if k > 1 else 0.0)
    if arm:
        return float(nbytes * cin * k * pixels) if k > 1 else 0.0
    if g == 1 or depthwise:
        return 0.0
    return float(nbytes * (w.act_in + w.act_out)) + (nbytes * cin * k * pixels if k > 1 else 0.0)


def memory_features(
    works: list[Any], nbytes: int, params: int | None = None, legacy: bool = False, arm: bool = False
) -> list[float]:
    """One network's row for the fit, in COEFFICIENTS order, in MB (``legacy``: the fourth feature of
    profiles calibrated before stop 23, the largest im2col buffer of any k x k conv; ``arm``: the device's
    CPU is ARM, see ``conv_scratch_bytes``)."""
    executed = [w for w in works if not w.fused]
    weights = (sum(w.params for w in works) if params is None else params) * nbytes
    activations = max((w.act_in + w.act_out for w in executed), default=0) * nbytes
    if legacy:
        scratch = max(
            (w.macs // max(w.channels, 1) for w in executed if w.kernel > 1 and w.kind == "conv"), default=0
        ) * nbytes
    else:
        scratch = max((conv_scratch_bytes(w, nbytes, arm) for w in executed), default=0.0)
    return [1.0, weights / _MB, activations / _MB, scratch / _MB]


def memory_mb(
    works: list[Any], model: dict[str, float], nbytes: int, params: int | None = None, arm: bool = False
) -> float:
    """Estimated peak growth in MB under a fitted memory model (either generation of the fourth figure)."""
    keys = _coefficients(model)
    row = memory_features(works, nbytes, params, legacy=keys[3] == LEGACY_SCRATCH, arm=arm)
    return sum(model[k] * v for k, v in zip(keys, row, strict=True))


def _coefficients(model: Any) -> tuple[str, ...]:
    """The figures a memory model table holds: COEFFICIENTS, or the pre-stop-23 ones with ``workspace_copies``."""
    if isinstance(model, dict) and "scratch_copies" not in model and LEGACY_SCRATCH in model:
        return (*COEFFICIENTS[:3], LEGACY_SCRATCH)
    return COEFFICIENTS


def fitted_memory_model(profile: Any, precision: str) -> dict[str, float] | None:
    """``[calibration.memory_model.<precision>]``, checked, or None."""
    from hwkd.errors import ProfileError

    table = profile.calibration.get("memory_model", {})
    model = table.get(precision) if isinstance(table, dict) else None
    if model is None:
        return None
    keys = _coefficients(model)
    ok = isinstance(model, dict) and all(
        isinstance(model.get(k), int | float) and not isinstance(model.get(k), bool) and model[k] >= 0
        for k in keys
    )
    if not ok:
        raise ProfileError(
            f"{profile.source}: calibration.memory_model.{precision} needs non-negative numbers "
            f"{', '.join(COEFFICIENTS)}.",
            "Re-run `hwkd profiles calibrate` to write a complete profile.",
        )
    return {k: float(model[k]) for k in keys}


def solve(x: Any, y: Any) -> Any:
    """Non-negative coefficients minimising the relative error of ``x @ coef`` against ``y`` (rows > 0)."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.asarray(x, dtype=np.float64) / np.asarray(y, dtype=np.float64)[:, None]
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    sol, _ = nnls(a / scale, np.ones(len(a)))
    return sol / scale


def fit_memory_model(rows: list[list[float]], measured_mb: list[float]) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit COEFFICIENTS to measured peak growths (relative error); (model, stats with leave-one-out error)."""
    import numpy as np

    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(measured_mb, dtype=np.float64)
    keep = y > 0
    x, y = x[keep], y[keep]
    coef = solve(x, y)
    rel = np.abs(x @ coef / y - 1.0)
    loo = [abs(x[i] @ solve(np.delete(x, i, 0), np.delete(y, i)) / y[i] - 1.0) for i in range(len(y))] if len(y) > 4 else []
    stats = {"networks": int(len(y)), "fit_mape_pct": round(float(rel.mean() * 100), 2)}
    if loo:
        stats.update(cv_mape_pct=round(float(np.mean(loo) * 100), 2),
                     cv_within_25pct=round(float(np.mean(np.asarray(loo) <= 0.25)), 3))  # fmt: skip
    return {k: float(f"{v:.6g}") for k, v in zip(COEFFICIENTS, coef, strict=True)}, stats


__all__ = ["COEFFICIENTS", "LEGACY_SCRATCH", "conv_scratch_bytes", "fit_memory_model", "fitted_memory_model", "memory_features", "memory_mb", "solve"]
