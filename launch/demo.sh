#!/usr/bin/env bash
# The CPU demo behind `make demo`: the whole text-to-image system on built-in shapes data, 2 ranks under the
# deepspeed launcher (gloo on CPU): dVAE → image-token shards → prior → CLIP reranker → samples for test_id and
# test_ood captions → shapes scorer → image prompts (completions, text-controlled edits) → RUN_DIR/metrics.json.
#   launch/demo.sh [RUN_DIR]        (default runs/demo; DEMO_NPROC=2 ranks; DEMO_CAPTIONS_ID=256 test_id and
#                                    DEMO_CAPTIONS_OOD=128 test_ood captions (DEMO_CAPTIONS sets both);
#                                    DEMO_CANDIDATES=32 samples per caption; DEMO_TEMPERATURE=0.8;
#                                    DEMO_PORT=29500, the launcher's rendezvous port: set another to run two at once;
#                                    DEMO_STOP_AFTER=tokens stops after the dVAE and the image-token shards)
# Each stage resumes from its checkpoints or is skipped when its output exists, so an interrupted demo continues.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
NPROC=${DEMO_NPROC:-2}
# 256 test_id captions: exact match on 64 is ±0.06 (one binomial sd at 0.5), on 256 ±0.03; one prior and CLIP
# scored 0.484 on 64 and 0.594 on 256 (runs/demo14, docs/dvae_cpu_trials.md).
CAPTIONS_ID=${DEMO_CAPTIONS_ID:-${DEMO_CAPTIONS:-256}}
CAPTIONS_OOD=${DEMO_CAPTIONS_OOD:-${DEMO_CAPTIONS:-128}}
# 32 candidates at t = 0.8 (the paper: 512 at t = 1): 256 test_id captions of one prior, the demo's CLIP, reranked
# exact match 0.44 at 16 / t 1, 0.50 at 16 / t 0.8, 0.55 at 32 / t 0.8 (docs/dvae_cpu_trials.md, "Cooler, and more")
CANDIDATES=${DEMO_CANDIDATES:-32}
TEMPERATURE=${DEMO_TEMPERATURE:-0.8}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RUN"
start=$(date +%s)
TIMES="$RUN/stage_seconds.txt"; : > "$TIMES"
log() { echo "[demo $(( $(date +%s) - start ))s] $*"; }
stage() {  # stage NAME OUTPUT_FILE COMMAND...
  local name=$1 want=$2; shift 2
  if [ -e "$want" ]; then log "$name: $want exists, skipped"; return; fi
  local t0; t0=$(date +%s)
  log "$name"
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -gt 128 ]; then  # the trainers stop on SIGTERM / SIGINT / SIGUSR1 with a checkpoint (128 + signal)
    echo "demo: stage '$name' stopped by signal $((rc - 128)); run the demo again to continue from its checkpoints"
    exit "$rc"
  elif [ "$rc" -ne 0 ]; then
    exit "$rc"
  fi
  test -e "$want" || { echo "demo: stage '$name' did not produce $want (see above)"; exit 1; }
  echo "$name $(( $(date +%s) - t0 ))" >> "$TIMES"
}
ds() { deepspeed --num_gpus "$NPROC" --master_port "${DEMO_PORT:-29500}" "$@"; }

stage "stage 1: dVAE on shapes (64x64 -> 16x16 codes)" "$RUN/dvae/dvae.pt" \
  ds launch/train_dvae.py --deepspeed_config ds_configs/cpu_dvae.json --preset demo --out "$RUN/dvae"
for split in train test_id; do
  n=20000; [ "$split" = test_id ] && n=512
  stage "image tokens: $split" "$RUN/tokens/$split/meta.json" \
    ds launch/tokenize_images.py --dvae "$RUN/dvae/dvae.pt" --split "$split" --num_samples "$n" --bf16 \
      --out "$RUN/tokens/$split"
done
if [ "${DEMO_STOP_AFTER:-}" = tokens ]; then  # e.g. token shards for benchmarks/precision_compare.py
  log "stopping after the image tokens (DEMO_STOP_AFTER=tokens): $RUN/tokens"; exit 0
fi
stage "stage 2: the prior (ZeRO-2)" "$RUN/dalle/dalle.pt" \
  ds launch/train_dalle.py --deepspeed_config ds_configs/cpu_dalle.json --preset demo \
    --set data.train_tokens="$RUN/tokens/train" --set data.val_tokens="$RUN/tokens/test_id" --out "$RUN/dalle"
stage "CLIP reranker" "$RUN/clip/clip" \
  ds launch/train_clip.py --deepspeed_config ds_configs/cpu_clip.json --preset demo \
    --set tokenizer="$RUN/dalle/tokenizer" --out "$RUN/clip"
for split in test_id test_ood; do
  n=$CAPTIONS_ID; [ "$split" = test_ood ] && n=$CAPTIONS_OOD
  stage "samples: $n $split captions" "$RUN/samples_$split/metrics.json" \
    ds launch/sample.py --prior "$RUN/dalle/dalle.pt" --clip "$RUN/clip/clip" --shapes_split "$split" \
      --num_captions "$n" --num_candidates "$CANDIDATES" --temperature "$TEMPERATURE" --keep 4 --batch_size 256 \
      --out "$RUN/samples_$split"
done
# image prompts (paper §3.3): the prior completes each scene's lower half from its upper half, as the own caption or
# one with the lower object's colour or shape edited says (benchmarks/prompt_edit.py; one process, 83 s on a 2-core CPU)
stage "image prompts: 64 test_id scenes, own and edited captions" "$RUN/prompt_edit/prompt_edit.json" \
  python benchmarks/prompt_edit.py --prior "$RUN/dalle/dalle.pt" --clip "$RUN/clip/clip" --num_scenes 64 \
    --num_candidates "$CANDIDATES" --temperature "$TEMPERATURE" --no-reference --out "$RUN/prompt_edit/prompt_edit"
# the stages' loss curves from their CSV monitor files (RUN/<stage>/curves_*.svg), then the report
python launch/plot_metrics.py "$RUN/dvae" "$RUN/dalle" "$RUN/clip" > /dev/null || log "could not draw the training curves"
python launch/demo_report.py "$RUN" --total_seconds $(( $(date +%s) - start ))
