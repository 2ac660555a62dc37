#!/usr/bin/env bash
# One lease of a GPU machine, in one call: GPU parity tests, then the benchmarks, each stage under its own time
# limit and all of them under a global deadline, so that a slow or broken stage cannot eat the others' time.
#
#   STAGES="tests_fp169 bench_fp169 bench_attn" DEADLINE=420 bash benchmarks/device_session.sh
# (without STAGES: every stage but bench_attn_large, in the order of what a stage can settle: first the two
# stages whose result can close an issue on its own (bench_fp169: the decode kernel's staging against the 85%-of-copy
# target, issue 5; precision: 300 fp16 steps with per-resblock scaling against bf16, the last item of issue 7), then
# bench_train (never run on a GPU; the presets' MFU and the time sinks issue 8 asks for), then bench_attn (the
# attention kernels' pipelined loop and fused backward, each provider checked against fp32 at the paper's shape
# before it is timed; issue 4's targets), then the CUDA tests and the profiles that explain the numbers)
#
# Stages (run in the order given; a stage is skipped when less than its minimum time is left):
#   tests_attn   tests/test_attention_triton.py on the GPU (every parity test, the gpu-marked ones included) and
#                tests/test_decode_graph.py (CUDA-graph sampling = eager sampling, bit for bit)
#   tests_fp169  the gpu-marked tests of tests/test_fp169_ops.py (the CUDA op bit for bit against the reference;
#                the CPU ones run in CI), tests/test_adam_moments.py (16-bit Adam moments on CUDA tensors) and
#                tests/test_powersgd_gpu.py (the PowerSGD reducer on CUDA tensors, NCCL world of one), and the
#                gpu-marked tests of tests/test_ema.py (the host weight average from asynchronous copies = the device
#                one) and tests/test_tf32_heads.py
#   fp169_argcheck  each invalid-argument call of test_argument_errors in its own process, with the CUDA build and
#                with the CPU build (CUDA_VISIBLE_DEVICES=""): which one crashes (segfault seen 2026-12-04, H200)
#   bench_fp169  benchmarks/bench_fp169.py --save
#   bench_attn   benchmarks/bench_attention.py, the paper's case (T=256, W=32)
#   bench_attn_large  the W=64 case
#   ncu_attn     Nsight Compute on a forward+backward of the row mask at the paper's shape, once per backward path
#                (split, fused), tiles pinned to the H200's tuned ones: speed of light, occupancy, warp stall reasons
#                per kernel (needs ncu; Firecracker)
#   bench_attn_diag   diagnostics: the kernels on the plain causal mask vs SDPA causal (same tiles), batch 32,
#                the backward paths pinned (triton_split, triton_fused) next to the tuned choice
#   precision    benchmarks/precision_compare.py: fp16 resblocks with per-resblock scaling vs bf16, 300 steps of a
#                16-layer d512 prior on the demo's shapes tokens (carry PRECISION_TOKENS, default runs/demo15/tokens)
#   bench_train  benchmarks/bench_train.py, 125M/350M/1.3B, ZeRO-2, bf16, triton attention (deepspeed launcher)
#   bench_train_tf32  350M with the output heads' matmuls in TF32 (--logits-matmul tf32) against the IEEE fp32
#                heads of bench_train (its floors predict the heads as the second largest part of a 350M step)
#   bench_train_compiled  the same with every resblock under torch.compile (--compile on), 350M: Inductor's
#                fusion of the elementwise work against the eager numbers of bench_train
#   bench_sample benchmarks/bench_sample.py, 350M, bf16 (eager cached steps against CUDA-graph replay)
#   memory_check benchmarks/memory_check.py, 125M, ZeRO 0/2/3 bf16 on one GPU: the storages DeepSpeed holds against
#                the estimate, with torch.cuda.max_memory_allocated beside them (activations included there)
# The machine has no deepspeed and no package index: run ../shared/device/wheels.sh first and carry .whl/ (and, for
# the precision stage, the token shards: runs/demo15/tokens, 19 MB, or PRECISION_TOKENS; `DEMO_STOP_AFTER=tokens
# make demo` writes runs/demo/tokens in ~10 min on 2 CPU cores; without them the stage is skipped).
# (Committing them on the CPU machine: unpack into benchmarks/results/, then python benchmarks/results_index.py.)
# Logs and results go to $OUT/bundle.tgz (rebuilt after every stage, so a killed run still returns what it did);
# results are also written under benchmarks/results/ named by device and date.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
DEADLINE=${DEADLINE:-420}
STAGES=${STAGES:-"bench_fp169 precision bench_train bench_attn tests_fp169 fp169_argcheck ncu_attn bench_train_tf32 tests_attn bench_attn_diag bench_train_compiled bench_sample memory_check"}
OUT=${OUT:-/tmp/device_out}
LOGS=/tmp/device_logs
mkdir -p "$OUT" "$LOGS"
DATE=$(date +%Y%m%d)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export DALLE_DS_OPS_CACHE=/tmp/dalle_ds_ops MAX_JOBS=16

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT
fi
export PATH=/tmp/site/bin:$PATH

