"""``python -m dalle_ds.models --preset 12B``: parameter counts of the presets, computed on the meta device.

``--memory`` adds a per-GPU memory estimate (parameters, gradients, Adam state, activations with and without
activation checkpointing) for a ZeRO stage, GPU count, precision and micro-batch (see dalle_ds.models.memory):

    python -m dalle_ds.models --preset 12B --memory --zero 3 --gpus 64 [--adam-moments 16bit]
    python -m dalle_ds.models --preset 12B --memory --zero 3 --gpus 1024 --powersgd-rank 896   # the paper's run
        [--deepspeed_config ds_configs/zero3_bf16.json]   (its stage, precision, micro-batch, offload, bucket sizes)
    python -m dalle_ds.models --preset 2.8B --memory --zero 2 --gpus 16 --precision fp16-resblock --micro-batch 2
"""
from __future__ import annotations

import argparse
import sys

from dalle_ds.config import ADAM_MOMENTS, DALLE_PRESETS
from dalle_ds.models.dalle import count_parameters
from dalle_ds.models.memory import EMA_PLACES, PRECISIONS, billions, estimate_per_gpu, format_estimate


def settings_from_ds_config(args: argparse.Namespace, ds_config: dict, where: str) -> list[str]:
    """Set ``args.zero``, ``precision``, ``micro_batch`` and ``offload`` from the DeepSpeed config where the command
    line left them None; return the warnings and notes to print (one line each).

    A flag given explicitly wins with a warning rather than an error: "this file's buckets at ZeRO-2" or "at
    micro-batch 4" is a fair what-if, and the warning names both values, so an estimate is never for other settings
    than the file's without saying so."""
    from dalle_ds.config import ConfigError
    from dalle_ds.train.ds_config import optimizer_offload, precision_mode, resolve_batch_sizes, zero_stage

    lines = []

    def take(name: str, flag: str, file_value, key: str) -> None:
        given = getattr(args, name)
        if given is None:
            setattr(args, name, file_value)
        elif file_value is not None and given != file_value:
            lines.append(f"warning: {flag} {given} differs from {where}'s {key}; estimating {flag} {given}")

    try:
        stage = zero_stage(ds_config)
    except (TypeError, ValueError):
        stage = None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got "
                          f"{(ds_config.get('zero_optimization') or {}).get('stage')!r}")
    take("zero", "--zero", stage, f"zero_optimization.stage {stage}")

    mode = precision_mode(ds_config, where)
    if mode == "fp16" and args.precision is None:
        raise ConfigError(f"{where}: fp16.enabled (DeepSpeed's fp16 mode) is not one of the estimate's precisions; "
                          "pass --precision bf16 to count 2-byte parameters, gradients and activations as fp16 "
                          "mode stores them")
    if mode == "bf16":
        take("precision", "--precision", "bf16", "bf16 mode (bf16.enabled)")
    elif mode == "fp32" and args.precision is None:
        args.precision = "fp32"
        lines.append(f"note: {where} enables neither bf16 nor fp16 (DeepSpeed's fp32 mode): estimating fp32; pass "
                     "--precision fp16-resblock if the model computes its resblocks in fp16 (resblock_grad_scaling)")
    elif mode == "fp32" and args.precision == "bf16":
        take("precision", "--precision", "fp32", "fp32 mode (neither bf16 nor fp16 enabled)")

    micro = ds_config.get("train_micro_batch_size_per_gpu")
    if micro is None and ds_config.get("train_batch_size") is not None:
        try:  # train_batch_size / (gradient_accumulation_steps × --gpus)
            micro = resolve_batch_sizes(ds_config, args.gpus, where)[1]
        except ConfigError as e:
            if args.micro_batch is None:
                raise ConfigError(f"{e} (or pass --micro-batch)") from None
    elif micro is not None and (not isinstance(micro, int) or isinstance(micro, bool) or micro < 1):
        raise ConfigError(f"{where}: train_micro_batch_size_per_gpu must be a positive integer, got {micro!r}")
    take("micro_batch", "--micro-batch", micro, f"micro-batch {micro}")

    offload = optimizer_offload(ds_config)
    if args.offload is None:
        args.offload = offload and args.zero >= 1
    elif not offload:
        lines.append(f"warning: --offload differs from {where}, which keeps the optimizer state on the GPU (no "
                     "zero_optimization.offload_optimizer); estimating with --offload")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dalle_ds.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help=f"one of {', '.join(DALLE_PRESETS)} (default: all)")
    p.add_argument("--memory", action="store_true", help="print a per-GPU memory estimate")
    # --zero, --precision, --micro-batch and --offload default to None: unless given, they come from --deepspeed_config
    p.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3],
                   help="ZeRO stage (with --memory; default: the --deepspeed_config's, else 3)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (with --memory)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="(with --memory; default: the --deepspeed_config's bf16 or fp32 mode, else bf16)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per GPU per micro-step (with --memory; default: the --deepspeed_config's, else 1)")
    p.add_argument("--offload", action="store_true", default=None,
                   help="optimizer state in CPU memory (with --memory; default: the --deepspeed_config's)")
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
                   help="a DeepSpeed JSON to estimate (with --memory). Read from it: the ZeRO stage "
                        "(zero_optimization.stage), the precision (bf16.enabled: bf16; neither bf16 nor fp16 enabled: "
                        "fp32; fp16.enabled needs --precision), the micro-batch (train_micro_batch_size_per_gpu, "
                        "else train_batch_size / (gradient_accumulation_steps × --gpus)), optimizer offload "
                        "(zero_optimization.offload_optimizer.device) and ZeRO-3's reduce_bucket_size, "
                        "contiguous_gradients and stage3_param_persistence_threshold; --zero, --precision, "
                        "--micro-batch and --offload given on the command line win, with a warning where they differ "
                        "from the file")
    args = p.parse_args(argv)
    if args.preset is not None and args.preset not in DALLE_PRESETS:
        p.error(f"unknown preset {args.preset!r}; choose from {', '.join(DALLE_PRESETS)}")
    if args.gpus < 1:
        p.error("--gpus must be ≥ 1")
    ds_config = None
    if args.deepspeed_config:
        from dalle_ds.config import ConfigError
        from dalle_ds.train.ds_config import check_section_types, load_ds_config

        try:
            ds_config = load_ds_config(args.deepspeed_config)
            check_section_types(ds_config, args.deepspeed_config)
            if args.memory:
                for line in settings_from_ds_config(args, ds_config, args.deepspeed_config):
                    print(line, file=sys.stderr)
        except ConfigError as e:
            p.error(str(e))
    for name, default in (("zero", 3), ("precision", "bf16"), ("micro_batch", 1), ("offload", False)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.memory and args.micro_batch < 1:
        p.error("--micro-batch must be ≥ 1")
    if args.powersgd_rank < 0 or args.gpus_per_machine < 1:
        p.error("--powersgd-rank must be ≥ 0 and --gpus-per-machine ≥ 1")
    if args.powersgd_rank and args.gpus % args.gpus_per_machine:
        p.error(f"--gpus-per-machine {args.gpus_per_machine} must divide --gpus {args.gpus}")
    if args.offload and args.zero == 0:
        p.error("--offload needs --zero 1, 2 or 3")
    if args.offload and args.adam_moments == "16bit":
        p.error("--adam-moments 16bit runs on the GPU; --offload uses DeepSpeed's fp32 CPU Adam")
    names = [args.preset] if args.preset else list(DALLE_PRESETS)
    print(f"{'preset':<8} {'params':>16} {'layers':>6} {'d_model':>7} {'heads':>5} {'text+image tokens':>18}")
    for name in names:
        cfg = DALLE_PRESETS[name]
        n = count_parameters(cfg)
        print(f"{name:<8} {n:>16,} {cfg.n_layers:>6} {cfg.d_model:>7} {cfg.n_heads:>5} "
              f"{f'{cfg.text_len} + {cfg.image_len}':>18}   ({billions(n)})")
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
