"""Latency predictors fitted on a kernel_dataset.py file, scored on its benchmark models (nothing re-timed).

    python benchmarks/kernel_fit.py /tmp/kernels.json.gz

Three predictors, each fitted on the calibration-family networks only and scored on the benchmark and
torchvision/timm models against their measured 1-thread p50:

- ``network``: hwkd's kernel model as calibration fits it today (linear features, whole-network times);
- ``layer``: the same linear features fitted to each layer's own kernel time (ORT's profile), then the
  non-MAC ops and the per-run cost fitted to what the layers leave of each network's time;
- ``kernel``: nn-Meter's way: a non-linear regressor per kernel class (gradient-boosted trees on the
  layer's shape, in log space) fitted to the layer times, with the same non-MAC / per-run step;
- ``powerlaw``: the same with a power law per kernel class (linear in log space), which extrapolates.

Writes results/kernel_fit.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import kernel_dataset  # noqa: E402

from hwkd.artifacts import atomic_write, write_json  # noqa: E402
from hwkd.hardware import cost, fit  # noqa: E402
from hwkd.hardware.calibrate import input_align  # noqa: E402
from hwkd.hardware.profiles import load_profile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LANES, TILE = 16, 16  # this host: AVX-512 (calibration's vector width), NCHWc / INT8 tile 16


def load(path: Path) -> list[dict]:
    """The dataset's models, each layer's time net of the profiler's own per-node cost (``node_overhead_us``)."""
    raw = path.read_bytes()
    data = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    models = data["models"]
    for m in models:
        m["works"] = [cost.LayerWork(**w) for w in m["works"]]
    for prec in ("fp32", "int8"):
        delta = node_overhead_us([m for m in models if m["precision"] == prec and m["group"].startswith("calibration")])
        for m in (m for m in models if m["precision"] == prec):
            nodes = [{**n, "us": max(0.0, n["us"] - delta)} for n in m["nodes"]]
            m["layer_us"], m["other_us"], m["unmatched"] = kernel_dataset.layer_times(m["works"], nodes)
            m["node_overhead_us"] = delta
    return models


def node_overhead_us(models: list[dict]) -> float:
    """What profiling adds per node: the median over networks of (sum of node times - CPU time) / nodes.

    The sum of a small network's node times exceeds its unprofiled CPU time by about a microsecond per
    node (time stamps and the event record); a fit to raw node times would charge that to every layer.
    """
    per = [(sum(n["us"] for n in m["nodes"]) - m["cpu_ms"] * 1e3) / len(m["nodes"]) for m in models if m["nodes"]]
    return max(0.0, float(np.median(per))) if per else 0.0


def features(works, prec: str, k_half: float) -> list[dict[str, float]]:
    return [cost.layer_features(w, TILE, k_half, LANES, 1, 0.0, input_align(prec, False, LANES)) for w in works]


def shape_vector(w) -> list[float]:
    """A MAC layer's shape for the regressor: what the kernel's speed depends on."""
    pix_out = w.act_out / max(w.channels, 1)
    cin_total = w.in_channels * w.groups
    pix_in = w.act_in / max(cin_total, 1)
    return [math.log(max(w.macs, 1)), math.log(max(w.in_channels, 1)), math.log(max(w.channels, 1)),
            math.log(max(pix_out, 1)), float(w.kernel), math.log(max(w.groups, 1)),
            math.log(max(pix_in / max(pix_out, 1), 1)),  # stride squared
            float(w.in_channels % 16 != 0), float(w.channels % 16 != 0), float(cin_total == 3)]  # fmt: skip


def work_scale(w) -> float:
    """What a layer's time is divided by before the regressor sees it: about its time at a typical
    speed (1 us + 10 ps per MAC). The regressor learns the speed, which stays bounded past the largest
    layer calibration timed, where a tree's prediction of the time itself would stop growing."""
    return 1.0 + 1e-5 * w.macs


def rest_vector(m: dict) -> list[float]:
    """What a network's MAC layers leave out: non-MAC values, non-MAC kernels, unfused epilogues, 1 (the run)."""
    macs = set(kernel_dataset.mac_layers(m["works"]))
    f = features(m["works"], m["precision"], 0.0)
    rest = [f[i] for i in range(len(m["works"])) if i not in macs]
    return [sum(r["elementwise"] + r["pool"] for r in rest), sum(r["ops"] for r in rest), sum(r["epilogue"] for r in rest), 1.0]


