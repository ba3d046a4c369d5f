#!/usr/bin/env bash
# Train the protocol's teacher (cifar10_teacher.py, 160 epochs) on a GPU lent by the `device` tool, in as
# many calls as it takes: each call goes on from the last complete epoch and hands back the checkpoint.
#
# The CIFAR-10 folder (../shared) does not travel to that machine; the split, packed, does (16 MB: the small
# JPEGs share their headers). Here, once:
#     mkdir -p .gpu && tar -czhf .gpu/split.tar.gz -C /tmp/hwkd-cifar10 split   # -h: links into ../shared
# (.gpu/ and .gpu-run/ are in .gitignore.)
# Each call (the device tool's run): command "bash benchmarks/device_teacher.sh", carry [".gpu"],
# timeout_s 600. The checkpoint lives in .gpu-run/ (ignored, not carried), which a warm machine keeps
# between calls; $OUT gets a copy of it and of the log each time. When the log shows epoch 160, here:
#     python benchmarks/cifar10_teacher.py --split /tmp/hwkd-cifar10/split --out DIR_WITH_last.pt --finalise --tag e160
# Settings: DEVICE (cuda), EPOCHS (160), WORKERS (8), BUDGET_S (seconds of training this call, 540);
# SPLIT and PACK (where the split is unpacked, and from what) for a trial run elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
split=${SPLIT:-/tmp/hwkd-cifar10/split}
run=.gpu-run/teacher${EPOCHS:-160}
if [ ! -d "$split/train" ]; then
    mkdir -p "$(dirname "$split")"
    tar -xzf "${PACK:-.gpu/split.tar.gz}" -C "$(dirname "$split")"
fi
resume=()
[ -f "$run/last.pt" ] && resume=(--resume)
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
status=0
timeout --signal=INT "${BUDGET_S:-540}" python3 benchmarks/cifar10_teacher.py --split "$split" --out "$run" \
    --epochs "${EPOCHS:-160}" --device "${DEVICE:-cuda}" --workers "${WORKERS:-8}" --threads 4 "${resume[@]}" || status=$?
if [ -f "$run/last.pt" ]; then
    cp "$run/last.pt" "$run/log.jsonl" "${OUT:-/tmp}/"
    tail -n 1 "$run/log.jsonl"
fi
# 124/130: the time budget ran out mid-epoch (the checkpoint holds the last complete one); call again.
[ "$status" -eq 0 ] || [ "$status" -eq 124 ] || [ "$status" -eq 130 ] || exit "$status"
