"""BPE dropout with a seed: the paper's 10% caption-segmentation noise (Ramesh et al., 2021, §2.2, footnote 5; the
method of Provilkov et al., 2020, "BPE-Dropout: Simple and Effective Subword Regularization").

Why not ``tokenizers``' own ``BPE(dropout=...)``: its random draws come from an RNG that cannot be seeded (20 encodings
of one caption gave 19 segmentations), so a resumed run would see other segmentations than the uninterrupted one. Here
every caption's segmentation is a pure function of (caption, rate, seed); the trainer derives the seed from (run
seed, epoch, dataset index), which keeps exact resume.

The rule (Provilkov et al., Algorithm 1): split each pre-tokenized word into its byte symbols, then repeat: list the
adjacent pairs that are merges of the trained BPE, drop each one with probability ``rate``, and apply the surviving
merge of lowest rank at every surviving position where it occurs (left to right, non-overlapping); stop when no pair
survives a step. With ``rate = 0`` this is plain BPE, the segmentation ``tokenizers`` gives (checked by a test on every
caption of a training set).

The normalizer and the byte-level pre-tokenizer are the trained tokenizer's own (called through ``tokenizers``); only
the merge loop is here, over the vocabulary and merge list read from the tokenizer's JSON.
"""
from __future__ import annotations

import json
import random
from typing import Sequence

from tokenizers import Tokenizer

__all__ = ["SeededBPEDropout"]


class SeededBPEDropout:
    """Segments text with a trained byte-level BPE (``tokenizers.Tokenizer`` with a ``BPE`` model), dropping merges
    at random with a caller-supplied seed."""

    def __init__(self, backend: Tokenizer):
        spec = json.loads(backend.to_str())
        model = spec.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"BPE dropout needs a BPE model, got {model.get('type')!r}")
        unsupported = {k: model.get(k) for k in ("continuing_subword_prefix", "end_of_word_suffix") if model.get(k)}
        if model.get("byte_fallback") or model.get("ignore_merges"):
            unsupported.update(byte_fallback=model.get("byte_fallback"), ignore_merges=model.get("ignore_merges"))
        if unsupported:
            raise ValueError(f"BPE dropout supports plain byte-level BPE models; this one sets {unsupported}")
        self.vocab: dict[str, int] = model["vocab"]
        # tokenizers ≥ 0.20 saves merges as [left, right] pairs, older versions as "left right" strings.
        pairs = (tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"])
        self.ranks: dict[tuple[str, str], int] = {p: r for r, p in enumerate(pairs)}
        self._normalizer = backend.normalizer
        self._pre_tokenizer = backend.pre_tokenizer

    def words(self, text: str) -> list[str]:
        """The pre-tokenized words of ``text`` (normalized, byte-level mapped), as the trained tokenizer splits it."""
        if self._normalizer is not None:
            text = self._normalizer.normalize_str(text)
        return [w for w, _ in self._pre_tokenizer.pre_tokenize_str(text)]

    def segment_word(self, word: str, rate: float, rng: random.Random) -> list[str]:
        """One word's BPE symbols, merges dropped with probability ``rate`` at every step."""
        symbols = list(word)
        ranks = self.ranks
        while len(symbols) > 1:
            best, positions = None, []
            for i in range(len(symbols) - 1):
                r = ranks.get((symbols[i], symbols[i + 1]))
                if r is None or (rate > 0.0 and rng.random() < rate):
                    continue
                if best is None or r < best:
                    best, positions = r, [i]
                elif r == best:
                    positions.append(i)
            if best is None:  # every candidate dropped (or none left): the word stays as it is
                break
            merged, last = [], -2
            take = set()
            for i in positions:  # non-overlapping, left to right: "a a a" with merge (a, a) gives "aa a"
                if i > last + 1:
                    take.add(i)
                    last = i
            i = 0
            while i < len(symbols):
                if i in take:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text: str, rate: float, seed: int) -> list[int]:
        """Token ids of ``text`` with BPE dropout at ``rate``, drawing from ``random.Random(seed)``."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"BPE dropout rate must be in [0, 1), got {rate!r}")
        rng = random.Random(seed)
        ids = []
        for word in self.words(text):
            ids.extend(self.vocab[s] for s in self.segment_word(word, rate, rng))
        return ids

    def encode_batch(self, texts: Sequence[str], rate: float, seeds: Sequence[int]) -> list[list[int]]:
        if len(seeds) != len(texts):
            raise ValueError(f"{len(seeds)} seeds for {len(texts)} captions: BPE dropout needs one seed per caption")
        return [self.encode(t, rate, s) for t, s in zip(texts, seeds)]
