"""Does hwkd bench's speed-change warning (timing rounds' p50s more than 10% apart) mark the p50s that do not repeat?

    python benchmarks/bench_round_spread.py --repeats 6     # ~10 min alone; results/bench_round_spread.{json,md}

Three models of different run times are timed together, as ``hwkd bench a b c`` times them (hwkd.api.benchmark:
20 warm-up runs, 5 interleaved rounds), ``--repeats`` times at 1 and at 2 intra-op threads and in two arms: its
default 200 runs, and ``--duration 10s`` (10 s per model), calls alternating. For each arm, model and thread count:
how often a call warned, and how far a call's p50 lay from the median p50 of its calls, for calls that warned and
calls that did not; the spread of the p50s across calls, and of each model's p50 ratio to the first model timed in
the same call. The warning says the p50 may not repeat and advises timing longer or reading ratios: each part is
checked here. Run it alone: other work on the host is what it detects.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from hwkd import api  # noqa: E402
from hwkd.artifacts import atomic_write, write_json  # noqa: E402
from hwkd.onnx import bench as ortbench  # noqa: E402
from hwkd.onnx.export import export_onnx  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INT8 = ROOT / "benchmarks" / "results" / "cifar10" / "e30" / "rpi4_int8.onnx"


def build_models(tmp: Path) -> dict[str, Path]:
    """The committed CIFAR-10 INT8 model, a CIFAR ResNet-20 and torchvision's ResNet-18 at 224 px (FP32, random
    weights: run time does not depend on the values)."""
    import torchvision

    from hwkd.models.zoo import ZOO

    torch.manual_seed(0)
    models = {"cifar10 INT8 (e30 rpi4, 32 px)": INT8}
    for name, net, shape in (
        ("resnet20 FP32, 32 px", ZOO.get("resnet20")(num_classes=10, in_channels=3, width=1.0), (1, 3, 32, 32)),
        ("torchvision resnet18 FP32, 224 px", torchvision.models.resnet18(weights=None), (1, 3, 224, 224)),
    ):
        path = tmp / (name.split(",")[0].replace(" ", "_") + ".onnx")
        export_onnx(net.eval(), torch.randn(*shape), path, {}, name=name.split(",")[0])
        models[name] = path
    return models


ARMS = {"200 runs": {"iterations": 200}, "10 s": {"duration": "10s"}}


def _range_pct(values: list[float]) -> float:
    return round(100 * (max(values) - min(values)) / statistics.median(values), 1)


def summarise(calls: list[dict], names: list[str], threads: list[int]) -> list[dict]:
    rows = []
    for arm in dict.fromkeys(c["arm"] for c in calls):
        for name in names:
            for t in threads:
                mine = [c["models"][name] for c in calls if c["threads"] == t and c["arm"] == arm]
                mid = statistics.median(m["p50"] for m in mine)
                dev = {w: [abs(m["p50"] / mid - 1) * 100 for m in mine if m["warned"] is w] for w in (True, False)}
                rows.append({
                    "arm": arm, "model": name, "threads": t, "calls": len(mine), "median_p50_ms": round(mid, 4),
                    "p50_range_pct": _range_pct([m["p50"] for m in mine]),
                    "ratio_range_pct": None if name == names[0] else _range_pct([m["p50_ratio"] for m in mine]),
                    "median_round_spread_pct": round(statistics.median(m["round_spread_pct"] for m in mine), 1),
                    "warned": sum(m["warned"] for m in mine),
                    "dev_warned_pct": round(statistics.median(dev[True]), 1) if dev[True] else None,
                    "dev_unwarned_pct": round(statistics.median(dev[False]), 1) if dev[False] else None,
                    "max_dev_unwarned_pct": round(max(dev[False]), 1) if dev[False] else None,
                })  # fmt: skip
    return rows


def _cell(v) -> str:
    return "–" if v is None else str(v)


def markdown(result: dict) -> str:
    lines = [
        "# Does the speed-change warning mark the p50s that do not repeat?",
        "",
        f"`{result['command']}` on {result['host']['cpu']} ({result['host']['usable_cores']} cores), "
        f"{result['wall_s']:.0f} s. Each call times the three models together as `hwkd bench` does (5 interleaved "
        f"rounds; arm \"200 runs\": its default, \"10 s\": `--duration 10s`); a call warns when a model's round "
        f"p50s are more than {result['threshold_pct']:.0f}% apart. p50 range: (max - min) / median over the calls; "
        "ratio range: the same for the model's p50 / the first model's p50 in the same call. Deviation: |call p50 / "
        "median p50 - 1|, median over the calls that warned / did not (max).",
        "",
        "| arm | model | threads | calls | median p50 ms | p50 range % | ratio range % | median round spread % "
        "| warned | dev. warned % | dev. not warned % (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        unwarned = "–" if r["dev_unwarned_pct"] is None else f"{r['dev_unwarned_pct']} ({r['max_dev_unwarned_pct']})"
        lines.append(
            f"| {r['arm']} | {r['model']} | {r['threads']} | {r['calls']} | {r['median_p50_ms']} | "
            f"{r['p50_range_pct']} | {_cell(r['ratio_range_pct'])} | {r['median_round_spread_pct']} | {r['warned']} | "
            f"{_cell(r['dev_warned_pct'])} | {unwarned} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=6, help="calls per arm and thread count")
    ap.add_argument("--arms", default=",".join(ARMS), help="which arms, comma-separated")
    ap.add_argument("--tag", default="", help="suffix of the results files")
    args = ap.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    threads = [1, 2]
    t0 = time.time()
    calls = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp))
        names = list(models)
        for rep in range(args.repeats):
            for arm in arms:
                for t in threads:
                    rec = api.benchmark([str(p) for p in models.values()], threads=t, **ARMS[arm])
                    by_path = {r["model"]: r for r in rec["results"]}
                    warned = " ".join(rec["warnings"])
                    call = {"repeat": rep, "arm": arm, "threads": t, "models": {}}
                    for name, path in models.items():
                        row = by_path[str(path)]
                        call["models"][name] = {"p50": row["latency_ms"]["p50"], "p50_ratio": row["p50_ratio"],
                                                "round_p50": row["round_p50"], "round_spread_pct": row["round_spread_pct"],
                                                "warned": f"{path}:" in warned}  # fmt: skip
                    calls.append(call)
                    print(f"repeat {rep} {arm} threads {t}: " + ", ".join(
                        f"{m['p50']:.3f} ms ({m['round_spread_pct']:.0f}%{' W' if m['warned'] else ''})"
                        for m in call["models"].values()), flush=True)  # fmt: skip
    result = {
        "command": "python benchmarks/bench_round_spread.py " + " ".join(sys.argv[1:]),
        "host": ortbench.host_info(), "threshold_pct": ortbench.ROUND_SPREAD_WARN_PCT, "arms": arms,
        "wall_s": round(time.time() - t0, 1), "rows": summarise(calls, names, threads), "calls": calls,
    }  # fmt: skip
    stem = "bench_round_spread" + (f"_{args.tag}" if args.tag else "")
    write_json(RESULTS / f"{stem}.json", result)
    atomic_write(RESULTS / f"{stem}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
