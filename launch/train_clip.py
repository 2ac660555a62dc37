#!/usr/bin/env python
"""Train the contrastive reranker (a small transformers.CLIPModel) on the project's own data under DeepSpeed.

    deepspeed --num_gpus 2 launch/train_clip.py --deepspeed_config ds_configs/cpu_clip.json --preset demo \
        --set tokenizer=runs/demo/dalle/tokenizer --out runs/demo/clip

Writes ``<out>/clip/``, a standard Hugging Face CLIP folder (model, tokenizer, image processor) that
``launch/sample.py --clip`` loads exactly like a local pretrained CLIP.
"""
import os

from dalle_ds.config import CLIP_RUN_PRESETS, ClipTrainConfig
from dalle_ds.train.cli import run_training


def make_trainer(cfg, ds_cfg, out, resume):
    from dalle_ds.train.clip_trainer import ClipTrainer

    return ClipTrainer(cfg, ds_cfg, out, resume=resume)


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(run_training(
        None, description=__doc__.split("\n\n")[0], cfg_class=ClipTrainConfig, presets=CLIP_RUN_PRESETS,
        default_preset="demo", job_name="clip", make_trainer=make_trainer,
        artifacts=lambda out: f"CLIP written to {os.path.join(out, 'clip')}"))
