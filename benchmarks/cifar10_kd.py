"""The CIFAR-10 KD table: every method against the student alone, same student, epochs, augmentation,
learning-rate schedule and seeds, distilled from the protocol's ResNet-20 teacher.

Used by ``benchmarks/cifar10.py`` (its "kd" step). As in ``benchmarks/kd_methods.py``, every method of
one seed trains *in lockstep* to fit a CPU budget: each augmented batch goes once through the teacher
(whose hooks feed every method's feature taps), then through each student. Each student uses hwkd's
own pieces (make_kd_loss, KDLoss.attach, KDSchedule, the distill stage's schedule hooks, lr_at) with
hwkd.train.fit's optimizer (SGD nesterov, weight decay on weights only) and gradient clipping; only
the loop is shared. The data are torchvision ImageFolders decoded once (``cifar10_teacher.DecodedFolder``)
with the teacher's CIFAR augmentation (random crop 32 pad 4 + flip).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hwkd.artifacts import atomic_path
from hwkd.config import DistillConfig, TrainConfig
from hwkd.kd.losses import make_kd_loss
from hwkd.kd.schedules import KDSchedule
from hwkd.models.zoo import ZOO
from hwkd.stages.distill import schedule_hooks
from hwkd.train import lr_at

# Every method starts from this recipe, so changing the distill stage's defaults does not change what
# a row means. lr / batch / wd are hwkd's distill defaults, except batch 128 (the CIFAR standard).
BASE = {"temperature": 4.0, "alpha": 0.7, "temperature_schedule": "constant", "alpha_schedule": "constant"}
METHODS: dict[str, dict] = {
    "student_alone": {"kd": "none"},
    "hinton_T4": {"kd": "hinton", "temperature": 4.0},
    "hinton_T_linear": {"kd": "hinton", "temperature_schedule": "linear", "temperature_end": 1.0},
    # hwkd's adaptive schedule with the 30% warm-up at T=4 (then toward T=1, pulled back to T0
    # when the validation loss rises); see docs/decisions-issue14.md for how it differs from "Temperate".
    "hinton_T_adaptive": {"kd": "hinton", "temperature_schedule": "adaptive", "schedule_warmup": 0.3},
    "hinton_T_multi": {"kd": "hinton", "temperature_schedule": "multi", "temperatures": (6.0, 3.0, 1.0)},
    "dkd": {"kd": "dkd", "alpha": 0.5, "alpha_schedule": "warmup"},  # hwkd's current default recipe
    "fitnet": {"kd": "fitnet"},  # CE + hint loss on the last three stages (1x1 adapters)
    "rkd": {"kd": "rkd"},  # CE + distance/angle relations of the penultimate embeddings
}


class Run:
    """One student being distilled with one method."""

    def __init__(self, name, overrides, student_fn, teacher, example, epochs, lr, seed, train_cfg):
        self.name = name
        self.cfg = DistillConfig(**{**BASE, **overrides, "epochs": epochs, "lr": lr})
        torch.manual_seed(seed)  # the same initial student for every method of a seed
        self.student = student_fn()
        self.kd = make_kd_loss(self.cfg.kd, self.cfg.temperature, self.cfg.alpha)
        extra = self.kd.attach(self.student, [teacher], example)
        self.on_start, self.on_end = schedule_hooks(self.kd, KDSchedule.from_config(self.cfg), epochs)
        self.params = [p for p in self.student.parameters() if p.requires_grad] + extra
        self.opt = torch.optim.SGD(
            [{"params": [p for p in self.params if p.ndim > 1], "weight_decay": train_cfg.weight_decay},
             {"params": [p for p in self.params if p.ndim <= 1], "weight_decay": 0.0}],
            lr=lr, momentum=0.9, nesterov=True,
        )  # fmt: skip
        self.history: list[dict] = []


class AugmentationStream:
    """A state of torch's global generator that only the data loader's augmentation draws from.

    transforms.v2 has no generator argument: it draws from torch's global generator. Without this, the
    augmentation of a seed depended on which methods ran beside it (their students and KD adapters are
    built from the global stream first), so the student alone scored 73.32% at seed 2 in one invocation
    and 75.84% in another (docs/decisions-issue14.md, stop 23). Batches are fetched in the main process
    (no workers), so swapping the state in around each fetch is all it takes.
    """

    def __init__(self, seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.state = torch.get_rng_state()

    def batches(self, loader: DataLoader):
        """The loader's batches (one epoch), augmented from this stream, which carries on to the next epoch."""
        batches = None
        while True:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.state)
                batches = batches or iter(loader)
                batch = next(batches, None)
                self.state = torch.get_rng_state()
            if batch is None:
                return
            yield batch


