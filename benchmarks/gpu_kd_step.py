"""Milliseconds per distillation step on the GPU, with no data loading: is a slow epoch the model or the loader?

The e30 CIFAR-10 ResNet-20 teacher and a student cut from it (``0.32x`` with ``prune.round_to=1``, the
parameter-goal recipe: 5/10/20 channels; ``0.5x`` with the profiles' rounding of 8), batch 128 of random
32 px images already on the device, SGD, Hinton KD at T=4: contiguous vs channels_last (hwkd trains
channels_last on CUDA), cudnn.benchmark off / on. Run it alone on the GPU (other processes time-slice it).
Writes benchmarks/results/gpu_kd_step.{json,md} (``--tag`` adds a suffix).

    python benchmarks/gpu_kd_step.py --steps 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hwkd.artifacts import atomic_write  # noqa: E402
from hwkd.models.loaders import build_student, load_teacher  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TEACHER = ROOT / "benchmarks" / "results" / "cifar10" / "teacher_resnet20_e30.pt"


def timed_ms(fn, n: int, cuda: bool) -> float:
    for _ in range(5):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def time_config(student, teacher, x, y, steps: int, cuda: bool) -> dict[str, float]:
    """ms of one KD step (teacher forward, student forward + backward, SGD step), and of its two halves."""
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def kd_step():
        with torch.no_grad():
            tl = teacher(x)
        sl = student(x)
        kd = F.kl_div(F.log_softmax(sl / 4, 1), F.softmax(tl / 4, 1), reduction="batchmean") * 16
        loss = 0.3 * F.cross_entropy(sl, y) + 0.7 * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def teacher_forward():
        with torch.no_grad():
            teacher(x)

    def student_forward_backward():
        student(x).sum().backward()

    return {"kd_step_ms": round(timed_ms(kd_step, steps, cuda), 2),
            "teacher_forward_ms": round(timed_ms(teacher_forward, steps, cuda), 2),
            "student_forward_backward_ms": round(timed_ms(student_forward_backward, steps, cuda), 2)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    x_cpu = torch.randn(128, 3, 32, 32)
    y = torch.randint(0, 10, (128,), device=dev)
    rows = []
    for width, round_to in (("0.32x", 1), ("0.5x", 8)):
        teacher, spec = load_teacher(str(TEACHER), "resnet20", 10, 3, False)  # on the CPU: the student is cut there
        torch.manual_seed(0)
        student, _ = build_student(width, teacher, spec, 10, 3, False, x_cpu[:1], round_to=round_to)
        channels = sorted({m.out_channels for m in student.modules() if isinstance(m, torch.nn.Conv2d)})
        params = sum(p.numel() for p in student.parameters())
        for fmt in ("contiguous", "channels_last"):
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench
                mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                s = student.to(dev).to(memory_format=mf).train()
                t = teacher.to(dev).eval()
                x = x_cpu.to(dev).to(memory_format=mf)
                times = time_config(s, t, x, y, args.steps, cuda)
                row = {"student": width, "round_to": round_to, "params": params, "channels": channels, "format": fmt,
                       "cudnn_benchmark": bench, **times}  # fmt: skip
                row["images_per_s"] = round(128 / row["kd_step_ms"] * 1e3)
                print(json.dumps(row), flush=True)
                rows.append(row)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    out = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "device": device,
           "steps": args.steps, "batch": 128, "rows": rows}  # fmt: skip
    stem = RESULTS / f"gpu_kd_step{('_' + args.tag) if args.tag else ''}"
    atomic_write(stem.with_suffix(".json"), json.dumps(out, indent=1) + "\n")
    atomic_write(stem.with_suffix(".md"), markdown(out))
    return 0


def markdown(out: dict) -> str:
    lines = [
        "# gpu_kd_step", "",
        f"Command: `{out['command']}`. Device: {out['device']}, torch {out['torch']}; batch {out['batch']}, "
        f"{out['steps']} timed steps after 5 warm-ups, random data already on the device.", "",
        "| student | params | channels | format | cudnn.benchmark | KD step ms | images/s | teacher fwd ms | student fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in out["rows"]:
        lines.append(f"| {r['student']} (round_to={r['round_to']}) | {r['params']:,} | {r['channels']} | {r['format']} | "
                     f"{r['cudnn_benchmark']} | {r['kd_step_ms']} | {r['images_per_s']:,} | {r['teacher_forward_ms']} | "
                     f"{r['student_forward_backward_ms']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
