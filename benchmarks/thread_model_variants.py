"""Offline: does the thread model miss small networks by noise or by a sign, and do extra terms fix it?

Refits the thread model (hwkd/hardware/threads.py) on committed predictor_accuracy dumps, as
``hwkd profiles calibrate`` fits it, in its current form and in candidate forms, and scores each on the
dump's benchmark models at 2 threads; nothing is timed (docs/decisions-issue13.md, stop 26).

    python benchmarks/thread_model_variants.py benchmarks/results/predictor_dumps/run_{stop19,1317,1512,1531}.json.gz

Variants (each swaps hwkd.hardware.threads' features for the run; none is hwkd's model unless adopted):
- ``current``: split kernels pay ``sync_ns``, the rest run at ``ratio_serial``;
- ``serial``: + a fixed cost per kernel *not* split (ORT dispatching it through the pool anyway);
- ``node``: + a fixed cost per kernel, split or not;
- ``class_sync``: a fork/join cost per kernel class instead of one ``sync_ns``;
- ``fine_grid``: the current terms, the MAC split threshold on a grid 3x finer;
- ``unaligned``: convs whose input channels are not a multiple of the kernel model's ``input_align``
  (FP32 on x86: the NCHWc block; they read NCHW through a kernel of their own) get a ratio of their own.

Each variant is also refitted *in-sample* (the benchmark models added to its fit): if a form cannot fit
a model it has seen, more calibration networks will not help it. The per-model tables show the 2-thread
error of every model under 0.15 ms at one thread on each dump: the same sign on every run is a bias,
not noise.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import predictor_refit as pr  # noqa: E402

from hwkd.artifacts import atomic_write, write_json  # noqa: E402
from hwkd.hardware import fit  # noqa: E402
from hwkd.hardware import threads as tm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("current", "serial", "node", "class_sync", "fine_grid", "unaligned")
FINE_GRID = (0.0, 2e3, 4e3, 8e3, 1.6e4, 3.2e4, 6.4e4, 1.28e5, 2.56e5, 5e5, 1e6, 2e6)
SMALL_MS = 0.15


def per_layer_terms(coefs, ratio_of, sync_of):
    """features / layer_seconds_at of a thread model whose split layers are priced ``t1 * model[ratio_of(w)] +
    model[sync_of(w)]`` (``ratio_of(w, None)`` while fitting) and the rest ``t1 * ratio_serial``."""

    def features(works, t1_layers, mac_grain, value_grain):
        row = dict.fromkeys(coefs, 0.0)
        for w, t1 in zip(works, t1_layers, strict=True):
            if tm.splits(w, mac_grain, value_grain):
                row[ratio_of(w, None)] += t1
                row[sync_of(w)] += 1.0
            else:
                row["ratio_serial"] += t1
        row["run_ns"] = 1.0
        return list(row.values())

    def layer_seconds_at(w, t1_s, model):
        if tm.splits(w, model["mac_grain"], model["value_grain"]):
            sync = model[sync_of(w)] * 1e-9
            return t1_s * model[ratio_of(w, model)] + sync, sync
        return t1_s * model["ratio_serial"], 0.0

    return features, layer_seconds_at


@contextlib.contextmanager
def variant(name: str):
    """hwkd.hardware.threads with the variant's features, restored afterwards."""
    saved = {k: getattr(tm, k) for k in ("COEFFICIENTS", "features", "layer_seconds_at", "MAC_GRAIN_GRID", "fitted_thread_model")}
    saved_fit = fit.fit_thread_model
    base_coefs, base_features, base_seconds = saved["COEFFICIENTS"], saved["features"], saved["layer_seconds_at"]
    extra: list[str] = []

    def count_kernel(w, mac_grain, value_grain) -> bool:
        return not w.fused and (name == "node" or not tm.splits(w, mac_grain, value_grain))

    if name in ("serial", "node"):
        extra = [f"{name}_ns"]

        def features(works, t1_layers, mac_grain, value_grain):
            row = base_features(works, t1_layers, mac_grain, value_grain)[: len(base_coefs)]
            return [*row, float(sum(count_kernel(w, mac_grain, value_grain) for w in works))]

        def layer_seconds_at(w, t1_s, model):
            s, sync = base_seconds(w, t1_s, model)
            if count_kernel(w, model["mac_grain"], model["value_grain"]):
                s, sync = s + model[extra[0]] * 1e-9, sync + model[extra[0]] * 1e-9
            return s, sync

        tm.features, tm.layer_seconds_at = features, layer_seconds_at
    elif name == "class_sync":
        extra = [f"sync_{k}" for k in tm.CLASSES]  # sync_ns stays a column of zeros (fit.py scales it)
        tm.features, tm.layer_seconds_at = per_layer_terms(
            (*base_coefs, *extra), ratio_of=lambda w, model: f"ratio_{w.kind}", sync_of=lambda w: f"sync_{w.kind}"
        )
    elif name == "fine_grid":
        tm.MAC_GRAIN_GRID = FINE_GRID
    elif name == "unaligned":
        extra = ["ratio_unaligned"]
        align = {"now": 4}  # the kernel model's input_align while fitting; the thread model keeps its own

        def ratio_of(w, model) -> str:
            a = int(model["input_align"]) if model else align["now"]
            reads_nchw = bool(w.kernel) and w.kind in ("conv", "pointwise") and w.in_channels % a != 0
            return "ratio_unaligned" if reads_nchw else f"ratio_{w.kind}"

        tm.features, tm.layer_seconds_at = per_layer_terms((*base_coefs, *extra), ratio_of, lambda w: "sync_ns")
    if extra:
        tm.COEFFICIENTS = (*base_coefs, *extra)

        def fitted(profile, precision, threads):
            m = profile.calibration.get("thread_model", {}).get(precision)
            return None if m is None or threads <= 1 or int(m["threads"]) != threads else {k: float(v) for k, v in m.items()}

        def fit_thread_model(works_list, m1, mt, kernel_model, *a, **k):
            if name == "unaligned":
                align["now"] = int(kernel_model.get("input_align", 4))
            model, stats = saved_fit(works_list, m1, mt, kernel_model, *a, **k)
            for key in extra:
                if not key.startswith("ratio_"):
                    model[key] *= 1e9  # fitted in seconds, like sync_ns
            model["input_align"] = align["now"] if name == "unaligned" else 0
            return model, stats
            return model, stats

        tm.fitted_thread_model, fit.fit_thread_model = fitted, fit_thread_model
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(tm, k, v)
        fit.fit_thread_model = saved_fit