@torch.no_grad()
def evaluate(model, data, batch_size: int = 500) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on a dataset of (x, y), on the device the model is on."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss, n = 0, 0.0, 0
    for x, y in DataLoader(data, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        correct += (logits.argmax(1) == y).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
    return correct / n, loss / n


def run_seed(train_set, val_set, test_set, teacher, student_fn: Callable, *, seed: int, epochs: int, lr: float,
             methods: dict[str, dict], batch_size: int = 128, log: Callable[[str], None] = print,
             checkpoint: Path | None = None, device: torch.device | str = "cpu") -> dict:  # fmt: skip
    """Train every method of ``methods`` for one seed in lockstep, on ``device``; return {name: results}.

    With ``checkpoint``, the state after each epoch (students, adapters, optimizers, histories, the
    shuffle, augmentation and global generators) is written there atomically, and a run whose checkpoint
    matches (same seed, epochs, lr, batch, methods, data size) goes on from its last epoch: a 40-epoch
    table is longer than a session, and a resumed run trains exactly as an uninterrupted one (on the same
    kind of device: a checkpoint loads on any, but CUDA and CPU kernels do not round alike).

    Students, KD adapters and the teacher are built (and seeded) on the CPU, as on every device, then moved
    to ``device``; the data are augmented on the CPU and each batch moved.
    """
    device = torch.device(device)
    train_cfg = TrainConfig(batch_size=batch_size)
    example = torch.stack([val_set[i][0] for i in range(2)])
    runs = [Run(n, o, student_fn, teacher, example, epochs, lr, seed, train_cfg) for n, o in methods.items()]
    teacher.to(device)
    for r in runs:  # in place: the optimizers hold these very parameters
        r.student.to(device)
        if r.kd.adapters is not None:
            r.kd.adapters.to(device)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen)
    augmentation = AugmentationStream(seed)  # the same batches whatever methods run beside each other
    n_batches = len(loader)
    key = checkpoint_key(seed, epochs, lr, batch_size, methods, len(train_set))
    start, wall_before = resume(checkpoint, key, runs, gen, augmentation, log) if checkpoint else (0, 0.0)
    started = time.time()
    total, step = epochs * n_batches, start * n_batches
    needs_teacher_pass = any(r.cfg.kd != "none" for r in runs)  # also fills the feature taps; CE alone skips it
    teacher.eval()
    for epoch in range(start, epochs):
        t0 = time.time()
        logged = {r.name: r.on_start(epoch) for r in runs}
        sums: dict[str, dict[str, float]] = {r.name: {} for r in runs}
        seen = 0
        for r in runs:
            r.student.train()
        for xb, yb in augmentation.batches(loader):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            lr_now = lr_at(step, total, lr, n_batches)  # one warm-up epoch, as the distill stage
            with torch.no_grad():
                t_logits = teacher(xb) if needs_teacher_pass else None
            for r in runs:
                for group in r.opt.param_groups:
                    group["lr"] = lr_now
                needs = r.kd.needs_teacher
                terms = r.kd(r.student(xb), [t_logits] if needs else [], [1.0] if needs else [], yb)
                r.opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                torch.nn.utils.clip_grad_norm_(r.params, train_cfg.grad_clip)
                r.opt.step()
                for k, v in terms.items():
                    sums[r.name][k] = sums[r.name].get(k, 0.0) + float(v.detach()) * len(xb)
            seen += len(xb)
            step += 1
        dt = time.time() - t0
        for r in runs:
            val_acc, val_loss = evaluate(r.student, val_set)
            row = {"epoch": epoch + 1, **logged[r.name], **{k: v / seen for k, v in sums[r.name].items()},
                   "val_accuracy": val_acc, "val_loss": val_loss}  # fmt: skip
            r.on_end(row)
            r.history.append(row)
        accs = " ".join(f"{r.name}={100 * r.history[-1]['val_accuracy']:.1f}" for r in runs)
        log(f"kd seed {seed} epoch {epoch + 1}/{epochs} ({dt:.0f}s, {seen * len(runs) / dt:.0f} student img/s): {accs}")
        if checkpoint:
            save_checkpoint(checkpoint, key, epoch + 1, wall_before + time.time() - started, runs, gen, augmentation)
    out = {}
    for r in runs:
        r.kd.detach()
        test_acc, _ = evaluate(r.student, test_set)
        out[r.name] = {"test_accuracy": test_acc, "val_accuracy": r.history[-1]["val_accuracy"], "history": r.history,
                       "augmentation_rng": "own",  # runs without it drew from the global stream (before stop 24)
                       "wall_s": round(wall_before + time.time() - started, 1)}  # every invocation's, if resumed
    return out


