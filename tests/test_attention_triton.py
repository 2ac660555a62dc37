"""Parity of the Triton block-sparse attention kernels with the dense reference: forward, backward, decode.

Where the tests run:

* on CPU, under the Triton interpreter. ``TRITON_INTERPRET`` must be set before the kernels are created, and
  setting it in this pytest process would leak into other tests, so ``test_parity_under_interpreter`` re-runs this
  file in a subprocess with ``TRITON_INTERPRET=1``; inside it (and only there) the parity tests run on CPU;
* on a CUDA GPU, directly (plus the ``gpu``-marked tests at the paper's shape, in bf16).

Every test draws fresh random inputs (no fixed seed) and poisons the outputs first (``poisoned_outputs``: the
launchers allocate every output, lse and delta filled with NaN instead of uninitialized), so an element a kernel
fails to write shows up as NaN. Tolerances: fp32 absolute 2e-4 (relative to the reference's magnitude); fp16/bf16 use
FlashAttention's rule (error <= 2 x the error of plain PyTorch attention in that dtype + a small atol), for the
output and for dq, dk, dv.

Under the interpreter bf16 is not tested: Triton's interpreter computes ``tl.dot`` on bf16 from the raw bits
(checked with triton 3.9: a 16x16 bf16 dot is off by ~1e10), so bf16 runs on GPU only.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from dalle_ds.ops.attention import MaskSpec, attention, attention_decode, reference_attention
from dalle_ds.ops.attention import triton_backend as tb
from dalle_ds.ops.attention.triton_backend import Config
from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import attn_sass  # noqa: E402  (benchmarks/attn_sass.py: ahead-of-time sm_90 compiles, loop counts)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
RUN_HERE = INTERPRET or ON_GPU
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

here = pytest.mark.skipif(not RUN_HERE, reason="runs inside test_parity_under_interpreter (TRITON_INTERPRET=1)")
ATOL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _no_tuning(monkeypatch):
    """Parity tests use the default tiles (tuning compiles every candidate: minutes of GPU time); one test tunes.
    The on-disk tuning cache is off (tests that tune must time, and must not write to the user's cache)."""
    monkeypatch.setenv("DALLE_DS_ATTN_TUNE", "0")
    monkeypatch.setenv("DALLE_DS_ATTN_CACHE", "off")


def test_old_interpreter_gets_squeezed_loop_bounds(monkeypatch):
    """tb._interpreter_loop_bounds_fix on an interpreter laid out as triton 3.6's (whose int() of a 1-element array
    NumPy 2 refuses): after it, a loaded count converts to an int; an interpreter that squeezes is left alone."""
    import numpy as np
    from triton.runtime import interpreter

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    def old_patch(tensor, scope):  # triton 3.6's conversion
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    class Tensor:
        def __init__(self, data):
            self.handle = type("Handle", (), {"data": data})()

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", old_patch)
    tb._interpreter_loop_bounds_fix()
    interpreter._patch_lang_tensor(Tensor, Scope())
    assert range(0, Tensor(np.array([5], dtype=np.int32))) == range(5)
    fixed = interpreter._patch_lang_tensor
    tb._interpreter_loop_bounds_fix()  # once only
    assert interpreter._patch_lang_tensor is fixed

    def new_patch(tensor, scope):  # triton 3.9's
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", new_patch)
    tb._interpreter_loop_bounds_fix()
    assert interpreter._patch_lang_tensor is new_patch


def test_parity_under_interpreter():
    """Run this file's CPU parity tests in a subprocess with TRITON_INTERPRET=1 (keeps this process clean)."""
    if INTERPRET:
        pytest.skip("already inside the interpreter subprocess")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu",
           os.path.abspath(__file__)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout[-8000:] + "\n" + proc.stderr[-4000:]).strip()
    print(f"interpreter subprocess: {time.time() - t0:.1f}s\n{tail[-1500:]}")
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def make_inputs(spec, B, H, D, dtype, layout="bhnd"):
    n = spec.seq_len
    if layout == "bhnd":
        qkv = [torch.randn(B, H, n, D, device=DEVICE, dtype=dtype) for _ in range(3)]
    else:  # a packed projection output (B, N, 3, H, D) viewed as (B, H, N, D): non-contiguous strides
        packed = torch.randn(B, n, 3, H, D, device=DEVICE, dtype=dtype)
        qkv = [packed[:, :, i].transpose(1, 2) for i in range(3)]
    return [t.requires_grad_() for t in qkv]


