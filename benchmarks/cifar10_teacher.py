"""Train the protocol's CIFAR-10 teacher (zoo ``resnet20``) on the 45k train split; cache it in the repo.

Standard CIFAR recipe: random crop 32 (pad 4) + horizontal flip (torchvision transforms.v2), CIFAR
mean/std normalisation, SGD (momentum 0.9, nesterov, weight decay 5e-4), one-cycle LR, batch 128.
The images are decoded once into a uint8 tensor (torchvision.io) and augmented per sample in a torch
DataLoader; a checkpoint is written atomically after every epoch, so the run can stop (or be killed) at
any time and resume with ``--resume``; the checkpoint keeps the shuffle and augmentation streams, so on the
CPU a run resumed at an epoch's end is bit-identical to one trained in one go. A run longer than a session
(160 epochs is ~4.5 h on 2 cores) ends itself cleanly with ``--stop-by HH:MM`` and keeps ``--out`` in the
repository between sessions. ``--finalise`` scores the last checkpoint on val and test and
writes the committed state dict + its metadata (``benchmarks/results/cifar10/teacher_resnet20[_TAG].*``;
``--tag`` keeps a second teacher beside the first, e.g. a longer-trained one).

    nice -n 10 python benchmarks/cifar10_teacher.py --split /tmp/cifar10_split --epochs 15 --out /tmp/teacher
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cifar10_kd import evaluate as kd_evaluate  # noqa: E402

from hwkd.artifacts import torch_save, write_json  # noqa: E402
from hwkd.models.zoo import ZOO  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
RESULTS = Path(__file__).resolve().parent / "results" / "cifar10"
ARCH = "resnet20"


class DecodedFolder(Dataset):
    """An ImageFolder decoded once into memory (uint8 NCHW); transforms.v2 applied per sample."""

    def __init__(self, root: Path, transform: v2.Transform):
        folder = ImageFolder(str(root), loader=lambda p: decode_image(p, mode=ImageReadMode.RGB))
        self.classes = folder.classes
        self.images = torch.stack([folder.loader(p) for p, _ in folder.samples])
        self.targets = torch.tensor([t for _, t in folder.samples])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.targets[i]


def transforms(train: bool) -> v2.Transform:
    aug = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if train else []
    return v2.Compose([*aug, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def evaluate(model: nn.Module, data: Dataset) -> float:
    """Accuracy on ``data``, on the device the model is on (the KD loop's scorer, its loss left out)."""
    return kd_evaluate(model, data)[0]


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = args.train_device
    torch.manual_seed(args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a")
    t0 = time.time()
    train_set = DecodedFolder(args.split / "train", transforms(True))
    val_set = DecodedFolder(args.split / "val", transforms(False))
    print(f"decoded {len(train_set)}+{len(val_set)} images in {time.time() - t0:.1f}s", flush=True)
    model = ZOO.get(ARCH)(num_classes=len(train_set.classes), in_channels=3).to(device)  # built on the CPU, as anywhere
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train_set, batch_size=128, shuffle=True, drop_last=True, generator=gen,
                        num_workers=args.workers, persistent_workers=args.workers > 0)  # fmt: skip
    steps = len(loader)
    start, history, train_s, cpu_s, replans, plan = 0, [], 0.0, 0.0, [], args.epochs or 15
    sched = one_cycle(opt, args.lr, plan, steps, 0)
    ckpt = out / "last.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location="cpu")  # load_state_dict copies to the device
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        if "rng" in state:  # the augmentation stream (workers=0 draws crops and flips from the global generator)
            torch.set_rng_state(state["rng"])
        start, history, train_s = state["epoch"], state["history"], state["train_s"]
        cpu_s, replans = state.get("cpu_s", 0.0), state.get("replans", [])
        plan = state["planned_epochs"] if args.epochs is None else args.epochs
        if plan == state["planned_epochs"]:
            sched.load_state_dict(state["sched"])
        else:
            sched = one_cycle(opt, args.lr, plan, steps, start * steps)
            replans.append({"at_epoch": start, "from": state["planned_epochs"], "to": plan, "why": "resume"})
        print(f"resumed at epoch {start} (plan {plan} epochs, lr {sched.get_last_lr()[0]:.4f})", flush=True)
    loss_fn = nn.CrossEntropyLoss()
    epoch = start
    while epoch < plan:
        model.train()
        t_ep, c_ep, seen, loss_sum = time.time(), time.process_time(), 0, 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
        dt, dc = time.time() - t_ep, time.process_time() - c_ep
        train_s += dt
        cpu_s += dc
        val_acc = evaluate(model, val_set)
        epoch += 1
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "val_acc": val_acc,
               "epoch_s": round(dt, 1), "cpu_s": round(dc, 1), "images_per_s": round(seen / dt, 1),
               "lr_end": sched.get_last_lr()[0], "plan": plan, "utc": time.strftime("%H:%M:%S", time.gmtime()),
               "device": str(device)}
        history.append(row)
        if args.deadline and epoch < plan:  # shrink the plan to what fits before the deadline
            left = args.deadline - time.time() - 120
            fits = epoch + max(1, int(left // max(dt, 1.0)))
            if fits < plan:
                replans.append({"at_epoch": epoch, "from": plan, "to": fits, "why": "deadline"})
                plan = fits
                sched = one_cycle(opt, args.lr, plan, steps, epoch * steps)
                row["replanned_to"] = plan
        torch_save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "gen": gen.get_state(), "rng": torch.get_rng_state(), "epoch": epoch,
                          "history": history, "train_s": train_s,
                          "cpu_s": cpu_s, "planned_epochs": plan, "replans": replans,
                          "args": {k: str(v) for k, v in vars(args).items()}})
        log.write(json.dumps(row) + "\n")  # after the checkpoint: a resumed run never logs an epoch twice
        log.flush()
        print(row, flush=True)
        if epoch == args.stop_after or (args.stop_by and time.time() + dt > args.stop_by):
            print(f"stopped after epoch {epoch} of {plan}; --resume goes on from here", flush=True)
            break