def checkpoint_key(seed: int, epochs: int, lr: float, batch_size: int, methods: dict[str, dict], n_train: int) -> str:
    """What a checkpoint must match to be resumed: everything that decides the training."""
    return json.dumps({"seed": seed, "epochs": epochs, "lr": lr, "batch_size": batch_size, "n_train": n_train,
                       "methods": methods}, sort_keys=True, default=list)  # fmt: skip


def checkpoint_path(folder: Path, step: str, seed: int, epochs: int, methods: dict[str, dict]) -> Path:
    """One file per (step, seed, epochs, method set), so invocations training other methods keep theirs."""
    digest = hashlib.sha256(json.dumps(methods, sort_keys=True, default=list).encode()).hexdigest()[:10]
    return Path(folder) / f"{step}_e{epochs}_seed{seed}_{digest}.ckpt.pt"


def save_checkpoint(path: Path, key: str, epochs_done: int, wall_s: float, runs: list[Run], gen: torch.Generator,
                    augmentation: AugmentationStream) -> None:  # fmt: skip
    state = {"key": key, "epochs_done": epochs_done, "wall_s": wall_s, "shuffle": gen.get_state(), "augmentation": augmentation.state,
             "global": torch.get_rng_state(),  # a student with dropout would draw from it (the zoo's have none)
             "runs": {r.name: {"student": r.student.state_dict(), "optimizer": r.opt.state_dict(), "history": r.history,
                               "adapters": r.kd.adapters.state_dict() if r.kd.adapters is not None else None}
                      for r in runs}}  # fmt: skip
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume(path: Path, key: str, runs: list[Run], gen: torch.Generator, augmentation: AugmentationStream,
           log) -> tuple[int, float]:  # fmt: skip
    """Load ``path`` into the freshly built runs and generators: (epochs it had done, seconds they took); (0, 0) if none."""
    if not Path(path).is_file():
        return 0, 0.0
    state = torch.load(path, weights_only=True, map_location="cpu")  # load_state_dict copies to each run's device
    if state["key"] != key:
        log(f"kd checkpoint {path} is of another run (seed, epochs, lr, batch, methods or data differ): starting afresh")
        return 0, 0.0
    for r in runs:
        saved = state["runs"][r.name]
        r.student.load_state_dict(saved["student"])
        if saved["adapters"] is not None:
            r.kd.adapters.load_state_dict(saved["adapters"])
        r.opt.load_state_dict(saved["optimizer"])
        r.history = list(saved["history"])
        for row in r.history:  # the schedule's hooks keep the validation losses they have seen
            r.on_end(row)
    gen.set_state(state["shuffle"])
    augmentation.state = state["augmentation"]
    torch.set_rng_state(state["global"])
    log(f"kd: resumed from {path} after epoch {state['epochs_done']}")
    return state["epochs_done"], state["wall_s"]


def summarise(per_seed: list[dict]) -> dict:
    """Mean / std over seeds per method, the difference to the student alone, and the chosen default."""
    names = list(per_seed[0])
    methods = {}
    for name in names:
        accs = [s[name]["test_accuracy"] for s in per_seed]
        methods[name] = {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                         "seeds": accs}  # fmt: skip
    base = methods["student_alone"]["mean"]
    for m in methods.values():
        m["vs_student_alone_points"] = round(100 * (m["mean"] - base), 2)
    kd = [n for n in methods if n != "student_alone"]
    best = max(kd, key=lambda n: methods[n]["mean"]) if kd else "student_alone"
    return {"methods": methods, "best_method": best,
            "adaptive_minus_T4_points": round(100 * (methods["hinton_T_adaptive"]["mean"] - methods["hinton_T4"]["mean"]), 2)
            if {"hinton_T_adaptive", "hinton_T4"} <= set(methods) else None}  # fmt: skip


