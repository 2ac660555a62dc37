#!/usr/bin/env python
"""Train the stage-1 dVAE under DeepSpeed.

    deepspeed --num_gpus 2 launch/train_dvae.py --deepspeed_config ds_configs/cpu_dvae.json \
        --preset demo --out runs/demo/dvae [--config run.json] [--set steps=2000 --set data.name=fashion_mnist]

The run configuration (model, data, schedules) is a preset from ``dalle_ds.config.DVAE_RUN_PRESETS``, optionally
overridden by a JSON file and ``--set key=value`` pairs; DeepSpeed's JSON owns batch size, optimizer, scheduler,
ZeRO, precision and monitors. Re-running with the same ``--out`` resumes from the last committed checkpoint
(``--no-resume`` starts over). Outputs in ``--out``: ``dvae.pt`` (EMA weights + config), ``dvae_metrics.json``,
``reconstructions_*.png``, ``checkpoints/``, ``monitor/`` (TensorBoard and CSV).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import deepspeed

from dalle_ds.config import DVAE_RUN_PRESETS, ConfigError, DVAETrainConfig, build_run_config
from dalle_ds.train.distributed import init_distributed, is_rank0, world_size
from dalle_ds.train.ds_config import load_ds_config, prepare_ds_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="demo", help=f"run preset: {', '.join(DVAE_RUN_PRESETS)} (default: demo)")
    p.add_argument("--config", default=None, help="JSON file overriding the preset (nested or dotted keys)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set steps=500 --set data.name=fashion_mnist")
    p.add_argument("--out", required=True, help="run folder (created; resumed from if it holds checkpoints)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore existing checkpoints")
    p.add_argument("--stop_at", type=int, default=None,
                   help="checkpoint and exit after this many steps, as a preempted job would (rerun to resume)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if not args.deepspeed_config:
        p.error("--deepspeed_config is required (see ds_configs/)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:  # validate everything before any process group or model exists
        cfg: DVAETrainConfig = build_run_config(DVAETrainConfig, DVAE_RUN_PRESETS, args.preset, args.config, args.set)
        ds_raw = load_ds_config(args.deepspeed_config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    init_distributed()
    from deepspeed.accelerator import get_accelerator

    try:
        ds_cfg = prepare_ds_config(ds_raw, steps=cfg.steps, run_dir=args.out, job_name="dvae",
                                   world_size=world_size(), accelerator=get_accelerator().device_name())
    except ConfigError as e:
        if is_rank0():
            print(f"config error: {e}", file=sys.stderr)
        return 2
    from dalle_ds.train.dvae_trainer import DVAETrainer

    trainer = DVAETrainer(cfg, ds_cfg, args.out, resume=args.resume)
    summary = trainer.train(stop_at=args.stop_at)
    if is_rank0():
        ev = summary["eval"] or {}
        shown = {k: round(v, 4) for k, v in ev.items() if isinstance(v, float) and "/" not in k}
        print(json.dumps({"steps": summary["steps"], "train_seconds": round(summary["train_seconds"], 1), **shown},
                         indent=1))
        print(f"dVAE written to {os.path.join(args.out, 'dvae.pt')}; "
              f"reconstructions in {os.path.join(args.out, 'reconstructions_final.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
