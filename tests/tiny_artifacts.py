"""Untrained, tiny exported models for tests of the sampling entry points (nothing here is trained)."""
from __future__ import annotations

from pathlib import Path

import torch

from dalle_ds.config import DalleConfig, DVAEConfig
from dalle_ds.data.tokenizer import train_caption_tokenizer
from dalle_ds.models.dalle import DALLE
from dalle_ds.models.dvae import DiscreteVAE
from dalle_ds.train.dalle_trainer import export_dalle
from dalle_ds.train.dvae_trainer import export_dvae


def export_tiny_text_to_image(folder: Path, captions: list[str], image_size: int, text_len: int = 8,
                              tokenizer_vocab: int = 270, n_layers: int = 1) -> Path:
    """``folder/dvae.pt`` (K = 16, three groups: a grid of image_size / 4) and ``folder/prior/dalle.pt`` with its
    caption tokenizer (trained on ``captions``) and the dVAE recorded, as train_dalle.py exports them; returns the
    prior's path."""
    torch.manual_seed(0)
    dvae_cfg = DVAEConfig(image_size=image_size, vocab_size=16, hidden=4, blocks_per_group=1, groups=3,
                          decoder_init=8)
    export_dvae(folder / "dvae.pt", dvae_cfg, DiscreteVAE(dvae_cfg).state_dict(), step=0)
    tok = train_caption_tokenizer(captions, vocab_size=tokenizer_vocab, max_length=text_len - 1)
    (folder / "prior").mkdir()
    tok.save(folder / "prior" / "tokenizer")
    cfg = DalleConfig(text_vocab_size=tok.vocab_size, text_len=text_len, image_vocab_size=16,
                      image_grid=image_size // 4, d_model=16, n_layers=n_layers, n_heads=1)
    export_dalle(folder / "prior" / "dalle.pt", cfg, DALLE(cfg).state_dict(), 0,
                 {"tokenizer": "tokenizer", "dvae": str(folder / "dvae.pt")})
    return folder / "prior" / "dalle.pt"


def export_tiny_clip(folder: Path, tokenizer_dir: Path, image_size: int, seed: int = 1) -> Path:
    """An untrained one-layer CLIP saved in ``folder`` as train_clip.py saves one, its text tower on the caption
    tokenizer in ``tokenizer_dir``; returns ``folder``."""
    from dalle_ds.config import ClipModelConfig
    from dalle_ds.data.tokenizer import CaptionTokenizer
    from dalle_ds.sample.clip import (ClipReranker, build_clip, clip_tokenizer_from_caption_tokenizer,
                                      image_processor_for)

    cfg = ClipModelConfig(image_size=image_size, patch_size=max(4, image_size // 8), width=16, layers=1, heads=1,
                          projection_dim=8, text_len=10)
    tok = clip_tokenizer_from_caption_tokenizer(CaptionTokenizer.load(tokenizer_dir), cfg.text_len)
    torch.manual_seed(seed)
    ClipReranker(build_clip(cfg, tok), tok, image_processor_for(image_size)).save(folder)
    return folder


def write_image_folder(root: Path, sizes: list[tuple[int, int]], caption: str = "image {}") -> Path:
    """An image folder of noise PNGs, one per (width, height) in ``sizes``, with ``metadata.jsonl`` captions
    ``caption.format(i)``; returns ``root``."""
    import json

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption.format(i)}) + "\n")
    return root
