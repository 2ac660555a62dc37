#!/usr/bin/env bash
# `make bench`: every benchmark, results under benchmarks/results/ named by device and date.
# On a machine without a GPU the attention benchmark runs its tiny CPU harness only (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
DATE=$(date +%Y%m%d)
if command -v nvidia-smi >/dev/null 2>&1 && python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEV=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
  python benchmarks/bench_attention.py --out "benchmarks/results/attention_${DEV}_${DATE}"
  python benchmarks/bench_fp169.py --save
  python benchmarks/bench_sample.py --preset 350M --dtype bfloat16 --batch-sizes 1,8,32,128 --no-uncached-above 1 \
    --out "benchmarks/results/sample_${DEV}_${DATE}"
  deepspeed --num_gpus 1 benchmarks/bench_train.py --presets 125M,350M,1.3B --zero 2 --precision bf16 \
    --attn-backend triton --checkpointing off,on --micro-batch 8 --trace "/tmp/train_trace_${DATE}.json" \
    --out "benchmarks/results/train_${DEV}_${DATE}"
else
  TRITON_INTERPRET=1 python benchmarks/bench_attention.py --quick --out "/tmp/attention_quick_${DATE}"
  python benchmarks/bench_fp169.py --device cpu --save
  python benchmarks/bench_sample.py --preset tiny --batch-sizes 1,8,32 --out "benchmarks/results/sample_cpu_${DATE}"
  python benchmarks/bench_train.py --quick --threads 1 --checkpointing off,on --out "benchmarks/results/train_cpu_${DATE}"
fi
# the attention kernels' sm_90 tile loops, counted from machine code compiled here (no GPU needed)
python benchmarks/attn_sass.py --out "benchmarks/results/attn_sass_triton$(python -c 'import triton; print(triton.__version__)')_${DATE}"
# fp16 underflow, global vs per-resblock scaling: a numerics measurement, device-independent in what it counts
python benchmarks/bench_underflow.py --out "benchmarks/results/underflow_cpu_${DATE}"
# PowerSGD reduction bytes/time, orthogonalization, side by side with torch's powerSGD_hook (gloo, 4 local ranks)
python benchmarks/bench_powersgd.py --out "benchmarks/results/powersgd_cpu_${DATE}"
# one data worker's decode + crop (centre, the paper's Listing 1 and 2) of 500x375 JPEGs to 256 px: a host-side cost
python benchmarks/bench_data.py --out "benchmarks/results/data_cpu_${DATE}"
