"""Stop 28's kernel-model change, scored offline on every committed calibration dump: one per-pixel rate
for all convs (``merged``, the model before) against k x k convs and 1x1 / depthwise convs priced apart
(``split``, ``cost.FEATURES``' ``light_pixels``). Each dump's calibration networks are refitted exactly as
``hwkd profiles calibrate`` fits them (``predictor_refit.fitted_profiles``) and every benchmark model is
estimated from that fit and compared with what the same run measured. The dumps come from three hosts
(stops 17-19: Intel Xeon; 23 and 28: AMD EPYC); the split was designed on stop 28's runs b and c, so the
others are the check. Writes benchmarks/results/pixel_split_ab.{json,md}.

    python benchmarks/pixel_split_ab.py benchmarks/results/predictor_dumps/run_*.json.gz benchmarks/results/predictor_dumps/stop28_*.json.gz
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
from hwkd.hardware import cost  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPLIT = cost._layer_features


def merged(w, tile, k_half, lanes, input_align=4):
    """The model before stop 28: 1x1 and depthwise pixels at the k x k rate (light_pixels never fitted)."""
    f = SPLIT(w, tile, k_half, lanes, input_align)
    f["conv_pixels"] += f["light_pixels"]
    f["light_pixels"] = 0.0
    return f


def score(dump: dict) -> dict:
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
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dumps", type=Path, nargs="+")
    args = ap.parse_args()
    rows = []
    for path in args.dumps:
        dump = refit.load_dump(path)
        row = {"dump": path.name}
        for name, fn in (("merged", merged), ("split", SPLIT)):
            cost._layer_features = fn
            try:
                row[name] = score(dump)
            finally:
                cost._layer_features = SPLIT
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"command": "python benchmarks/pixel_split_ab.py " + " ".join(str(p) for p in args.dumps), "rows": rows}
    atomic_write(RESULTS / "pixel_split_ab.json", json.dumps(out, indent=1) + "\n")
    atomic_write(RESULTS / "pixel_split_ab.md", markdown(out))
    return 0


def markdown(out: dict) -> str:
    cols = [("fp32_bench_t1_within10", "FP32 1t ±10%"), ("int8_bench_t1_within10", "INT8 1t ±10%"),
            ("int8_bench_t1_mape", "INT8 1t MAPE"), ("fp32_bench_t2_within10", "FP32 2t ±10%"),
            ("int8_bench_t2_within10", "INT8 2t ±10%"), ("fp32_tv_t1_within15", "tv FP32 1t ±15%"),
            ("int8_tv_t1_within15", "tv INT8 1t ±15%"), ("int8_cv_mape_pct", "INT8 held-out-family MAPE (calibration)")]  # fmt: skip
    lines = ["# pixel_split_ab", "", f"Command: `{out['command']}`.", "",
             "Benchmark models (27 per precision; tv: the 5 torchvision/timm models at 224 px) within ±10% / ±15% of "
             "what the same run measured, each dump's calibration refitted as calibration fits it; merged -> split.", "",
             "| dump | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]  # fmt: skip
    for r in out["rows"]:
        cells = [f"{r['merged'].get(k)} -> {r['split'].get(k)}" for k, _ in cols]
        lines.append(f"| {r['dump']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