def references(q, k, v, spec, do, scale=None):
    """(out, grads) in float64, and (out, grads) of plain attention in the inputs' dtype."""
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = reference_attention(*leaves64, spec, scale, compute_dtype=torch.float64)
    g64 = torch.autograd.grad(out64, leaves64, do.double())
    if q.dtype == torch.float32:
        return (out64, g64), None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_lp = reference_attention(*leaves, spec, scale, upcast=False)
    g_lp = torch.autograd.grad(out_lp, leaves, do)
    return (out64, g64), (out_lp, g_lp)


def assert_parity(name, got, ref64, ref_lp, dtype):
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or overflowed elements)"
    err = (got.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    if ref_lp is None:
        tol = ATOL[dtype] * scale
    else:
        tol = 2 * (ref_lp.double() - ref64).abs().max().item() + ATOL[dtype] * scale
    assert err <= tol, f"{name}: max |err| {err:.3g} > tol {tol:.3g}"


def check_forward_backward(spec, B, H, D, dtype, layout="bhnd", scale=None):
    q, k, v = make_inputs(spec, B, H, D, dtype, layout)
    with tb.poisoned_outputs():  # outputs start as NaN: an element the kernels do not write fails the test
        out = attention(q, k, v, spec, backend="triton", scale=scale)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    (out64, g64), lp = references(q, k, v, spec, do, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_parity("out", out, out64, None if lp is None else lp[0], dtype)
    for name, g, r, i in zip(("dq", "dk", "dv"), grads, g64, range(3)):
        assert_parity(name, g, r, None if lp is None else lp[1][i], dtype)


# --------------------------------------------------------------------------------------------------------------
# parity: small odd shapes (every mask, several tile shapes, dtypes, head dims)
# --------------------------------------------------------------------------------------------------------------
SMALL = Config(16, 16, 4, 1)
TALL = Config(32, 16, 4, 1)
WIDE = Config(16, 32, 4, 1)
CASES = [
    # (kind, T, W, D, B, H, fwd/dq config, dkdv config)
    *[(kind, 3, 5, 32, 2, 3, SMALL, SMALL) for kind in ("causal", "row", "column", "conv")],
    *[(kind, 0, 8, 64, 1, 2, TALL, WIDE) for kind in ("causal", "row", "column", "conv")],
    ("conv", 5, 8, 32, 1, 2, WIDE, TALL),
]


@here
@pytest.mark.parametrize("backward", tb.BACKWARD_PATHS)  # fused: the dK/dV kernel adds dQ atomically
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,T,W,D,B,H,cfg,cfg_dkdv", CASES,
                         ids=[f"{c[0]}-T{c[1]}-W{c[2]}-d{c[3]}-{c[6].block_m}x{c[6].block_n}" for c in CASES])
def test_forward_backward_small(kind, T, W, D, B, H, cfg, cfg_dkdv, dtype, backward):
    spec = MaskSpec(kind, T, W)
    with tb.kernel_config(fwd=cfg, dq=cfg, dkdv=cfg_dkdv, backward=backward):
        check_forward_backward(spec, B, H, D, dtype)


@here
@pytest.mark.parametrize("wrap", ["raster", "none"])
def test_conv_wraparound_choices(wrap):
    spec = MaskSpec("conv", 3, 8, conv_wrap=wrap, conv_kernel=5)
    with tb.kernel_config(fwd=SMALL, dq=SMALL, dkdv=SMALL):
        check_forward_backward(spec, 1, 2, 32, torch.float32)


@here
def test_non_contiguous_inputs_and_custom_scale():
    spec = MaskSpec("column", 2, 6)
    with tb.kernel_config(fwd=SMALL, dq=SMALL, dkdv=SMALL):
        check_forward_backward(spec, 2, 2, 32, torch.float32, layout="packed", scale=0.3)


# --------------------------------------------------------------------------------------------------------------
# parity at the paper's geometry (T = 256, W = 32: 1280 tokens) with tensor-core-sized tiles
# --------------------------------------------------------------------------------------------------------------
@here
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_forward_backward_paper_geometry(kind):
    spec = MaskSpec(kind, 256, 32)
    dtype = torch.float16 if kind == "column" else torch.float32
    with tb.kernel_config(fwd=Config(128, 64), dq=Config(128, 64), dkdv=Config(64, 128)):
        check_forward_backward(spec, 1, 1, 64, dtype)


# --------------------------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------------------------
def check_decode(spec, B, H, D, dtype, positions):
    q, k, v = (t.detach() for t in make_inputs(spec, B, H, D, dtype))
    full = reference_attention(q.double(), k.double(), v.double(), spec)
    for p in positions:
        kc, vc = k.clone(), v.clone()
        kc[:, :, p + 1 :] = float("nan")  # not yet generated: must not be read
        vc[:, :, p + 1 :] = float("nan")
        with tb.poisoned_outputs():
            out = attention_decode(q[:, :, p : p + 1], kc, vc, spec, p, backend="triton")
        assert out.shape == (B, H, 1, D) and out.dtype == dtype
        err = (out[:, :, 0].double() - full[:, :, p]).abs().max().item()
        assert err <= ATOL[dtype] * 4, f"position {p}: max |err| {err:.3g}"
        # the position read by the kernel from a device tensor (the CUDA-graph route): the same bits
        with tb.poisoned_outputs():
            out_t = attention_decode(q[:, :, p : p + 1], kc, vc, spec, torch.tensor(p, device=q.device),
                                     backend="triton")
        assert torch.equal(out_t, out), f"position {p}: tensor position differs from int position"


@here
@pytest.mark.parametrize("kind", ["causal", "row", "column", "conv"])
def test_decode_matches_full_forward_every_position(kind):
    spec = MaskSpec(kind, 3, 5)
    check_decode(spec, 1, 2, 32, torch.float32, range(spec.seq_len))


@here
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_decode_paper_geometry(kind):
    spec = MaskSpec(kind, 256, 32)
    check_decode(spec, 1, 2, 64, torch.float16, [0, 255, 256, 257, 300, 700, 1279])


# --------------------------------------------------------------------------------------------------------------
# custom op and torch.compile
# --------------------------------------------------------------------------------------------------------------
@here
def test_custom_op_registration():
    spec = MaskSpec("column", 0, 4)
    q, k, v = (t.detach() for t in make_inputs(spec, 1, 1, 16, torch.float32))
    with tb.kernel_config(fwd=SMALL, dq=SMALL, dkdv=SMALL):
        torch.library.opcheck(
            torch.ops.dalle_ds.sparse_attn_fwd.default, (q, k, v, "column", 0, 4, 11, "raster", 0.25),
            test_utils=("test_schema", "test_faketensor"),
        )


@here
def test_eager_path_equals_the_custom_ops(monkeypatch):
    """Eager calls skip the ops' dispatch (host time); forcing the op route must give the same bits, forward,
    backward and decode, and fake tensors must still go through the ops (the direct launchers cannot take them)."""
    spec = MaskSpec("row", 3, 5)
    q, k, v = make_inputs(spec, 2, 2, 16, torch.float32)
    do = torch.randn_like(q)
    results = {}
    for route in ("direct", "ops"):
        if route == "ops":
            monkeypatch.setattr(tb, "_plain_eager", lambda *tensors: False)
        with tb.kernel_config(fwd=SMALL, dq=SMALL, dkdv=SMALL), tb.poisoned_outputs():
            out = attention(q, k, v, spec, backend="triton")
            grads = torch.autograd.grad(out, (q, k, v), do)
            dec = attention_decode(q[:, :, 7:8].detach(), k.detach(), v.detach(), spec, 7, backend="triton")
        results[route] = (out, *grads, dec)
    for a, b in zip(results["direct"], results["ops"]):
        assert torch.equal(a, b)
    monkeypatch.undo()
    assert tb._plain_eager(q, k, v)
    from torch._subclasses.fake_tensor import FakeTensorMode

    plain = [t.detach() for t in (q, k, v)]
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in plain)
        assert not tb._plain_eager(fq, fk, fv)
        fout = attention(fq, fk, fv, spec, backend="triton")
    assert fout.shape == q.shape


