"""Block layouts (dalle_ds.ops.attention.layouts) against the dense element mask, and against FlexAttention."""
import pytest
import torch

from dalle_ds.ops.attention.layouts import FULL, PARTIAL, SKIP, block_layout, decode_table
from dalle_ds.ops.attention.masks import MaskSpec

SPECS = [
    MaskSpec("causal", 3, 5),
    MaskSpec("row", 0, 8),
    MaskSpec("row", 3, 5),
    MaskSpec("column", 3, 5),
    MaskSpec("column", 0, 8),
    MaskSpec("column", 256, 32),
    MaskSpec("conv", 3, 5),
    MaskSpec("conv", 7, 16, conv_wrap="none"),
    MaskSpec("conv", 256, 32),
    MaskSpec("row", 256, 32),
]
BLOCKS = [(16, 16), (32, 16), (16, 64), (64, 64), (128, 64)]


def tiles_of(mask: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Pad the [N, N] element mask to whole tiles (padding invisible) and view it as [Mb, bm, Nb, bn]."""
    n = mask.shape[0]
    mb, nb = -(-n // bm), -(-n // bn)
    padded = torch.zeros(mb * bm, nb * bn, dtype=torch.bool)
    padded[:n, :n] = mask
    return padded.view(mb, bm, nb, bn)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("bm,bn", BLOCKS)
def test_layout_consistent_with_dense_mask(spec, bm, bn):
    lay = block_layout(spec, bm, bn, "kernel")
    tiles = tiles_of(spec.dense(order="kernel"), bm, bn)
    any_vis = tiles.any(3).any(1)
    all_vis = tiles.all(3).all(1)
    st = lay.status
    assert st.shape == any_vis.shape
    assert any_vis[st != SKIP].all(), "every listed tile has a visible element"
    assert not any_vis[st == SKIP].any(), "no visible element lies in a skipped tile"
    assert all_vis[st == FULL].all(), "FULL tiles are fully visible"
    assert not all_vis[st == PARTIAL].any(), "PARTIAL tiles are not fully visible"

    # per query block: FULL key blocks first, then PARTIAL ones, each ascending; exactly the tiles of that row
    for m in range(lay.num_q_blocks):
        nf, nv = int(lay.kv_full[m]), int(lay.kv_count[m])
        row = lay.kv_index[m].tolist()
        assert row[:nf] == (st[m] == FULL).nonzero().flatten().tolist()
        assert row[nf:nv] == (st[m] == PARTIAL).nonzero().flatten().tolist()
    # per key block (the backward's view): the same tiles, transposed
    for n in range(lay.num_k_blocks):
        nf, nv = int(lay.q_full[n]), int(lay.q_count[n])
        col = lay.q_index[n].tolist()
        assert col[:nf] == (st[:, n] == FULL).nonzero().flatten().tolist()
        assert col[nf:nv] == (st[:, n] == PARTIAL).nonzero().flatten().tolist()
    assert lay.kv_index.dtype == torch.int32 and lay.kv_index.is_contiguous()


def test_layout_statistics_at_paper_shape():
    """Fractions of the causal tiles kept at N = 1280 (research/kernel_anchors.md §5.3 has row/column values)."""
    T, W = 256, 32
    stats = {}
    for kind in ("row", "column", "conv"):
        for order in ("raster", "kernel"):
            for b in (64, 128):
                stats[kind, order, b] = block_layout(MaskSpec(kind, T, W), b, b, order).stats()["kept_of_causal"]
    assert stats["row", "kernel", 64] == pytest.approx(0.500, abs=5e-4)
    assert stats["row", "kernel", 128] == pytest.approx(0.618, abs=5e-4)
    # column attention in raster order skips nothing; transposed, about half the causal tiles remain
    assert stats["column", "raster", 64] == 1.0 and stats["column", "raster", 128] == 1.0
    assert stats["column", "kernel", 64] == pytest.approx(0.429, abs=5e-4)
    assert stats["column", "kernel", 128] == pytest.approx(0.491, abs=5e-4)
    assert stats["conv", "kernel", 64] < 0.65 and stats["conv", "kernel", 128] < 0.75


@pytest.mark.parametrize("spec", [MaskSpec("row", 3, 5), MaskSpec("column", 256, 32), MaskSpec("conv", 0, 8)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("block", [16, 128])
def test_flex_block_mask_agrees_with_layout(spec, block):
    """FlexAttention's create_block_mask (its own derivation from the same mask_mod) lists the same tiles."""
    from dalle_ds.ops.attention.flex import block_mask_for

    bm = block_mask_for(spec, "cpu", block)
    lay = block_layout(spec, block, block, "kernel")
    part_n, part_i, full_n, full_i = bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices
    for m in range(lay.num_q_blocks):
        flex_full = sorted(full_i[0, 0, m, : full_n[0, 0, m]].tolist())
        flex_part = sorted(part_i[0, 0, m, : part_n[0, 0, m]].tolist())
        nf, nv = int(lay.kv_full[m]), int(lay.kv_count[m])
        assert flex_full == lay.kv_index[m, :nf].tolist()
        assert flex_part == lay.kv_index[m, nf:nv].tolist()


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_decode_table_lists_exactly_the_visible_keys(kind):
    spec = MaskSpec(kind, 3, 6)
    table, count = decode_table(spec)
    dense = spec.dense()
    for p in range(spec.seq_len):
        expect = dense[p].nonzero().flatten().tolist()
        assert table[p, : count[p]].tolist() == expect
    assert table.shape[1] == int(dense.sum(1).max())
