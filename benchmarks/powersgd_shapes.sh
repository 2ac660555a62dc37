#!/usr/bin/env bash
# Issue 6's quality check: the demo prior on shapes image tokens, 4 CPU ranks emulating 2 machines x 2 GPUs (ZeRO-2),
# trained for the same steps with the stock fp32 all-reduce and with hierarchical PowerSGD; compares validation
# loss and writes benchmarks/results/powersgd_shapes_<tag>.{md,json}.
#   benchmarks/powersgd_shapes.sh [TOKENS_DIR] [OUT_DIR]   (default runs/demo/tokens from `make demo`; runs/psgd)
#   PSGD_RANK=16 (per machine; 8 per GPU) PSGD_STEPS=400 PSGD_WARM_START=false PSGD_PORT=29500 PSGD_TAG=cpu_<date>
#   PSGD_SEED=1234 (run seed: init, data order, both runs) PSGD_QSEED=0 (seed of the fixed Q) for seed-spread repeats
#   PSGD_DS_CONFIG=ds_configs/cpu_dalle.json PSGD_RESBLOCK_DTYPE=float32
#   PSGD_DS_SET="optimizer.params.lr=1e-3 scheduler.params.warmup_num_steps=30": --ds_set overrides of that config,
#   space-separated (train_micro_batch_size_per_gpu=64 is global batch 256 on the 4 ranks)
#   PSGD_SET="model.d_model=256 model.n_heads=8": --set overrides of the run config (both runs), space-separated
#   PSGD_ERROR_DTYPE=fp169 (fp32: the ablation) PSGD_DIAGNOSTICS=true (log delayed/spread norms, the sent fraction,
#   the buffer updates' rounding) PSGD_RECENTER=0 (re-center the buffers over machines every N steps; 0: never, the paper)
#   PSGD_START=0 (optimizer steps reduced uncompressed in fp32 before PowerSGD starts)
#   PSGD_STOCK_RUN=DIR: compare with an earlier stock run (same tokens, steps, seed and config; the report checks)
#   instead of training the stock run again
#   PSGD_WINDOW=20: steps per row of the report's along-the-run table (default: powersgd_report.py's)
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${1:-runs/demo/tokens}
OUT=${2:-runs/psgd}
RANK=${PSGD_RANK:-16}
STEPS=${PSGD_STEPS:-400}
TAG=${PSGD_TAG:-cpu_$(date +%Y%m%d)}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
test -f "$TOKENS/train/meta.json" || { echo "no token shards in $TOKENS/train: run make demo first (or pass a folder)"; exit 1; }
SEED=${PSGD_SEED:-1234}
# fp32 resblocks (PSGD_RESBLOCK_DTYPE), as in every recorded comparison, though the demo preset now trains in bf16.
common=(--deepspeed_config "${PSGD_DS_CONFIG:-ds_configs/cpu_dalle.json}" --preset demo --set "steps=$STEPS" --set eval_every=0 --set "seed=$SEED"
        --set "model.resblock_dtype=${PSGD_RESBLOCK_DTYPE:-float32}"
        --set "data.train_tokens=$TOKENS/train" --set "data.val_tokens=$TOKENS/test_id" --set data.val_batches=16)
read -ra ds_set <<< "${PSGD_DS_SET:-}"  # split on spaces, no globbing ([0.9,0.95] stays as written)
for item in "${ds_set[@]}"; do common+=(--ds_set "$item"); done
read -ra run_set <<< "${PSGD_SET:-}"
for item in "${run_set[@]}"; do common+=(--set "$item"); done
for mode in stock powersgd; do
  extra=()
  [ "$mode" = powersgd ] && extra=(--set powersgd.enabled=true --set "powersgd.rank=$RANK" --set powersgd.local_size=2
    --set "powersgd.warm_start=${PSGD_WARM_START:-false}" --set "powersgd.seed=${PSGD_QSEED:-0}"
    --set "powersgd.error_dtype=${PSGD_ERROR_DTYPE:-fp169}" --set "powersgd.diagnostics=${PSGD_DIAGNOSTICS:-true}"
    --set "powersgd.recenter_every=${PSGD_RECENTER:-0}" --set "powersgd.start_step=${PSGD_START:-0}")
  if [ "$mode" = stock ] && [ -n "${PSGD_STOCK_RUN:-}" ]; then
    mkdir -p "$OUT" && ln -sfn "$(realpath "$PSGD_STOCK_RUN")" "$OUT/stock"
  fi
  if [ ! -f "$OUT/$mode/dalle_metrics.json" ]; then
    t0=$(date +%s)
    deepspeed --num_gpus 4 --master_port "${PSGD_PORT:-29500}" launch/train_dalle.py "${common[@]}" "${extra[@]}" --out "$OUT/$mode"
    echo "$(( $(date +%s) - t0 ))" > "$OUT/$mode/wall_seconds.txt"
  fi
done
# the command as one would type it again (values with spaces, like PSGD_DS_SET's, in single quotes)
settings=$(env | grep '^PSGD_' | sort | while IFS= read -r kv; do
  case ${kv#*=} in *' '*) printf "%s='%s' " "${kv%%=*}" "${kv#*=}" ;; *) printf '%s ' "$kv" ;; esac; done)
window=(); [ -n "${PSGD_WINDOW:-}" ] && window=(--window "$PSGD_WINDOW")
python benchmarks/powersgd_report.py "$OUT" --tag "$TAG" --command "$settings$0 $*" "${window[@]}"