@here
def test_works_under_torch_compile():
    spec = MaskSpec("conv", 2, 5, conv_kernel=3)
    q, k, v = make_inputs(spec, 1, 2, 32, torch.float32)

    def step(q, k, v):
        return (attention(q, k, v, spec, backend="triton") ** 2).sum()

    backend = "inductor" if ON_GPU else "aot_eager"  # no C++ toolchain needed on CPU
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    with tb.kernel_config(fwd=SMALL, dq=SMALL, dkdv=SMALL):
        loss = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
        ref_loss = (reference_attention(q, k, v, spec) ** 2).sum()
        ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_pick_default_then_tuned(monkeypatch):
    """_pick without a GPU (meta tensors, the timer stubbed): tuning off gives the first candidate, remembered apart
    from the tuned ones, so turning tuning on later still times every candidate and keeps the fastest."""
    monkeypatch.setattr(tb, "_tuned", {})
    monkeypatch.setattr(tb, "_defaults", {})
    spec = MaskSpec("row", 256, 32)
    q = torch.empty(2, 4, spec.seq_len, 64, device="meta")
    cands = tb._CANDIDATES["fwd"]["small"]
    launched = []
    assert tb._pick("fwd", q, spec, launched.append) == cands[0]  # DALLE_DS_ATTN_TUNE=0 (autouse fixture)
    assert tb._pick("fwd", q, spec, launched.append) == cands[0] and not launched and not tb._tuned
    monkeypatch.setenv("DALLE_DS_ATTN_TUNE", "1")
    fastest = cands[2]
    monkeypatch.setattr(tb, "_bench", lambda fn: (fn(), 1.0 if launched[-1] == fastest else 2.0)[1])
    assert tb._pick("fwd", q, spec, launched.append) == fastest and launched == cands
    assert tb._pick("fwd", q, spec, launched.append) == fastest and len(launched) == len(cands)  # cached