def in_sample_profiles(dump: dict) -> dict:
    """fitted_profiles with each thread model refitted on the calibration networks *and* the benchmark
    models: what the form can reach when it has seen the models it is scored on (the kernel model as fitted)."""
    import dataclasses

    profiles = pr.fitted_profiles(dump)
    for prec, (profile, fits, threads) in profiles.items():
        nets, kernel_model = dump["calibration"][prec], profile.calibration["kernel_model"][prec]
        models = [m for m in dump["models"] if m["precision"] == prec and m["group"] == "benchmark"]
        model, _ = fit.fit_thread_model([n["works"] for n in nets] + [m["works"] for m in models],
                                        [n["wall_1_ms"] for n in nets] + [m["t1_ms"] for m in models],
                                        [n["wall_n_ms"] for n in nets] + [m["t2_ms"] for m in models],
                                        kernel_model, threads, nets[0]["lanes"])  # fmt: skip
        calibration = {**profile.calibration, "thread_model": {prec: model}}
        profiles[prec] = (dataclasses.replace(profile, calibration=calibration), fits, threads)
    return profiles


def score(dump: dict) -> tuple[list[dict], dict]:
    """Per variant (fitted on calibration, and in-sample) and precision, the 2-thread errors on the
    benchmark models; per model under SMALL_MS, its 2-thread and 1-thread errors per variant."""
    rows, per_model = [], {}
    for name in VARIANTS:
        for fitted_on in ("calibration", "in-sample"):
            with variant(name):
                result = pr.refit(dump, profiles=in_sample_profiles(dump) if fitted_on == "in-sample" else None)
            for prec, entry in result.items():
                models = [m for m in entry["models"] if m["group"] == "benchmark"]
                r1 = np.array([m["t1"]["estimated_ms"] / m["t1"]["measured_ms"] for m in models])
                r2 = np.array([m["t2"]["estimated_ms"] / m["t2"]["measured_ms"] for m in models])
                small = np.array([m["t1"]["measured_ms"] < 0.1 for m in models])
                rows.append({"variant": name, "fitted_on": fitted_on, "precision": prec, "n": len(models),
                             "within_10pct_2t": round(float(np.mean(np.abs(r2 - 1) <= 0.10)), 3),
                             "within_10pct_2t_under_0.1ms": round(float(np.mean(np.abs(r2[small] - 1) <= 0.10)), 3),
                             "n_under_0.1ms": int(small.sum()),
                             "mape_2t_pct": round(float(np.mean(np.abs(r2 - 1)) * 100), 1),
                             "speedup_error_within_5pct": round(float(np.mean(np.abs(r2 / r1 - 1) <= 0.05)), 3),
                             "calibration_cv_mape_pct": (entry.get("thread_fit") or {}).get("cv_mape_pct")
                             if fitted_on == "calibration" else None})  # fmt: skip
                for m, e1, e2 in zip(models, r1, r2, strict=True):
                    if m["t1"]["measured_ms"] < SMALL_MS:
                        cell = per_model.setdefault((prec, m["model"]), {"t1_ms": round(m["t1"]["measured_ms"], 4),
                                                    "t2_over_t1": round(m["t2"]["measured_ms"] / m["t1"]["measured_ms"], 2)})  # fmt: skip
                        cell[f"{name} {fitted_on}"] = {"err_1t_pct": round(float(e1 - 1) * 100, 1),
                                                      "err_2t_pct": round(float(e2 - 1) * 100, 1)}  # fmt: skip
    return rows, per_model


