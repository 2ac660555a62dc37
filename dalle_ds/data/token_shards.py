"""Image-token shards: the dVAE's argmax codes for a dataset, stored once so stage 2 never runs the encoder.

Layout of a shard folder::

    meta.json                 {"format": 1, "grid_size", "vocab_size", "num_samples", "shards": [...], ...}
    part-R-NNNNN.tokens.npy   uint16 [n, grid_size²], codes in raster order (row-major)
    part-R-NNNNN.jsonl        one {"index", "caption", "scene"?} line per row, same order

``R`` is the writing rank: each rank encodes its own slice of the dataset and writes its own parts; rank 0 writes
``meta.json`` last (atomically), so a folder with a ``meta.json`` is complete.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from dalle_ds.utils.files import atomic_write_bytes

FORMAT_VERSION = 1


class ShardWriter:
    """Accumulates (tokens, caption, extras) rows and flushes a part every ``rows_per_shard`` rows."""

    def __init__(self, out_dir: str | Path, rank: int, grid_size: int, vocab_size: int, rows_per_shard: int = 4096):
        if vocab_size > 65536:
            raise ValueError(f"vocab_size {vocab_size} does not fit the uint16 shard format")
        self.out_dir, self.rank = Path(out_dir), rank
        self.grid_size, self.rows_per_shard = grid_size, rows_per_shard
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tokens: list[np.ndarray] = []
        self.rows: list[dict[str, Any]] = []
        self.parts: list[str] = []
        self.count = 0

    def add(self, tokens: torch.Tensor, records: Iterable[dict[str, Any]]) -> None:
        """``tokens``: [B, grid, grid] or [B, grid²] integer codes; ``records``: B JSON-serialisable dicts."""
        tok = tokens.reshape(tokens.shape[0], -1).cpu().numpy().astype(np.uint16)
        if tok.shape[1] != self.grid_size ** 2:
            raise ValueError(f"expected {self.grid_size ** 2} tokens per image, got {tok.shape[1]}")
        records = list(records)
        if len(records) != len(tok):
            raise ValueError("one record per image is required")
        self.tokens.append(tok)
        self.rows.extend(records)
        if len(self.rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"part-{self.rank}-{len(self.parts):05d}"
        np.save(self.out_dir / f"{name}.tokens.npy", np.concatenate(self.tokens))
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        (self.out_dir / f"{name}.jsonl").write_text(lines)
        self.parts.append(name)
        self.count += len(self.rows)
        self.tokens, self.rows = [], []


def write_meta(out_dir: str | Path, parts: list[str], grid_size: int, vocab_size: int, extra: dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    counts = [int(np.load(out_dir / f"{p}.tokens.npy", mmap_mode="r").shape[0]) for p in parts]
    meta = {"format": FORMAT_VERSION, "grid_size": grid_size, "vocab_size": vocab_size,
            "num_samples": int(sum(counts)), "shards": parts, "shard_sizes": counts, **extra}
    atomic_write_bytes(out_dir / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())


def read_meta(shard_dir: str | Path) -> dict[str, Any]:
    f = Path(shard_dir) / "meta.json"
    if not f.is_file():
        raise FileNotFoundError(f"{shard_dir} has no meta.json: not a token-shard folder, or an incomplete one "
                                f"(run launch/tokenize_images.py)")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{f}: unsupported token-shard format {meta.get('format')!r}")
    return meta


class TokenShardDataset(Dataset):
    """Map-style view over a shard folder: ``{"image_tokens": int64 [grid²], "caption": str, **extras}``."""

    def __init__(self, shard_dir: str | Path):
        self.dir = Path(shard_dir)
        self.meta = read_meta(self.dir)
        self.grid_size, self.vocab_size = self.meta["grid_size"], self.meta["vocab_size"]
        self._tokens = [np.load(self.dir / f"{p}.tokens.npy", mmap_mode="r") for p in self.meta["shards"]]
        self._rows: list[dict[str, Any]] = []
        for p in self.meta["shards"]:
            with open(self.dir / f"{p}.jsonl") as fh:
                self._rows.extend(json.loads(line) for line in fh)
        self._offsets = np.cumsum([0] + [len(t) for t in self._tokens])
        if self._offsets[-1] != len(self._rows):
            raise ValueError(f"{self.dir}: {self._offsets[-1]} token rows but {len(self._rows)} caption rows")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def captions(self, limit: int | None = None) -> list[str]:
        return [r["caption"] for r in self._rows[:limit]]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        part = int(np.searchsorted(self._offsets, i, side="right") - 1)
        tokens = torch.from_numpy(np.asarray(self._tokens[part][i - self._offsets[part]], dtype=np.int64))
        return {"image_tokens": tokens, **self._rows[i]}
