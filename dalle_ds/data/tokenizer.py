"""Caption tokenizer: byte-level BPE trained with ``tokenizers`` on the training captions (SPEC: stage 2 text).

The DALL-E paper lowercases captions and encodes them with BPE into at most 256 tokens from a 16,384-token vocabulary
(Ramesh et al., 2021, §2.2). Here:

* **Normalization** (stored in the tokenizer, so a reloaded tokenizer does the same): NFKC, lowercase, every run of
  whitespace → one space, strip. "A  RED Circle" and "a red circle" give the same ids.
* **Byte-level** pre-tokenizer and decoder (GPT-2 style, with a prefix space): every string is encodable, nothing
  maps to ``<unk>``, and decoding returns the normalized text.
* **Special tokens at fixed ids**: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3 (checked on load).
  BPE tokens follow from id 4 (the 256 byte symbols first, then merges).
* **No <bos>/<eos> is added** to encoded captions: ``encode`` returns only the caption's own tokens, then
  ``<pad>`` up to ``max_length``, plus each caption's length. The prior puts its per-position learned padding
  embeddings at positions ``>= length``, which already marks where the caption ends, so an ``<eos>`` would only use up
  one of the 256 positions; ``<bos>`` and ``<eos>`` still exist in the vocabulary (ids 1, 2) for a model that wants
  a start token. An empty caption has length 0.
* **vocab_size is an upper bound**: the trainer stops when no pair occurs ``min_frequency`` times, so small caption
  sets give smaller vocabularies. Size embeddings from :attr:`CaptionTokenizer.vocab_size` (the trained size).
* **Truncation**: captions longer than ``max_length`` tokens keep their first ``max_length`` tokens; each ``encode``
  call that truncates (the 1st, 2nd, 4th, 8th... such call) logs one warning with the count of distinct captions cut,
  and :attr:`CaptionTokenizer.truncated_count` keeps the running total of rows cut (a caption encoded once per
  sampled image counts each time; per process: DataLoader workers each count their own). Tokens are bytes or byte
  sequences, so a cut can fall inside a multi-byte character; decoding then shows U+FFFD for the partial character.

Saved with ``save(dir)`` as a ``transformers`` tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``,
with ``model_max_length = max_length``) plus ``dalle_ds_tokenizer.json`` (our settings), so
``transformers.PreTrainedTokenizerFast.from_pretrained(dir)`` loads it offline and gives the same ids.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle_ds.data.bpe_dropout import SeededBPEDropout

__all__ = [
    "CaptionTokenizer", "train_caption_tokenizer", "SPECIAL_TOKENS", "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID",
    "PAPER_VOCAB_SIZE", "PAPER_MAX_LENGTH",
]

logger = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
PAPER_VOCAB_SIZE = 16384  # the paper's text vocabulary; the default upper bound for vocab_size
PAPER_MAX_LENGTH = 256  # the paper's text positions
N_BYTES = 256  # the byte-level alphabet is always in the vocabulary
METADATA_FILE = "dalle_ds_tokenizer.json"
_FORMAT_VERSION = 1


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )


def _check_int(name: str, value: object, low: int, high: Optional[int] = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return value


def train_caption_tokenizer(
    captions: Iterable[Optional[str]],
    vocab_size: int = PAPER_VOCAB_SIZE,
    max_length: int = PAPER_MAX_LENGTH,
    min_frequency: int = 1,
    *,
    max_vocab_size: int = PAPER_VOCAB_SIZE,
) -> "CaptionTokenizer":
    """Train a lowercased byte-level BPE on ``captions`` and wrap it as a :class:`CaptionTokenizer`.

    Args:
        captions: the training captions (any iterable, consumed once; ``None`` counts as ``""``).
        vocab_size: the largest vocabulary to learn, special tokens and the 256 byte symbols included; at least
            260 and at most ``max_vocab_size``.
        max_length: text positions; longer captions are truncated (with a warning) by :meth:`CaptionTokenizer.encode`.
        min_frequency: a pair must occur this often to be merged.
        max_vocab_size: the upper bound checked for ``vocab_size`` (16,384 as in the paper; raise it deliberately).

    Training is deterministic: the same captions give the same vocabulary and merges.
    """
    max_vocab_size = _check_int("max_vocab_size", max_vocab_size, N_BYTES + len(SPECIAL_TOKENS))
    vocab_size = _check_int("vocab_size", vocab_size, N_BYTES + len(SPECIAL_TOKENS), max_vocab_size)
    max_length = _check_int("max_length", max_length, 1)
    min_frequency = _check_int("min_frequency", min_frequency, 1)
    if isinstance(captions, (str, bytes)):
        raise TypeError("captions must be an iterable of strings, not a single string")

    tok = Tokenizer(models.BPE(unk_token=None))  # byte-level: every input is covered, nothing is unknown
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # the trainer puts these first, in order: ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    count = 0

    def texts() -> Iterator[str]:
        nonlocal count
        for caption in captions:
            count += 1
            if caption is not None and not isinstance(caption, str):
                raise TypeError(f"captions must be strings, got {type(caption).__name__} at position {count - 1}")
            yield caption or ""

    tok.train_from_iterator(texts(), trainer=trainer)
    if count == 0:
        raise ValueError("no captions to train the tokenizer on")
    logger.info("trained caption BPE on %d captions: %d tokens (limit %d)", count, tok.get_vocab_size(), vocab_size)
    return CaptionTokenizer(
        _to_transformers(tok, max_length),
        max_length,
        settings={"vocab_size_limit": vocab_size, "min_frequency": min_frequency, "trained_on": count},
    )


def _to_transformers(tok: Tokenizer, max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right", truncation_side="right",
    )


class CaptionTokenizer:
    """Batch encoding of captions to fixed-length id tensors, around a ``transformers.PreTrainedTokenizerFast``.

    Build one with :func:`train_caption_tokenizer` or :meth:`load`. The wrapped tokenizer is :attr:`hf`; encoding
    goes through a private copy of its ``tokenizers`` backend with truncation and padding off, so counting truncated
    captions is exact and unaffected by calls made on :attr:`hf`.
    """

    def __init__(self, hf_tokenizer, max_length: int, settings: Optional[dict] = None) -> None:
        self.max_length = _check_int("max_length", max_length, 1)
        self.hf = hf_tokenizer
        self.hf.model_max_length = max_length
        self._backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            got = self._backend.token_to_id(token)
            if got != expected_id:
                raise ValueError(
                    f"special token {token} has id {got}, expected {expected_id}; not a dalle_ds caption tokenizer"
                )
        self.settings = dict(settings or {})
        self.truncated_count = 0
        self._truncating_calls = 0  # encode calls that truncated; warnings go out on powers of two
        self._dropout_encoder: Optional[SeededBPEDropout] = None  # built on the first encode with bpe_dropout > 0

    # ----- sizes and ids ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The trained vocabulary size, special tokens included: the size of a text embedding table."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def normalize(self, text: str) -> str:
        """The text the tokenizer actually sees (lowercased, NFKC, single spaces, stripped)."""
        return self._backend.normalizer.normalize_str(text)

    # ----- encode / decode -------------------------------------------------------------------------------------
    def encode(
        self,
        captions: Union[str, Sequence[Optional[str]]],
        bpe_dropout: float = 0.0,
        seeds: Optional[Sequence[int]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → ``(ids, lengths)``: ``ids`` LongTensor ``[B, max_length]``, right-padded with ``pad_id``;
        ``lengths`` LongTensor ``[B]``, the number of caption tokens kept (≤ ``max_length``). No bos/eos is added.
        A single string is treated as a batch of one; ``None`` as ``""``.

        ``bpe_dropout`` > 0 segments each caption with that rate of BPE dropout (paper §2.2: 0.1 in training;
        :mod:`dalle_ds.data.bpe_dropout`), drawing from ``random.Random(seeds[i])`` for caption ``i``: the same
        (caption, rate, seed) always gives the same ids.
        """
        if isinstance(captions, str):
            captions = [captions]
        texts = []
        for i, c in enumerate(captions):
            if c is not None and not isinstance(c, str):
                raise TypeError(f"captions must be strings, got {type(c).__name__} at position {i}")
            texts.append(c or "")
        if not isinstance(bpe_dropout, (int, float)) or not 0.0 <= bpe_dropout < 1.0:
            raise ValueError(f"bpe_dropout must be in [0, 1), got {bpe_dropout!r}")
        if bpe_dropout > 0.0:
            if seeds is None:
                raise ValueError("bpe_dropout > 0 needs seeds= (one int per caption), so that segmentations repeat")
            if self._dropout_encoder is None:
                self._dropout_encoder = SeededBPEDropout(self._backend)
            token_lists = self._dropout_encoder.encode_batch(texts, float(bpe_dropout), seeds)
        else:
            encodings = self._backend.encode_batch(texts, add_special_tokens=False) if texts else []
            token_lists = [enc.ids for enc in encodings]
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        lengths = torch.zeros(len(texts), dtype=torch.long)
        truncated, longest = 0, 0
        truncated_texts: set[str] = set()
        for row, toks in enumerate(token_lists):
            longest = max(longest, len(toks))
            if len(toks) > self.max_length:
                truncated += 1
                truncated_texts.add(texts[row])
                toks = toks[: self.max_length]
            if toks:
                ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            lengths[row] = len(toks)
        if truncated:
            self.truncated_count += truncated
            self._truncating_calls += 1
        # Warn on the 1st, 2nd, 4th, 8th... call that truncates, so a training loop is not flooded.
        if truncated and self._truncating_calls & (self._truncating_calls - 1) == 0:
            # Counted as distinct captions: sampling encodes one caption once per candidate image, and "truncated 4
            # of 4 captions" for one prompt would mislead. The rows are named too where captions repeat.
            distinct = len(set(texts))
            rows = f" ({truncated} of {len(texts)} rows)" if distinct != len(texts) else ""
            logger.warning(
                "caption tokenizer: truncated %d of %d captions%s to max_length=%d tokens (longest had %d); "
                "%d truncated so far (rows, repeats included)",
                len(truncated_texts), distinct, rows, self.max_length, longest, self.truncated_count,
            )
        return ids, lengths

    __call__ = encode

    def decode(
        self,
        ids: Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]],
        lengths: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    ) -> Union[str, list[str]]:
        """Ids → text. ``[L]`` (or a flat list) gives a str, ``[B, L]`` a list of str. Special tokens are dropped;
        with ``lengths`` only the first ``lengths[b]`` ids of each row are used."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() not in (1, 2):
                raise ValueError(f"ids must be 1-d or 2-d, got shape {tuple(ids.shape)}")
            single = ids.dim() == 1
            rows = [ids.tolist()] if single else ids.tolist()
        else:
            seq = list(ids)
            single = not seq or not isinstance(seq[0], (list, tuple, torch.Tensor))
            rows = [[int(t) for t in seq]] if single else [[int(t) for t in r] for r in seq]
        if lengths is not None:
            lens = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
            lens = [lens] if not isinstance(lens, list) else lens
            if len(lens) != len(rows):
                raise ValueError(f"{len(lens)} lengths for {len(rows)} rows")
            rows = [r[: int(n)] for r, n in zip(rows, lens)]
        texts = [t.strip() for t in self._backend.decode_batch(rows, skip_special_tokens=True)]
        return texts[0] if single else texts

    # ----- persistence -----------------------------------------------------------------------------------------
    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write the tokenizer to ``directory`` (created if needed); returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        meta = {
            "format_version": _FORMAT_VERSION,
            "max_length": self.max_length,
            "vocab_size": self.vocab_size,
            "special_tokens": {tok: i for i, tok in enumerate(SPECIAL_TOKENS)},
            "adds_bos_eos": False,
            **self.settings,
        }
        tmp = directory / (METADATA_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, directory / METADATA_FILE)
        return directory

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], max_length: Optional[int] = None) -> "CaptionTokenizer":
        """Load a tokenizer saved by :meth:`save` (offline, local files only). ``max_length`` overrides the saved one;
        a plain ``transformers`` tokenizer directory without our metadata uses its ``model_max_length``."""
        from transformers import PreTrainedTokenizerFast

        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {directory}; expected a directory written by CaptionTokenizer.save"
            )
        hf = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
        meta_path = directory / METADATA_FILE
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        if max_length is None:
            max_length = int(meta.get("max_length", hf.model_max_length))
        if max_length > 1_000_000:  # transformers' "no limit" sentinel
            raise ValueError(f"{directory}: no max_length saved; pass max_length=")
        settings = {k: meta[k] for k in ("vocab_size_limit", "min_frequency", "trained_on") if k in meta}
        return cls(hf, max_length, settings=settings)

    def __repr__(self) -> str:
        return f"CaptionTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, adds_bos_eos=False)"
