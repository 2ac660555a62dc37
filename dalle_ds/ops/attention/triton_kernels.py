"""Block-sparse causal attention kernels in Triton for the DALL-E row / column / conv masks.

Algorithm: FlashAttention-2 (Dao, 2023, arXiv 2307.08691): tiled online softmax in the forward pass (no score
matrix in memory), the log-sum-exp saved per row, and a backward pass that recomputes the probabilities tile by
tile: one program per key block accumulates dK and dV over the query blocks that see it, one program per query
block accumulates dQ, after a pre-pass computing ``delta = rowsum(dO * O)``. Written for this project from the
paper's equations and the structure of Triton's fused-attention tutorial (no code copied).

What is specific here:

* **Visit lists instead of a causal loop.** Each program loads from a :class:`layouts.BlockLayout` how many
  tiles to visit and which (into registers, ``_visit_list``), and runs one loop over them: FULL tiles first (no mask
  at all), then PARTIAL tiles, where a uniform runtime branch evaluates the mask from the row and column indices by
  ``_visible`` (a line-by-line mirror of :func:`masks.visible`; no dense mask is ever loaded). Skipped tiles cost
  nothing. One loop is one software pipeline: two loops (FULL, then PARTIAL) paid a pipeline fill and drain each.
* **Column attention on transposed image states, fused into the addressing.** With ``TRANSPOSED`` the kernels
  work in column-major image order, where the column mask is a contiguous window. Logical index ``i`` (kernel
  order) reads and writes row ``_to_raster(i)`` of the raster-order tensors, so the caller never permutes
  anything; the mask is evaluated on raster indices, so causality is exactly the raster one.
* **Geometry is compile-time.** T, W (hence N) and the mask kind are ``tl.constexpr``: the index maps and the
  in-block masks compile to multiply/shift sequences, and each model shape compiles its kernels once.
* The log-sum-exp is kept in base 2 with the softmax scale folded in (``qk_scale = scale / ln 2``).

Supports fp16 / bf16 (fp32 accumulation) and fp32 (``input_precision="ieee"`` dots, for tests), head dims
16-128 (powers of two), any batch and head count, arbitrary strides except a unit stride on the head dim.
Tested on CPU under ``TRITON_INTERPRET=1``, compiled ahead of time for sm_90 without a GPU, and on an H200
(2026-12-04: every parity test passes; speed is far from its targets, see
benchmarks/results/h200_20261204_session.md).

Naming follows Triton's tutorial: ``_``-prefixed kernels, capitalized pointers, ``stride_<tensor><dim>``,
``UPPER`` constexprs, ``offs_m``/``offs_n``, ``m_i``/``l_i``/``acc``.
"""
import triton
import triton.language as tl

# Mask kinds and conv wraparound codes (must match triton_backend.KIND_CODE / WRAP_CODE).
KIND_CAUSAL, KIND_ROW, KIND_COLUMN, KIND_CONV = 0, 1, 2, 3
WRAP_RASTER, WRAP_NONE = 0, 1


