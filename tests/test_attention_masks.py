"""The mask definition (dalle_ds.ops.attention.masks): hand-checked facts from the paper and public code."""
import pytest
import torch

from dalle_ds.ops.attention.masks import (
    MaskSpec,
    kept_elements,
    kernel_order_index,
    kernel_to_raster,
    layer_kind,
    layer_schedule,
    visible,
)

KINDS = ["causal", "row", "column", "conv"]


def image_keys(spec: MaskSpec, r: int, c: int) -> set[tuple[int, int]]:
    """The (row, col) image keys visible to the image query at (r, c)."""
    T, W = spec.text_len, spec.grid
    q = T + r * W + c
    ks = torch.arange(T, spec.seq_len)
    vis = visible(spec, torch.tensor(q), ks)
    return {(int(k - T) // W, int(k - T) % W) for k in ks[vis]}


def test_row_mask_matches_paper_and_rudalle():
    # research/dalle_anchors.md §2: query (10,10) sees (9,10)..(9,31),(10,0)..(10,10); (31,0) sees (30,0)..(31,0).
    spec = MaskSpec("row", 256, 32)
    assert image_keys(spec, 10, 10) == {(9, c) for c in range(10, 32)} | {(10, c) for c in range(11)}
    assert image_keys(spec, 31, 0) == {(30, c) for c in range(32)} | {(31, 0)}
    # the oldest key is the same column one row up: W + 1 = 33 keys for every query with p >= W
    for r, c in [(1, 0), (5, 17), (31, 31)]:
        keys = image_keys(spec, r, c)
        older = r * 32 + c - 33  # one step before the window, in raster order
        assert len(keys) == 33 and (r - 1, c) in keys and (older // 32, older % 32) not in keys


def test_column_mask_is_same_column_all_earlier_rows():
    spec = MaskSpec("column", 256, 32)
    assert image_keys(spec, 10, 10) == {(r, 10) for r in range(11)}
    assert image_keys(spec, 31, 0) == {(r, 0) for r in range(32)}
    assert image_keys(spec, 0, 7) == {(0, 7)}


def test_conv_mask_raster_wraparound_is_a_fixed_offset_set():
    W, R = 32, 5
    spec = MaskSpec("conv", 256, W)
    offsets = set(range(R + 1)) | {dr * W + dc for dr in range(1, R + 1) for dc in range(-R, R + 1)}
    for r, c in [(10, 10), (10, 0), (10, 31), (5, 5), (31, 31)]:
        p = r * W + c
        expect = {((p - o) // W, (p - o) % W) for o in offsets}
        assert image_keys(spec, r, c) == expect
        assert len(expect) == 61
    # near the left edge the window's left columns wrap into the end of the row above (like the row mask)
    assert (9, 31) in image_keys(spec, 10, 0) and (9, 0) in image_keys(spec, 10, 0)
    # near the top it is clipped by the grid start
    assert image_keys(spec, 0, 3) == {(0, c) for c in range(4)}
    # K = 3 at W = 4: offsets {0, 1, 3, 4, 5}, the ground truth ru-dalle's (skipped) conv test hard-codes
    small = MaskSpec("conv", 0, 4, conv_kernel=3)
    q = 10
    assert {q - k for k in range(16) if visible(small, torch.tensor(q), torch.tensor(k))} == {0, 1, 3, 4, 5}


def test_conv_mask_without_wraparound_is_the_clipped_window():
    # ru-dalle v3 (research/dalle_anchors.md §2): 61 keys at (10,10), rows 5..10 x cols 5..15; 31 keys at (31,0)
    spec = MaskSpec("conv", 256, 32, conv_wrap="none")
    keys = image_keys(spec, 10, 10)
    assert len(keys) == 61 and all(5 <= r <= 10 and 5 <= c <= 15 for r, c in keys)
    keys = image_keys(spec, 31, 0)
    assert len(keys) == 31 and all(26 <= r <= 31 and 0 <= c <= 5 for r, c in keys)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,W", [(0, 4), (3, 5), (7, 8), (256, 32), (1, 64)])
def test_text_prefix_and_causality(kind, T, W):
    spec = MaskSpec(kind, T, W)
    n = spec.seq_len
    m = spec.dense()
    assert m.shape == (n, n)
    assert not torch.triu(m, diagonal=1).any(), "a key after its query is visible"
    assert m.diagonal().all(), "every token sees itself"
    assert torch.equal(m[:T, :T], torch.ones(T, T, dtype=torch.bool).tril())  # text -> text causal
    assert m[T:, :T].all(), "every image token sees every text token"
    if kind == "causal":
        assert m.sum() == n * (n + 1) // 2


def test_kept_elements_hand_count():
    # T = 3, W = 4: text 3*4/2 = 6; image->text 16*3 = 48; row image->image: sum_p min(p, 4) + 1 = 15 + 11*5 = 70
    assert kept_elements(MaskSpec("row", 3, 4)) == 6 + 48 + 70
    # column: query at row r sees r + 1 keys: 4 * (1 + 2 + 3 + 4) = 40
    assert kept_elements(MaskSpec("column", 3, 4)) == 6 + 48 + 40
    assert kept_elements(MaskSpec("causal", 3, 4)) == 19 * 20 // 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,W", [(0, 4), (3, 5), (256, 32)])
def test_kernel_order_is_the_raster_mask_permuted(kind, T, W):
    spec = MaskSpec(kind, T, W)
    perm = kernel_order_index(spec)
    assert torch.equal(perm[perm], torch.arange(spec.seq_len)), "the transposition is an involution"
    raster = spec.dense()
    kernel = spec.dense(order="kernel")
    assert torch.equal(kernel, raster[perm][:, perm])
    if kind != "column":
        assert torch.equal(perm, torch.arange(spec.seq_len))


@pytest.mark.parametrize("T,W", [(0, 4), (3, 5), (256, 32), (5, 64)])
def test_column_mask_is_a_contiguous_window_in_kernel_order(T, W):
    spec = MaskSpec("column", T, W)
    m = spec.dense(order="kernel")
    for q in range(T, spec.seq_len, 7):
        img = m[q, T:].nonzero().flatten() + T
        t = q - T
        assert torch.equal(img, torch.arange(T + (t // W) * W, q + 1)), "the earlier part of the query's own column"


def test_kernel_to_raster_maps_column_major_to_raster():
    spec = MaskSpec("column", 2, 3)
    # column-major image index t = c*W + r -> raster p = r*W + c
    idx = torch.arange(spec.seq_len)
    assert kernel_to_raster(spec, idx).tolist() == [0, 1] + [2 + p for p in (0, 3, 6, 1, 4, 7, 2, 5, 8)]


def test_predicate_works_under_vmap():
    # FlexAttention evaluates mask_mod under torch.vmap on scalar index tensors.
    for kind in KINDS:
        for wrap in ("raster", "none"):
            spec = MaskSpec(kind, 3, 5, conv_wrap=wrap)
            idx = torch.arange(spec.seq_len)
            f = torch.vmap(torch.vmap(spec.visible_in_kernel_order, in_dims=(None, 0)), in_dims=(0, None))
            assert torch.equal(f(idx, idx), spec.dense(order="kernel"))


def test_layer_schedule():
    assert layer_schedule(4) == ["row", "column", "row", "conv"]
    assert layer_schedule(6)[:4] == ["row", "column", "row", "row"]
    sched = layer_schedule(64)
    assert (sched.count("row"), sched.count("column"), sched.count("conv")) == (47, 16, 1)
    assert sched[-1] == "conv" and [i + 1 for i, k in enumerate(sched) if k == "column"][:3] == [2, 6, 10]
    with pytest.raises(ValueError):
        layer_kind(0, 4)


def test_spec_validation():
    with pytest.raises(ValueError, match="kind"):
        MaskSpec("diagonal", 0, 4)
    with pytest.raises(ValueError, match="odd"):
        MaskSpec("conv", 0, 4, conv_kernel=4)
    with pytest.raises(ValueError, match="text_len"):
        MaskSpec("row", -1, 4)
    with pytest.raises(ValueError, match="conv_wrap"):
        MaskSpec("conv", 0, 4, conv_wrap="torus")
    assert MaskSpec("conv", 256, 32).name == "conv_T256_W32_k11_raster"
    assert MaskSpec("row", 256, 32).seq_len == 1280


@pytest.mark.parametrize("field, value", [("grid", 2.5), ("text_len", 1.5), ("conv_kernel", 3.0), ("grid", "3"),
                                          ("grid", True)])
def test_mask_spec_sizes_must_be_ints(field, value):
    """A float or string size failed only inside a kernel (Triton's pointer arithmetic, flex's tracing)."""
    kwargs = {"kind": "conv", "text_len": 2, "grid": 3, field: value}
    with pytest.raises(TypeError, match=f"{field} must be an int"):
        MaskSpec(**kwargs)
