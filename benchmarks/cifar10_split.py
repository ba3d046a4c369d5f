"""The fixed CIFAR-10 protocol split: 50,000 training images -> train 45,000 / val 2,500 / test 2,500.

Stratified (250 val + 250 test images per class), seeded, and committed as two file lists
(``benchmarks/results/cifar10/split_val.txt`` / ``split_test.txt``; train is every other image), so
anyone with the same public image folder gets the same three splits. ``materialise`` builds symlink
folders ``OUT/{train,val,test}/<class>/`` that hwkd (and torchvision's ImageFolder) read as they are.

Usage::

    python benchmarks/cifar10_split.py --data ../shared/data/cifar10/train --out /tmp/cifar10_split
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cifar10"
SEED = 14
PER_CLASS = {"val": 250, "test": 250}
EXTS = (".jpg", ".jpeg", ".png")


def list_images(data: Path) -> dict[str, list[str]]:
    """``{class: sorted relative paths}`` of the image folder."""
    classes = sorted(d.name for d in data.iterdir() if d.is_dir())
    return {
        c: sorted(f"{c}/{f.name}" for f in (data / c).iterdir() if f.suffix.lower() in EXTS) for c in classes
    }


def make_split(data: Path, seed: int = SEED) -> dict[str, list[str]]:
    """Seeded stratified split: per class, shuffle the sorted list, take val then test, the rest is train."""
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, files in list_images(data).items():
        files = list(files)
        random.Random(f"{seed}/{c}").shuffle(files)
        n_val, n_test = PER_CLASS["val"], PER_CLASS["test"]
        out["val"] += sorted(files[:n_val])
        out["test"] += sorted(files[n_val : n_val + n_test])
        out["train"] += sorted(files[n_val + n_test :])
    return out


def digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:16]


def write_lists(split: dict[str, list[str]], results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    for name in ("val", "test"):
        (results / f"split_{name}.txt").write_text("\n".join(split[name]) + "\n")
    manifest = {
        "seed": SEED,
        "rule": "per class: random.Random(f'{seed}/{class}').shuffle(sorted files); first 250 val, next 250 "
        "test, rest train",
        "counts": {k: len(v) for k, v in split.items()},
        "sha256_16": {k: digest(v) for k, v in split.items()},
    }
    (results / "split.json").write_text(json.dumps(manifest, indent=2) + "\n")


def read_lists(data: Path, results: Path = RESULTS) -> dict[str, list[str]]:
    """The committed split applied to ``data`` (train = every image not in val/test)."""
    val = (results / "split_val.txt").read_text().split()
    test = (results / "split_test.txt").read_text().split()
    held = set(val) | set(test)
    train = [p for files in list_images(data).values() for p in files if p not in held]
    return {"train": train, "val": val, "test": test}


def materialise(data: Path, out: Path, split: dict[str, list[str]]) -> Path:
    """Symlink folders ``out/{train,val,test}/<class>/<file>`` -> the original images (idempotent)."""
    data = data.resolve()
    for name, paths in split.items():
        for rel in paths:
            link = out / name / rel
            if not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(data / rel, link)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/cifar10/train"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/cifar10_split"))
    ap.add_argument("--write", action="store_true", help="(re)write the committed split lists")
    args = ap.parse_args()
    split = make_split(args.data) if args.write else read_lists(args.data)
    if args.write:
        write_lists(split)
    materialise(args.data, args.out, split)
    print({k: len(v) for k, v in split.items()}, "->", args.out)


if __name__ == "__main__":
    main()
