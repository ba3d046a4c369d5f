"""Fitting calibration's models to what it timed: the 1-thread kernel model, the thread model, the tile.

Every fit minimises *relative* error by non-negative least squares (a 10% miss weighs the same on a
0.05 ms and a 5 ms network), with the few nonlinear figures (``k_half``, the thread-split thresholds)
on grids. The held-out error leaves out one network *family* at a time when families are given: the
error to expect on architectures the fit has not seen, not on more of the same.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# Reduction lengths at which a 1x1 / k x k GEMM reaches half its peak, tried in turn: the one
# nonlinear figure of the kernel model, so a grid and a linear fit per point beat a nonlinear solver.
K_HALF_GRID = (0.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
# Work (FLOPs, or values) at which a kernel reaches half its parallel speed-up; tried with > 1 thread.
GRAIN_GRID = (1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7)


def feature_matrix(
    works_list: list[list], tile: int, k_half: float, lanes: int = 8, threads: int = 1, grain: float = 0.0,
    input_align: int = 4,
) -> np.ndarray:
    """Per network, its layers' kernel-model features summed (columns: cost.FEATURES, then 1 per run)."""
    from hwkd.hardware.cost import FEATURES, layer_features

    rows = []
    for works in works_list:
        total = dict.fromkeys(FEATURES, 0.0)
        for w in works:
            for key, value in layer_features(w, tile, k_half, lanes, threads, grain, input_align).items():
                total[key] += value
        rows.append([total[k] for k in FEATURES] + [1.0])
    return np.asarray(rows, dtype=np.float64)


