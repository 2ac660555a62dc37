#!/usr/bin/env python
"""Train the stage-2 transformer prior under DeepSpeed.

    deepspeed --num_gpus 2 launch/train_dalle.py --deepspeed_config ds_configs/cpu_dalle.json --preset demo \
        --set data.train_tokens=runs/demo/tokens/train --set data.val_tokens=runs/demo/tokens/test_id \
        --out runs/demo/dalle

Data come from image-token shards (``launch/tokenize_images.py``) or are encoded on the fly
(``--set data.dvae=dvae.pt --set data.images.name=shapes``). The caption tokenizer is trained on the training
captions unless ``data.tokenizer`` names one; it is saved in ``<out>/tokenizer``. The model preset's text vocabulary,
image vocabulary and grid are sized from the tokenizer and the data. Re-running with the same ``--out`` resumes.
Outputs: ``dalle.pt`` (EMA weights + config), ``dalle_metrics.json``, ``tokenizer/``, ``checkpoints/``, ``monitor/``.
"""
import os

from dalle_ds.config import DALLE_RUN_PRESETS, DalleTrainConfig
from dalle_ds.train.cli import run_training


def make_trainer(cfg, ds_cfg, out, resume):
    from dalle_ds.train.dalle_trainer import DalleTrainer

    return DalleTrainer(cfg, ds_cfg, out, resume=resume)


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(run_training(
        None, description=__doc__.split("\n\n")[0], cfg_class=DalleTrainConfig, presets=DALLE_RUN_PRESETS,
        default_preset="demo", job_name="dalle", make_trainer=make_trainer,
        artifacts=lambda out: f"prior written to {os.path.join(out, 'dalle.pt')}"))
