"""The cost model refitted on one recorded predictor_accuracy run, without timing anything again.

``python benchmarks/predictor_accuracy.py --dump FILE`` records what calibration timed (each fit
network's layers, 1-thread CPU time, wall time at 1 and N threads) and every benchmark model's layers
and timings. This script fits the *current* kernel and thread models to those calibration networks
exactly as ``hwkd profiles calibrate`` does and scores them on the benchmark models: how a change to
the model would have done on that run's measurements (docs/decisions-issue13.md, stop 17).

    python benchmarks/predictor_refit.py --dump /tmp/predictor_dump.json
    python benchmarks/predictor_refit.py --cross A.json B.json C.json   # fit on each run, score on each run
    python benchmarks/predictor_refit.py --direct-threads A.json B.json  # 2-thread fit vs 1-thread x thread model

``--cross`` separates the fit from the measurement: runs of the same seeded calibration networks, each
run's fit scored on every run's benchmark timings (docs/decisions-issue13.md, stop 18).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

from hwkd.artifacts import atomic_write, write_json
from hwkd.hardware import cost, fit
from hwkd.hardware.calibrate import input_align

RESULTS = Path(__file__).resolve().parent / "results"


def load_dump(path: Path) -> dict:
    """The JSON predictor_accuracy.py --dump wrote, with its layers as cost.LayerWork again."""
    raw = path.read_bytes()
    data = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)  # dumps may be gzipped (FILE.json.gz)
    for nets in data["calibration"].values():
        for net in nets:
            net["works"] = [cost.LayerWork(**w) for w in net["works"]]
    for model in data["models"]:
        model["works"] = [cost.LayerWork(**w) for w in model["works"]]
    return data


def host_profile(lanes: int, calibration: dict):
    """The built-in x86 profile with this host's vector width and the given ``[calibration]`` tables."""
    import dataclasses

    from hwkd.hardware.profiles import load_profile

    base = load_profile("x86-avx2")
    return dataclasses.replace(base, hardware=dataclasses.replace(base.hardware, vector_width=lanes),
                               calibration=calibration)  # fmt: skip


def kernel_fit(prec: str, rows: list[dict], measured: str = "fit_ms", threads: int = 1) -> tuple[dict, dict]:
    """The kernel model fitted to a dump's calibration networks of one precision, as calibration fits it,
    on the column ``measured`` of each row (``fit_ms``: calibration's own target)."""
    lanes = rows[0]["lanes"]
    return fit.fit_kernel_model([r["works"] for r in rows], [r[measured] for r in rows], rows[0]["tile"], lanes=lanes,
                                threads=threads, families=[r["family"] for r in rows],
                                input_align=input_align(prec, False, lanes))  # fmt: skip


def fitted_profiles(dump: dict) -> dict[str, tuple]:
    """Per precision: (profile with the kernel and thread models fitted to the dump's calibration
    networks exactly as ``hwkd profiles calibrate`` fits them, their fit statistics, threads)."""
    out = {}
    for prec, rows in dump["calibration"].items():
        works = [r["works"] for r in rows]
        families = [r["family"] for r in rows]
        lanes, threads = rows[0]["lanes"], rows[0]["threads"]
        model, stats = kernel_fit(prec, rows)
        fits = {"kernel_fit": stats}
        calibration = {"kernel_model": {prec: model}}
        if threads > 1:
            tm, fits["thread_fit"] = fit.fit_thread_model(
                works, [r["wall_1_ms"] for r in rows], [r["wall_n_ms"] for r in rows], model, threads, lanes, families
            )
            calibration["thread_model"] = {prec: tm}
        out[prec] = (host_profile(lanes, calibration), fits, threads)
    return out


