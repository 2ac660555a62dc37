"""The caption tokenizer a run uses, kept inside the run folder so the run is self-contained."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from torch.utils.data import Dataset

from dalle_ds.config import ConfigError
from dalle_ds.data.registry import dataset_captions
from dalle_ds.data.tokenizer import CaptionTokenizer, train_caption_tokenizer
from dalle_ds.train.distributed import barrier, is_rank0

log = logging.getLogger("dalle_ds.tokenizer")

TOKENIZER_FILE = "tokenizer.json"


def same_tokenizer(a: str | Path, b: str | Path) -> bool:
    """Whether two tokenizer folders hold the same tokenizer: their ``tokenizer.json`` parsed (the vocabulary, the
    merges, the special tokens; not the file's formatting)."""
    return json.loads((Path(a) / TOKENIZER_FILE).read_text()) == json.loads((Path(b) / TOKENIZER_FILE).read_text())


def ensure_run_tokenizer(source: str | None, train_ds: Dataset, dest: str | Path, vocab_size: int,
                         max_length: int, resuming: bool) -> CaptionTokenizer:
    """Collective. The tokenizer of the run in ``dest``'s parent folder; every rank loads it with ``max_length``.

    * ``resuming`` (the folder holds a checkpoint of this run): ``dest`` as it is, the one the checkpoint's
      embeddings were trained with. A ``source`` that is another tokenizer is refused, and so is a missing ``dest``.
    * otherwise rank 0 writes ``dest`` anew, replacing what an earlier run left there (a run that stopped before its
      first checkpoint; ``--no-resume`` has moved an earlier run's tokenizer aside with its checkpoints,
      ``checkpoint.set_aside_for_new_run``): a copy of ``source`` or, without one, a BPE trained on ``train_ds``'s
      captions. Written beside ``dest``, then the old folder is renamed away and the new one into place: a crash
      leaves the old folder, the new one or, between the two renames, none, which the next start writes again (no
      checkpoint needs it yet).
    """
    dest = Path(dest)
    have = (dest / TOKENIZER_FILE).is_file()
    # every rank checks (the same files): a refusal ends every rank alike, none is left waiting at the barrier
    if source and not (Path(source) / TOKENIZER_FILE).is_file():
        raise ConfigError(f"tokenizer {source}: no {TOKENIZER_FILE} there (want the tokenizer/ folder of a prior's "
                          "run, or one saved by CaptionTokenizer.save)")
    if resuming and not have:
        raise ConfigError(f"{dest.parent} holds checkpoints but no caption tokenizer ({dest / TOKENIZER_FILE}): the "
                          "checkpoint's text embeddings need the tokenizer they were trained with; restore it, or "
                          "pass --no-resume to start over")
    if resuming and source and not same_tokenizer(source, dest):
        raise ConfigError(f"tokenizer {source} is not the one the checkpoints in {dest.parent} were trained with "
                          f"({dest}); to resume, leave the tokenizer setting unset (the run folder's is used); to "
                          "train with the other one, use another --out")
    if is_rank0():
        if resuming:
            log.info("caption tokenizer: %s, the one this run's checkpoints were trained with", dest)
        else:
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if source:
                shutil.copytree(source, tmp)
                what = f"copied from {source}"
            else:
                captions = dataset_captions(train_ds)
                tok = train_caption_tokenizer(captions, vocab_size=vocab_size, max_length=max_length)
                tok.save(tmp)
                what = f"trained a BPE on {len(captions)} captions: {tok.vocab_size} tokens"
            if have:  # a run that stopped before its first checkpoint, or data.tokenizer naming this very folder
                what += "; it replaces the one an earlier run left there (this run does not resume it)"
            old = dest.with_name(dest.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if dest.exists():
                dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
            log.info("caption tokenizer: %s, saved to %s", what, dest)
    barrier()
    return CaptionTokenizer.load(dest, max_length=max_length)