def test_tuned_choices_persist_across_processes(tmp_path, monkeypatch):
    """tuning_cache: what one process tuned (tiles and backward path) another reads back without timing, only for
    the same GPU model, triton and kernel source; an unreadable file is ignored with a warning; 'off' writes
    nothing. Meta tensors and a stubbed timer stand in for the GPU."""
    from dalle_ds.ops.attention import tuning_cache

    path = tmp_path / "tuning.json"
    monkeypatch.setenv("DALLE_DS_ATTN_CACHE", str(path))
    monkeypatch.setenv("DALLE_DS_ATTN_TUNE", "1")
    monkeypatch.delenv("DALLE_DS_ATTN_BWD", raising=False)
    spec = MaskSpec("row", 256, 32)
    q = torch.empty(2, 4, spec.seq_len, 64, device="meta")
    cands = tb._CANDIDATES["dq"]["small"]
    fastest = cands[3]
    launched = []

    def bench(fn):  # a path runner states its time; a tile launch is fast for ``fastest`` only
        ms = fn()
        return ms if isinstance(ms, float) else 1.0 if launched[-1] == fastest else 2.0

    monkeypatch.setattr(tb, "_bench", bench)

    def new_process():
        for name in ("_tuned", "_defaults", "_tuned_paths"):
            monkeypatch.setattr(tb, name, {})
        launched.clear()

    new_process()
    assert tb._pick("dq", q, spec, launched.append) == fastest and launched == cands
    fused_first = [lambda: launched.append("split") or 2.0, lambda: launched.append("fused") or 1.0]
    assert tb._backward_path(q, spec, *fused_first) == "fused"
    saved = json.loads(path.read_text())
    (context,) = saved["entries"]
    assert context.startswith("meta|triton ") and context.endswith(tuning_cache.kernels_hash())
    assert saved["entries"][context]["dq:T256:W32:d64:float32:bh8"] == vars(fastest)

    new_process()  # another process: both read back, nothing launched or timed
    never = lambda: launched.append("never")  # noqa: E731
    assert tb._pick("dq", q, spec, launched.append) == fastest and tb._backward_path(q, spec, never, never) == "fused"
    assert launched == []

    new_process()  # other kernel source: its own section, timed again
    monkeypatch.setattr(tuning_cache, "kernels_hash", lambda: "0123456789ab")
    assert tb._pick("dq", q, spec, launched.append) == fastest and launched == cands
    assert len(json.loads(path.read_text())["entries"]) == 2

    new_process()
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignored"):
        assert tb._pick("dq", q, spec, launched.append) == fastest
    assert launched == cands and json.loads(path.read_text())["version"] == tuning_cache.VERSION  # rewritten

    new_process()
    path.unlink()
    monkeypatch.setenv("DALLE_DS_ATTN_CACHE", "off")
    assert tb._pick("dq", q, spec, launched.append) == fastest and not path.exists()