class NetworkFit:
    """hwkd's kernel model fitted as calibration fits it, priced by ``cost.price`` (what ``hwkd estimate`` runs)."""

    name = "network"

    def fit(self, models, prec):
        model, _ = fit.fit_kernel_model([m["works"] for m in models], [m["cpu_ms"] for m in models], TILE,
                                        lanes=LANES, input_align=input_align(prec, False, LANES))  # fmt: skip
        base = load_profile("x86-avx2")
        self.profile = dataclasses.replace(base, hardware=dataclasses.replace(base.hardware, vector_width=LANES),
                                           calibration={"kernel_model": {prec: model}})  # fmt: skip
        self.prec = prec
        return self

    def predict_ms(self, m) -> float:
        return cost.price(m["works"], self.profile, self.prec, threads=1).latency_ms


class PerLayerFit:
    """A predictor of each MAC layer's time (``fit_layers``, ``layer_ns``), then the non-MAC ops and the
    per-run cost fitted by non-negative least squares to what the layers leave of each network's time."""

    def fit(self, models, prec):
        from scipy.optimize import nnls

        self.fit_layers(models, prec)
        x = np.asarray([rest_vector(m) for m in models])
        y = np.asarray([m["cpu_ms"] * 1e6 - sum(self.layer_ns(m, i) for i in m["layer_us"]) for m in models])
        w = np.asarray([1.0 / (m["cpu_ms"] * 1e6) for m in models])
        self.rest, _ = nnls(x * w[:, None], y * w)
        return self

    def predict_ms(self, m) -> float:
        layers = sum(self.layer_ns(m, i) for i in kernel_dataset.mac_layers(m["works"]))
        return (layers + float(self.rest @ rest_vector(m))) * 1e-6


class LayerFit(PerLayerFit):
    name = "layer"

    def fit_layers(self, models, prec):
        from scipy.optimize import nnls

        names = [k for k in cost.FEATURES if k not in ("elementwise", "pool", "ops")]
        best = None
        for k_half in fit.K_HALF_GRID:
            x, y, w = [], [], []
            for m in models:
                f = features(m["works"], prec, k_half)
                for i, us in m["layer_us"].items():
                    x.append([f[i][k] for k in names])
                    y.append(us * 1e3)
                    w.append(1.0 / (m["cpu_ms"] * 1e6))  # a layer's miss counts by its share of its network
            x, y, w = np.asarray(x), np.asarray(y), np.asarray(w)
            scale = np.abs(x * w[:, None]).max(axis=0)
            scale[scale == 0] = 1.0
            c, _ = nnls(x * w[:, None] / scale, y * w)
            c = c / scale
            score = float((np.abs(x @ c - y) * w).sum())
            if best is None or score < best[0]:
                best = (score, k_half, c)
        _, self.k_half, c = best
        self.coef = dict(zip(names, c, strict=True))

    def layer_ns(self, m, i) -> float:
        f = features([m["works"][i]], m["precision"], self.k_half)[0]
        return sum(f[k] * v for k, v in self.coef.items())


class KernelFit(PerLayerFit):
    """A regressor per kernel class (conv | pointwise | depthwise | gemm) of a layer's speed on its shape."""

    name = "kernel"

    def regressor(self):
        from sklearn.ensemble import GradientBoostingRegressor

        return GradientBoostingRegressor(n_estimators=300, max_depth=3, learning_rate=0.05, subsample=0.8,
                                         random_state=0, loss="huber")  # fmt: skip

    def fit_layers(self, models, prec):
        by_class: dict[str, tuple[list, list, list]] = {}
        for m in models:
            for i, us in m["layer_us"].items():
                w = m["works"][i]
                xs, ys, ws = by_class.setdefault(w.kind, ([], [], []))
                xs.append(shape_vector(w))
                ys.append(math.log(max(us, 0.05) / work_scale(w)))
                ws.append(us / (m["cpu_ms"] * 1e3))  # share of its network
        self.models = {k: self.regressor().fit(np.asarray(xs), np.asarray(ys), sample_weight=np.asarray(ws) + 0.01)
                       for k, (xs, ys, ws) in by_class.items()}  # fmt: skip

    def layer_ns(self, m, i) -> float:
        w = m["works"][i]
        reg = self.models.get(w.kind) or next(iter(self.models.values()))
        return float(math.exp(reg.predict(np.asarray([shape_vector(w)]))[0])) * work_scale(w) * 1e3