def one_cycle(opt, lr: float, epochs: int, steps: int, done: int):
    """OneCycleLR over ``epochs`` (warm-up 25%), fast-forwarded by ``done`` steps (a re-planned run)."""
    for group in opt.param_groups:  # a fresh plan starts from the base values
        group.pop("initial_lr", None)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps, pct_start=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        for _ in range(done):
            sched.step()
    return sched


def finalise(args: argparse.Namespace) -> None:
    """Score the last checkpoint on val + test and write the committed teacher files."""
    torch.set_num_threads(args.threads)
    state = torch.load(args.out / "last.pt", weights_only=True, map_location="cpu")  # scored on the CPU
    val_set = DecodedFolder(args.split / "val", transforms(False))
    test_set = DecodedFolder(args.split / "test", transforms(False))
    model = ZOO.get(ARCH)(num_classes=len(val_set.classes), in_channels=3)
    model.load_state_dict(state["model"])
    split = json.loads((RESULTS / "split.json").read_text())
    meta = {
        "arch": ARCH, "num_classes": 10, "in_channels": 3,
        "params": sum(p.numel() for p in model.parameters()),
        "val_acc": evaluate(model, val_set), "test_acc": evaluate(model, test_set),
        "epochs": state["epoch"], "planned_epochs": state["planned_epochs"],
        "replans": state.get("replans", []),
        "train_s": round(state["train_s"], 1), "cpu_s": round(state.get("cpu_s", 0.0), 1),
        "recipe": {"batch": 128, "optimizer": "SGD momentum 0.9 nesterov wd 5e-4",
                   "schedule": f"OneCycleLR max_lr {state['args']['lr']} pct_start 0.25 over planned epochs",
                   "augmentation": "RandomCrop(32, padding=4) + RandomHorizontalFlip (transforms.v2)",
                   "mean": MEAN, "std": STD, "seed": int(state["args"]["seed"]),
                   "threads": int(state["args"]["threads"]),
                   # per epoch, since a run can resume elsewhere; epochs before --device trained on the CPU
                   "device": ", ".join(sorted({row.get("device", "cpu") for row in state["history"]}))},
        "split": split["sha256_16"], "history": state["history"],
        "host": args.host or f"{os.cpu_count()} CPU cores, {state['args']['threads']} torch thread(s)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = teacher_stem(args.tag)
    torch_save(RESULTS / f"{stem}.pt", model.state_dict())
    write_json(RESULTS / f"{stem}.json", meta)
    print({k: meta[k] for k in ("val_acc", "test_acc", "epochs", "train_s")})


def device_or_exit(ap: argparse.ArgumentParser, spec: str | None) -> torch.device:
    """hwkd's ``--device`` check as the parser's error: one paragraph, exit 2, before anything is made."""
    from hwkd.accel import resolve_device
    from hwkd.errors import ConfigError

    try:
        return resolve_device(spec)
    except ConfigError as e:
        ap.error(str(e))


def next_utc(hhmm: str | None) -> float | None:
    """``HH:MM`` (UTC) as a ``time.time()`` value: the next such time, so 00:15 at 21:40 is after midnight."""
    if not hhmm:
        return None
    hh, mm = map(int, hhmm.split(":"))
    if not (0 <= hh < 24 and 0 <= mm < 60):
        raise ValueError(hhmm)
    now = time.gmtime()
    minutes = ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) % (24 * 60)
    return time.time() + minutes * 60 - now.tm_sec


def teacher_stem(tag: str | None) -> str:
    """``teacher_resnet20`` (the first committed teacher) or ``teacher_resnet20_<tag>``."""
    return f"teacher_{ARCH}" + (f"_{tag}" if tag else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", type=Path, default=Path("/tmp/cifar10_split"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/cifar10_teacher"))
    ap.add_argument("--epochs", type=int, default=None, help="planned epochs (default 15; on --resume: as saved)")
    ap.add_argument("--deadline", default=None, help="UTC HH:MM: shrink the one-cycle plan to end before it")
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="end this invocation after this epoch, the plan unchanged (a run that spans sessions)")
    ap.add_argument("--stop-by", default=None,
                    help="UTC HH:MM: end after the last epoch that should finish before it, the plan unchanged")
    ap.add_argument("--finalise", action="store_true")
    ap.add_argument("--tag", default=None, help="--finalise: write teacher_resnet20_TAG.* (the untagged files are kept)")
    ap.add_argument("--host", default=None, help="--finalise: how the host was shared, for the metadata")
    ap.add_argument("--device", default=None, help="auto|cpu|cuda|cuda:N: where to train (default auto: CUDA when available)")
    ap.add_argument("--workers", type=int, default=0,
                    help="augmentation processes (default 0: in the main process, a few thousand images/s on one "
                         "core; a GPU trains ResNet-20 faster than that, so give it a few)")
    args = ap.parse_args()
    args.train_device = device_or_exit(ap, args.device)
    args.device = str(args.train_device)  # the checkpoint's args record where it trained
    for flag in ("deadline", "stop_by"):
        try:
            setattr(args, flag, next_utc(getattr(args, flag)))
        except ValueError:
            ap.error(f"--{flag.replace('_', '-')} takes a UTC time as HH:MM (00:00-23:59), not {getattr(args, flag)!r}")
    if args.epochs is None and not args.resume:
        args.epochs = 15
    finalise(args) if args.finalise else train(args)


if __name__ == "__main__":
    main()