def test_backward_path_choice(monkeypatch):
    """_backward_path without a GPU (meta tensors; the timer stubbed by each path's stated cost): a pin wins, then
    determinism, CPU and tuning off mean split; otherwise both paths run once (tuning their tiles), are timed,
    and the faster is kept per geometry."""
    monkeypatch.setenv("DALLE_DS_ATTN_TUNE", "1")
    monkeypatch.delenv("DALLE_DS_ATTN_BWD", raising=False)
    monkeypatch.setattr(tb, "_tuned_paths", {})
    monkeypatch.setattr(tb, "_bench", lambda fn: fn())
    calls = []

    def path(name, ms):
        return lambda: calls.append(name) or ms

    spec = MaskSpec("row", 4, 4)
    q = torch.empty(2, 3, spec.seq_len, 16, device="meta")
    assert tb._backward_path(q, spec, path("split", 2.0), path("fused", 1.0)) == "fused"
    assert calls == ["split", "fused", "split", "fused"]  # a warm-up run of each, then one timing each
    assert tb._backward_path(q, spec, path("split", 2.0), path("fused", 1.0)) == "fused" and len(calls) == 4
    assert list(tb.tuned_backward_paths()) == ["backward:T4:W4:d16:float32:bh8"]
    q32 = torch.empty(2, 3, spec.seq_len, 32, device="meta")  # another geometry: measured again
    assert tb._backward_path(q32, spec, path("split", 1.0), path("fused", 3.0)) == "split" and len(calls) == 8

    never = path("never", 0.0)
    with tb.kernel_config(backward="split"):
        assert tb._backward_path(q, spec, never, never) == "split"
    monkeypatch.setenv("DALLE_DS_ATTN_BWD", "fused")
    assert tb._backward_path(q32, spec, never, never) == "fused"
    monkeypatch.setenv("DALLE_DS_ATTN_BWD", "atomic")
    with pytest.raises(ValueError, match="DALLE_DS_ATTN_BWD='atomic'"):
        tb._backward_path(q, spec, never, never)
    with pytest.raises(ValueError, match="backward='atomic'"):
        with tb.kernel_config(backward="atomic"):
            pass
    monkeypatch.delenv("DALLE_DS_ATTN_BWD")
    q64 = torch.empty(2, 3, spec.seq_len, 64, device="meta")  # not measured yet: each rule below must decide
    torch.use_deterministic_algorithms(True)
    try:
        assert tb._backward_path(q64, spec, never, never) == "split"
    finally:
        torch.use_deterministic_algorithms(False)
    assert tb._backward_path(torch.empty(q64.shape), spec, never, never) == "split"
    monkeypatch.setenv("DALLE_DS_ATTN_TUNE", "0")
    assert tb._backward_path(q64, spec, never, never) == "split"
    assert "never" not in calls