def refit(dump: dict, scored_on: dict | None = None, profiles: dict | None = None) -> dict:
    """Per precision: the held-out errors of the fits and each benchmark model's estimate vs measurement.

    The fitted tables go into a profile and every estimate comes from ``cost.price``, the code path
    ``hwkd estimate`` takes. ``scored_on``: another run's dump whose benchmark timings are scored instead;
    ``profiles``: ``fitted_profiles(dump)`` when already computed.
    """
    out = {}
    for prec, (profile, fits, threads) in (profiles or fitted_profiles(dump)).items():
        entry = {**fits, "models": []}
        for m in (scored_on or dump)["models"]:
            if m["precision"] != prec:
                continue
            row = {"model": m["model"], "group": m["group"]}
            for n in sorted({1, threads}):
                row[f"t{n}"] = {"measured_ms": m[f"t{n}_ms"],
                                "estimated_ms": cost.price(m["works"], profile, prec, threads=n).latency_ms}  # fmt: skip
            entry["models"].append(row)
        out[prec] = entry
    return out


def summary(result: dict) -> list[dict]:
    rows = []
    for prec, entry in result.items():
        counts = [k for k in entry["models"][0] if k.startswith("t")]
        for t in counts:
            for group in dict.fromkeys(m["group"] for m in entry["models"]):
                mine = [m[t] for m in entry["models"] if m["group"] == group]
                rel = np.abs(np.array([m["estimated_ms"] / m["measured_ms"] - 1 for m in mine]))
                rows.append({"threads": int(t[1:]), "group": group, "precision": prec, "n": len(rel),
                             "within_10pct": round(float((rel <= 0.10).mean()), 3),
                             "within_15pct": round(float((rel <= 0.15).mean()), 3),
                             "mape_pct": round(float(rel.mean() * 100), 1)})  # fmt: skip
    return sorted(rows, key=lambda r: (r["threads"], r["group"], r["precision"]))


def cross(paths: list[Path]) -> dict:
    """Benchmark models within ±10% when each run's fit is scored on each run's timings."""
    dumps = [load_dump(p) for p in paths]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for fit_path, fitted in zip(paths, dumps, strict=True):
        profiles = fitted_profiles(fitted)  # fitted once, scored on every run
        for score_path, scored in zip(paths, dumps, strict=True):
            for r in summary(refit(fitted, scored, profiles)):
                if r["group"] == "benchmark":
                    key = f"{r['precision']} {r['threads']}"
                    table.setdefault(key, {}).setdefault(str(fit_path), {})[str(score_path)] = r["within_10pct"]
    return table


def direct_threads(paths: list[Path]) -> list[dict]:
    """The 2-thread estimate three ways, per dump, precision and model group: the current 1-thread kernel
    model x thread model; a kernel model fitted directly on the 2-thread wall times (priced as if at one
    thread, so no thread model applies); and that fit with the older single-grain thread scaling."""
    rows = []
    for path in paths:
        dump = load_dump(path)
        current = fitted_profiles(dump)
        for prec, nets in dump["calibration"].items():
            lanes, threads = nets[0]["lanes"], nets[0]["threads"]
            direct = {variant: host_profile(lanes, {"kernel_model": {prec: kernel_fit(prec, nets, "wall_n_ms", fit_threads)[0]}})
                      for variant, fit_threads in (("direct", 1), ("direct_grain", threads))}  # fmt: skip
            errors: dict[str, list[list[float]]] = {}
            for m in dump["models"]:
                if m["precision"] != prec:
                    continue
                est = [cost.price(m["works"], current[prec][0], prec, threads=threads).latency_ms,
                       cost.price(m["works"], direct["direct"], prec, threads=1).latency_ms,
                       cost.price(m["works"], direct["direct_grain"], prec, threads=threads).latency_ms]  # fmt: skip
                errors.setdefault(m["group"], []).append([abs(e / m["t2_ms"] - 1) for e in est])
            for group, errs in errors.items():
                a = np.asarray(errs)
                rows.append({"dump": path.name, "precision": prec, "group": group, "n": len(errs),
                             **{f"{v}_within_10pct": round(float((a[:, i] <= 0.10).mean()), 2)
                                for i, v in enumerate(("current", "direct", "direct_grain"))},
                             **{f"{v}_mape_pct": round(float(a[:, i].mean() * 100), 1)
                                for i, v in enumerate(("current", "direct", "direct_grain"))}})  # fmt: skip
    return rows


