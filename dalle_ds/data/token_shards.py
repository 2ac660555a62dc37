"""Image-token shards: the dVAE's argmax codes for a dataset, stored once so stage 2 never runs the encoder.

Layout of a shard folder::

    meta.json                 {"format": 1, "grid_size", "vocab_size", "num_samples", "shards": [...], ...}
    part-R-NNNNN.tokens.npy   uint16 [n, grid_size²], codes in raster order (row-major)
    part-R-NNNNN.jsonl        one {"index", "caption", "scene"?} line per row, same order

``R`` is the writing rank: each rank encodes its own slice of the dataset and writes its own parts; rank 0 writes
``meta.json`` last (atomically), so a folder with a ``meta.json`` is complete.

With ``"crops": K`` in ``meta.json`` (``tokenize_images.py --crops K``) every image has K rows, one per random crop,
each with a ``"crop"`` number beside its ``"index"``: the dataset then has one sample per image, and
``dataset[(epoch, i)]`` reads crop ``epoch mod K`` of image i (``dataset[i]``: crop 0).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from dalle_ds.config import load_json_config
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
        # whole shards of rows_per_shard rows: flushing the whole pending batch made a shard up to a batch longer
        # (tokenize_images.py --rows_per_shard 2 --batch_size 64 wrote 64-row shards)
        while len(self.rows) >= self.rows_per_shard:
            self.flush(self.rows_per_shard)

    def flush(self, rows: int | None = None) -> None:
        """Write the first ``rows`` pending rows (all of them by default) as the next part."""
        if not self.rows:
            return
        tokens = np.concatenate(self.tokens)
        n = len(self.rows) if rows is None else min(rows, len(self.rows))
        name = f"part-{self.rank}-{len(self.parts):05d}"
        np.save(self.out_dir / f"{name}.tokens.npy", tokens[:n])
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows[:n])
        (self.out_dir / f"{name}.jsonl").write_text(lines)
        self.parts.append(name)
        self.count += n
        self.tokens, self.rows = ([tokens[n:]] if n < len(tokens) else []), self.rows[n:]


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
    meta = load_json_config(f, flag="token-shard index")  # a ConfigError (a ValueError) when not a JSON object
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{f}: unsupported token-shard format {meta.get('format')!r}")
    missing = [k for k in ("grid_size", "vocab_size", "shards") if k not in meta]
    if missing:
        raise ValueError(f"{f}: lacks {', '.join(missing)}; re-run launch/tokenize_images.py")
    return meta


class TokenShardDataset(Dataset):
    """Map-style view over a shard folder: ``{"image_tokens": int64 [grid²], "caption": str, **extras}``; one sample
    per image (per row, without crops)."""

    def __init__(self, shard_dir: str | Path):
        self.dir = Path(shard_dir)
        self.meta = read_meta(self.dir)
        self.grid_size, self.vocab_size = self.meta["grid_size"], self.meta["vocab_size"]
        self._rows: list[dict[str, Any]] = []
        try:
            self._tokens = [np.load(self.dir / f"{p}.tokens.npy", mmap_mode="r") for p in self.meta["shards"]]
            for p in self.meta["shards"]:
                with open(self.dir / f"{p}.jsonl") as fh:
                    self._rows.extend(json.loads(line) for line in fh)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.dir}: {Path(e.filename).name}, listed in meta.json, is missing; re-run "
                                    "launch/tokenize_images.py") from None
        except (ValueError, OSError) as e:  # a truncated .npy (mmap longer than the file), a damaged .jsonl line
            raise ValueError(f"{self.dir}: a shard does not read ({e}); re-run launch/tokenize_images.py") from None
        self._offsets = np.cumsum([0] + [len(t) for t in self._tokens])
        if self._offsets[-1] != len(self._rows):
            raise ValueError(f"{self.dir}: {self._offsets[-1]} token rows but {len(self._rows)} caption rows")
        self.crops = int(self.meta.get("crops") or 0)
        self._row_of = self._crop_table() if self.crops else None  # [crops, images] → row

    def _crop_table(self) -> np.ndarray:
        """Row of (crop c, image i) for the images in ``"index"`` order; every image must have every crop."""
        row_of = {(int(r["crop"]), int(r["index"])): n for n, r in enumerate(self._rows)}
        images = sorted({index for _, index in row_of})
        missing = [(c, i) for c in range(self.crops) for i in images if (c, i) not in row_of]
        if missing or len(row_of) != len(self._rows):
            raise ValueError(f"{self.dir}: meta.json says {self.crops} crops per image, but rows are missing or "
                             f"repeated (e.g. crop {missing[0][0]} of image {missing[0][1]})" if missing else
                             f"{self.dir}: repeated (crop, index) rows")
        return np.array([[row_of[(c, i)] for i in images] for c in range(self.crops)], dtype=np.int64)

    @property
    def takes_sample_key(self) -> bool:
        """With crops: ``dataset[(epoch, i)]`` reads that epoch's crop (see the module docstring)."""
        return self.crops > 0

    def __len__(self) -> int:
        return int(self._row_of.shape[1]) if self.crops else int(self._offsets[-1])

    def captions(self, limit: int | None = None) -> list[str]:
        rows = self._row_of[0][:limit] if self.crops else range(len(self._rows))[:limit]
        return [self._rows[int(r)]["caption"] for r in rows]

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, Any]:
        epoch = 0
        if isinstance(i, tuple):
            epoch, i = int(i[0]), int(i[1])
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        if self.crops:
            i = int(self._row_of[epoch % self.crops, i])
        part = int(np.searchsorted(self._offsets, i, side="right") - 1)
        tokens = torch.from_numpy(np.asarray(self._tokens[part][i - self._offsets[part]], dtype=np.int64))
        return {"image_tokens": tokens, **self._rows[i]}
