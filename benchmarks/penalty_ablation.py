"""Does the budget penalty in the loss help? Same budget, penalty on vs off, 3 seeds.

Both arms run the whole default pipeline on the embedded default (digits, built-in teacher, MobileNetV2
student, profile jetson, its latency budget of 15% of the teacher): distillation, budget-driven pruning
with KD recovery, QAT, export and benchmark, with default epochs. Only ``distill.penalty_weight`` and
``prune.penalty_weight`` differ (0 = off). The figures are accuracy at the final *measured* latency
(onnxruntime p50 on this host), the accuracy right after pruning (where the penalty should matter:
the channels it drove down are the ones pruned), and which layers each arm pruned.

    python benchmarks/penalty_ablation.py                 # ~15 min on an idle 2-core host
    python benchmarks/penalty_ablation.py --seeds 0 --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hwkd import api
from hwkd.artifacts import atomic_write, write_json
from hwkd.onnx import bench as ortbench

RESULTS = Path(__file__).resolve().parent / "results"


def settings(quick: bool) -> dict:
    """The defaults, except for a shorter benchmark (and, with --quick, one epoch per stage)."""
    out: dict = {"bench": {"iterations": 100, "warmup": 10, "rounds": 3}}
    if quick:
        out.update(teacher={"epochs": 3}, distill={"epochs": 1}, prune={"recovery_epochs": 1}, qat={"epochs": 1})
        out["export"] = {"min_top1_agreement": 0.9}
    return out


def run_one(seed: int, weight: float, budget: str, quick: bool, root: Path) -> dict:
    overrides = settings(quick)
    overrides["seed"] = seed
    overrides["distill"] = {**overrides.get("distill", {}), "penalty_weight": weight}
    overrides["prune"] = {**overrides.get("prune", {}), "penalty_weight": weight}
    t0 = time.time()
    result = api.compress(
        "jetson", out=root / f"s{seed}-w{weight:g}", overrides=overrides, latency_budget=budget or None
    )
    rep = result.report
    final, prune = rep["final"], next(s for s in rep["stages"] if s["name"] == "prune")
    distill = next(s for s in rep["stages"] if s["name"] == "distill")
    penalties = [row.get("penalty") for row in distill["history"] if "penalty" in row]
    return {
        "seed": seed,
        "penalty_weight": weight,
        "accuracy": final["accuracy"],
        "distill_accuracy": distill["accuracy"],
        "prune_accuracy": prune["accuracy"],
        "channels_after_prune": prune["details"].get("channels_after"),
        "measured_latency_ms": final["measured_latency_ms"],
        "teacher_measured_latency_ms": rep["teacher"]["measured_latency_ms"],
        "estimated_latency_ms": final["estimated_latency_ms"],
        "budget_latency_ms": rep["budget"]["latency_ms"],
        "budget_met": prune["details"].get("budget_met"),
        "prune_steps": len(prune["history"]),
        "params": final["params"],
        "distill_penalty_history": penalties,
        "seconds": round(time.time() - t0, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weight", type=float, default=1.0, help="penalty weight of the 'on' arm")
    parser.add_argument("--budget", default="", help="latency budget for both arms (default: the profile's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tag", default="", help="write results/penalty_ablation_<tag>.* instead")
    args = parser.parse_args()
    started = time.time()
    runs = []
    with tempfile.TemporaryDirectory(prefix="hwkd-ablation-") as tmp:
        for seed in args.seeds:
            for weight in (args.weight, 0.0):
                print(f"seed {seed}, penalty weight {weight:g} ...", flush=True)
                runs.append(run_one(seed, weight, args.budget, args.quick, Path(tmp)))
                print(f"  {runs[-1]}", flush=True)
                # written after every run, so a run cut short still leaves what it measured
                save(summarize(args, runs, started, partial=True), args.tag)
    save(summarize(args, runs, started, partial=False), args.tag)
    print(render(summarize(args, runs, started, partial=False)))
    return 0


def save(result: dict, tag: str = "") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"penalty_ablation_{tag}" if tag else "penalty_ablation"
    write_json(RESULTS / f"{stem}.json", result)
    atomic_write(RESULTS / f"{stem}.md", render(result))


def summarize(args, runs: list[dict], started: float, partial: bool) -> dict:
    arms = {}
    for label, weight in (("penalty on", args.weight), ("penalty off", 0.0)):
        rs = [r for r in runs if r["penalty_weight"] == weight]
        if not rs:
            continue
        arms[label] = {
            "accuracy_mean": round(statistics.mean(r["accuracy"] for r in rs), 4),
            "accuracy_per_seed": [round(r["accuracy"], 4) for r in rs],
            "prune_accuracy_mean": round(statistics.mean(r["prune_accuracy"] for r in rs), 4),
            "prune_accuracy_per_seed": [round(r["prune_accuracy"], 4) for r in rs],
            "distill_accuracy_mean": round(statistics.mean(r["distill_accuracy"] for r in rs), 4),
            "measured_latency_ms_mean": round(statistics.mean(r["measured_latency_ms"] for r in rs), 4),
            "estimated_latency_ms_mean": round(statistics.mean(r["estimated_latency_ms"] for r in rs), 4),
            "budget_met": [r["budget_met"] for r in rs],
        }
    paired = [
        (on["accuracy"], off["accuracy"])
        for on in runs
        for off in runs
        if on["seed"] == off["seed"] and on["penalty_weight"] == args.weight and off["penalty_weight"] == 0.0
    ]
    delta = statistics.mean(a - b for a, b in paired) if paired else None
    paired_prune = [
        (on["prune_accuracy"], off["prune_accuracy"])
        for on in runs
        for off in runs
        if on["seed"] == off["seed"] and on["penalty_weight"] == args.weight and off["penalty_weight"] == 0.0
    ]
    delta_prune = statistics.mean(a - b for a, b in paired_prune) if paired_prune else None
    return {
        "benchmark": "penalty_ablation",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "host": ortbench.host_info(),
        "budget": args.budget,
        "settings": settings(args.quick),
        "arms": arms,
        "accuracy_delta_points": None if delta is None else round(100 * delta, 2),
        "prune_accuracy_delta_points": None if delta_prune is None else round(100 * delta_prune, 2),
        "seeds_completed": sorted({r["seed"] for r in runs}),
        "partial": partial,
        "total_seconds": round(time.time() - started, 1),
        "runs": runs,
    }


def render(r: dict) -> str:
    h = r["host"]
    lines = [
        "# penalty_ablation",
        "",
        f"Command: `python benchmarks/{r['command']}`. Embedded default (digits, jetson profile), latency "
        f"budget {r['budget'] or 'of the profile (15% of the teacher)'}, the default pipeline in both arms. "
        f"Host: {h['cpu']}, 1-min load average at the end {h['load_average_1min']}; {r['total_seconds']} s in all.",
        "",
        "| arm | final accuracy (mean) | per seed | after pruning (mean) | per seed | after distill (mean) "
        "| measured p50 ms (mean) | estimated ms (mean) | budget met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, a in r["arms"].items():
        lines.append(
            f"| {label} | {100 * a['accuracy_mean']:.2f}% | "
            f"{', '.join(f'{100 * x:.1f}' for x in a['accuracy_per_seed'])} | {100 * a['prune_accuracy_mean']:.2f}% | "
            f"{', '.join(f'{100 * x:.1f}' for x in a['prune_accuracy_per_seed'])} | "
            f"{100 * a['distill_accuracy_mean']:.2f}% | {a['measured_latency_ms_mean']:.3f} | "
            f"{a['estimated_latency_ms_mean']:.3f} | {a['budget_met']} |"
        )
    if r["accuracy_delta_points"] is not None:
        lines += ["", f"Penalty on minus off, paired by seed: {r['accuracy_delta_points']:+.2f} points final, "
                      f"{r['prune_accuracy_delta_points']:+.2f} points right after pruning."]
        lines += ["", "Channels per layer after pruning (seed, arm):", ""]
        for run in r["runs"]:
            arm = "on" if run["penalty_weight"] else "off"
            chans = run.get("channels_after_prune") or {}
            lines.append(f"- seed {run['seed']}, penalty {arm}: " + ", ".join(f"{v}" for v in chans.values()))
    if r["partial"]:
        lines += ["", f"**Partial**: only seeds {r['seeds_completed']} finished when this was written."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
