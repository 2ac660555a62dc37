"""Block layouts of a :class:`MaskSpec` at a chosen block size, derived from the element predicate.

A layout tiles the [N, N] score matrix (in the kernel order, or in raster order for comparison) into
``block_m x block_n`` tiles and classifies each tile as

* ``FULL`` (2): every element is a valid, visible (query, key) pair; kernels skip the in-block mask;
* ``PARTIAL`` (1): some but not all elements are visible (or the tile hangs over the sequence end); kernels
  evaluate the predicate on the tile's indices;
* ``SKIP`` (0): nothing visible; kernels never touch it.

The classification evaluates :func:`masks.visible` on every element, one strip of query blocks at a time, on the
device the layout is for (so it is exact, not a corner heuristic); the tests re-check it against the dense mask.
From the tile status two CSR-like views are built, in the padded-row format FlexAttention's ``BlockMask`` uses
(row ``i`` holds ``count[i]`` valid entries, the rest is filler):

* per query block ``m``: the key blocks to visit, FULL ones first, then PARTIAL (forward pass and dQ);
* per key block ``n``: the query blocks that see it, FULL first, then PARTIAL (dK/dV).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .masks import MaskSpec, keys_per_query, visible

SKIP, PARTIAL, FULL = 0, 1, 2
_STRIP_ELEMENTS = 1 << 22  # elements evaluated per strip when classifying tiles


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Tile classification plus the per-query-block and per-key-block visit lists (int32, on ``status.device``)."""

    spec: MaskSpec
    block_m: int
    block_n: int
    order: str
    """"kernel" (column attention transposed) or "raster"."""
    status: torch.Tensor
    """[num_q_blocks, num_k_blocks] int8: SKIP / PARTIAL / FULL."""
    kv_index: torch.Tensor
    """[num_q_blocks, max_kv] key-block ids per query block: FULL first, then PARTIAL, ascending within each."""
    kv_full: torch.Tensor
    """[num_q_blocks] number of FULL entries at the front of each ``kv_index`` row."""
    kv_count: torch.Tensor
    """[num_q_blocks] number of valid entries (FULL + PARTIAL)."""
    q_index: torch.Tensor
    """[num_k_blocks, max_q] query-block ids per key block (the transposed view, for dK/dV)."""
    q_full: torch.Tensor
    q_count: torch.Tensor

    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    @property
    def num_q_blocks(self) -> int:
        return self.status.shape[0]

    @property
    def num_k_blocks(self) -> int:
        return self.status.shape[1]

    def stats(self) -> dict:
        """Block counts and fractions; ``kept_of_causal`` = visited tiles / tiles a plain causal mask visits."""
        full = int((self.status == FULL).sum())
        partial = int((self.status == PARTIAL).sum())
        causal = block_status(
            MaskSpec("causal", self.spec.text_len, self.spec.grid), self.block_m, self.block_n, "raster", "cpu"
        )
        causal_kept = int((causal > SKIP).sum())
        return {
            "mask": self.spec.name,
            "order": self.order,
            "block_m": self.block_m,
            "block_n": self.block_n,
            "full": full,
            "partial": partial,
            "kept": full + partial,
            "causal_kept": causal_kept,
            "kept_of_causal": (full + partial) / causal_kept,
            "partial_of_kept": partial / max(full + partial, 1),
        }


