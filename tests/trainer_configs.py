"""Helpers for tests that check trainer command lines without running them: the run config and the DeepSpeed
config a `launch/train_*.py` command line would start with (test_docs_commands.py, test_device_session.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from launch_utils import ROOT


def token_shards(path: Path) -> None:
    """A one-row token-shard folder, as launch/tokenize_images.py writes them (32 x 32 grid, 8192 codes)."""
    from dalle_ds.data.token_shards import ShardWriter, write_meta

    w = ShardWriter(path, rank=0, grid_size=32, vocab_size=8192)
    w.add(torch.zeros(1, 32 * 32, dtype=torch.long), [{"index": 0, "caption": "a red circle"}])
    w.flush()
    write_meta(path, w.parts, 32, 8192, {})


TRAINERS = {"train_dalle": ("DalleTrainConfig", "DALLE_RUN_PRESETS", "dalle"),
            "train_dvae": ("DVAETrainConfig", "DVAE_RUN_PRESETS", "dvae"),
            "train_clip": ("ClipTrainConfig", "CLIP_RUN_PRESETS", "clip")}


def check_trainer(name: str, args: list[str], elided: bool, world: int | None, scratch: Path) -> None:
    """What ``launch/<name>.py args`` checks before it trains: its flags, the run config from the preset and the
    ``--set`` values, the DeepSpeed JSON with its ``--ds_set`` values and (``world`` given) the batch sizes for that
    many ranks. ``elided``: the line had a ``...`` (a missing --out and missing data are supplied)."""
    import dalle_ds.config as config
    from dalle_ds.train.cli import build_parser
    from dalle_ds.train.ds_config import apply_ds_overrides, load_ds_config, prepare_ds_config

    cfg_name, presets_name, job = TRAINERS[name]
    cfg_class, presets = getattr(config, cfg_name), getattr(config, presets_name)
    if elided and "--out" not in args:
        args = [*args, "--out", str(scratch / "out")]
    if elided and not any(a.startswith("data.") for a in args):  # "..." stands for the data too
        token_shards(scratch / "runs" / "doc_tokens")
        args = [*args, "--set", f"data.train_tokens={scratch / 'runs' / 'doc_tokens'}"]
    ns = build_parser("doc command", presets, "demo").parse_args(args)
    assert ns.deepspeed_config, "--deepspeed_config is required"
    cfg = config.build_run_config(cfg_class, presets, ns.preset, ns.config, ns.set)
    ds_raw = apply_ds_overrides(load_ds_config(str(ROOT / ns.deepspeed_config)), ns.ds_set)
    if world is not None:
        accelerator = "cpu" if Path(ns.deepspeed_config).name.startswith("cpu_") else "cuda"
        prepare_ds_config(ds_raw, steps=cfg.steps, run_dir=scratch / "out", job_name=job, world_size=world,
                          accelerator=accelerator)
