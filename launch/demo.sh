#!/usr/bin/env bash
# The CPU demo behind `make demo`: everything on built-in data, 2 ranks under the deepspeed launcher.
#   launch/demo.sh [RUN_DIR]        (default runs/demo; DEMO_NPROC=2 ranks)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
NPROC=${DEMO_NPROC:-2}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RUN"
start=$(date +%s)
log() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

log "stage 1: training the dVAE on shapes (64x64 -> 16x16 codes) on $NPROC ranks"
deepspeed --num_gpus "$NPROC" launch/train_dvae.py --deepspeed_config ds_configs/cpu_dvae.json \
  --preset demo --out "$RUN/dvae" 2>&1 | grep -v -E '^\[20[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]' || true
test -f "$RUN/dvae/dvae.pt" || { echo "demo: the dVAE run did not finish (see above)"; exit 1; }

log "done. Pictures: $RUN/dvae/reconstructions_final.png (originals above, reconstructions below)"
log "metrics: $RUN/dvae/dvae_metrics.json; TensorBoard: tensorboard --logdir $RUN/dvae/monitor"