def _tile_status(spec: MaskSpec, q_lo: int, q_hi: int, block_m: int, block_n: int, order: str, device) -> torch.Tensor:
    """Status of the tiles of query blocks [q_lo, q_hi) against every key block (exact, element by element)."""
    n = spec.seq_len
    nkb = -(-n // block_n)
    q = torch.arange(q_lo * block_m, q_hi * block_m, device=device)
    k = torch.arange(nkb * block_n, device=device)
    if order == "kernel":
        vis = spec.visible_in_kernel_order(q[:, None], k[None, :])
    elif order == "raster":
        vis = visible(spec, q[:, None], k[None, :])
    else:
        raise ValueError(f"order must be 'kernel' or 'raster', got {order!r}")
    valid = (q[:, None] < n) & (k[None, :] < n)
    vis = vis & valid
    tiles = vis.view(q_hi - q_lo, block_m, nkb, block_n)
    any_ = tiles.any(dim=3).any(dim=1)
    all_ = tiles.all(dim=3).all(dim=1)  # padded rows/columns are not visible, so such tiles are never FULL
    return torch.where(all_, FULL, torch.where(any_, PARTIAL, SKIP)).to(torch.int8)


@functools.lru_cache(maxsize=256)
def _block_status_cached(spec: MaskSpec, block_m: int, block_n: int, order: str, device: str) -> torch.Tensor:
    n = spec.seq_len
    nqb, nkb = -(-n // block_m), -(-n // block_n)
    strip = max(1, _STRIP_ELEMENTS // (block_m * nkb * block_n))
    parts = [
        _tile_status(spec, lo, min(lo + strip, nqb), block_m, block_n, order, device) for lo in range(0, nqb, strip)
    ]
    return torch.cat(parts, dim=0)


def block_status(spec: MaskSpec, block_m: int, block_n: int | None = None, order: str = "kernel", device="cpu"):
    """[ceil(N/block_m), ceil(N/block_n)] int8 tile status (SKIP/PARTIAL/FULL)."""
    block_n = block_m if block_n is None else block_n
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block sizes must be >= 1, got {block_m} x {block_n}")
    return _block_status_cached(spec, int(block_m), int(block_n), order, str(torch.device(device)))


def _visit_lists(status: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``status``: (index [rows, width] int32, n_full [rows] int32, n_visit [rows] int32)."""
    rows, cols = status.shape
    rank = torch.full_like(status, 2, dtype=torch.int64)
    rank[status == FULL] = 0
    rank[status == PARTIAL] = 1
    key = rank * cols + torch.arange(cols, device=status.device)
    order = key.argsort(dim=1)
    n_full = (status == FULL).sum(dim=1).to(torch.int32)
    n_visit = (status != SKIP).sum(dim=1).to(torch.int32)
    width = max(int(n_visit.max()) if rows else 0, 1)
    return order[:, :width].to(torch.int32).contiguous(), n_full.contiguous(), n_visit.contiguous()


@functools.lru_cache(maxsize=256)
def _block_layout_cached(spec: MaskSpec, block_m: int, block_n: int, order: str, device: str) -> BlockLayout:
    status = _block_status_cached(spec, block_m, block_n, order, device)
    kv_index, kv_full, kv_count = _visit_lists(status)
    q_index, q_full, q_count = _visit_lists(status.t().contiguous())
    return BlockLayout(spec, block_m, block_n, order, status, kv_index, kv_full, kv_count, q_index, q_full, q_count)


def block_layout(
    spec: MaskSpec, block_m: int, block_n: int | None = None, order: str = "kernel", device="cpu"
) -> BlockLayout:
    """The cached :class:`BlockLayout` of ``spec`` at ``block_m x block_n`` tiles on ``device``.

    ``order="kernel"`` is what the block-sparse kernels use (column attention on transposed image states);
    ``order="raster"`` is the untransposed layout, for comparison (column attention skips nothing there).
    """
    block_n = block_m if block_n is None else block_n
    return _block_layout_cached(spec, int(block_m), int(block_n), order, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _decode_table_cached(spec: MaskSpec, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = spec.seq_len
    idx = torch.arange(n, device=device)
    rows = max(1, _STRIP_ELEMENTS // max(n, 1))
    counts = keys_per_query(spec).to(device=device, dtype=torch.int32)  # how many keys each query sees
    width = max(1, int(counts.max()))
    table = torch.empty(n, width, dtype=torch.int32, device=device)
    for lo in range(0, n, rows):  # their indices, ascending (invisible keys sorted to the back)
        vis = visible(spec, idx[lo : lo + rows, None], idx[None, :])
        key = torch.where(vis, idx[None, :], idx[None, :] + n)
        table[lo : lo + rows] = key.sort(dim=1).values[:, :width].to(torch.int32) % n
    return table.contiguous(), counts.contiguous()


def decode_table(spec: MaskSpec, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """For KV-cached decoding: ``(keys [N, max_keys] int32, count [N] int32)``, raster order.

    Row ``p`` lists, ascending, the raster indices of the keys query ``p`` sees (``count[p]`` of them; the rest of
    the row is filler). Column attention needs no transposition here: one query gathers its keys directly.
    Plain causal attention needs no table (keys 0..p); callers should not build one for it (it is N x N).
    """
    return _decode_table_cached(spec, str(torch.device(device)))