@triton.jit
def _to_raster(idx, T: tl.constexpr, W: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Kernel-order sequence index -> raster-order index (masks.kernel_to_raster)."""
    if TRANSPOSED:
        t = tl.maximum(idx - T, 0)
        c = t // W
        r = t - c * W
        out = tl.where(idx >= T, T + r * W + c, idx)
    else:
        out = idx
    return out


@triton.jit
def _visible(qi, ki, T: tl.constexpr, W: tl.constexpr, KIND: tl.constexpr, CONV_R: tl.constexpr,
             CONV_WRAP: tl.constexpr):
    """masks.visible on raster indices (broadcast shapes). Mirror the Python definition line by line."""
    causal = ki <= qi
    if KIND == 0:  # causal
        vis = causal
    else:
        d = qi - ki  # raster offset; only read where causal (d >= 0)
        if KIND == 1:  # row: q - W <= k <= q
            img = d <= W
        elif KIND == 2:  # column: same column, earlier rows
            img = (d % W) == 0
        else:  # conv
            if CONV_WRAP == 0:  # raster wraparound: offsets {0..R} U {dr*W-R .. dr*W+R}, dr = 1..R
                if W > 2 * CONV_R:  # bands do not overlap: u = d + R lies in band u // W iff u % W <= 2R
                    u = d + CONV_R
                    band = u // W
                    img = (d <= CONV_R) | ((band >= 1) & (band <= CONV_R) & (u - band * W <= 2 * CONV_R))
                else:  # small grids: the definition band by band
                    img = d <= CONV_R
                    for dr in tl.static_range(1, CONV_R + 1):
                        img = img | ((d >= dr * W - CONV_R) & (d <= dr * W + CONV_R))
            else:  # clipped 2-D window
                pq = tl.maximum(qi - T, 0)
                pk = tl.maximum(ki - T, 0)
                dr2 = pq // W - pk // W
                dc2 = pq % W - pk % W
                img = (dr2 <= CONV_R) & (dr2 >= -CONV_R) & (dc2 <= CONV_R) & (dc2 >= -CONV_R)
        vis = causal & ((ki < T) | img)
    return vis


@triton.jit
def _visit_list(Index, Full, Count, pid, stride_lay, SLOTS: tl.constexpr):
    """This program's visit list (block ids: FULL first, then PARTIAL), loaded once into registers.

    Why registers: when a loop reads its next block id from memory (``tl.load(Index + j)``) and the id only feeds
    the K/V addresses (as in a loop over FULL tiles), Triton's software pipeliner (3.6 and 3.9, sm_90) makes the id
    load an async copy with a stage of its own, keeps K/V one stage behind, and waits for every copy in flight at
    the top of each iteration (``async_wait {num = 0}``): the load latency of every tile is exposed. Read from
    registers, the K/V loads run ``num_stages - 1`` tiles ahead (``async_wait {num = 2}`` at 3 stages);
    tests/test_attention_triton.py checks this on the sm_90 code compiled on CPU."""
    slots = tl.arange(0, SLOTS)
    n_full = tl.load(Full + pid)
    n_visit = tl.load(Count + pid)
    row = tl.load(Index + pid * stride_lay + slots, mask=slots < n_visit, other=0)
    return row, n_full, n_visit


@triton.jit
def _visit_at(row, j, SLOTS: tl.constexpr):
    """Entry ``j`` of a visit list held in registers (a masked sum: Triton has no scalar extraction)."""
    return tl.sum(tl.where(tl.arange(0, SLOTS) == j, row, 0))


@triton.jit
def _row_tiles(A_base, B_base, stride_an, stride_bn, start, T: tl.constexpr, W: tl.constexpr, N: tl.constexpr,
               TRANSPOSED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Rows ``start .. start + BLOCK`` (kernel order) of two (N, HEAD_DIM) tensors: their raster row indices, which
    of them exist (< N), and both tiles (zeros past N). K and V for the forward and dQ; Q and dO for dK/dV."""
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = _to_raster(offs, T, W, TRANSPOSED)
    ok = offs < N
    a = tl.load(A_base + rows[:, None] * stride_an + offs_d[None, :], mask=ok[:, None], other=0.0)
    b = tl.load(B_base + rows[:, None] * stride_bn + offs_d[None, :], mask=ok[:, None], other=0.0)
    return rows, ok, a, b


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, l_i, m_i, q, qr, K_base, V_base, stride_kn, stride_vn, start_n, qk_scale,
              T: tl.constexpr, W: tl.constexpr, N: tl.constexpr, KIND: tl.constexpr, TRANSPOSED: tl.constexpr,
              CONV_R: tl.constexpr, CONV_WRAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              partial, DOT_PRECISION: tl.constexpr):
    kr, n_ok, k, v = _row_tiles(K_base, V_base, stride_kn, stride_vn, start_n, T, W, N, TRANSPOSED, HEAD_DIM,
                                 BLOCK_N)
    # -- raw scores (B_M, B_N); the log2-unit scale (qk_scale > 0) is applied to the row maxima and inside exp2's
    # argument, where multiply and subtract fuse into one FMA per score (Triton's tutorial does the same): 32 fewer
    # instructions per thread and 64x64 tile than scaling every score first (ptxas for sm_90)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if partial:  # a runtime branch, uniform over the program: FULL tiles skip the mask arithmetic
        vis = _visible(qr[:, None], kr[None, :], T, W, KIND, CONV_R, CONV_WRAP) & n_ok[None, :]
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: avoid inf - inf
    # -- online softmax update
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, KvIndex, KvFull, KvCount, stride_lay,
              stride_qb, stride_qh, stride_qn,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_on,
              H, qk_scale,
              T: tl.constexpr, W: tl.constexpr, N: tl.constexpr, KIND: tl.constexpr, TRANSPOSED: tl.constexpr,
              CONV_R: tl.constexpr, CONV_WRAP: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SLOTS: tl.constexpr):
    # grid (B*H, query blocks), last query block first: later rows visit more tiles (longest first)
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q_base = Q + b * stride_qb + h * stride_qh
    K_base = K + b * stride_kb + h * stride_kh
    V_base = V + b * stride_vb + h * stride_vh
    O_base = Out + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N
    qr = _to_raster(offs_m, T, W, TRANSPOSED)
    q = tl.load(Q_base + qr[:, None] * stride_qn + offs_d[None, :], mask=m_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    row, n_full, n_visit = _visit_list(KvIndex, KvFull, KvCount, pid_m, stride_lay, SLOTS)
    for j in range(0, n_visit):  # FULL tiles first, then PARTIAL ones (one loop: one software pipeline)
        start_n = _visit_at(row, j, SLOTS) * BLOCK_N
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, qr, K_base, V_base, stride_kn, stride_vn, start_n, qk_scale,
                                  T, W, N, KIND, TRANSPOSED, CONV_R, CONV_WRAP, HEAD_DIM, BLOCK_N,
                                  j >= n_full, DOT_PRECISION)

    # -- epilogue: every valid row sees itself, so l_i > 0 there; guard padded rows anyway
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O_base + qr[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty), mask=m_ok[:, None])
    # log-sum-exp in base 2 (scaled scores), in the kernel order, (B*H, N) contiguous
    tl.store(Lse + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_safe), mask=m_ok)


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(Out, DO, Delta,
                         stride_ob, stride_oh, stride_on,
                         stride_dob, stride_doh, stride_don,
                         H,
                         T: tl.constexpr, W: tl.constexpr, N: tl.constexpr, TRANSPOSED: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[i] = sum_d dO[i, d] * O[i, d] (fp32), stored in the kernel order like the log-sum-exp."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N
    rows = _to_raster(offs_m, T, W, TRANSPOSED)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_don + offs_d[None, :],
                 mask=m_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * N + offs_m, delta, mask=m_ok)


