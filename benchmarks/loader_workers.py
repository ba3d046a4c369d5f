"""Images per second that hwkd's training loader decodes, by number of DataLoader workers (no model).

hwkd's own loader (``Dataset.loader("train", train=True)``: JPEG decode, the CIFAR normalisation, the
default pad-crop-flip augmentation) over an image folder; the first batch (worker start-up) is not timed.
On a GPU host this is the ceiling of an epoch's speed, to set beside ``gpu_kd_step.py``'s step time.
Writes benchmarks/results/loader_workers.{json,md} (``--tag`` adds a suffix).

    python benchmarks/cifar10.py --data ../shared/data/cifar10/train --steps split   # the split folder
    python benchmarks/loader_workers.py --data /tmp/hwkd-cifar10/split --workers 0,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hwkd.artifacts import atomic_write  # noqa: E402
from hwkd.config import DataConfig  # noqa: E402
from hwkd.data.dataset import load_dataset  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="an image folder (the CIFAR-10 split: train/ val/ test/)")
    ap.add_argument("--workers", default="0,4,8")
    ap.add_argument("--batches", type=int, default=150, help="timed batches per worker count (30 at 0 workers)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    cfg = DataConfig(mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616))
    ds = load_dataset(str(args.data), data_cfg=cfg)
    n_train = ds.split_size("train")
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        it = iter(ds.loader("train", train=True, batch_size=128, workers=workers))
        next(it)
        limit = min(args.batches, 30) if workers == 0 else args.batches
        n, t0 = 0, time.perf_counter()
        for i, (x, _y) in enumerate(it):
            n += len(x)
            if i + 1 == limit:
                break
        rate = n / (time.perf_counter() - t0)
        rows.append({"workers": workers, "images_per_s": round(rate), "epoch_s": round(n_train / rate, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = {"command": "python " + " ".join(sys.argv), "cores": len(os.sched_getaffinity(0)), "train_images": n_train,
           "augment": ds.augment, "rows": rows}  # fmt: skip
    stem = RESULTS / f"loader_workers{('_' + args.tag) if args.tag else ''}"
    lines = ["# loader_workers", "", f"Command: `{out['command']}`. {out['cores']} usable cores; {n_train:,} training "
             f"images, augmentation {ds.augment}, batch 128.", "", "| workers | images/s | one epoch, s |", "|---|---|---|",
             *(f"| {r['workers']} | {r['images_per_s']:,} | {r['epoch_s']} |" for r in rows)]  # fmt: skip
    atomic_write(stem.with_suffix(".json"), json.dumps(out, indent=1) + "\n")
    atomic_write(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
