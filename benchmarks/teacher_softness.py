"""How soft each committed CIFAR-10 teacher's outputs are, on the images a student is distilled from.

A longer-trained teacher is more accurate and usually more confident; the soft targets a student learns
from then carry less mass off the true class at a given temperature. This measures it, so that a student
that learns less from the stronger teacher (docs/cifar10-results.md, stops 45-46) can be read against a
figure rather than a guess. Per teacher and split (every 5th train image, un-augmented, and the val
split): accuracy, the mean top-1 probability at T=1, the mean entropy at T=1 and T=4 (nats; uniform over
10 classes is 2.303), and the mean mass off the true class at T=4 (what Hinton KD's soft term adds).

    python benchmarks/teacher_softness.py --split /tmp/hwkd-cifar10/split --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar10_teacher as teacher_mod  # noqa: E402
from cifar10 import load_teacher  # noqa: E402

from hwkd.artifacts import atomic_write  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEACHERS = {"e6": "teacher_resnet20.pt", "e30": "teacher_resnet20_e30.pt", "e160": "teacher_resnet20_e160.pt"}
TEMPERATURES = (1.0, 4.0)


@torch.no_grad()
def softness(model: torch.nn.Module, data) -> dict[str, float]:
    """Accuracy and how soft the outputs are on ``data`` (means over its images)."""
    logits, labels = [], []
    for x, y in DataLoader(data, batch_size=500):
        logits.append(model(x))
        labels.append(y)
    z, y = torch.cat(logits), torch.cat(labels)
    out = {"images": len(y), "accuracy": float((z.argmax(1) == y).float().mean())}
    for t in TEMPERATURES:
        p = torch.softmax(z / t, dim=1)
        out[f"entropy_T{t:g}"] = float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())
        out[f"top1_prob_T{t:g}"] = float(p.max(1).values.mean())
        out[f"off_target_mass_T{t:g}"] = float(1 - p.gather(1, y[:, None]).mean())
    return out


def markdown(res: dict) -> str:
    lines = ["# Teacher softness (`benchmarks/teacher_softness.py`)", "",
             f"Command: `{res['command']}`. Train: every 5th image of the 45k train split, un-augmented; val: the 2,500-image "
             "validation split. Entropy in nats (uniform over 10 classes: 2.303).", "",
             "| teacher | split | images | accuracy | top-1 prob T=1 | entropy T=1 | entropy T=4 | off-target mass T=4 |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for tag, splits in res["teachers"].items():
        for split, m in splits.items():
            lines.append(f"| {tag} | {split} | {m['images']} | {100 * m['accuracy']:.2f}% | {m['top1_prob_T1']:.3f} | "
                         f"{m['entropy_T1']:.3f} | {m['entropy_T4']:.3f} | {m['off_target_mass_T4']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", type=Path, required=True, help="the benchmark's split folder (train/ val/ test/)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train = teacher_mod.DecodedFolder(args.split / "train", teacher_mod.transforms(False))
    sets = {"train (every 5th)": Subset(train, range(0, len(train), 5)),
            "val": teacher_mod.DecodedFolder(args.split / "val", teacher_mod.transforms(False))}  # fmt: skip
    res = {"command": "python benchmarks/teacher_softness.py " + " ".join(sys.argv[1:]), "teachers": {}}
    for tag, name in TEACHERS.items():
        path = teacher_mod.RESULTS / name
        if not path.exists():
            continue
        model = load_teacher(path)
        res["teachers"][tag] = {split: softness(model, data) for split, data in sets.items()}
    res["wall_s"] = round(time.time() - t0, 1)
    atomic_write(RESULTS / "teacher_softness.json", json.dumps(res, indent=1) + "\n")
    atomic_write(RESULTS / "teacher_softness.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
