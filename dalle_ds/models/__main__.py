"""``python -m dalle_ds.models --preset 12B``: parameter counts of the presets, computed on the meta device.

``--memory`` adds a per-GPU memory estimate (parameters, gradients, Adam state, activations with and without
activation checkpointing) for a ZeRO stage, GPU count, precision and micro-batch (see dalle_ds.models.memory):

    python -m dalle_ds.models --preset 12B --memory --zero 3 --gpus 64 [--adam-moments 16bit]
    python -m dalle_ds.models --preset 12B --memory --zero 3 --gpus 1024 --powersgd-rank 896   # the paper's run
        [--deepspeed_config ds_configs/zero3_bf16.json]   (its bucket sizes)
    python -m dalle_ds.models --preset 2.8B --memory --zero 2 --gpus 16 --precision fp16-resblock --micro-batch 2
"""
from __future__ import annotations

import argparse
import sys

from dalle_ds.config import ADAM_MOMENTS, DALLE_PRESETS
from dalle_ds.models.dalle import count_parameters
from dalle_ds.models.memory import EMA_PLACES, PRECISIONS, estimate_per_gpu, format_estimate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help=f"one of {', '.join(DALLE_PRESETS)} (default: all)")
    p.add_argument("--memory", action="store_true", help="print a per-GPU memory estimate")
    p.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3], help="ZeRO stage (with --memory)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (with --memory)")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS, help="(with --memory)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-step (with --memory)")
    p.add_argument("--offload", action="store_true", help="optimizer state in CPU memory (with --memory)")
    p.add_argument("--adam-moments", default="fp32", choices=ADAM_MOMENTS,
                   help="16bit: the resblock matrices' Adam moments in 1-6-9 / 0-6-10 (paper App. B.2; with --memory)")
    p.add_argument("--attention", default="flash", choices=["flash", "dense"],
                   help="flash: O(n) attention memory (Triton/flex kernels); dense: O(n²) probabilities saved")
    p.add_argument("--powersgd-rank", type=int, default=0,
                   help="hierarchical PowerSGD's total rank per machine (paper: 896 for 12B); adds its error buffers "
                        "and Q to the estimate (with --memory; 0: no PowerSGD)")
    p.add_argument("--gpus-per-machine", type=int, default=8, help="GPUs per machine, for --powersgd-rank")
    p.add_argument("--ema", default="device", choices=EMA_PLACES,
                   help="where the trainer's fp32 weight average lives: device (default), host (ema_on_host, the "
                        "paper's App. B.2) or none (with --memory)")
    p.add_argument("--deepspeed_config", default=None,
                   help="a DeepSpeed JSON whose ZeRO bucket sizes to use (with --memory; default: DeepSpeed's)")
    args = p.parse_args(argv)
    if args.preset is not None and args.preset not in DALLE_PRESETS:
        p.error(f"unknown preset {args.preset!r}; choose from {', '.join(DALLE_PRESETS)}")
    if args.memory and (args.gpus < 1 or args.micro_batch < 1):
        p.error("--gpus and --micro-batch must be ≥ 1")
    if args.powersgd_rank < 0 or args.gpus_per_machine < 1:
        p.error("--powersgd-rank must be ≥ 0 and --gpus-per-machine ≥ 1")
    if args.powersgd_rank and args.gpus % args.gpus_per_machine:
        p.error(f"--gpus-per-machine {args.gpus_per_machine} must divide --gpus {args.gpus}")
    if args.offload and args.zero == 0:
        p.error("--offload needs --zero 1, 2 or 3")
    if args.offload and args.adam_moments == "16bit":
        p.error("--adam-moments 16bit runs on the GPU; --offload uses DeepSpeed's fp32 CPU Adam")
    ds_config = None
    if args.deepspeed_config:
        from dalle_ds.config import ConfigError
        from dalle_ds.train.ds_config import check_section_types, load_ds_config

        try:
            ds_config = load_ds_config(args.deepspeed_config)
            check_section_types(ds_config, args.deepspeed_config)
        except ConfigError as e:
            p.error(str(e))
    names = [args.preset] if args.preset else list(DALLE_PRESETS)
    print(f"{'preset':<8} {'params':>16} {'layers':>6} {'d_model':>7} {'heads':>5} {'text+image tokens':>18}")
    for name in names:
        cfg = DALLE_PRESETS[name]
        n = count_parameters(cfg)
        print(f"{name:<8} {n:>16,} {cfg.n_layers:>6} {cfg.d_model:>7} {cfg.n_heads:>5} "
              f"{f'{cfg.text_len} + {cfg.image_len}':>18}   ({n / 1e9:.2f} B)")
    if args.memory:
        for name in names:
            est = estimate_per_gpu(DALLE_PRESETS[name], zero=args.zero, gpus=args.gpus, precision=args.precision,
                                   micro_batch=args.micro_batch, offload=args.offload, attention=args.attention,
                                   adam_moments=args.adam_moments, ds_config=ds_config,
                                   powersgd_rank=args.powersgd_rank, gpus_per_machine=args.gpus_per_machine,
                                   ema=args.ema)
            print()
            print(format_estimate(name, est, zero=args.zero, gpus=args.gpus, precision=args.precision,
                                  micro_batch=args.micro_batch, offload=args.offload, adam_moments=args.adam_moments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
