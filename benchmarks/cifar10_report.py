"""Markdown + Pareto plot of ``benchmarks/cifar10.py``'s results (only what was measured; gaps say so)."""

from __future__ import annotations

from pathlib import Path


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _ms(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _k(v) -> str:
    return "–" if v is None else f"{v / 1e3:.1f}k"


def _m(v) -> str:
    return "–" if v is None else f"{v / 1e6:.2f}M"


def header(r: dict) -> list[str]:
    meta = r["meta"]
    quick = meta["protocol"] == "quick"
    h = meta["host"]
    s = meta["settings"]
    lines = [
        f"# CIFAR-10 benchmark — {'QUICK protocol (a smoke run on a subset, NOT the benchmark)' if quick else 'full protocol'}",
        "",
        "Commands (each invocation adds its steps to the same results; earlier steps are kept):",
        "",
        *([f"    {inv['command']}    # {inv.get('started_utc', '')} UTC" for inv in meta.get("invocations", [])]
          or [f"    {meta['command']}"]),
        "",
        f"Host: {h.get('cpu')}, {h.get('usable_cores', '?')} cores (load average "
        f"{h.get('load_average_1min')} at the start of the newest invocation), torch {meta['torch']}, {meta['threads']} torch thread(s)"
        f"{', training on ' + meta['device'] if 'device' in meta else ''}. "
        "Latencies are onnxruntime p50 at batch 1 on this host, interleaved rounds; treat them as ratios.",
        "",
        "**Protocol.** Data: the 50,000 CIFAR-10 training JPEGs, split once (seed 14, stratified) into train "
        "45,000 / val 2,500 / test 2,500 (`benchmarks/results/cifar10/split_*.txt`)"
        + (f"; this quick run uses the first {s['per_class']} images per class of each split" if quick else "")
        + ". Teacher: zoo `resnet20` trained on train only"
        + (f" (`{r['teacher']['file']}`, {r['teacher'].get('epochs')} epochs)" if (r.get("teacher") or {}).get("file") else "")
        + ". Student: zoo "
        f"`{s['student'][0]}` width {s['student'][1]} (hwkd's default). KD table: {(r.get('kd') or {}).get('epochs') or s['kd_epochs']} epochs, seeds "
        f"{(r.get('kd') or {}).get('seeds_done') or s['kd_seeds']}, random crop 32 pad 4 + flip, batch 128, lr {s['kd_lr']} cosine with 1 warm-up epoch. "
        f"Pipeline: `hwkd compress` through the CLI, profiles {list(r.get('pipeline') or s['profiles'])}"
        + (f", with `--set {' --set '.join(s['hwkd_sets'])}`" if s["hwkd_sets"] else ", hwkd's defaults")
        + f". Hardware-aware vs peer: profile {s['hw_profile']}, budgets "
        f"{[int(b) for b in (r.get('hw') or {}).get('budgets', {})] or s['budgets']}% of the teacher.",
        "",
        *cost_lines(r),
        "",
    ]
    return lines


def cost_lines(r: dict) -> list[str]:
    """The protocol's cost as run: every run the results hold, summed per step (``run_costs``), and the newest
    invocation's own walls, which alone would say nothing of the sessions before it."""
    meta = r["meta"]
    costs = run_costs(r)
    total = sum(seconds for _, seconds in costs.values())
    ledger = ", ".join(f"{step} {seconds / 3600:.2f} h ({n} run{'s' if n != 1 else ''})"
                       for step, (n, seconds) in costs.items())  # fmt: skip
    return [
        "**Measured cost** (this host; summed over the runs these results hold: each `hwkd compress` run by its "
        "stages' seconds, over every launch of a resumed run since stop 46, the last launch's before; the KD and "
        "plateau tables by their training loops' walls; each peer by its pruning and fine-tuning; runs that shared "
        "the host at once each count whole, at their own thread count; not counted: the hw step's latency grid and "
        f"re-timing, minutes per invocation): {ledger or '–'}; **{total / 3600:.2f} h in all**. The newest invocation of "
        "each step took: " + (", ".join(f"{k} {v:.0f} s" for k, v in meta.get("step_wall_s", {}).items()) or "–")
        + f"; this invocation {meta.get('wall_s_so_far', 0):.0f} s.",
    ]


def _stages_total(run: dict) -> float:
    """A ``hwkd compress`` run's stages' seconds (every launch of a resumed stage since stop 46)."""
    return sum(s.get("seconds") or 0.0 for s in run.get("stages") or [])


def _stage_seconds(run: dict) -> float:
    """A ``hwkd compress`` run's time: its stages' seconds, or its wall where it recorded no stages (a failed run)."""
    return _stages_total(run) if run.get("stages") else float(run.get("wall_s") or 0.0)


def _group_walls(walls: list[float], gap_s: float = 120.0) -> float:
    """The time of one seed's plateau runs. Methods trained together in one loop each record that loop's wall
    at their end (within seconds of each other); methods trained in another invocation record another loop's.
    Walls within ``gap_s`` of the previous are taken as one loop, counted once, at its longest."""
    total, last = 0.0, None
    for wall in sorted(walls):
        if last is not None and wall - last <= gap_s:
            total += wall - last
        else:
            total += wall
        last = wall
    return total


def run_costs(r: dict) -> dict[str, tuple[int, float]]:
    """Per step: how many runs the results hold and their summed seconds. A run standing in for another step's
    (``stand_in``) is that step's, and a peer shared by budgets (one model file) is counted once."""
    costs: dict[str, tuple[int, float]] = {}

    def add(step: str, seconds: float, n: int = 1) -> None:
        runs, total = costs.get(step, (0, 0.0))
        costs[step] = (runs + n, total + seconds)

    teacher = r.get("teacher") or {}
    if teacher.get("train_s"):
        add("teacher", teacher["train_s"])
    for step in ("pipeline", "small"):
        for run in (r.get(step) or {}).values():
            add(step, _stage_seconds(run))
    kd = r.get("kd") or {}
    if kd.get("wall_s"):
        add("kd", kd["wall_s"], n=sum(len(m) for m in (kd.get("runs") or {}).values()) or 1)
    for runs in plateau_seeds(r["plateau"]).values() if r.get("plateau") else ():
        add("plateau", _group_walls([x["wall_s"] for x in runs.values() if x.get("wall_s")]), n=len(runs))
    seen: set[str] = set()
    for row in ((r.get("hw") or {}).get("budgets") or {}).values():
        for key, run in row.items():
            ident = run.get("run_dir") or run.get("model")  # a row with neither is a run of its own
            if run.get("stand_in") or (ident and ident in seen):
                continue
            seen.add(ident)
            add("hw", _stage_seconds(run) if key.startswith("hwkd_") else float(run.get("wall_s") or 0.0))
    for pen in penalty_students(r.get("penalty")).values():
        for row in pen.get("budgets", {}).values():
            for run in row.values():
                add("penalty", _stage_seconds(run))
    return costs


def teacher_section(r: dict) -> list[str]:
    t = r.get("teacher")
    if not t:
        return []
    if not t.get("cached"):
        return ["## Teacher", "", f"{t.get('note')}; trained {t.get('train_s', 0):.0f} s.", ""]
    return [
        "## Teacher",
        "",
        "| arch | params | epochs | train time | val acc | test acc |",
        "|---|---|---|---|---|---|",
        f"| {t['arch']} | {t['params']} | {t['epochs']} | {t['train_s'] / 60:.1f} min ({t['recipe']['threads']} thread) "
        f"| {_pct(t['val_acc'])} | {_pct(t['test_acc'])} |",
        "",
        f"Recipe: {t['recipe']['optimizer']}, {t['recipe']['schedule']}, {t['recipe']['augmentation']}, batch "
        f"{t['recipe']['batch']}. Val accuracy per epoch: {', '.join(f'{100 * v:.1f}' for v in t['val_curve'])}."
        + (f" Re-planned: {t['replans']}." if t.get("replans") else ""),
        "",
    ]


def pipeline_section(r: dict, key: str = "pipeline") -> list[str]:
    """The default pipeline's runs, or (``key="small"``) the same with the student sized for the
    parameter goal."""
    p = r.get(key)
    title = {"pipeline": "Default pipeline", "small": "Pipeline with a student sized for the parameter goal"}[key]
    if not p:
        return [] if key == "small" else [f"## {title}", "", "Not run in this invocation.", ""]
    lines = [f"## {title} (`hwkd compress`, CLI)", ""]
    if key == "small":
        lines += ["The default pipeline with one change: `--student 0.3x --set prune.round_to=1`, the trained "
                  "teacher with 70% of every layer's channels removed by magnitude (weights kept, counts not "
                  "rounded to the profile's 8), so that the student starts under 10% of the teacher's parameters. "
                  "Runs made with `--jobs 2` shared the two cores, so their host p50s are not comparable with the other tables'.",
                  ""]  # fmt: skip
    lines += ["| profile | KD recipe | model | accuracy (test) | val | params | MACs | p50 ms (host) | est. ms (device) | wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    goals = []
    for prof, res in p.items():
        if res["returncode"] != 0:
            why = "stopped (interrupted, exit 130)" if res["returncode"] == 130 else f"failed (exit {res['returncode']})"
            lines.append(f"| {prof} | | {why} | | | | | | | {res['wall_s']:.0f} s |")
            continue
        for label in ("teacher", "final"):
            m = res[label]
            name = label if label == "teacher" else f"final ({m.get('precision')})"
            kd = (res.get("kd") or "–") if label == "final" else ""  # the teacher is not distilled
            lines.append(f"| {prof} | {kd} | {name} | {_pct(m['accuracy'])} | {_pct(m.get('val_accuracy'))} | "
                         f"{_k(m['params'])} | {_m(m['macs'])} | "
                         f"{_ms(m['measured_latency_ms'])} | {_ms(m['estimated_latency_ms'])} | "
                         f"{_run_wall(res)} |")  # fmt: skip
        t, f = res["teacher"], res["final"]
        if t["params"] and f["params"] and t["accuracy"] and f["accuracy"] is not None:
            red, keep = 1 - f["params"] / t["params"], f["accuracy"] / t["accuracy"]
            # the teacher's validation score: the run's own, else the cached teacher's (the same file)
            t_val = t.get("val_accuracy") or (r.get("teacher") or {}).get("val_acc")
            on_val = ""
            if t_val and f.get("val_accuracy") is not None:
                keep_val = f["val_accuracy"] / t_val
                on_val = f", {100 * keep_val:.1f}% on validation ({'met' if keep_val >= 0.95 else 'NOT met'})"
            goals.append(f"- {prof}: {100 * red:.1f}% fewer parameters (goal >= 90%: {'met' if red >= 0.9 else 'NOT met'}), "
                         f"{100 * keep:.1f}% of the teacher's accuracy on test (goal >= 95%: {'met' if keep >= 0.95 else 'NOT met'})"
                         f"{on_val}.")  # fmt: skip
    lines += ["", *goals, "", "Commands:", ""] + [f"    {res['command']}" for res in p.values()] + [""]
    return lines


def _run_wall(res: dict) -> str:
    """A run's wall; a resumed run's is its last launch only, so its stages' seconds are shown beside it
    (hwkd counts a resumed stage's earlier launches since stop 46; earlier runs' stages did not)."""
    if not res.get("resumed"):
        return f"{res['wall_s']:.0f} s"
    return f"{res['wall_s']:.0f} s (resumed: this launch; stages {_stages_total(res):.0f} s)"


def kd_section(r: dict) -> list[str]:
    k = r.get("kd")
    if not k:
        return ["## Distillation side by side", "", "Not run in this invocation.", ""]
    base = k["methods"]["student_alone"]["mean"]
    lines = [
        "## Distillation side by side",
        "",
        f"Student {k['student'][0]} width {k['student'][1]} ({k['student_params']} params), teacher test accuracy "
        f"{_pct(k['teacher_test_accuracy'])}; {k['epochs']} epochs, seeds {k['seeds_done']}, mean ± std over "
        f"seeds (test split). Wall {k['wall_s']:.0f} s. Base recipe: "
        + ", ".join(f"{a}={b}" for a, b in k["base_recipe"].items()) + ".",
        "",
        "| method | recipe | test accuracy | vs student alone | per seed |",
        "|---|---|---|---|---|",
    ]
    for name, m in sorted(k["methods"].items(), key=lambda kv: -kv[1]["mean"]):
        recipe = ", ".join(f"{a}={b}" for a, b in k["recipes"][name].items())
        lines.append(f"| {name} | {recipe} | {100 * m['mean']:.2f} ± {100 * m['std']:.2f} | "
                     f"{100 * (m['mean'] - base):+.2f} | {', '.join(f'{100 * s:.2f}' for s in m['seeds'])} |")  # fmt: skip
    lines += [
        "",
        f"Adaptive T minus fixed T=4: {k['adaptive_minus_T4_points']:+.2f} points. Best method: {k['best_method']}.",
        f"Student alone, val accuracy per epoch (per seed): {k['student_alone_val_curve']}; plateau epoch "
        f"(best val so far within 0.5 point of the run's best, 3 epochs after it; None: still climbing): "
        f"{k['student_alone_plateau_epoch']}.",
        "",
    ]
    return lines


def plateau_section(r: dict) -> list[str]:
    pl = r.get("plateau")
    if not pl:
        return []
    seeds = plateau_seeds(pl)
    lines = [f"## Trained long: the student alone, and KD, at {pl['epochs']} epochs (plateau)", "",
             f"{pl['student'][0]} width {pl['student'][1]}, seeds {', '.join(seeds)}, {pl['epochs']} epochs (the KD "
             "table's recipe, its cosine schedule over all epochs). Plateau: the first epoch whose best val accuracy "
             "so far is within 0.5 point of the run's best, with 3 epochs after it.", "",
             "A second reading of every run: its val accuracy after the last epoch (other images than test; every "
             "run keeps its last epoch, not its best on val, though the adaptive schedule reads the val loss to set "
             "its temperature); and a third, both splits together (the mean of the two, twice the images).", "",
             "| method | seed | test accuracy | vs student alone | val, last epoch | vs student alone (val) "
             "| vs student alone (both) | plateau epoch | wall |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for seed, runs in seeds.items():
        alone = runs.get("student_alone")
        for name, run in runs.items():
            diffs = [f"{100 * (metric(run, split) - metric(alone, split)):+.2f}" if alone and name != "student_alone"
                     else "–" for split in SPLITS]  # fmt: skip
            when = run["plateau_epoch"] or f"not within {pl['epochs']}"
            lines.append(f"| {name} | {seed} | {_pct(run['test_accuracy'])} | {diffs[0]} | {_pct(metric(run, 'val'))} | "
                         f"{diffs[1]} | {diffs[2]} | {when} | {run['wall_s']:.0f} s |")  # fmt: skip
    val_means, both_means = plateau_means(seeds, "val"), plateau_means(seeds, "both")
    for name, (mean, gains, n) in plateau_means(seeds).items():
        val_mean, val_gains, _ = val_means[name]
        lines.append(f"| **{name}, mean** | {n} seeds | {_pct(mean)} | {_gain(gains)} | {_pct(val_mean)} | "
                     f"{_gain(val_gains)} | {_gain(both_means[name][1])} | | |")  # fmt: skip
    lines += ["", *default_against_the_others(seeds, r.get("split", {}).get("counts", {}).get("test"))]
    lines += [f"Val accuracy per epoch, {name}, seed {seed}: {run['val_curve']}."
              for seed, runs in seeds.items() for name, run in runs.items()]  # fmt: skip
    lines += [f"Temperature per epoch, {name}, seed {seed}: {run['temperature_curve']}."
              for seed, runs in seeds.items() for name, run in runs.items() if run.get("temperature_curve")]  # fmt: skip
    return [*lines, ""]


def plateau_seeds(pl: dict) -> dict[str, dict]:
    """The plateau entry's runs by seed, whichever layout wrote it (``seeds``; one seed's ``runs``; the
    student alone only)."""
    if "seeds" in pl:
        return dict(sorted(pl["seeds"].items(), key=lambda kv: int(kv[0])))
    return {str(pl["seed"]): pl.get("runs") or {"student_alone": pl}}


SPLITS = ("test", "val", "both")


def default_against_the_others(seeds: dict[str, dict], test_images: int | None) -> list[str]:
    """Adaptive T (hwkd's default recipe from stop 17 to stop 47) minus every other KD method, paired by seed, on
    each reading: the question the default's choice rested on, in one table; its hinton_T4 row (fixed T=4, the
    default since stop 48) is the comparison that changed it."""
    others = [n for n in dict.fromkeys(n for runs in seeds.values() for n in runs)
              if n not in ("hinton_T_adaptive", "student_alone")]  # fmt: skip
    rows = []
    for name in others:
        paired = [paired_difference(seeds, "hinton_T_adaptive", name, split) for split in SPLITS]
        if paired[0]:
            rows.append(f"| {name} | " + " | ".join(f"{m:+.2f} (per seed {_signed(d)})" for m, d in paired) + " |")
    if not rows:
        return []
    image = f" One test image is {100 / test_images:.2f} point." if test_images else ""
    return ["Adaptive T (hwkd's default until stop 47) minus each other method, paired by seed (points; positive: "
            f"adaptive T ahead; hinton_T4 is hwkd's default recipe since stop 48).{image}", "", "| adaptive T minus | test | val, last epoch | both splits |", "|---|---|---|---|",
            *rows, ""]  # fmt: skip


def metric(run: dict, split: str) -> float:
    """A plateau run's accuracy on ``split``: ``test`` (scored once, at the end), ``val`` (after the last epoch)
    or ``both`` (their mean; the protocol's two splits are the same size, so it is the accuracy on both)."""
    if split == "both":
        return (metric(run, "test") + metric(run, "val")) / 2
    return run["test_accuracy"] if split == "test" else run["val_curve"][-1]


def plateau_means(seeds: dict[str, dict], split: str = "test") -> dict[str, tuple[float, list[float], int]]:
    """Per method over the seeds that ran it: mean accuracy on ``split``, its gain over the student alone of
    the same seed (points, seeds with both only), and how many seeds. Only with two seeds or more."""
    names = list(dict.fromkeys(n for runs in seeds.values() for n in runs))
    means = {}
    for name in names:
        accs = [metric(runs[name], split) for runs in seeds.values() if name in runs]
        paired = paired_difference(seeds, name, "student_alone", split) if name != "student_alone" else None
        gains = paired[1] if paired else []
        if len(accs) >= 2:
            means[name] = (sum(accs) / len(accs), gains, len(accs))
    return means


def paired_difference(seeds: dict[str, dict], a: str, b: str, split: str = "test") -> tuple[float, list[float]] | None:
    """Method ``a`` minus method ``b`` in accuracy on ``split`` (points), per seed that ran both, and their mean."""
    diffs = [100 * (metric(runs[a], split) - metric(runs[b], split)) for runs in seeds.values() if a in runs and b in runs]
    return (sum(diffs) / len(diffs), diffs) if diffs else None


def _gain(gains: list[float]) -> str:
    """A mean gain in points with its per-seed values, or a dash where no seed has both runs."""
    return f"{sum(gains) / len(gains):+.2f} (per seed {_signed(gains)})" if gains else "–"


def _signed(points: list[float]) -> str:
    """Per-seed differences in points, signed, comma-separated: "+1.44, -0.12"."""
    return ", ".join(f"{d:+.2f}" for d in points)


def budgets_in_order(budgets: dict) -> list[tuple[str, dict]]:
    """``budgets.items()`` from the smallest budget up (the dict keeps the order invocations added them in)."""
    return sorted(budgets.items(), key=lambda kv: int(kv[0]))


def _scores(x: dict) -> tuple[float | None, float | None]:
    """A run's final (or a peer's) accuracy on the test split and, where it was read, on the validation split."""
    m = x.get("final", x) if x and x.get("returncode", 0) == 0 else {}
    return m.get("accuracy"), m.get("val_accuracy")


def _with_val(test: float | None, val: float | None) -> str:
    return _pct(test) + (f" (val {_pct(val)})" if val is not None else "")


def _difference(a: dict, b: dict) -> str:
    """a − b in points on test and, where both were read on it, on validation: a margin one split shows alone."""
    (ta, va), (tb, vb) = _scores(a), _scores(b)
    if ta is None or tb is None:
        return "–"
    return f"{100 * (ta - tb):+.2f}" + (f" (val {100 * (va - vb):+.2f})" if va is not None and vb is not None else "")


def hw_section(r: dict, plot: Path) -> list[str]:
    hw = r.get("hw")
    if not hw or not hw.get("budgets"):
        return ["## Hardware-aware vs the peer pipeline", "", "Not run in this invocation.", ""]
    lines = [
        "## Hardware-aware vs the peer pipeline",
        "",
        f"Profile {hw['profile']}. hwkd: `hwkd compress --latency-budget B%`, with `--student S` where the budget names one (penalty on = defaults: the `cost` penalty target in runs before stop 38, the `mask` target since; off = "
        "`--set distill.penalty_weight=0 --set prune.penalty_weight=0`). Peer: the teacher pruned uniformly "
        "by torch-pruning's MagnitudePruner to hwkd's (penalty on) measured latency (the least pruning on the grid "
        "that reaches it; where none does, the fastest grid point), fine-tuned with CE for the "
        "same epochs, onnxruntime quantize_static defaults. p50: every final model re-timed in the same "
        "interleaved rounds (since stop 40 at 1 thread, 2,000 runs a round; before, at every core, 200 a round).",
        "",
    ]
    plan = any("hwkd_penalty_plan" in row for row in hw["budgets"].values())  # --penalty-arms plan
    if plan:
        lines[2] += f" Plan: {PENALTY_ARM_NOTES['plan']}."
    lines += [
        "| budget | hwkd on: acc / p50 ms | hwkd off: acc / p50 ms | peer: ratio / acc / p50 ms | on − peer | on − off |"
        + (" hwkd plan: acc / p50 ms | plan − off |" if plan else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if plan else ""),
    ]
    for b, row in budgets_in_order(hw["budgets"]):
        on, off, pe = row.get("hwkd_penalty_on", {}), row.get("hwkd_penalty_off", {}), row.get("peer")

        def cell(x):
            if not x or x.get("returncode", 0) != 0:
                return "failed" if x else "–"
            return (f"{_with_val(*_scores(x))} / {_ms(x.get('paired_p50_ms'))}"
                    + (" (stand-in †)" if x.get("stand_in") else ""))  # fmt: skip

        d_peer = _difference(on, pe) if pe else "–"
        d_off = _difference(on, off)
        peer_cell = f"{pe['ratio']:.2f} / {cell(pe)}" if pe else "–"
        if pe and on.get("paired_p50_ms") and pe.get("paired_p50_ms") and pe["paired_p50_ms"] > on["paired_p50_ms"]:
            peer_cell += " (slower: no grid ratio reached hwkd's latency; the fastest grid point)"
        extra = ""
        if plan:
            pl = row.get("hwkd_penalty_plan", {})
            extra = f" {cell(pl)} | {_difference(pl, off)} |"
        student = f" (`--student {on['student']}`)" if on.get("student") else ""
        lines.append(f"| {b}%{student} | {cell(on)} | {cell(off)} | {peer_cell} | {d_peer} | {d_off} |{extra}")
    at_budget = [(b, row["peer_at_budget"], row.get("hwkd_penalty_on", {})) for b, row in budgets_in_order(hw["budgets"])
                 if row.get("peer_at_budget")]  # fmt: skip
    if at_budget:
        lines += ["", "The peer pruned to the budget itself (`--peer-at-budget`: the least pruning whose INT8 p50 is within "
                  "B% of the unpruned teacher's, as a user without hwkd would aim; same fine-tuning and quantization):", "",
                  "| budget | peer's budget ms | ratio | params | MACs | acc | p50 ms | hwkd on − this peer | latency, peer / hwkd |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for b, pb, on in at_budget:
            diff = _difference(on, pb)
            speed = (f"{pb['paired_p50_ms'] / on['paired_p50_ms']:.1f}x" if pb.get("paired_p50_ms") and on.get("paired_p50_ms")
                     else "–")  # fmt: skip
            lines.append(f"| {b}% | {_ms(pb['budget_ms'])} | {pb['ratio']:.2f} | {_k(pb['params'])} | {_m(pb['macs'])} | "
                         f"{_with_val(*_scores(pb))} | {_ms(pb.get('paired_p50_ms'))} | {diff} | {speed} |")  # fmt: skip
    stand_ins = sorted({f"{b}%: {x['stand_in']}" for b, row in hw["budgets"].items() for x in row.values()
                        if isinstance(x, dict) and x.get("stand_in")})  # fmt: skip
    if stand_ins:
        lines += ["", "† Not trained again: another step's run of the same computation stands in. Under a budget the "
                  "default student meets, the penalty's gate stays 0 and nothing is pruned, so penalty on and off are "
                  "the pipeline step's default run (`--stand-in-pipeline`); where the penalty step ran the default "
                  "student at the budget, its mask and off runs are the two arms (`--stand-in-penalty`). "
                  + "; ".join(stand_ins) + "."]  # fmt: skip
    if hw.get("peer_grid_ms"):
        grid = ", ".join(f"{k} {v:.3f}" for k, v in hw["peer_grid_ms"].items())
        lines += ["", f"Peer grid, INT8 p50 ms at batch 1 by pruning ratio (timed with hwkd's models): {grid}."]
    if plot.exists():
        lines += ["", f"![accuracy vs measured latency]({plot.name})"]
    return [*lines, ""]


PENALTY_ARM_NOTES = {
    "on": "penalty target `cost` (hwkd's default until stop 38, run as the default then; since then "
          "`--set distill.penalty_target=cost --set distill.penalty_start=0 --set prune.penalty_target=cost`)",
    "off": "`--set distill.penalty_weight=0 --set prune.penalty_weight=0`",
    "plan": "`--set distill.penalty_target=plan --set distill.penalty_start=0.3 --set prune.penalty_target=plan`",
    "mask": "`--set distill.penalty_target=mask --set distill.penalty_start=0.3 --set prune.penalty_target=mask`",
    "mask10": "`--set distill.penalty_target=mask --set distill.penalty_start=0.1 --set prune.penalty_target=mask`",
}


def penalty_key(arm: str, seed: int) -> str:
    """A penalty run's key in its budget's row: the arm for seed 0 (the layout before seeds), else arm_seedN."""
    return arm if seed == 0 else f"{arm}_seed{seed}"


def penalty_runs(row: dict) -> dict[tuple[str, int], dict]:
    """A penalty budget's runs by (arm, seed), the keys penalty_key wrote read back."""
    runs = {}
    for key, x in row.items():
        arm, _, seed = key.partition("_seed")
        runs[(x.get("arm", arm), int(x.get("seed", seed or 0)))] = x
    return runs


def penalty_students(entry: dict | None) -> dict[str, dict]:
    """The penalty step's results by student (``--penalty-student``); until stop 34 one student's entry alone."""
    if not entry:
        return {}
    if "student" in entry:
        return {entry["student"]: entry}
    return {student: dict(pen) for student, pen in entry.items()}


def penalty_section(r: dict) -> list[str]:
    """Penalty arms (on = cost target, off, plan target) for students that start over the budget (the
    ``penalty`` step), per student, budget and seed, each against off of the same seed; with several seeds,
    the mean."""
    return [line for pen in penalty_students(r.get("penalty")).values() for line in student_penalty_section(pen)]


def _paired_mean(pairs: list[tuple[dict, dict]]) -> str:
    """The arm − off mean over (arm, off) runs of the same seeds on test and, where every run of both was read on
    it, on the validation split."""
    scores = [(_scores(arm), _scores(off)) for arm, off in pairs]  # ((test, val), (test, val)) per seed
    test = [100 * (a[0] - o[0]) for a, o in scores]
    text = f"mean {sum(test) / len(test):+.2f} over {len(test)} seeds ({_signed(test)})"
    if any(a[1] is None or o[1] is None for a, o in scores):
        return text
    val = [100 * (a[1] - o[1]) for a, o in scores]
    return f"{text}, on validation {sum(val) / len(val):+.2f} ({_signed(val)})"


def student_penalty_section(pen: dict) -> list[str]:
    if not pen.get("budgets"):
        return []
    by_budget = {b: penalty_runs(row) for b, row in pen["budgets"].items()}
    arms = [a for a in PENALTY_ARM_NOTES if any(a == arm for runs in by_budget.values() for arm, _ in runs)]
    lines = [
        f"## Penalty on vs off where the budget binds: student {pen['student']}",
        "",
        f"Profile {pen['profile']}, `hwkd compress --student {pen['student']} --latency-budget B%` (seed N: `--seed N`); "
        "arms: " + "; ".join(f"{a} = {PENALTY_ARM_NOTES[a]}" for a in arms)
        + ". 1 thread each; p50: the final models re-timed in the same interleaved rounds. Code: the hwkd commit each "
        "run started on (then each resume's, if the code changed; blank: made before runs recorded it).",
        "",
        "| budget | seed | arm | final INT8 acc | params | MACs | est. ms (device) | p50 ms (host) | after distill | after prune "
        "| prune epochs | − off | code |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    means, repruned = [], []
    # rows timed by different invocations (finals since deleted are not re-timed) get a mark per timing
    timings = sorted({x.get("paired_p50_timed_at") or "" for runs in by_budget.values() for x in runs.values()
                      if x.get("paired_p50_ms") is not None})  # fmt: skip
    mark = {t: f" ({chr(ord('a') + i)})" for i, t in enumerate(timings)} if len(timings) > 1 else {}
    for b, runs in by_budget.items():
        ok = {k for k, x in runs.items() if x.get("returncode") == 0}
        for seed in sorted({s for _, s in runs}):
            for arm in arms:
                x = runs.get((arm, seed))
                if not x:
                    continue
                budget = (x.get("budget") or {}).get("latency_ms")
                if x.get("returncode") != 0:
                    lines.append(f"| {b}% | {seed} | {arm} | failed (exit {x.get('returncode')}) | | | | | | | | | |")
                    continue
                off = runs.get(("off", seed)) if ("off", seed) in ok else None
                diff = _difference(x, off) if arm != "off" and off is not None else ""
                f, stage = x["final"], {st["name"]: st.get("accuracy") for st in x["stages"]}
                epochs = {st["name"]: st.get("epochs") for st in x["stages"]}.get("prune")
                rep = x.get("reprune") or {}
                if rep.get("returncode") not in (None, 0):  # the row is still the arm's own run
                    repruned.append(f"{b}% seed {seed} {arm}: the re-prune failed (exit {rep['returncode']}), the row is "
                                    f"the arm's own run: `{rep['command']}`")  # fmt: skip
                if rep.get("before"):
                    repruned.append(f"{b}% seed {seed} {arm} was {_pct(rep['before']['accuracy'])} "
                                    f"({' → '.join(rep['before']['code']) or 'code not recorded'}): `{rep['command']}`")  # fmt: skip
                lines.append(f"| {b}% ({_ms(budget)} ms) | {seed} | {arm}{' (r)' if rep.get('before') else ''} | {_with_val(*_scores(x))} | {_k(f['params'])} | "
                             f"{_m(f['macs'])} | {_ms(f['estimated_latency_ms'])} | {_ms(x.get('paired_p50_ms'))}"
                             f"{mark.get(x.get('paired_p50_timed_at') or '', '') if x.get('paired_p50_ms') is not None else ''} | "
                             f"{_pct(stage.get('distill'))} | {_pct(stage.get('prune'))} | "
                             f"{'' if epochs is None else epochs} | {diff} | {' → '.join(x.get('code', []))} |")  # fmt: skip
        for arm in arms:
            pairs = [(runs[(a, s)], runs[("off", s)]) for a, s in sorted(ok, key=lambda k: k[1])
                     if a == arm != "off" and ("off", s) in ok]  # by seed
            if len(pairs) > 1:
                means.append(f"{b}% {arm} − off: {_paired_mean(pairs)}")
    if means:
        lines += ["", "Paired by seed: " + "; ".join(means) + "."]
    if repruned:
        lines += ["", "(r) re-pruned: the run's distilled student taken again through prune, QAT, export and bench on "
                  "later code (the code after \"prune on\"; `--penalty-reprune`), distillation kept. "
                  + "; ".join(repruned) + "."]  # fmt: skip
    if mark:
        lines += ["", "p50 timings: " + "; ".join(f"{m.strip()} {t or 'an earlier invocation (time not recorded)'}"
                                               for t, m in mark.items())
                  + ". Only p50s of one timing were measured in the same rounds; this host's speed differs between "
                  "sessions, so p50s of different timings are not comparable."]  # fmt: skip
    commands = [x["command"] for runs in by_budget.values() for x in runs.values() if x.get("command")]
    return [*lines, "", "Commands:", "", *(f"    {c}" for c in commands), ""]


def timing_threads(threads: set) -> str:
    """How the plotted p50s were timed: rows timed before stop 40 ran at every core and record no thread count."""
    if threads == {1}:
        return "1 thread"
    if len(threads) == 1 and None not in threads:
        return f"{threads.pop()} threads"
    return "thread counts differ or not recorded"


def plot_pareto(r: dict, path: Path) -> None:
    hw = r.get("hw")
    if not hw or not hw.get("budgets"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads: set = set()  # of the timings plotted
    series: dict[str, list[tuple[float, float, str]]] = {"hwkd (penalty on)": [], "hwkd (penalty off)": [],
                                                         "peer (to hwkd's latency)": [], "peer (to the budget)": []}
    keys = (("hwkd (penalty on)", "hwkd_penalty_on"), ("hwkd (penalty off)", "hwkd_penalty_off"),
            ("peer (to hwkd's latency)", "peer"), ("peer (to the budget)", "peer_at_budget"))
    for b, row in hw["budgets"].items():
        for label, key in keys:
            x = row.get(key)
            if x and x.get("paired_p50_ms") is not None:
                acc = x["final"]["accuracy"] if "final" in x else x["accuracy"]
                series[label].append((x["paired_p50_ms"], 100 * acc, f"{b}%"))
                threads.add(x.get("paired_threads"))
    if not any(series.values()):
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, pts), marker in zip(series.items(), ("o", "s", "^", "v"), strict=True):
        pts.sort()
        if pts:
            # off hollow and larger: where one run stands in for both arms, the on point shows inside it
            hollow = {"fillstyle": "none", "markersize": 11} if label == "hwkd (penalty off)" else {}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label, **hollow)
            for (x, y), names in point_labels(pts).items():
                ax.annotate(names, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"measured p50 latency, ms\n(onnxruntime, batch 1, {timing_threads(threads)}, this host)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(f"CIFAR-10, {r['meta']['protocol']} protocol: accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def point_labels(pts: list[tuple[float, float, str]]) -> dict[tuple[float, float], str]:
    """One label per plotted point: budgets at the same point (one stand-in model, or one peer recipe timed as two
    files 0.001 ms apart) as "20/30/50%", not labels drawn over each other; placed at the first such point."""
    out: dict[tuple[float, float], tuple[tuple[float, float], list[str]]] = {}
    for x, y, t in pts:
        out.setdefault((round(x, 2), round(y, 1)), ((x, y), []))[1].append(t.removesuffix("%"))
    return {xy: "/".join(sorted(names, key=float)) + "%" for xy, names in out.values()}


def write(r: dict, md: Path, png: Path) -> None:
    plot_pareto(r, png)
    text = "\n".join(header(r) + teacher_section(r) + pipeline_section(r) + pipeline_section(r, "small") + kd_section(r) + plateau_section(r) + hw_section(r, png) + penalty_section(r))
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(md)