# --------------------------------------------------------------------------------------------------------------
# GPU only: the paper's shape in bf16 with tuned tiles, W = 64, head dim 128
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["causal", "row", "column", "conv"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_paper_shape(kind, dtype):
    check_forward_backward(MaskSpec(kind, 256, 32), 2, 4, 64, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["causal", "row", "column", "conv"])
def test_gpu_fused_backward_paper_shape(kind):
    with tb.kernel_config(backward="fused"):
        check_forward_backward(MaskSpec(kind, 256, 32), 2, 4, 64, torch.bfloat16)
    with tb.kernel_config(backward="fused"):  # head dim 128 and a packed (non-contiguous) input
        check_forward_backward(MaskSpec(kind, 256, 32), 1, 2, 128, torch.bfloat16, layout="packed")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_gpu_large_grid_and_head_dim_128(kind):
    check_forward_backward(MaskSpec(kind, 256, 64), 1, 2, 64, torch.bfloat16)
    check_forward_backward(MaskSpec(kind, 256, 32), 1, 2, 128, torch.bfloat16)
    check_forward_backward(MaskSpec(kind, 77, 16), 3, 5, 32, torch.bfloat16, layout="packed")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_tuned_tiles(monkeypatch):
    """The tile tuner: times every candidate, keeps one per kernel and one backward path, and the tuned kernels
    still match."""
    monkeypatch.setenv("DALLE_DS_ATTN_TUNE", "1")
    spec = MaskSpec("row", 256, 32)
    tb._tuned.clear()
    tb._tuned_paths.clear()
    check_forward_backward(spec, 4, 8, 64, torch.bfloat16)
    check_decode(spec, 4, 8, 64, torch.bfloat16, [700])
    chosen = tb.tuned_configs()
    assert {k.split(":")[0] for k in chosen} == {"fwd", "dkdv", "dq", "dkdv_dq", "decode"}, chosen
    assert list(tb.tuned_backward_paths().values())[0] in tb.BACKWARD_PATHS
    check_forward_backward(MaskSpec("column", 256, 32), 4, 8, 64, torch.bfloat16)  # reuses the tuned tiles


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_gpu_decode_paper_shape(kind):
    spec = MaskSpec(kind, 256, 32)
    check_decode(spec, 4, 8, 64, torch.bfloat16, [0, 1, 255, 256, 288, 700, 1279])


# --------------------------------------------------------------------------------------------------------------
# CPU-only check that the kernels lower to Hopper code: triton.compile for sm_90 with the wheel's ptxas
# --------------------------------------------------------------------------------------------------------------
def _sm90_kernels():
    """The kernel module if this triton can compile for sm_90 here (else skip)."""
    try:
        kernels = tb._kernels()
        import triton.compiler  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as e:  # no triton / no NVIDIA backend in this wheel
        pytest.skip(f"triton NVIDIA backend unavailable: {e}")
    if tb.interpreted():
        pytest.skip("kernels were created under TRITON_INTERPRET=1 in this process")
    return kernels


def _in_loop_async_waits(ttgir: str) -> list[int]:
    """``num`` of every ``ttg.async_wait`` inside an ``scf.for`` body of a kernel's TTGIR (MLIR prints a loop's
    body two spaces deeper than the function body, which is at four)."""

    return [int(m.group(2)) for m in re.finditer(r"^( *)%\S+ = ttg\.async_wait .*?\{num = (\d+)", ttgir, re.M)
            if len(m.group(1)) > 4]


@pytest.mark.skipif(INTERPRET, reason="kernels are interpreted in this process")
@pytest.mark.parametrize("name", ["fwd", "dkdv", "dq", "dkdv_dq"])
def test_kernel_loops_keep_loads_in_flight_on_sm90(name):
    """Each kernel's one loop over its visit list must keep K/V (or Q/dO) loads in flight across iterations: at 3
    stages its wait may not drain every async copy (``num = 0``). With the next block id read from memory in the
    loop, a loop over FULL tiles got ``num = 0`` with triton 3.6 and 3.9 (triton_kernels._visit_list)."""
    _sm90_kernels()
    fn = attn_sass.kernel_fn(name)
    # the tiles the H200 tuned on 2026-12-04 (benchmarks/results/attention_h200_20261204.md) and the defaults
    tiles = {"fwd": [Config(64, 64, 4, 3)], "dkdv": [Config(32, 64, 4, 3)], "dq": [Config(64, 64, 4, 3)],
             "dkdv_dq": [Config(32, 64, 4, 3)]}[name]
    tiles.append(tb._CANDIDATES[name]["small"][0])
    for kind in ("row", "causal"):  # causal: the longest visit lists (20-40 entries at the paper's shape)
        for cfg in tiles:
            try:
                consts = attn_sass.kernel_constexprs(name, MaskSpec(kind, 256, 32), cfg)
                compiled = attn_sass.compile_sm90(fn, consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            except (TypeError, KeyError, AttributeError) as e:  # ASTSource's API differs across triton versions
                pytest.skip(f"ahead-of-time compile API differs in this triton: {e}")
            waits = _in_loop_async_waits(compiled.asm["ttgir"])
            assert len(waits) == 1, f"{name} {kind} {cfg}: expected one pipelined loop, got waits {waits}"
            assert waits[0] > 0, f"{name} {kind} {cfg}: the loop drains every load in flight ({waits})"


@pytest.mark.skipif(INTERPRET, reason="kernels are interpreted in this process")
@pytest.mark.parametrize("kind", ["column", "conv"])
def test_kernels_compile_for_sm90_without_spills(kind):
    kernels = _sm90_kernels()
    spec = MaskSpec(kind, 256, 32)
    jobs = []
    for name in ("fwd", "dkdv", "dq", "dkdv_dq"):
        cfg = tb._CANDIDATES[name]["small"][0]  # the default configuration when tuning is off
        jobs.append((name, attn_sass.kernel_fn(name), attn_sass.kernel_constexprs(name, spec, cfg), cfg.num_warps,
                     cfg.num_stages))
    jobs.append(("preprocess", kernels._attn_bwd_preprocess,
                 dict(T=256, W=32, N=1280, TRANSPOSED=spec.transposed, HEAD_DIM=64, BLOCK_M=64), 4, 2))
    for cfg in tb._CANDIDATES["decode"]["small"]:  # every candidate the decode tuner may pick, both position routes
        for in_memory in (False, True):
            jobs.append(("decode", kernels._attn_decode, dict(HEAD_DIM=64, BLOCK_N=cfg.block_n, CONTIGUOUS=False,
                                                              POSITION_IN_MEMORY=in_memory),
                         cfg.num_warps, cfg.num_stages))
    for name, fn, consts, nw, ns in jobs:
        try:
            compiled = attn_sass.compile_sm90(fn, consts, num_warps=nw, num_stages=ns)
        except (TypeError, KeyError, AttributeError) as e:  # ASTSource's API differs across triton versions
            pytest.skip(f"ahead-of-time compile API differs in this triton: {e}")
        assert compiled.asm["cubin"], name
        if name in ("fwd", "dkdv", "dq", "dkdv_dq"):
            assert "wgmma" in compiled.asm["ptx"], f"{name}: no Hopper tensor-core (wgmma) instructions"
        if name == "dkdv_dq":  # dQ's atomic adds go out as 16-byte vectors (4 fp32), not one element at a time
            assert re.search(r"(red|atom)\.global\.\S*add\.v4\.f32", compiled.asm["ptx"]), "dQ atomics not vectorized"
        spill = attn_sass.spill_bytes(compiled)
        assert spill in (None, 0), f"{name}: {spill} bytes of register spills"


@pytest.mark.skipif(INTERPRET, reason="kernels are interpreted in this process")
def test_full_tile_path_costs_what_a_minimal_flash_loop_costs_on_sm90():
    """Per FULL tile the forward runs no more instructions than a minimal causal FlashAttention-2 loop compiled with
    the same tiles (+15%: its visit list, and column attention's transposed addressing of K and V), with the same
    tensor-core and exp2 work; the PARTIAL-only mask block exists for the sparse masks. (Triton 3.9: causal 327, row
    329, column 352 against 317.) A change that adds work to every tile shows up here before it costs GPU time."""
    _sm90_kernels()
    try:
        result = attn_sass.run(kernels=("fwd",), masks=("causal", "row", "column"))
    except (TypeError, KeyError, AttributeError) as e:  # ASTSource's API differs across triton versions
        pytest.skip(f"ahead-of-time compile API differs in this triton: {e}")
    *ours, plain = result["rows"]
    if plain.get("loop") is None:
        pytest.skip("cuobjdump unavailable in this triton wheel")
    assert plain["kernel"].startswith("minimal") and plain["partial_only"] == 0 and plain["HGMMA"] > 0
    for row in ours:
        where = f"fwd {row['mask']}: {row}"
        assert row["full_path"] <= 1.15 * plain["loop"], where
        # once per program (a program of the paper's row mask visits ~5 tiles): set-up and epilogue within 30% of
        # the minimal loop's (triton 3.9: 648 / 650 / 729 against 585)
        assert row["outside_loop"] <= 1.3 * plain["outside_loop"], where
        assert row["partial_only"] > 0, where
        assert (row["HGMMA"], row["MUFU"]) == (plain["HGMMA"], plain["MUFU"]), where
    assert "| minimal FA2 fwd |" in attn_sass.markdown(result)
