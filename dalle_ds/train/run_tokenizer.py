"""The caption tokenizer a run uses, kept inside the run folder so the run is self-contained."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch.utils.data import Dataset

from dalle_ds.config import ConfigError
from dalle_ds.data.registry import dataset_captions
from dalle_ds.data.tokenizer import CaptionTokenizer, train_caption_tokenizer
from dalle_ds.train.distributed import barrier, is_rank0

log = logging.getLogger("dalle_ds.tokenizer")


def ensure_run_tokenizer(source: str | None, train_ds: Dataset, dest: str | Path, vocab_size: int,
                         max_length: int) -> CaptionTokenizer:
    """Collective. ``dest`` gets a copy of ``source`` or, without one, a BPE trained on ``train_ds``'s captions
    (rank 0 writes it once; a resumed run reuses it). Every rank then loads it with ``max_length``."""
    dest = Path(dest)
    if source and not (Path(source) / "tokenizer.json").is_file():  # every rank checks: none is left at the barrier
        raise ConfigError(f"tokenizer {source}: no tokenizer.json there (want the tokenizer/ folder of a prior's run, "
                          "or one saved by CaptionTokenizer.save)")
    if is_rank0() and not (dest / "tokenizer.json").is_file():
        if source:
            shutil.copytree(source, dest, dirs_exist_ok=True)
        else:
            captions = dataset_captions(train_ds)
            tok = train_caption_tokenizer(captions, vocab_size=vocab_size, max_length=max_length)
            tok.save(dest)
            log.info("trained a BPE tokenizer on %d captions: %d tokens, saved to %s", len(captions),
                     tok.vocab_size, dest)
    barrier()
    return CaptionTokenizer.load(dest, max_length=max_length)
