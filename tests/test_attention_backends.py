"""Dense reference, FlexAttention backend and the dispatcher (CPU; the Triton kernels are in test_attention_triton)."""
import math

import pytest
import torch

from dalle_ds.ops.attention import (
    MaskSpec,
    attention,
    attention_decode,
    backend_status,
    reference_attention,
    reference_decode,
    select_backend,
)
from dalle_ds.ops.attention.flex import flex_sparse_attention
from dalle_ds.ops.attention.reference import decode_windows

KINDS = ["causal", "row", "column", "conv"]


def naive_attention(q, k, v, spec, scale):
    """Query by query, from the predicate, in float64: an oracle for the oracle."""
    out = torch.empty(q.shape, dtype=torch.float64)
    keys = torch.arange(spec.seq_len)
    for i in range(spec.seq_len):
        vis = spec.visible(torch.tensor(i), keys)
        s = (q[:, :, i : i + 1].double() @ k[:, :, vis].double().transpose(-1, -2)) * scale
        out[:, :, i] = (torch.softmax(s, -1) @ v[:, :, vis].double())[:, :, 0]
    return out


def rand_qkv(spec, B=2, H=3, D=32, dtype=torch.float32, requires_grad=False):
    return [torch.randn(B, H, spec.seq_len, D, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_query_by_query_softmax(kind):
    spec = MaskSpec(kind, 3, 5, conv_kernel=5)
    q, k, v = rand_qkv(spec)
    scale = 0.3
    ref = reference_attention(q, k, v, spec, scale, compute_dtype=torch.float64)
    torch.testing.assert_close(ref, naive_attention(q, k, v, spec, scale).float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,W,D", [(0, 5, 32), (3, 8, 64), (17, 4, 16)])
def test_flex_matches_dense(kind, T, W, D):
    spec = MaskSpec(kind, T, W, conv_kernel=5 if W < 8 else 11)
    q, k, v = rand_qkv(spec, D=D)
    ref = reference_attention(q, k, v, spec, compute_dtype=torch.float64)
    for order, block in (("kernel", 16), ("raster", 128)):
        out = flex_sparse_attention(q, k, v, spec, order=order, block_size=block)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    out = attention(q, k, v, spec, backend="flex")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_dense_backend_gradients_match_float64():
    spec = MaskSpec("column", 3, 5)
    q, k, v = rand_qkv(spec, requires_grad=True)
    do = torch.randn_like(q)
    out = attention(q, k, v, spec, backend="dense")
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = reference_attention(q, k, v, spec, compute_dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_scale_argument():
    spec = MaskSpec("row", 2, 4)
    q, k, v = rand_qkv(spec)
    default = attention(q, k, v, spec)
    torch.testing.assert_close(default, attention(q, k, v, spec, scale=1 / math.sqrt(32)))
    torch.testing.assert_close(attention(q * 2, k, v, spec, scale=0.5 / math.sqrt(32)), default)


def test_auto_on_cpu_uses_sdpa_and_explains_refusals():
    spec = MaskSpec("row", 3, 5)
    q, k, v = rand_qkv(spec, requires_grad=True)
    assert select_backend(q, k, v, spec) == "sdpa"
    with pytest.raises(NotImplementedError, match="no CPU backward"):
        attention(q, k, v, spec, backend="flex")
    with pytest.raises(NotImplementedError) as err:
        attention(*(t.detach().to(torch.int32) for t in (q, k, v)), spec)
    msg = str(err.value)
    for name in ("triton:", "flex:", "sdpa:", "dense:"):
        assert name in msg
    assert "dtype=torch.int32" in msg


def test_triton_refuses_cpu_without_interpreter():
    from dalle_ds.ops.attention import triton_backend

    if triton_backend.interpreted():
        pytest.skip("kernels were imported under TRITON_INTERPRET=1 in this process")
    spec = MaskSpec("row", 3, 5)
    q, k, v = rand_qkv(spec)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        attention(q, k, v, spec, backend="triton")


def test_input_validation():
    spec = MaskSpec("row", 3, 5)
    q, k, v = rand_qkv(spec)
    with pytest.raises(ValueError, match="T \\+ W\\*W"):
        attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], spec)
    with pytest.raises(ValueError, match="same shape"):
        attention(q, k[:, :1], v, spec)
    with pytest.raises(ValueError, match="backend must be"):
        attention(q, k, v, spec, backend="cuda")
    with pytest.raises(TypeError):
        attention(q, k, v, "row")


def test_backend_status_lists_every_backend():
    rows = backend_status()
    assert [r["name"] for r in rows] == ["triton", "flex", "sdpa", "dense"]
    for r in rows:
        assert set(r) == {"name", "available", "reason"} and isinstance(r["reason"], str) and r["reason"]
    assert rows[2]["available"] and rows[3]["available"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,W", [(0, 5), (3, 8), (7, 4)])
def test_sdpa_matches_dense_forward_and_backward(kind, T, W):
    spec = MaskSpec(kind, T, W, conv_kernel=3)
    q, k, v = rand_qkv(spec, requires_grad=True)
    ref = attention(q, k, v, spec, backend="dense")
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    out = attention(q, k, v, spec, backend="sdpa")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_decode_matches_full_forward_row_by_row(kind):
    spec = MaskSpec(kind, 3, 5)
    q, k, v = rand_qkv(spec, B=2, H=2)
    full = attention(q, k, v, spec, backend="dense")
    for p in range(spec.seq_len):
        kc, vc = k.clone(), v.clone()
        kc[:, :, p + 1 :] = float("nan")  # the future is not in the cache yet
        vc[:, :, p + 1 :] = float("nan")
        out = attention_decode(q[:, :, p : p + 1], kc, vc, spec, p)
        torch.testing.assert_close(out[:, :, 0], full[:, :, p], atol=1e-6, rtol=1e-5)
        # position as a device tensor (whole cache under the mask row, no host sync): the same row
        out_t = attention_decode(q[:, :, p : p + 1], kc, vc, spec, torch.tensor(p))
        assert not out_t.isnan().any(), f"position {p}: the NaN future leaked in"
        torch.testing.assert_close(out_t, out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_windows_hold_exactly_the_visible_keys(kind):
    """The (at most two) strided cache windows a decode step reads, minus their keep-masks, are the predicate's
    visible set for every query; windows end at the query (nothing later is read)."""
    spec = MaskSpec(kind, 4, 6, conv_kernel=5)
    for p in range(spec.seq_len):
        windows = decode_windows(spec, p)
        assert 1 <= len(windows) <= 2
        got = []
        for window, keep in windows:
            idx = torch.arange(window.start, window.stop, window.step)
            got += idx[keep].tolist() if keep is not None else idx.tolist()
        want = torch.nonzero(spec.visible(torch.tensor(p), torch.arange(p + 1)))[:, 0].tolist()
        assert got == want and windows[-1][0].stop == p + 1


def test_decode_validation():
    spec = MaskSpec("row", 3, 5)
    q, k, v = rand_qkv(spec)
    with pytest.raises(ValueError, match="position"):
        attention_decode(q[:, :, :1], k, v, spec, spec.seq_len)
    with pytest.raises(ValueError, match="q_new"):
        attention_decode(q[:, :, :2], k, v, spec, 3)
    with pytest.raises(NotImplementedError, match="no decode path"):
        attention_decode(q[:, :, :1], k, v, spec, 3, backend="flex")
    with pytest.raises(ValueError, match="one integer"):
        attention_decode(q[:, :, :1], k, v, spec, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="one integer"):
        attention_decode(q[:, :, :1], k, v, spec, torch.tensor(3.0))
    with pytest.raises(ValueError, match="one integer"):
        attention_decode(q[:, :, :1], k, v, spec, torch.tensor(True))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on"):
            attention_decode(q[:, :, :1], k, v, spec, torch.tensor(3, device="cuda"))
    out = reference_decode(q[:, :, 4:5], k[:, :, :5], v[:, :, :5], spec, 4)
    assert out.shape == (2, 3, 1, 32)


def test_inputs_that_used_to_fail_deep_are_named_errors():
    spec = MaskSpec("row", text_len=3, grid=2)
    q = torch.randn(1, 1, spec.seq_len, 4)
    with pytest.raises(TypeError, match="q must be a tensor, got list"):
        attention([1.0], q, q, spec)
    empty = torch.randn(1, 1, spec.seq_len, 0)
    with pytest.raises(ValueError, match="head dim must be ≥ 1"):  # was a ZeroDivisionError in the scale
        attention(empty, empty, empty, spec, backend="dense")
    for bad in (5.7, True):  # 5.7 was truncated to 5, True taken as position 1
        with pytest.raises(TypeError, match="position must be an int or a one-element integer tensor"):
            attention_decode(q[:, :, :1], q, q, spec, bad, backend="dense")
