#!/usr/bin/env bash
# 1 vs 2 torchrun processes on the CPU, same global batch (train.batch_size=64, split across ranks):
# distill only, embedded digits, built-in teacher from the cache. Writes benchmarks/results/ddp_cpu.jsonl.
# Usage: bash benchmarks/ddp_cpu.sh [THREADS_TOTAL]   (OMP threads shared out between the processes)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
TOTAL=${1:-2}
ARGS="--stages distill --set teacher.epochs=3 --set distill.epochs=3 --set train.batch_size=64 --json"
for n in 1 2; do
  out=$(mktemp -d)/run
  t0=$(date +%s.%N)
  OMP_NUM_THREADS=$(( TOTAL / n > 0 ? TOTAL / n : 1 )) torchrun --standalone --nproc-per-node $n \
    -m hwkd compress --out "$out" $ARGS > "$out.json" 2> "$out.err"
  rc=$?
  t1=$(date +%s.%N)
  python - "$out" "$n" "$rc" "$t0" "$t1" <<'PY' >> benchmarks/results/ddp_cpu.jsonl
import json, sys
out, n, rc, t0, t1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
r, m = json.load(open(out + ".json")), json.load(open(out + "/manifest.json"))
d = r["stages"][0]
print(json.dumps({"nproc": n, "rc": rc, "wall_s": round(t1 - t0, 1), "distill_s": m["stage_seconds"]["distill"],
                  "test_accuracy": d["accuracy"], "val_accuracy_by_epoch": [round(h["val_accuracy"], 4) for h in d["history"]],
                  "world_size": m["world_size"], "loadavg_1min": float(open("/proc/loadavg").read().split()[0])}))
PY
done