left() { echo $((DEADLINE - ($(date +%s) - START))); }
bundle() {
  cp -f benchmarks/results/*_"$DATE"* "$LOGS"/ 2>/dev/null  # every result of the day (bench_fp169 names its own)
  tar -czf "$OUT/bundle.tgz" -C "$LOGS" . 2>/dev/null
}
# How busy the host is: eager GPU timings include the host's launch path, so a compile or a test worker still running
# beside a benchmark slows it (the 2026-12-04 H200 run saw a 1-min load average of 51 at bench_fp169's start, after
# the test stages). procs_running counts the runnable threads at this instant, this shell's included.
busy() {
  echo "load $(cut -d' ' -f1 /proc/loadavg), $(awk '/^procs_running/ {print $2}' /proc/stat) runnable;" \
    "busiest (CPU % over their lifetime): $(ps -eo pcpu=,comm= --sort=-pcpu | head -n 3 | awk '{print $2, $1 "%"}' \
    | paste -sd, | sed 's/,/, /g')"
}
# run NAME MIN MAX CMD...: skip if fewer than MIN seconds are left; otherwise run with a limit of min(MAX, left-5).
# timeout puts the stage in a process group of its own (its pid); whatever the stage leaves running there (test
# workers, compile pools) is killed when it returns, so that it cannot compete with the next stage for the CPUs.
run() {
  local name=$1 min=$2 max=$3; shift 3
  local l; l=$(left)
  if [ "$l" -lt "$min" ]; then echo "== $name: SKIPPED ($l s left, needs $min)"; return; fi
  local lim=$(( max < l - 5 ? max : l - 5 ))
  local t0; t0=$(date +%s)
  local head; head="== $name: start (limit ${lim}s; host $(busy))"
  echo "$head"; echo "$head" > "$LOGS/$name.log"
  timeout -k 5 "$lim" "$@" >> "$LOGS/$name.log" 2>&1 &
  local pid=$!
  wait "$pid"
  local rc=$?
  kill -KILL -- "-$pid" 2>/dev/null
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
  tail -n "${TAIL:-15}" "$LOGS/$name.log"
  bundle
}
# The 1-6-9 extension's JIT build (ninja, MAX_JOBS compiles at once: every core for ~10 s), once, in the foreground:
# a build in the background would compete with a timing stage for the CPUs.
FP169_BUILT=
build_fp169() {
  [ -n "$FP169_BUILT" ] && return
  FP169_BUILT=1
  TAIL=3 run fp169_build 15 120 python3 -c \
    "from dalle_ds.ops.fp169 import _ext; import json; print(json.dumps(_ext.load(), default=str))"
}

{ nvidia-smi; python3 -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__,
  'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(),
  torch.cuda.get_device_properties(0))"; python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)";
} > "$LOGS/env.log" 2>&1
# h100 / h200 / a100 (an H100 SXM calls itself "NVIDIA H100 80GB HBM3": the last word would be "hbm3")
DEV=$(python3 -c "import sys, torch; sys.path.insert(0, 'benchmarks'); import timing
print(timing.device_tag(torch.cuda.get_device_name(0)))" 2>/dev/null || echo cpu)
echo "device $DEV, stages: $STAGES, deadline ${DEADLINE}s"; tail -n 4 "$LOGS/env.log"

# Nothing runs in the background: every stage has the host to itself. (The kernels' sm_90 loop counts,
# benchmarks/attn_sass.py, need no GPU: they are made on the CPU machine with the device's triton, e.g.
# `pip install --no-deps --target /tmp/t36 triton==3.6.0` and PYTHONPATH=/tmp/t36; attn_sass_triton3.6.0_*.md.)
for stage in $STAGES; do
  case $stage in
    tests_attn)
      run tests_attn 60 150 python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 200 -rfEs \
        tests/test_attention_triton.py tests/test_decode_graph.py -k "not interpreter and not sm90" ;;
    tests_fp169)
      build_fp169
      run tests_fp169 30 150 python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 120 -rfEs -m gpu \
        tests/test_fp169_ops.py tests/test_adam_moments.py tests/test_powersgd_gpu.py tests/test_ema.py \
        tests/test_tf32_heads.py ;;
    fp169_argcheck)
      build_fp169
      run fp169_argcheck 20 120 bash -c '
        for vis in 0 ""; do for call in \
          "ops.encode_out(x, torch.empty(10, dtype=torch.int32), 1.0, False, 0)" \
          "ops.encode_out(x, torch.empty(10, dtype=torch.int16), 1.0, False, 7)" \
          "ops.decode_out(torch.zeros(10, dtype=torch.int16), torch.empty(10), 1.0, 7)" \
          "ops.encode_out(x.cuda(), torch.empty(10, dtype=torch.int16, device=\"cuda\"), 1.0, False, 7)"; do
            CUDA_VISIBLE_DEVICES=$vis python3 -X faulthandler -c "
import torch
from dalle_ds.ops.fp169 import _ext
print(_ext.load())
ops = torch.ops.dalle_ds_fp169
x = torch.randn(10)
try:
    $call
    print(\"no error\")
except Exception as e:
    print(type(e).__name__, str(e).splitlines()[0][:120])" 2>&1 | tail -n 2
            echo "CUDA_VISIBLE_DEVICES=$vis $call -> rc=${PIPESTATUS[0]}"
          done; done
        # the crashing test itself, alone (not after other tests in an xdist worker), then under a debugger for the
        # native frames (faulthandler shows only the Python ones): gdb, else cuda-gdb (the GPU image has no gdb;
        # cuda-gdb also debugs host code)
        python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_fp169_ops.py -k argument_errors 2>&1 \
          | tail -n 4; echo "test_argument_errors alone -> rc=${PIPESTATUS[0]}"
        dbg=$(command -v gdb || command -v cuda-gdb || true)
        if [ -n "$dbg" ]; then
          "$dbg" -q -batch -ex run -ex bt --args python3 -m pytest -q -p no:cacheprovider tests/test_fp169_ops.py \
            -k "argument_errors or encode or decode" 2>&1 | grep -E "^#|SIG|passed|failed" | head -n 40
        else echo "no gdb or cuda-gdb on this machine"; fi' ;;
    bench_fp169)
      build_fp169
      TAIL=30 run bench_fp169 30 120 python3 benchmarks/bench_fp169.py --save ;;
    bench_attn)
      # both backward paths pinned beside the tuned one: each is checked against fp32 before it is timed
      TAIL=40 run bench_attn 60 300 python3 benchmarks/bench_attention.py --no-large \
        --providers triton,triton_split,triton_fused,flex,sdpa_causal,sdpa_mask \
        --out "benchmarks/results/attention_${DEV}_${DATE}" ;;
    bench_attn_large)
      TAIL=25 run bench_attn_large 60 240 python3 benchmarks/bench_attention.py --cases large_w64 \
        --out "benchmarks/results/attention_large_${DEV}_${DATE}" ;;
    bench_attn_diag)
      TAIL=25 run bench_attn_diag 60 200 python3 benchmarks/bench_attention.py --no-large --batch 32 \
        --extra-masks causal --providers triton,triton_split,triton_fused,sdpa_causal --out "benchmarks/results/attention_diag_${DEV}_${DATE}" ;;
    ncu_attn)
      TAIL=80 run ncu_attn 45 150 ncu --clock-control none --profile-from-start off -k "regex:_attn" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis python3 benchmarks/attn_ncu_probe.py --kind row ;;
    precision)
      if [ ! -f "${PRECISION_TOKENS:-runs/demo15/tokens}/train/meta.json" ]; then
        echo "== precision: SKIPPED (no token shards at ${PRECISION_TOKENS:-runs/demo15/tokens}: make them on the CPU" \
          "machine with DEMO_STOP_AFTER=tokens make demo, carry runs/demo/tokens, PRECISION_TOKENS=runs/demo/tokens)"
        continue
      fi
      DALLE_DS_ATTN_TUNE=0 TAIL=25 run precision 120 300 python3 benchmarks/precision_compare.py \
        "${PRECISION_TOKENS:-runs/demo15/tokens}" /tmp/precision --gpus 1 --precisions fp16,bf16 --steps 300 \
        --set model.n_layers=16 --set model.d_model=512 --set model.n_heads=8 \
        --ds_set train_micro_batch_size_per_gpu=32 --ds_set optimizer.params.lr=1e-3 \
        --ds_set tensorboard.enabled=false \
        --tag "${DEV}_${DATE}_d512_16layers_300steps" ;;
    bench_train)
      TAIL=30 run bench_train 90 360 deepspeed --num_gpus 1 benchmarks/bench_train.py --presets "${TRAIN_PRESETS:-125M,350M,1.3B}" \
        --zero 2 --precision bf16 --attn-backend triton --checkpointing "${TRAIN_CKPT:-off}" --micro-batch 8 --torch-adam on \
        --out "benchmarks/results/train_${DEV}_${DATE}" ;;
    bench_train_tf32)
      TAIL=30 run bench_train_tf32 90 240 deepspeed --num_gpus 1 benchmarks/bench_train.py --presets "${TRAIN_TF32_PRESETS:-350M}" \
        --zero 2 --precision bf16 --attn-backend triton --checkpointing off --logits-matmul tf32 --micro-batch 8 \
        --torch-adam on --out "benchmarks/results/train_tf32logits_${DEV}_${DATE}" ;;
    bench_train_compiled)
      TAIL=30 run bench_train_compiled 120 360 deepspeed --num_gpus 1 benchmarks/bench_train.py \
        --presets "${TRAIN_COMPILE_PRESETS:-350M}" --zero 2 --precision bf16 --attn-backend triton --checkpointing off \
        --compile on --warmup 8 --micro-batch 8 --torch-adam on --out "benchmarks/results/train_compiled_${DEV}_${DATE}" ;;
    bench_sample)
      TAIL=15 run bench_sample 60 200 python3 benchmarks/bench_sample.py --preset 350M --dtype bfloat16 \
        --batch-sizes 1,8,32,128 --no-uncached-above 1 --out "benchmarks/results/sample_${DEV}_${DATE}" ;;
    memory_check)
      DALLE_DS_ATTN_TUNE=0 TAIL=8 run memory_check 45 150 python3 benchmarks/memory_check.py --preset 125M \
        --zero 0 2 3 --precision bf16 --out "benchmarks/results/memory_check_${DEV}_${DATE}.json" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
wait
bundle
echo "== done in $(( $(date +%s) - START ))s"
