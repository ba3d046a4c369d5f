"""Peak memory of many networks in fresh processes: the data to choose the memory model's features offline.

Calibration fits the memory model (hwkd.hardware.memory) on ten networks per precision, too few to
compare features on. This measures, the way ``hwkd bench`` and calibration do (peak RSS growth of a
fresh process over loading the session and its warm-ups, ``isolated_memory``), calibration's four
network families (a seed of their own), its two large memory probes, and the benchmark models of
predictor_accuracy.py (zoo grid and torchvision / timm at 224 px), FP32 and INT8 QDQ, and writes each
one's traced layers beside its measured peak:

    python benchmarks/memory_dataset.py --networks 64 --out /tmp/memory.json.gz

Peak RSS does not depend on how busy the host is, so this can run beside other work. ``memory_fit.py``
fits and scores memory models on the file, nothing measured again.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from hwkd.artifacts import atomic_write  # noqa: E402
from hwkd.hardware.calib_graphs import FAMILIES, random_network  # noqa: E402
from hwkd.hardware.calibrate import memory_probe_networks, quantize  # noqa: E402
from hwkd.hardware.onnx_trace import trace_onnx  # noqa: E402
from hwkd.onnx import bench as ortbench  # noqa: E402


def input_shape(path: Path) -> dict[str, tuple[int, ...]]:
    import onnx

    inp = onnx.load(path, load_external_data=False).graph.input[0]
    return {inp.name: tuple(d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", type=int, default=64, help="calibration-family networks (spread over the families)")
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--threads", type=int, default=0, help="session threads (0 = every usable core, as calibration)")
    ap.add_argument("--no-benchmark-models", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import onnx
    import torch

    torch.set_num_threads(1)
    threads = ortbench.effective_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="hwkd-memory-") as tmp:
        root = Path(tmp)
        items: list[tuple[str, str, Path]] = []  # (group, name, fp32 path)
        for i in range(args.networks):
            family = FAMILIES[i % len(FAMILIES)]
            path = root / f"net{i}.onnx"
            onnx.save(random_network(rng, family=family), path)
            items.append((family, f"net{i}", path))
        for i, model in enumerate(memory_probe_networks(rng)):
            path = root / f"probe{i}.onnx"
            onnx.save(model, path)
            items.append(("probe", f"probe{i}", path))
        pairs = []
        for group, name, fp32 in items:
            pairs += [(group, name, "fp32", fp32), (group, name, "int8", quantize(fp32, root / f"{name}-int8.onnx", rng))]
        if not args.no_benchmark_models:
            from predictor_accuracy import export_models

            for r in export_models(root, quick=False):
                pairs.append((r["group"], r["model"], r["precision"], Path(r["path"])))
        for k, (group, name, prec, path) in enumerate(pairs):
            works, params, _ = trace_onnx(path)
            mem = ortbench.isolated_memory(path, input_shape(path), (ortbench.CPU_EP,), threads, warmup=3)
            rows.append({"group": group, "name": name, "precision": prec, "params": params,
                         "peak_mb": mem.get("peak_mb"), "works": [dataclasses.asdict(w) for w in works]})  # fmt: skip
            print(f"[{k + 1}/{len(pairs)}] {group} {name} {prec}: {mem.get('peak_mb')} MB", flush=True)
    out = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "host": ortbench.host_info(),
           "threads": threads, "seconds": round(time.time() - started, 1), "rows": rows}  # fmt: skip
    text = json.dumps(out)
    atomic_write(args.out, gzip.compress(text.encode(), mtime=0) if args.out.suffix == ".gz" else text)
    print(f"wrote {args.out} ({len(rows)} rows, {out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