def render_cross(table: dict, paths: list[Path]) -> str:
    cols = " / ".join(p.name for p in paths)
    lines = ["# predictor_refit --cross", "",
             "Benchmark models within ±10%: each run's calibration fitted, scored on each run's timings. Command: "
             f"`python benchmarks/predictor_refit.py --cross {' '.join(map(str, paths))}`.", "",
             "| precision, threads | fit on | scored on " + cols + " |", "|---|---|---|"]  # fmt: skip
    for key, rows in table.items():
        for fit_path, cells in rows.items():
            lines.append(f"| {key} | {Path(fit_path).name} | "
                         + " / ".join(f"{100 * cells[str(p)]:.0f}%" for p in paths) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def render(result: dict, rows: list[dict], source: str) -> str:
    lines = ["# predictor_refit", "",
             f"The current cost model fitted to the calibration networks recorded in `{source}` and scored on "
             "that run's benchmark models (nothing re-timed). Command: `python benchmarks/predictor_refit.py "
             f"--dump {source}`.", "",
             "| threads | models | precision | n | within ±10% | within ±15% | MAPE |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['threads']} | {r['group']} | {r['precision']} | {r['n']} | {100 * r['within_10pct']:.0f}% | "
                     f"{100 * r['within_15pct']:.0f}% | {r['mape_pct']}% |")  # fmt: skip
    lines += ["", "Held-out (leave-one-family-out) MAPE of the fits on the calibration networks:", ""]
    for prec, entry in result.items():
        k = entry["kernel_fit"]
        t = entry.get("thread_fit", {})
        lines.append(f"- {prec}: kernel model {k.get('cv_mape_pct')}% (per family {k.get('held_out_family_mape_pct')})"
                     + (f"; thread model {t.get('cv_mape_pct')}%" if t else ""))  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, help="a predictor_accuracy.py --dump file")
    parser.add_argument("--cross", type=Path, nargs="+", help="several dumps: every run's fit on every run's timings")
    parser.add_argument("--direct-threads", type=Path, nargs="+",
                        help="several dumps: the 2-thread estimate from a kernel model fitted at 2 threads vs today's")
    args = parser.parse_args()
    if args.direct_threads:
        rows = direct_threads(args.direct_threads)
        write_json(RESULTS / "predictor_refit_direct_threads.json", {"dumps": [str(p) for p in args.direct_threads], "rows": rows})
        head = ["dump", "precision", "group", "n", "current_within_10pct", "direct_within_10pct", "direct_grain_within_10pct",
                "current_mape_pct", "direct_mape_pct", "direct_grain_mape_pct"]  # fmt: skip
        text = "\n".join(["# predictor_refit --direct-threads", "", "2-thread estimates of the benchmark models: today's "
                          "1-thread kernel model x thread model (current) against a kernel model fitted on the 2-thread "
                          "wall times (direct; direct_grain: with the older single-grain scaling). Command: `python "
                          f"benchmarks/predictor_refit.py --direct-threads {' '.join(str(p) for p in args.direct_threads)}`.", "",
                          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]) + "\n"  # fmt: skip
        atomic_write(RESULTS / "predictor_refit_direct_threads.md", text)
        print(text)
        return 0
    if args.cross:
        missing = [str(p) for p in args.cross if not p.is_file()]
        if missing:
            parser.error(f"--cross: {', '.join(missing)} do not exist; write them with predictor_accuracy.py --dump")
        table = cross(args.cross)
        write_json(RESULTS / "predictor_refit_cross.json", {"dumps": [str(p) for p in args.cross], "within_10pct": table})
        text = render_cross(table, args.cross)
        atomic_write(RESULTS / "predictor_refit_cross.md", text)
        print(text)
        return 0
    if args.dump is None:
        parser.error("give --dump FILE (or --cross FILE ...)")
    if not args.dump.is_file():
        parser.error(f"--dump {args.dump} does not exist; write one with predictor_accuracy.py --dump")
    dump = load_dump(args.dump)
    result = refit(dump)
    rows = summary(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "predictor_refit.json", {"source": str(args.dump), "summary": rows, "per_precision": result},
               )  # fmt: skip
    text = render(result, rows, str(args.dump))
    atomic_write(RESULTS / "predictor_refit.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
