#!/usr/bin/env bash
# GPU: the fine-tune arm of the issue-14 study on real CIFAR-100, offline.
#
#   benchmarks/gpu_study.sh [DATA_DIR] [OUT_DIR]
#
# Runs `transferlab study` with one arm, timm:tf_efficientnet_lite0:finetune:lite-finetune (the
# full fine-tune recipe of presets/lite-finetune.yaml: 0.8416 test accuracy in 10 epochs on the
# full data, RESULTS.md), at 4, 16, 64 and all images per class and SEEDS seeds. The subsets,
# validation and test split are the ones the CPU study draws (same seeds, same split seed), so its
# rows line up with the CPU study's frozen and scratch rows; its times are this GPU's.
# Cells run seed by seed. BUDGET_S (default 0: no limit) stops the study with SIGTERM after that
# many seconds (the cell in flight is dropped, finished cells stay), and the study's report is
# then rebuilt from the cells that finished. Installs nothing; fails clearly without a GPU.
# A CPU dry run on tiny data:
#   DEVICE=cpu PER_CLASS=2,all SEEDS=1 EXTRA="--image-size 32 --val-size 20" \
#     benchmarks/gpu_study.sh DATA OUT
set -euo pipefail
DATA=${1:-../shared/datasets}
OUT=${2:-runs/gpu-study}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-3}
PER_CLASS=${PER_CLASS:-4,16,64,all}
BUDGET_S=${BUDGET_S:-0}
read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"

source "$(dirname "$0")/gpu_common.sh"
require_gpu_and_data gpu_study.sh
$PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'
t0=$EPOCHREALTIME
code=0
timeout --signal=TERM --kill-after=60 "$BUDGET_S" \
  $PY -m transferlab study --arms timm:tf_efficientnet_lite0:finetune:lite-finetune \
    --per-class "$PER_CLASS" --seeds "$SEEDS" --data-dir "$DATA" --device "$DEVICE" \
    --run-dir "$OUT" --no-progress "${EXTRA_FLAGS[@]}" || code=$?
echo "gpu_study.sh: study exit $code after $($PY -c "print(round($EPOCHREALTIME - $t0, 1))") s"
# after a stop by BUDGET_S the study wrote study.csv in its finally; the report reads the cells
$PY -m transferlab report "$OUT" || echo "gpu_study.sh: no report (exit $?)"
