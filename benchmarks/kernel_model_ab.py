"""A change to the kernel model, scored offline on every committed calibration dump: the model as it stood
after an earlier stop against another (by default stop 28's against the current one). Each dump's calibration
networks are refitted exactly as ``hwkd profiles calibrate`` fits them (``predictor_refit.fitted_profiles``)
and every benchmark model is estimated from that fit and compared with what the same run measured.

Variants are the current ``cost._layer_features`` with later features taken out again:

- ``stop27``: one per-pixel rate for every conv (``light_pixels`` at the k x k rate) and no ``group_pixels``;
- ``stop28``: k x k convs and 1x1 / depthwise convs priced apart, no ``group_pixels``;
- ``current``: what ``cost.FEATURES`` prices now (stop 29: a per-group pixel set-up for grouped convs).

Besides the benchmark models each row scores *unseen grouped networks*: the calibration's ``grouped`` family
(ResNeXt / Inception-style, grouped 3x3 convs) split into 4 folds, each fold predicted by a fit on every other
network; the held-out-family CV cannot judge a feature only one family exercises. The dumps come from three
hosts (stops 17-19: Intel Xeon; 23 and 28: AMD EPYC). Writes benchmarks/results/<--out>.{json,md}.

    python benchmarks/kernel_model_ab.py benchmarks/results/predictor_dumps/run_*.json.gz benchmarks/results/predictor_dumps/stop28_*.json.gz
    python benchmarks/kernel_model_ab.py --variants stop27,stop28 --out pixel_split_ab DUMPS...   # stop 28's A/B
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import predictor_refit as refit  # noqa: E402

from hwkd.artifacts import atomic_write  # noqa: E402
from hwkd.hardware import cost, fit  # noqa: E402
from hwkd.hardware.calibrate import input_align  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CURRENT = cost._layer_features


def stop28(w, tile, k_half, lanes, input_align=4):
    """Before stop 29: grouped convs priced as plain convs (group_pixels never fitted)."""
    f = CURRENT(w, tile, k_half, lanes, input_align)
    f["group_pixels"] = 0.0
    return f


def stop27(w, tile, k_half, lanes, input_align=4):
    """Before stop 28 as well: 1x1 and depthwise pixels at the k x k rate (light_pixels never fitted)."""
    f = stop28(w, tile, k_half, lanes, input_align)
    f["conv_pixels"] += f["light_pixels"]
    f["light_pixels"] = 0.0
    return f


VARIANTS = {"stop27": stop27, "stop28": stop28, "current": CURRENT}


def score(dump: dict) -> dict:
    """Benchmark models within ±10% / ±15% and MAPE per precision, group and thread count, and the held-out errors."""
    out = {}
    for prec, entry in refit.refit(dump).items():
        out[f"{prec}_cv_mape_pct"] = entry["kernel_fit"].get("cv_mape_pct")
        for group, short in (("benchmark", "bench"), ("torchvision/timm 224px", "tv")):
            for tk in ("t1", "t2"):
                rel = np.abs([m[tk]["estimated_ms"] / m[tk]["measured_ms"] - 1 for m in entry["models"]
                              if m["group"] == group and tk in m])  # fmt: skip
                if len(rel):
                    out[f"{prec}_{short}_{tk}_within10"] = round(float((rel <= 0.10).mean() * 100))
                    out[f"{prec}_{short}_{tk}_within15"] = round(float((rel <= 0.15).mean() * 100))
                    out[f"{prec}_{short}_{tk}_mape"] = round(float(rel.mean() * 100), 1)
        out.update(grouped_held_out(dump, prec))
    return out


def grouped_held_out(dump: dict, prec: str, folds: int = 4) -> dict:
    """The calibration's grouped networks, each predicted by a 1-thread fit that left its fold out."""
    rows = dump["calibration"][prec]
    grouped = np.flatnonzero([r["family"] == "grouped" for r in rows])
    if len(grouped) < folds:
        return {}
    lanes, tile, align = rows[0]["lanes"], rows[0]["tile"], input_align(prec, False, rows[0]["lanes"])
    y = np.asarray([r["fit_ms"] for r in rows])
    rel = np.full(len(rows), np.nan)
    for fold in np.array_split(np.random.default_rng(0).permutation(grouped), folds):
        train = np.setdiff1d(np.arange(len(rows)), fold)
        model, _ = fit.fit_kernel_model([rows[i]["works"] for i in train], list(y[train]), tile, lanes=lanes,
                                        input_align=align)  # fmt: skip
        for i in fold:  # priced as calibration's profile prices a layer (cost.kernel_seconds), plus the run
            seconds = sum(fit.one_thread_layers(rows[i]["works"], model, lanes)) + model["run_ns"] * 1e-9
            rel[i] = seconds * 1e3 / y[i] - 1.0
    rel = rel[grouped]
    return {f"{prec}_grouped_mape": round(float(np.abs(rel).mean() * 100), 1),
            f"{prec}_grouped_bias": round(float(np.median(rel) * 100), 1)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dumps", type=Path, nargs="+")
    ap.add_argument("--variants", default="stop28,current", help="before,after: two of " + ", ".join(VARIANTS))
    ap.add_argument("--out", default="kernel_model_ab", help="results name under benchmarks/results/")
    args = ap.parse_args()
    before, after = args.variants.split(",")
    rows = []
    for path in args.dumps:
        dump = refit.load_dump(path)
        row = {"dump": path.name}
        for name in (before, after):
            cost._layer_features = VARIANTS[name]
            try:
                row[name] = score(dump)
            finally:
                cost._layer_features = CURRENT
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = f"python benchmarks/kernel_model_ab.py --variants {before},{after} --out {args.out} " + " ".join(
        str(p) for p in args.dumps
    )
    out = {"command": command, "before": before, "after": after, "rows": rows}
    atomic_write(RESULTS / f"{args.out}.json", json.dumps(out, indent=1) + "\n")
    atomic_write(RESULTS / f"{args.out}.md", markdown(out, args.out))
    return 0


def markdown(out: dict, name: str) -> str:
    cols = [("fp32_bench_t1_within10", "FP32 1t ±10%"), ("int8_bench_t1_within10", "INT8 1t ±10%"),
            ("int8_bench_t1_mape", "INT8 1t MAPE"), ("fp32_bench_t2_within10", "FP32 2t ±10%"),
            ("int8_bench_t2_within10", "INT8 2t ±10%"), ("fp32_tv_t1_within15", "tv FP32 1t ±15%"),
            ("int8_tv_t1_within15", "tv INT8 1t ±15%"), ("int8_cv_mape_pct", "INT8 held-out-family MAPE (calibration)"),
            ("fp32_grouped_mape", "unseen grouped FP32 MAPE"), ("int8_grouped_mape", "unseen grouped INT8 MAPE"),
            ("int8_grouped_bias", "unseen grouped INT8 median error")]  # fmt: skip
    before, after = out["before"], out["after"]
    lines = [f"# {name}", "", f"Command: `{out['command']}`.", "",
             "Benchmark models (27 per precision; tv: the torchvision/timm models at 224 px) within ±10% / ±15% of "
             "what the same run measured, each dump's calibration refitted as calibration fits it; unseen grouped: the "
             "calibration's grouped networks, each predicted by a fit that left its fold (of 4) out. "
             f"{before} -> {after}.", "",
             "| dump | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]  # fmt: skip
    for r in out["rows"]:
        cells = [f"{r[before].get(k)} -> {r[after].get(k)}" for k, _ in cols]
        lines.append(f"| {r['dump']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