@triton.jit
def _dkdv_tile(dk, dv, k, v, kr, Q_base, DO_base, Lse_bh, Delta_bh, DQ_bh, stride_qn, stride_don, start_m,
               qk_scale, sm_scale,
               T: tl.constexpr, W: tl.constexpr, N: tl.constexpr, KIND: tl.constexpr, TRANSPOSED: tl.constexpr,
               CONV_R: tl.constexpr, CONV_WRAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               partial, DOT_PRECISION: tl.constexpr, FUSE_DQ: tl.constexpr):
    qr, m_ok, q, do = _row_tiles(Q_base, DO_base, stride_qn, stride_don, start_m, T, W, N, TRANSPOSED, HEAD_DIM,
                                 BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lse = tl.load(Lse_bh + offs_m, mask=m_ok, other=float("inf"))  # padded rows: p = 0
    delta = tl.load(Delta_bh + offs_m, mask=m_ok, other=0.0)
    # -- P^T = exp2(K Q^T * qk_scale - lse): (B_N, B_M)
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    pT = tl.math.exp2(qkT - lse[None, :])
    if partial:  # runtime branch, uniform over the program
        vis = _visible(qr[None, :], kr[:, None], T, W, KIND, CONV_R, CONV_WRAP) & m_ok[None, :]
        pT = tl.where(vis, pT, 0.0)
    # -- dV += P^T dO
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    # -- dS^T = P^T * (V dO^T - delta);  dK += dS^T Q   (the softmax scale is applied once at the end)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
    dk = tl.dot(dsT, q, dk, input_precision=DOT_PRECISION)
    if FUSE_DQ:  # dQ[rows] += dS K * scale, added atomically into an fp32 (N, HEAD_DIM) buffer (rows in raster order)
        offs_d = tl.arange(0, HEAD_DIM)
        dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION) * sm_scale
        tl.atomic_add(DQ_bh + qr[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=m_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, DQ, Lse, Delta, QIndex, QFull, QCount, stride_lay,
                   stride_qb, stride_qh, stride_qn,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_don,
                   stride_dkb, stride_dkh, stride_dkn,
                   stride_dvb, stride_dvh, stride_dvn,
                   H, qk_scale, sm_scale,
                   T: tl.constexpr, W: tl.constexpr, N: tl.constexpr, KIND: tl.constexpr,
                   TRANSPOSED: tl.constexpr, CONV_R: tl.constexpr, CONV_WRAP: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, SLOTS: tl.constexpr, FUSE_DQ: tl.constexpr):
    """One program per (batch*head, key block): dK, dV over the query blocks listed for this key block.
    Grid (B*H, key blocks) in order: the text key blocks, seen by every later query, are the longest and go first.

    ``FUSE_DQ``: also add each tile's share of dQ (dS K) atomically into ``DQ``, a zeroed fp32 (B*H, N, HEAD_DIM)
    buffer in raster row order (FlashAttention-2's backward, Dao 2023 Alg. 2): five matmuls a tile instead of the
    seven of this kernel plus ``_attn_bwd_dq``, which recomputes P and dP, at the price of fp32 atomics and an
    order of additions that varies from run to run. Not set: ``DQ`` is never touched."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q_base = Q + b * stride_qb + h * stride_qh
    DO_base = DO + b * stride_dob + h * stride_doh
    Lse_bh = Lse + pid_bh.to(tl.int64) * N
    Delta_bh = Delta + pid_bh.to(tl.int64) * N
    DQ_bh = DQ + pid_bh.to(tl.int64) * N * HEAD_DIM

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < N
    kr = _to_raster(offs_n, T, W, TRANSPOSED)
    k = tl.load(K + b * stride_kb + h * stride_kh + kr[:, None] * stride_kn + offs_d[None, :],
                mask=n_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + kr[:, None] * stride_vn + offs_d[None, :],
                mask=n_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    row, n_full, n_visit = _visit_list(QIndex, QFull, QCount, pid_n, stride_lay, SLOTS)
    for j in range(0, n_visit):  # FULL tiles first, then PARTIAL ones
        start_m = _visit_at(row, j, SLOTS) * BLOCK_M
        dk, dv = _dkdv_tile(dk, dv, k, v, kr, Q_base, DO_base, Lse_bh, Delta_bh, DQ_bh, stride_qn, stride_don,
                            start_m, qk_scale, sm_scale, T, W, N, KIND, TRANSPOSED, CONV_R, CONV_WRAP, HEAD_DIM,
                            BLOCK_M, j >= n_full, DOT_PRECISION, FUSE_DQ)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + kr[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + kr[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _dq_tile(dq, q, do, lse, delta, qr, K_base, V_base, stride_kn, stride_vn, start_n, qk_scale,
             T: tl.constexpr, W: tl.constexpr, N: tl.constexpr, KIND: tl.constexpr, TRANSPOSED: tl.constexpr,
             CONV_R: tl.constexpr, CONV_WRAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
             partial, DOT_PRECISION: tl.constexpr):
    kr, n_ok, k, v = _row_tiles(K_base, V_base, stride_kn, stride_vn, start_n, T, W, N, TRANSPOSED, HEAD_DIM,
                                 BLOCK_N)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if partial:  # runtime branch, uniform over the program
        vis = _visible(qr[:, None], kr[None, :], T, W, KIND, CONV_R, CONV_WRAP) & n_ok[None, :]
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, Lse, Delta, KvIndex, KvFull, KvCount, stride_lay,
                 stride_qb, stride_qh, stride_qn,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_don,
                 stride_dqb, stride_dqh, stride_dqn,
                 H, qk_scale, sm_scale,
                 T: tl.constexpr, W: tl.constexpr, N: tl.constexpr, KIND: tl.constexpr,
                 TRANSPOSED: tl.constexpr, CONV_R: tl.constexpr, CONV_WRAP: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, SLOTS: tl.constexpr):
    """One program per (batch*head, query block): dQ over the key blocks listed for this query block.
    Grid (B*H, query blocks), last query block first (longest first), as in the forward."""
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    K_base = K + b * stride_kb + h * stride_kh
    V_base = V + b * stride_vb + h * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N
    qr = _to_raster(offs_m, T, W, TRANSPOSED)
    q = tl.load(Q + b * stride_qb + h * stride_qh + qr[:, None] * stride_qn + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + qr[:, None] * stride_don + offs_d[None, :],
                 mask=m_ok[:, None], other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    row, n_full, n_visit = _visit_list(KvIndex, KvFull, KvCount, pid_m, stride_lay, SLOTS)
    for j in range(0, n_visit):  # FULL tiles first, then PARTIAL ones
        start_n = _visit_at(row, j, SLOTS) * BLOCK_N
        dq = _dq_tile(dq, q, do, lse, delta, qr, K_base, V_base, stride_kn, stride_vn, start_n, qk_scale,
                      T, W, N, KIND, TRANSPOSED, CONV_R, CONV_WRAP, HEAD_DIM, BLOCK_N, j >= n_full, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + qr[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])


# --------------------------------------------------------------------------------------------------------------
# decode: one new query against a KV cache (raster order, no transposition needed)
# --------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["position"])
def _attn_decode(Q, K, V, Out, KeyTable, KeyCount, stride_table, position,
                 stride_qb, stride_qh,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_ob, stride_oh,
                 H, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CONTIGUOUS: tl.constexpr,
                 POSITION_IN_MEMORY: tl.constexpr):
    """One program per (batch, head). The visible keys are row ``position`` of a decode table
    (layouts.decode_table: sorted raster indices), or 0..position when CONTIGUOUS (plain causal).

    ``POSITION_IN_MEMORY``: ``position`` points to a one-element integer tensor holding it, read here, so that one
    captured launch (a CUDA graph of the sampler's decode step) serves every position."""
    if POSITION_IN_MEMORY:
        position = tl.load(position).to(tl.int32)
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    K_base = K + b * stride_kb + h * stride_kh
    V_base = V + b * stride_vb + h * stride_vh
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d).to(tl.float32) * qk_scale  # (D,)
    if CONTIGUOUS:
        n_keys = position + 1
    else:
        n_keys = tl.load(KeyCount + position)
    table = KeyTable + position * stride_table

    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([1, HEAD_DIM], dtype=tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        ok = offs < n_keys
        if CONTIGUOUS:
            kidx = offs
        else:
            kidx = tl.load(table + offs, mask=ok, other=0)
        k = tl.load(K_base + kidx[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None], other=0.0)
        # V is loaded before the scores are reduced: issued here, its latency overlaps the K arithmetic (issued
        # after the softmax, as before, ptxas kept it behind the reductions' barriers: two load latencies a block)
        v = tl.load(V_base + kidx[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # (B_N,)
        s = tl.where(ok, s, float("-inf"))[None, :]  # (1, B_N); every block has >= 1 valid key
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(tl.trans(p) * v.to(tl.float32), 0)[None, :]
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty))