def render(paths: list[Path], rows: dict, per_model: dict) -> str:
    names = [p.name.split(".")[0] for p in paths]
    lines = ["# Thread-model variants, refitted offline on committed dumps", "",
             f"`python benchmarks/thread_model_variants.py {' '.join(str(p) for p in paths)}`; nothing timed. "
             "Benchmark models (27 per precision) at 2 threads. *calibration*: fitted as `hwkd profiles calibrate` fits "
             "(the goal's setting); *in-sample*: the thread model refitted with the benchmark models added, what the form "
             "can reach at best. Speed-up error: predicted t2/t1 over measured t2/t1.", "",
             "| dump | variant | fitted on | precision | 2t within ±10% | of them < 0.1 ms | 2t MAPE | speed-up within ±5% | calibration CV MAPE |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in names:
        for r in rows[name]:
            cv = f"{r['calibration_cv_mape_pct']}%" if r["calibration_cv_mape_pct"] is not None else ""
            lines.append(f"| {name} | {r['variant']} | {r['fitted_on']} | {r['precision']} | {100 * r['within_10pct_2t']:.0f}% | "
                         f"{100 * r['within_10pct_2t_under_0.1ms']:.0f}% of {r['n_under_0.1ms']} | {r['mape_2t_pct']}% | "
                         f"{100 * r['speedup_error_within_5pct']:.0f}% | {cv} |")  # fmt: skip
    for arm in ("current calibration", "current in-sample", "serial in-sample"):
        lines += ["", f"Per model under {SMALL_MS} ms at one thread, **{arm}**: 2-thread error (1-thread error) on each dump; "
                  "measured t2/t1 of the first dump in the last column.", "",
                  "| precision | model | " + " | ".join(names) + " | t2/t1 |", "|---|---|" + "---|" * (len(names) + 1)]  # fmt: skip
        keys = sorted({k for d in per_model.values() for k in d},
                      key=lambda k: np.mean([per_model[n][k]["t1_ms"] for n in names if k in per_model[n]]))  # fmt: skip
        for prec, model in keys:
            cells = []
            for n in names:
                c = per_model[n].get((prec, model), {}).get(arm)
                cells.append(f"{c['err_2t_pct']:+.0f}% ({c['err_1t_pct']:+.0f}%)" if c else "")
            first = next(per_model[n][(prec, model)] for n in names if (prec, model) in per_model[n])
            lines.append(f"| {prec} | {model} | " + " | ".join(cells) + f" | {first['t2_over_t1']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dumps", type=Path, nargs="+")
    args = ap.parse_args()
    rows, per_model = {}, {}
    for path in args.dumps:
        name = path.name.split(".")[0]
        rows[name], per_model[name] = score(pr.load_dump(path))
        print(f"  scored {name}", flush=True)
    write_json(RESULTS / "thread_model_variants.json", {"dumps": [str(p) for p in args.dumps], "rows": rows,
               "per_model": {n: {f"{p} {m}": v for (p, m), v in d.items()} for n, d in per_model.items()}})  # fmt: skip
    text = render(args.dumps, rows, per_model)
    atomic_write(RESULTS / "thread_model_variants.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