def earlier_seeds(kd_out: dict | None, epochs: int) -> dict[int, dict]:
    """Per-seed results already in the results file at the same epochs: ``{seed: {method: results}}``.

    Lets the table grow across invocations (a session is shorter than the protocol): more seeds, or
    more methods for seeds already run (methods train independently in ``run_seed``: the same shuffle,
    each student its own seeded init). The summary is rebuilt from each seed's test accuracy and history,
    as ``run_seed`` returned them.
    """
    if not kd_out or kd_out.get("epochs") != epochs:
        return {}
    if "runs" in kd_out:  # every (seed, method) run, also those not yet on every seed
        return {int(seed): dict(runs) for seed, runs in kd_out["runs"].items()}
    seeds: dict[int, dict] = {}  # results written before "runs": every method on every seed of the table
    for name, per_seed in kd_out.get("histories", {}).items():
        for seed, history, acc in zip(kd_out["seeds_done"], per_seed, kd_out["methods"][name]["seeds"], strict=True):
            seeds.setdefault(int(seed), {})[name] = {"test_accuracy": acc, "val_accuracy": history[-1]["val_accuracy"],
                                                     "history": history}  # fmt: skip
    return seeds


def table(done: dict[int, dict]) -> tuple[list[int], list[str]]:
    """(seeds, methods) of the summary: every seed with the student alone, every method run on all of them."""
    seeds = sorted(s for s, r in done.items() if "student_alone" in r)
    names = [n for n in dict.fromkeys(n for s in seeds for n in done[s]) if all(n in done[s] for s in seeds)]
    return seeds, names


def rebuild(fixed: dict, done: dict[int, dict]) -> dict:
    """The results' "kd" entry from every (seed, method) run: the table (``table``: seeds with the student
    alone, methods run on all of them) summarised, the student alone's curves, and the raw runs kept.
    ``fixed``: epochs, student, params, teacher accuracy, recipes (every method's), base recipe, wall."""
    seeds, names = table(done)
    per_seed = [{n: done[s][n] for n in names} for s in seeds]
    alone = [s["student_alone"]["history"] for s in per_seed]
    return {**fixed, **summarise(per_seed), "seeds_done": seeds,  # fixed may be an older entry: recomputed over it
            "student_alone_val_curve": [[round(r["val_accuracy"], 4) for r in h] for h in alone],
            "student_alone_plateau_epoch": [plateau_epoch(h) for h in alone],
            # every method run, not only the table's: a method still short of seeds keeps its recipe
            "recipes": {n: fixed["recipes"].get(n, METHODS.get(n, {})) for s in done.values() for n in s},
            "histories": {n: [s[n]["history"] for s in per_seed] for n in names},
            "runs": {str(s): done[s] for s in sorted(done)}}  # fmt: skip


def plateau_epoch(history: list[dict], window: int = 3, tol: float = 0.005) -> int | None:
    """The first epoch whose best validation accuracy so far is within ``tol`` of the run's best, with at
    least ``window`` epochs after it to show the level holds; None when the run ends still climbing.

    Best-so-far, not epoch-to-epoch gains: a dip or a flat stretch mid-run (common under a cosine
    schedule, whose last epochs still add points) is not a plateau.
    """
    accs = [row["val_accuracy"] for row in history]
    best, so_far = max(accs, default=0.0), 0.0
    for i, acc in enumerate(accs):
        so_far = max(so_far, acc)
        if best - so_far < tol:
            return i + 1 if len(accs) - (i + 1) >= window else None
    return None


def student_factory(name: str, width: float, num_classes: int = 10) -> Callable:
    return lambda: ZOO.get(name)(num_classes, 3, width)


__all__ = ["METHODS", "run_seed", "summarise", "earlier_seeds", "table", "rebuild", "plateau_epoch", "student_factory",
           "evaluate"]
