"""KD methods side by side on the embedded digits: every method and the student alone, same epochs,
augmentation, learning-rate schedule and seeds. Writes benchmarks/results/kd_methods.json and .md.

    python benchmarks/kd_methods.py            # full run (3 seeds)
    python benchmarks/kd_methods.py --smoke    # 1 seed, 1 epoch, a slice of the data: checks it runs

The teacher is the cached built-in ResNet (hwkd.teacher.builtin_teacher, trained on first use). To fit
a 2-core budget, every method of one seed trains *in lockstep*: each augmented batch goes once through
the teacher (whose hooks feed every method's feature taps) and then through each student. Each student
uses hwkd's own pieces (make_kd_loss, KDLoss.attach, KDSchedule, the distill stage's schedule hooks,
lr_at, random_affine) with the optimizer and clipping of hwkd.train.fit; only the loop is shared.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hwkd.config import DistillConfig, TeacherConfig, TrainConfig
from hwkd.data import load_dataset, set_epoch
from hwkd.kd.losses import make_kd_loss
from hwkd.kd.schedules import KDSchedule
from hwkd.models.zoo import ZOO
from hwkd.stages.distill import schedule_hooks
from hwkd.teacher import builtin_teacher
from hwkd.train import accuracy, lr_at, predict

RESULTS = Path(__file__).parent / "results"
STUDENT = ("cnn", 0.5)  # 3.8k parameters against the teacher's 308k: far from saturating the digits

# Every method starts from this recipe (the distill stage's defaults when the benchmark was first run),
# so changing the stage's defaults does not change what a method means.
BASE = {"temperature": 4.0, "alpha": 0.7, "temperature_schedule": "constant", "alpha_schedule": "constant"}
# name -> DistillConfig overrides of BASE.
METHODS: dict[str, dict] = {
    "student_alone": {"kd": "none"},
    "hinton": {"kd": "hinton", "temperature": 4.0, "alpha": 0.7},
    "hinton_T_linear": {"kd": "hinton", "temperature": 4.0, "temperature_schedule": "linear", "temperature_end": 1.0},
    "hinton_T_adaptive": {"kd": "hinton", "temperature": 4.0, "temperature_schedule": "adaptive"},
    "hinton_T_multi": {"kd": "hinton", "temperature_schedule": "multi", "temperatures": (6.0, 3.0, 1.0)},
    "dkd": {"kd": "dkd", "temperature": 4.0, "alpha": 0.5, "alpha_schedule": "warmup"},
    "hinton+at": {"kd": "hinton+at", "temperature": 4.0, "alpha": 0.7},
    "hinton+fitnet": {"kd": "hinton+fitnet", "temperature": 4.0, "alpha": 0.7},
}


class Run:
    """One student being distilled with one method."""

    def __init__(self, name, overrides, dataset, teacher, epochs, seed, train_cfg, lr):
        self.name = name
        self.cfg = DistillConfig(**{**BASE, **overrides, "epochs": epochs, "lr": lr})
        torch.manual_seed(seed)  # same initial student for every method of a seed
        self.student = ZOO.get(STUDENT[0])(dataset.num_classes, dataset.input_shape[0], STUDENT[1])
        self.kd = make_kd_loss(self.cfg.kd, self.cfg.temperature, self.cfg.alpha)
        extra = self.kd.attach(self.student, [teacher], dataset.example_input(2))
        self.on_start, self.on_end = schedule_hooks(self.kd, KDSchedule.from_config(self.cfg), epochs)
        self.params = [p for p in self.student.parameters() if p.requires_grad] + extra
        decay = [p for p in self.params if p.ndim > 1]
        no_decay = [p for p in self.params if p.ndim <= 1]
        self.opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, momentum=0.9, nesterov=True,
        )
        self.history: list[dict] = []


def run_seed(dataset, teacher, seed, epochs, methods, train_cfg, lr) -> dict[str, dict]:
    runs = [Run(n, o, dataset, teacher, epochs, seed, train_cfg, lr) for n, o in methods.items()]
    loader = dataset.loader("train", train=True, batch_size=train_cfg.batch_size, seed=seed)  # shuffled + affine
    n_batches = max(1, len(loader))
    total, step = epochs * n_batches, 0
    for epoch in range(epochs):
        logged = {r.name: r.on_start(epoch) for r in runs}
        sums = {r.name: {} for r in runs}
        seen = 0
        for r in runs:
            r.student.train()
        set_epoch(loader, epoch)
        for xb, yb in loader:
            lr_now = lr_at(step, total, lr, n_batches)  # one warm-up epoch, as the distill stage
            with torch.no_grad():
                t_logits = teacher(xb)  # fills every method's teacher taps
            for r in runs:
                for group in r.opt.param_groups:
                    group["lr"] = lr_now
                terms = r.kd(r.student(xb), [t_logits] if r.kd.needs_teacher else [], [1.0] if r.kd.needs_teacher else [], yb)
                r.opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                torch.nn.utils.clip_grad_norm_(r.params, train_cfg.grad_clip)
                r.opt.step()
                for k, v in terms.items():
                    sums[r.name][k] = sums[r.name].get(k, 0.0) + float(v.detach()) * len(xb)
            seen += len(xb)
            step += 1
        for r in runs:
            logits, y_val = predict(r.student, dataset.eval_batches("val")), dataset.targets("val")
            row = {"epoch": epoch + 1, **logged[r.name], **{k: v / seen for k, v in sums[r.name].items()}}
            row["val_accuracy"] = (logits.argmax(1) == y_val).float().mean().item()
            row["val_loss"] = F.cross_entropy(logits, y_val).item()
            r.on_end(row)
            r.history.append(row)
    out = {}
    for r in runs:
        r.kd.detach()
        out[r.name] = {
            "test_accuracy": accuracy(r.student, dataset.eval_batches("test")),
            "val_accuracy": r.history[-1]["val_accuracy"],
            "history": r.history,
        }
    return out


def _seed_job(dataset, teacher, epochs, train_cfg, lr, threads, seed):
    torch.set_num_threads(threads)
    t0 = time.time()
    res = run_seed(dataset, teacher, seed, epochs, METHODS, train_cfg, lr)
    accs = "  ".join(f"{n} {100 * r['test_accuracy']:.2f}" for n, r in res.items())
    print(f"seed {seed} ({time.time() - t0:.0f}s): {accs}", flush=True)
    return res


def markdown(results: dict, meta: dict) -> str:
    base = results["methods"]["student_alone"]["mean"]
    lines = [
        "# KD methods on the embedded digits",
        "",
        f"Student `{meta['student']}` ({meta['student_params']} params) distilled from the built-in ResNet teacher "
        f"({meta['teacher_params']} params, test accuracy {100 * meta['teacher_test_accuracy']:.2f}%). "
        f"{meta['epochs']} epochs, random-affine augmentation, seeds {meta['seeds']}, test split of "
        f"{meta['test_size']} images; mean ± std over seeds. Wall time {meta['wall_seconds']:.0f} s on {meta['host']}.",
        "",
        "Every recipe is " + ", ".join(f"{k}={v}" for k, v in BASE.items()) + " unless it says otherwise.",
        "",
        "| method | KD recipe | test accuracy | vs student alone | per seed |",
        "|---|---|---|---|---|",
    ]
    for name, m in sorted(results["methods"].items(), key=lambda kv: -kv[1]["mean"]):
        marker = " **(default)**" if name == results["default_method"] else ""
        recipe = ", ".join(f"{k}={v}" for k, v in METHODS[name].items())
        lines.append(
            f"| {name}{marker} | {recipe} | {100 * m['mean']:.2f} ± {100 * m['std']:.2f} | "
            f"{100 * (m['mean'] - base):+.2f} | {', '.join(f'{100 * s:.2f}' for s in m['seeds'])} |"
        )
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=DistillConfig().lr)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel processes")
    ap.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch, 256 training images; writes nothing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    dataset = load_dataset(None)
    train_cfg = TrainConfig()
    teacher, _, info = builtin_teacher(dataset, 0, TeacherConfig(), train_cfg)
    if args.smoke:
        args.seeds, args.epochs = 1, 1
        dataset.splits["train"] = dataset.splits["train"][:256]
    per_method: dict[str, list[float]] = {name: [] for name in METHODS}
    histories: dict[str, dict] = {}
    job = functools.partial(_seed_job, dataset, teacher, args.epochs, train_cfg, args.lr, args.threads)
    if args.jobs > 1:  # seeds are independent: one process each (same results, less wall time)
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            per_seed = pool.map(job, range(args.seeds))
    else:
        per_seed = [job(seed) for seed in range(args.seeds)]
    for seed, res in enumerate(per_seed):
        for name, r in res.items():
            per_method[name].append(r["test_accuracy"])
            histories.setdefault(name, {})[str(seed)] = r["history"]
    methods = {
        name: {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "seeds": accs}
        for name, accs in per_method.items()
    }
    # The default must beat the baseline: the best mean among the KD methods, if it does.
    best = max((n for n in methods if n != "student_alone"), key=lambda n: methods[n]["mean"])
    default = best if methods[best]["mean"] > methods["student_alone"]["mean"] else "student_alone"
    results = {"methods": methods, "default_method": default}
    student = ZOO.get(STUDENT[0])(dataset.num_classes, dataset.input_shape[0], STUDENT[1])
    import platform

    meta = {
        "student": f"{STUDENT[0]} width {STUDENT[1]}",
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "teacher_test_accuracy": accuracy(teacher, dataset.eval_batches("test")),
        "teacher_val_accuracy": info.get("val_accuracy"),
        "epochs": args.epochs,
        "seeds": list(range(args.seeds)),
        "test_size": dataset.split_size("test"),
        "wall_seconds": time.time() - started,
        "host": f"{platform.processor() or platform.machine()}, {args.jobs} process(es) x {args.threads} thread(s)",
        "command": " ".join(["python benchmarks/kd_methods.py", *sys.argv[1:]]),
        "recipes": METHODS,
    }
    print(markdown(results, meta))
    if args.smoke:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kd_methods.json").write_text(json.dumps({**results, "meta": meta, "histories": histories}, indent=1, default=list))
    (RESULTS / "kd_methods.md").write_text(markdown(results, meta))


if __name__ == "__main__":
    main()
