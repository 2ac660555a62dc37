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
import os

from dalle_ds.config import DVAE_RUN_PRESETS, DVAETrainConfig
from dalle_ds.train.cli import run_training


def make_trainer(cfg, ds_cfg, out, resume):
    from dalle_ds.train.dvae_trainer import DVAETrainer

    return DVAETrainer(cfg, ds_cfg, out, resume=resume)


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(run_training(
        None, description=__doc__.split("\n\n")[0], cfg_class=DVAETrainConfig, presets=DVAE_RUN_PRESETS,
        default_preset="demo", job_name="dvae", make_trainer=make_trainer,
        artifacts=lambda out: f"dVAE written to {os.path.join(out, 'dvae.pt')}; reconstructions in "
                              f"{os.path.join(out, 'reconstructions_final.png')}"))