class PowerLawFit(KernelFit):
    """A power law per kernel class (log time linear in the log shape), which extrapolates where trees
    cannot: past the largest layer calibration timed, a tree predicts that layer's time."""

    name = "powerlaw"

    def regressor(self):
        from sklearn.linear_model import Ridge

        return Ridge(alpha=1e-3)


PREDICTORS = (NetworkFit, LayerFit, KernelFit, PowerLawFit)


def score(pred: list[float], measured: list[float]) -> dict:
    rel = np.abs(np.asarray(pred) / np.asarray(measured) - 1.0)
    return {"n": len(rel), "within_10pct": round(float((rel <= 0.10).mean()), 3),
            "within_15pct": round(float((rel <= 0.15).mean()), 3), "mape_pct": round(float(rel.mean() * 100), 1)}  # fmt: skip


def evaluate(models: list[dict]) -> dict:
    out: dict = {}
    for prec in ("fp32", "int8"):
        calib = [m for m in models if m["precision"] == prec and m["group"].startswith("calibration") and not m["unmatched"]]
        scored = [m for m in models if m["precision"] == prec and not m["group"].startswith("calibration")]
        families = sorted({m["group"] for m in calib})
        for cls in PREDICTORS:
            p = cls().fit(calib, prec)
            row = {"precision": prec, "predictor": cls.name, "networks": len(calib),
                   "node_overhead_us": round(calib[0]["node_overhead_us"], 3) if calib else None}
            for group in dict.fromkeys(m["group"] for m in scored):
                mine = [m for m in scored if m["group"] == group]
                row[group] = score([p.predict_ms(m) for m in mine], [m["wall_ms"] for m in mine])
                row[group]["errors_pct"] = {m["model"]: round(100 * (p.predict_ms(m) / m["wall_ms"] - 1), 1) for m in mine}
            # leave one calibration family out: what to expect on an architecture the fit has not seen
            held = []
            for fam in families:
                q = cls().fit([m for m in calib if m["group"] != fam], prec)
                held += [abs(q.predict_ms(m) / m["cpu_ms"] - 1) for m in calib if m["group"] == fam]
            row["held_out_family_mape_pct"] = round(100 * float(np.mean(held)), 1)
            row["calibration_in_sample"] = score([p.predict_ms(m) for m in calib], [m["cpu_ms"] for m in calib])
            out[f"{prec} {cls.name}"] = row
            print(prec, cls.name, {g: (v["within_10pct"], v["mape_pct"]) for g, v in row.items() if isinstance(v, dict) and "n" in v},
                  "held-out", row["held_out_family_mape_pct"], flush=True)  # fmt: skip
    return out


def render(result: dict, source: str, tag: str = "") -> str:
    lines = ["# kernel_fit: where the latency model's error comes from", "",
             f"Fitted on the calibration-family networks of `{source}` (ORT per-node profile, 1 thread), scored on "
             f"the other models' measured 1-thread p50. Command: `python benchmarks/kernel_fit.py {source}"
             + (f" --tag {tag}" if tag else "") + "`.", "",
             "| precision | predictor | benchmark ±10% | benchmark MAPE | torchvision/timm ±15% | MAPE | held-out family MAPE | calibration in-sample ±10% |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in result.values():
        b = row.get("benchmark", {})
        t = row.get("torchvision/timm 224px", {})
        c = row["calibration_in_sample"]
        lines.append(f"| {row['precision']} | {row['predictor']} | {100 * b.get('within_10pct', 0):.0f}% | {b.get('mape_pct', '–')}% | "
                     f"{100 * t.get('within_15pct', 0):.0f}% | {t.get('mape_pct', '–')}% | {row['held_out_family_mape_pct']}% | "
                     f"{100 * c['within_10pct']:.0f}% |")  # fmt: skip
    overhead = {row["precision"]: row["node_overhead_us"] for row in result.values()}
    lines += ["", "Profiler cost per node subtracted from every node's time (median over the calibration networks of "
              "(sum of node times - CPU time) / nodes): " + ", ".join(f"{k} {v} us" for k, v in overhead.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--tag", default="", help="write results/kernel_fit_<tag>.* instead")
    args = parser.parse_args()
    if not args.dataset.is_file():
        parser.error(f"{args.dataset} does not exist; write it with benchmarks/kernel_dataset.py --out FILE")
    result = evaluate(load(args.dataset))
    stem = f"kernel_fit_{args.tag}" if args.tag else "kernel_fit"
    write_json(RESULTS / f"{stem}.json", {"dataset": str(args.dataset), "results": result})
    text = render(result, str(args.dataset), args.tag)
    atomic_write(RESULTS / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