def _relative_nnls(
    x: np.ndarray, y: np.ndarray, rounds: int = 4, bounds: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Non-negative (or ``bounds``-limited) coefficients minimising the *relative* error of x @ c against y.

    Rows are divided by y (a 10% miss weighs the same on a 0.05 ms and a 5 ms network); a few
    reweighting rounds shrink the pull of networks missed by more than 10% (Huber weights), so one
    network timed during a burst of load does not drag the rest.
    """
    from scipy.optimize import lsq_linear, nnls

    a = x / y[:, None]
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    weights = np.ones(len(y))
    coef = np.zeros(x.shape[1])
    for _ in range(rounds):
        if bounds is None:
            sol, _ = nnls(a / scale * weights[:, None], weights, maxiter=50 * x.shape[1])
        else:
            sol = lsq_linear(a / scale * weights[:, None], weights, bounds=(bounds[0] * scale, bounds[1] * scale)).x
        coef = sol / scale
        rel = np.abs(x @ coef / y - 1.0)
        weights = np.sqrt(1.0 / np.maximum(1.0, rel / 0.1))
    return coef


def _huber(rel: np.ndarray, delta: float = 0.1) -> float:
    return float(np.where(rel <= delta, 0.5 * rel**2, delta * (rel - 0.5 * delta)).sum())


def _held_out(
    x: np.ndarray, y: np.ndarray, families: Sequence[str] | None, folds: int, seed: int, bounds: Any = None
) -> np.ndarray:
    """Each network's relative error when its fold was left out of the fit (NaN where none could be).

    With two or more ``families`` a fold is a family (leave-one-family-out); otherwise ``folds`` random folds.
    """
    cv = np.full(len(y), np.nan)
    if families is not None and len(set(families)) >= 2:
        labels = np.asarray(families)
        splits = [np.flatnonzero(labels == fam) for fam in dict.fromkeys(families)]
    elif folds > 1 and len(y) >= 2 * folds:
        splits = np.array_split(np.random.default_rng(seed).permutation(len(y)), folds)
    else:
        return cv
    for fold in splits:
        train = np.setdiff1d(np.arange(len(y)), fold)
        cv[fold] = np.abs(x[fold] @ _relative_nnls(x[train], y[train], bounds=bounds) / y[fold] - 1.0)
    return cv


def _stats(rel: np.ndarray, cv: np.ndarray, families: Sequence[str] | None) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "networks": len(rel),
        "fit_mape_pct": round(float(rel.mean() * 100), 2),
        "fit_within_10pct": round(float((rel <= 0.10).mean()), 3),
    }
    if not np.isnan(cv).any():
        stats.update(cv_mape_pct=round(float(cv.mean() * 100), 2), cv_within_10pct=round(float((cv <= 0.10).mean()), 3))
        if families is not None and len(set(families)) >= 2:
            labels = np.asarray(families)
            stats["held_out_family_mape_pct"] = {
                fam: round(float(cv[labels == fam].mean() * 100), 2) for fam in dict.fromkeys(families)
            }
    return stats


def fit_kernel_model(
    works_list: list[list], measured_ms: list[float], tile: int, folds: int = 5, seed: int = 0, lanes: int = 8,
    threads: int = 1, families: Sequence[str] | None = None, input_align: int = 4,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit one precision's kernel model to networks timed on the host: (model table, fit statistics).

    Returns ns per unit of every cost.FEATURES entry, ``run_ns``, the chosen ``k_half`` and the tile;
    the statistics are the fit's error on its own networks and a held-out error (leave-one-family-out
    when ``families`` label the networks, else ``folds``-fold), which is what to expect on networks it
    has not seen. ``threads`` > 1 fits the older single-grain thread scaling (profiles before the
    thread model); calibration fits at one thread and leaves threads to ``fit_thread_model``.
    """
    from hwkd.hardware.cost import FEATURES

    y = np.asarray(measured_ms, dtype=np.float64) * 1e6  # ns
    best = None
    for k_half, grain in itertools.product(K_HALF_GRID, GRAIN_GRID if threads > 1 else (0.0,)):
        x = feature_matrix(works_list, tile, k_half, lanes, threads, grain, input_align)
        coef = _relative_nnls(x, y)
        loss = _huber(np.abs(x @ coef / y - 1.0))
        if best is None or loss < best[0]:
            best = (loss, k_half, grain, x, coef)
    _, k_half, grain, x, coef = best
    rel = np.abs(x @ coef / y - 1.0)
    cv = _held_out(x, y, families, folds, seed)
    model = {k: float(v) for k, v in zip(FEATURES, coef[:-1], strict=True)}
    model.update(run_ns=float(coef[-1]), k_half=float(k_half), channel_tile=int(tile), threads=int(threads),
                 input_align=int(input_align))
    if threads > 1:
        model["grain"] = float(grain)
    return model, _stats(rel, cv, families)


def one_thread_layers(works: list, model: dict[str, float], lanes: int = 8) -> list[float]:
    """Each layer's seconds at one thread under a fitted kernel model (run overhead excluded)."""
    from hwkd.hardware.cost import kernel_seconds

    one = {**model, "threads": 1, "grain": 0.0}
    return [kernel_seconds(w, one, int(model["channel_tile"]), lanes)[0] for w in works]


def fit_thread_model(
    works_list: list[list], measured_1_ms: list[float], measured_t_ms: list[float], kernel_model: dict[str, float],
    threads: int, lanes: int = 8, families: Sequence[str] | None = None, folds: int = 5, seed: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit hwkd.hardware.threads' model to networks timed at 1 and ``threads`` threads.

    Each network's 1-thread layer times come from the kernel model, rescaled so they add up to what the
    network measured at one thread (the ratios are then fitted on the thread effect alone, not on the
    kernel model's misses); the split thresholds are chosen on a grid.
    """
    from hwkd.hardware import threads as tm

    y = np.asarray(measured_t_ms, dtype=np.float64) * 1e-3  # seconds
    layer_times = []
    for works, m1 in zip(works_list, measured_1_ms, strict=True):
        t1 = one_thread_layers(works, kernel_model, lanes)
        scale = max(m1 * 1e-3 - kernel_model["run_ns"] * 1e-9, 1e-9) / max(sum(t1), 1e-12)
        layer_times.append([t * scale for t in t1])
    # a split kernel runs at no less than 0.9 / threads of its 1-thread time and at most 3x it
    bounds = tm.bounds(threads)
    best = None
    for mac_grain, value_grain in itertools.product(tm.MAC_GRAIN_GRID, tm.VALUE_GRAIN_GRID):
        x = np.asarray([tm.features(w, t1, mac_grain, value_grain) for w, t1 in zip(works_list, layer_times, strict=True)])
        coef = _relative_nnls(x, y, bounds=bounds)
        loss = _huber(np.abs(x @ coef / y - 1.0))
        if best is None or loss < best[0]:
            best = (loss, mac_grain, value_grain, x, coef)
    _, mac_grain, value_grain, x, coef = best
    rel = np.abs(x @ coef / y - 1.0)
    cv = _held_out(x, y, families, folds, seed, bounds)
    model = {k: float(v) for k, v in zip(tm.COEFFICIENTS, coef, strict=True)}
    model["sync_ns"] *= 1e9  # the fit ran in seconds
    model["run_ns"] *= 1e9
    model.update(mac_grain=float(mac_grain), value_grain=float(value_grain), threads=int(threads))
    stats = _stats(rel, cv, families)
    stats["median_speedup"] = round(float(np.median(np.asarray(measured_1_ms) / np.asarray(measured_t_ms))), 3)
    return model, stats


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


