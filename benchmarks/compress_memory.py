"""Peak RSS of ``hwkd compress`` on 5,000 vs 50,000 CIFAR-10 JPEGs: memory must not grow with the data.

The 5k folder is symlinks (500 per class) under a temporary directory, never a copy. Each run is
``/usr/bin/time -v nice -n 10 python -m hwkd compress ...`` with a user teacher (so no built-in
teacher is trained), the distill stage only and one epoch. GNU time's ``Maximum resident set size`` is
the RSS of the biggest single process of the tree (the main one here; DataLoader workers are smaller
and share most of their pages with it), not a sum over processes.

    python benchmarks/compress_memory.py --data /work/shared/data/cifar10/train
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subset(src: Path, dst: Path, per_class: int) -> Path:
    for cls in sorted(d for d in src.iterdir() if d.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (dst / cls.name / f.name).symlink_to(f)
    return dst


def compress_cmd(data: Path, teacher: Path, out: Path) -> list[str]:
    return [
        "nice", "-n", "10", sys.executable, "-m", "hwkd", "compress", "--profile", "x86-avx2",
        "--data", str(data), "--teacher", str(teacher), "--teacher-arch", "cnn", "--allow-weak-teacher",
        "--student", "0.5x", "--stages", "distill", "--set", "distill.epochs=1",
        "--set", "train.batch_size=128", "--out", str(out), "--overwrite",
    ]  # fmt: skip


def measure(cmd: list[str], env: dict) -> dict:
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", proc.stderr).group(1)
    return {"peak_rss_mb": round(rss_kb / 1024, 1), "wall_s": round(time.time() - t0, 1), "cpu_percent": int(cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/cifar10/train")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress_memory"))
    args = ap.parse_args()
    import torch

    sys.path.insert(0, str(ROOT))
    from hwkd.models.zoo import ZOO

    src = Path(args.data)
    classes = len([d for d in src.iterdir() if d.is_dir()])
    total = sum(len(list((src / d.name).iterdir())) for d in src.iterdir() if d.is_dir())
    rows = []
    with tempfile.TemporaryDirectory(prefix="hwkd-mem-") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        torch.save(ZOO.get("cnn")(num_classes=classes, in_channels=3).state_dict(), tmp / "teacher.pt")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HWKD_CACHE": str(tmp / "cache")}
        for label, data, n in (("5k", subset(src, tmp / "5k", 5000 // classes), 5000), ("50k", src, total)):
            cmd = compress_cmd(data, tmp / "teacher.pt", tmp / f"run-{label}")
            rows.append({"images": n, "data": str(data), **measure(cmd, env), "command": " ".join(cmd[3:])})
            print(json.dumps(rows[-1]), flush=True)
    write(rows, Path(args.out))


def write(rows: list[dict], out: Path, notes: list[str] | None = None) -> None:
    record = {
        "what": "peak RSS of hwkd compress (GNU time -v, Maximum resident set size)",
        "runs": rows,
        "rss_ratio_50k_over_5k": round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3),
        "notes": notes
        or [
            "Shared host: 2 cores, other sessions running (load average about 11); wall time is not comparable.",
            "Distill stage only, 1 epoch, batch 128, user teacher (zoo cnn) with --allow-weak-teacher, student 0.5x.",
        ],
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    md = [
        "# Peak memory of `hwkd compress` vs dataset size",
        "",
        "| images | peak RSS (MB) | wall (s) | CPU % |",
        "|---|---|---|---|",
        *(f"| {r['images']} | {r['peak_rss_mb']} | {r['wall_s']} | {r['cpu_percent']} |" for r in rows),
        "",
        f"50k / 5k peak RSS: **{record['rss_ratio_50k_over_5k']}**.",
        "",
        "Commands (`/usr/bin/time -v` in front of each):",
        "",
        *(f"- `{r['command']}`" for r in rows),
        "",
        *(f"- {n}" for n in record["notes"]),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
