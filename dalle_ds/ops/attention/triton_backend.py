"""Launchers, tile-size tuning, the ``torch.library`` custom ops and the autograd function for the Triton kernels.

Public pieces:

* ``sparse_attention(q, k, v, spec, scale)``: differentiable block-sparse attention (raster-order tensors);
* ``sparse_attention_decode(q_new, k_cache, v_cache, spec, position, scale)``: one query against a KV cache;
* ``not_supported_reasons(...)`` / ``status()``: what this backend can run here, and why not;
* ``kernel_config(...)``: a context manager that pins tile sizes (tests, benchmarks).

The custom ops ``dalle_ds::sparse_attn_fwd``, ``dalle_ds::sparse_attn_bwd`` and ``dalle_ds::sparse_attn_decode``
have fake (meta) implementations, so ``torch.compile`` traces through them without graph breaks; the autograd
function calls the forward and backward ops (the pattern FlashAttention's interface uses) when traced, and the same
launchers directly in plain eager calls (``_plain_eager``: the ops' Python dispatch costs host time per call).

Tile sizes. A kernel's block layout depends on its tile sizes, so Triton's ``autotune`` (which varies constexprs
under fixed arguments) does not fit; instead, on a GPU the first call for a given (kernel, T, W, head dim, dtype,
batch*heads bucket) times each candidate with ``triton.testing.do_bench`` and keeps the fastest (shared by the
mask kinds of that geometry). Candidates that
fail to compile (shared memory) are dropped. ``DALLE_DS_ATTN_TUNE=0`` uses the first candidate. Under the
interpreter a fixed small configuration is used (speed there is per tile, not per element). Choices are kept on disk
for later processes on the same GPU model, triton and kernel source (``tuning_cache``; ``DALLE_DS_ATTN_CACHE``).

Backward paths. ``split`` (dK/dV kernel, then dQ kernel: deterministic) or ``fused`` (the dK/dV kernel also adds dQ
atomically into an fp32 buffer: two fewer matmuls per tile, run-to-run differences in the last bits of dQ). On a GPU
with tuning on, the first backward of a geometry times both with their tuned tiles and keeps the faster; split
whenever ``torch.use_deterministic_algorithms(True)`` is on, on CPU, or with tuning off; pinned by
``DALLE_DS_ATTN_BWD=split|fused`` or ``kernel_config(backward=...)``.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from torch.utils import _python_dispatch

from . import tuning_cache
from .layouts import block_layout, decode_table
from .masks import MaskSpec

KIND_CODE = {"causal": 0, "row": 1, "column": 2, "conv": 3}
WRAP_CODE = {"raster": 0, "none": 1}
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MIN_CUDA_CAPABILITY = (8, 0)
LOG2E = 1.4426950408889634
# FMA contraction on (triton's long-standing default), stated explicitly: triton 3.9 warns when it is left unset.
_LAUNCH_OPTIONS = {"enable_fp_fusion": True}

_kernels_module = None
_kernels_error: str | None = None


def _interpreter_loop_bounds_fix() -> None:
    """Triton 3.6's interpreter (torch 2.11 and 2.12 pin it) turns a loaded scalar, a 1-element array there, into a
    loop bound with ``int(array)``, which NumPy 2 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"): every kernel whose loop runs to a loaded count (the visit lists) failed on CPU. Triton 3.9 squeezes the
    array first; this gives the older interpreter the same conversion. Interpreter only: compiled kernels never see
    it. A no-op where the interpreter already squeezes, or lays itself out differently."""
    import inspect

    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_dalle_ds_squeezes", False):
        return
    try:
        if ".squeeze()" in inspect.getsource(patch):
            return
    except (OSError, TypeError):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._dalle_ds_squeezes = True
    interpreter._patch_lang_tensor = patched


def _kernels():
    """Import the kernel module on first use (importing triton is slow, and optional on CPU)."""
    global _kernels_module, _kernels_error
    if _kernels_module is None and _kernels_error is None:
        try:
            from . import triton_kernels

            if type(triton_kernels._attn_fwd).__name__ == "InterpretedFunction":
                _interpreter_loop_bounds_fix()
            _kernels_module = triton_kernels
        except Exception as e:  # ImportError, or a triton that cannot build these kernels
            _kernels_error = f"triton kernels unavailable: {type(e).__name__}: {e}"
    if _kernels_module is None:
        raise RuntimeError(_kernels_error)
    return _kernels_module


# The probes below are marked constant for torch.compile: dynamo calls them once while tracing and bakes the
# answer into the graph, so that `attention(...)` dispatches inside compiled models without graph breaks.
@torch.compiler.assume_constant_result
def _import_error() -> str:
    """Why the kernel module cannot be imported ("" if it can)."""
    try:
        _kernels()
    except RuntimeError as e:
        return str(e)
    return ""


@torch.compiler.assume_constant_result
def interpreted() -> bool:
    """True if the kernels were created under ``TRITON_INTERPRET=1`` (they then run on CPU tensors only)."""
    if _import_error():
        return False
    return type(_kernels()._attn_fwd).__name__ == "InterpretedFunction"


@torch.compiler.assume_constant_result
def _cuda_capability(index: int) -> tuple:
    """(major, minor) of CUDA device ``index`` (-1: the current device)."""
    return tuple(torch.cuda.get_device_capability(None if index < 0 else index))


# ----------------------------------------------------------------------------------------------------------------
# capabilities
# ----------------------------------------------------------------------------------------------------------------
def status() -> tuple[bool, str]:
    """(available, reason) for ``backend_status``: can this backend run on some device of this machine?"""
    err = _import_error()
    if err:
        return False, err
    import triton

    if interpreted():
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1: CPU tensors, for tests (slow)"
    if torch.cuda.is_available():
        cc = _cuda_capability(-1)
        if cc >= MIN_CUDA_CAPABILITY:
            return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()} (sm{cc[0]}{cc[1]})"
        return False, f"GPU is sm{cc[0]}{cc[1]}; the kernels need sm80+"
    return False, "no CUDA device (CPU runs need TRITON_INTERPRET=1 set before the kernels are imported)"


def not_supported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, *, auto: bool = False):
    """Why this backend cannot run these inputs (empty list: it can). ``auto``: also refuse the slow interpreter."""
    reasons = []
    err = _import_error()
    if err:
        return [err]
    dev = q.device
    if dev.type == "cuda":
        if interpreted():
            reasons.append("kernels were created under TRITON_INTERPRET=1 and run on CPU tensors only")
        else:
            cc = _cuda_capability(-1 if dev.index is None else dev.index)
            if cc < MIN_CUDA_CAPABILITY:
                reasons.append(f"device is sm{cc[0]}{cc[1]}; needs sm80+")
    elif dev.type == "cpu":
        if not interpreted():
            reasons.append("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)")
        elif auto:
            reasons.append("the Triton interpreter is for tests; ask for backend='triton' explicitly")
    else:
        reasons.append(f"device type {dev.type!r} unsupported (cuda, or cpu under the interpreter)")
    if q.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype={q.dtype} (supported: {', '.join(str(d) for d in SUPPORTED_DTYPES)})")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head dim {q.shape[-1]} (supported: {SUPPORTED_HEAD_DIMS})")
    return reasons


# ----------------------------------------------------------------------------------------------------------------
# tile configurations
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of one kernel. For dK/dV ``block_n`` is the key tile a program owns and
    ``block_m`` the query tile it steps through; for the forward and dQ it is the other way round."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# Candidates per kernel and head dim (sm80/sm90). Tiles of 64/128 rows feed the tensor cores; the text prefix
# (256 tokens in the paper) is then made of FULL tiles. First entry = default when tuning is off.
_CANDIDATES = {
    "fwd": {
        "small": [Config(128, 64, 4, 3), Config(128, 128, 8, 3), Config(64, 64, 4, 3), Config(128, 64, 8, 3),
                  Config(64, 128, 4, 3), Config(128, 32, 4, 4), Config(64, 64, 4, 2), Config(128, 64, 8, 2)],
        "large": [Config(128, 64, 8, 3), Config(64, 64, 8, 3), Config(128, 128, 8, 2), Config(64, 32, 4, 3)],
    },
    "dkdv": {
        "small": [Config(32, 128, 8, 3), Config(64, 128, 8, 2), Config(32, 64, 4, 3), Config(64, 64, 4, 3),
                  Config(16, 128, 8, 3), Config(32, 64, 4, 2)],
        "large": [Config(32, 64, 8, 2), Config(32, 64, 8, 3), Config(64, 64, 8, 2), Config(32, 128, 8, 2)],
    },
    "dq": {
        "small": [Config(128, 32, 4, 3), Config(128, 64, 8, 2), Config(64, 64, 4, 3), Config(64, 32, 4, 3),
                  Config(64, 64, 4, 2)],
        "large": [Config(128, 32, 8, 2), Config(64, 64, 8, 2), Config(64, 32, 4, 3), Config(128, 64, 8, 2)],
    },
    # dK/dV with dQ added atomically (the fused backward, ``_backward_path``). Query tiles of 64 rows: the extra dot
    # (dS K, block_m x head dim) then has the 64-row M of a Hopper wgmma; 32-row ones stay as a measured option.
    "dkdv_dq": {
        "small": [Config(64, 64, 4, 3), Config(64, 64, 4, 2), Config(64, 128, 8, 2), Config(32, 64, 4, 3)],
        "large": [Config(64, 64, 8, 2), Config(32, 64, 8, 2), Config(32, 64, 8, 3)],
    },
    # decode: one query per program, block_n keys per step, no tl.dot (nothing for the pipeliner: 1 stage). Its
    # three reductions per step cross warps (sm_90 SASS at 4 warps: 14 barriers a step); 1-2 warps keep them in
    # shuffles, at fewer loads in flight per program. Which wins depends on batch x heads: the tuner measures.
    "decode": {
        "small": [Config(1, 64, 4, 1), Config(1, 64, 2, 1), Config(1, 64, 1, 1), Config(1, 128, 4, 1)],
        "large": [Config(1, 64, 4, 1), Config(1, 32, 2, 1), Config(1, 64, 8, 1)],
    },
}
# The 2-stage entries (added 2026-12-05, not yet timed on a GPU): a program visits only ~5 key tiles at the paper's
# shape, so a third stage hardly fills, and 2 stages cut shared memory per program (64x64 forward: 40 KB vs 56 KB
# from triton.compile for sm_90), which lets more programs share an SM. The tuner keeps whichever is fastest.
# Checked with ptxas for sm_90 (triton.compile(..., target=GPUTarget("cuda", 90, 32)) + cuobjdump -res-usage, no GPU
# needed): every forward / dK-dV / dQ candidate compiles to wgmma code for every mask (the decode has no tl.dot);
# at D = 64 none spills registers; at D = 128 the last two dK/dV candidates spill a little (dK and dV accumulators
# of 64-128 x 128 fp32) and stay only as options. Fused dK/dV/dQ (2026-12-06, triton 3.6, row and column masks): no
# candidate spills (64 x 64 at 4 warps: 244 registers; at D = 128 4 warps spilled, so 8).
_INTERPRETER_CONFIG = Config(32, 32, 4, 1)
# Backward paths: "split" runs _attn_bwd_dkdv then _attn_bwd_dq (7 matmuls a tile pair, deterministic); "fused"
# runs _attn_bwd_dkdv with FUSE_DQ (5 matmuls, fp32 atomics for dQ, not bitwise reproducible).
BACKWARD_PATHS = ("split", "fused")
_tuned: dict = {}
_defaults: dict = {}  # untuned choices (DALLE_DS_ATTN_TUNE=0, or one candidate), per tuning key
_tuned_paths: dict = {}
_forced: dict = {}
_FORCED_FALLBACK = {"dkdv_dq": "dkdv"}  # with no tiles pinned for the fused kernel, pinned dK/dV tiles apply
_poison = False


@contextlib.contextmanager
def poisoned_outputs():
    """Inside the block, launchers allocate outputs (and lse, delta) filled with NaN instead of uninitialized:
    tests use it so that any element a kernel fails to write is caught."""
    global _poison
    saved, _poison = _poison, True
    try:
        yield
    finally:
        _poison = saved


def _alloc(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = like.dtype if dtype is None else dtype
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


@contextlib.contextmanager
def kernel_config(fwd: Config | None = None, dkdv: Config | None = None, dq: Config | None = None,
                  decode: Config | None = None, dkdv_dq: Config | None = None, backward: str | None = None):
    """Pin the tile configuration of the forward / dK-dV / dQ / decode / fused dK-dV-dQ kernels, and the backward
    path (``"split"`` or ``"fused"``, see ``_backward_path``), inside the ``with`` block."""
    if backward is not None and backward not in BACKWARD_PATHS:
        raise ValueError(f"backward={backward!r}: choose one of {BACKWARD_PATHS}")
    saved = dict(_forced)
    for name, cfg in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq), ("decode", decode), ("dkdv_dq", dkdv_dq),
                      ("backward", backward)):
        if cfg is not None:
            _forced[name] = cfg
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def _pick(kernel: str, q: torch.Tensor, spec: MaskSpec, launch) -> Config:
    """The configuration to launch ``kernel`` with: forced, interpreter default, cached, default, or tuned."""
    for name in (kernel, _FORCED_FALLBACK.get(kernel)):
        if name in _forced:
            return _forced[name]
    if q.device.type == "cpu":
        return _INTERPRETER_CONFIG
    key = _tuning_key(kernel, q, spec)  # looked up first: this runs on every call (decode: per token and layer)
    if key in _tuned:
        return _tuned[key]
    tuning = _tuning_on()
    if not tuning and key in _defaults:
        return _defaults[key]
    B, H, N, D = q.shape
    cands = _CANDIDATES[kernel]["small" if D <= 64 else "large"]
    cands = [c for c in cands if max(c.block_m, c.block_n) <= max(16, triton_next_pow2(N))] or cands[-1:]
    if not tuning or len(cands) == 1:
        _defaults[key] = cands[0]  # kept apart from _tuned: turning tuning on later still tunes
        return cands[0]
    context, name = _tuning_context(q), _key_name(key)
    stored = _config_or_none(tuning_cache.lookup(context, name))  # an earlier process's choice (same GPU model,
    if stored in cands:                                              # triton and kernels), if still a candidate
        _tuned[key] = stored
        return stored
    times = {}
    for cfg in cands:
        try:
            times[cfg] = _bench(lambda: launch(cfg))
        except Exception as e:  # out of shared memory / registers for this tile size: skip it
            if "OutOfResources" not in type(e).__name__ and "resources" not in str(e).lower():
                raise
    if not times:
        raise RuntimeError(f"no tile configuration of {kernel} fits this GPU")
    best = min(times, key=times.get)
    _tuned[key] = best
    tuning_cache.store(context, name, vars(best))
    return best


def _tuning_key(kernel: str, q: torch.Tensor, spec: MaskSpec) -> tuple:
    """One tuning per geometry, shared by the mask kinds (they have the same tile mix: text tiles + a band), so a
    model compiles every candidate once, not once per layer kind."""
    B, H, N, D = q.shape
    return (kernel, spec.text_len, spec.grid, D, q.dtype, str(q.device), triton_next_pow2(B * H))


def _config_or_none(stored) -> Config | None:
    try:
        return Config(**stored) if isinstance(stored, dict) else None
    except TypeError:  # fields of another version
        return None


def _tuning_context(q: torch.Tensor) -> str:
    """What a tuned choice is valid for, in the on-disk cache: the GPU model, triton and the kernels' source."""
    import triton

    if q.device.type == "cuda":
        index = torch.cuda.current_device() if q.device.index is None else q.device.index
        cc = _cuda_capability(index)
        where = f"{torch.cuda.get_device_name(index)} sm{cc[0]}{cc[1]}"
    else:  # meta tensors in tests
        where = q.device.type
    return f"{where}|triton {triton.__version__}|kernels {tuning_cache.kernels_hash()}"


def _tuning_on() -> bool:
    return os.environ.get("DALLE_DS_ATTN_TUNE", "1") != "0"


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25)


def _backward_path(q: torch.Tensor, spec: MaskSpec, run_split, run_fused) -> str:
    """``"split"`` or ``"fused"``: pinned (``kernel_config(backward=...)``, else ``DALLE_DS_ATTN_BWD``), else
    split when torch's deterministic mode is on (the fused path's atomic adds are not reproducible bit for bit),
    on CPU, or with tuning off (the path measured on a GPU first); else measured: both paths run with their tuned
    tiles and the faster one is kept per geometry, like the tiles."""
    path = _forced.get("backward") or os.environ.get("DALLE_DS_ATTN_BWD") or None
    if path is not None:
        if path not in BACKWARD_PATHS:
            raise ValueError(f"DALLE_DS_ATTN_BWD={path!r}: choose one of {BACKWARD_PATHS}")
        return path
    if torch.are_deterministic_algorithms_enabled() or q.device.type == "cpu" or not _tuning_on():
        return "split"
    key = _tuning_key("backward", q, spec)
    if key not in _tuned_paths:
        context, name = _tuning_context(q), _key_name(key)
        stored = tuning_cache.lookup(context, name)
        if stored in BACKWARD_PATHS:  # measured by an earlier process: only that path's tiles get tuned
            _tuned_paths[key] = stored
        else:
            run_split()  # tunes (and compiles) each path's tiles before either is timed
            run_fused()
            times = {"split": _bench(run_split), "fused": _bench(run_fused)}
            _tuned_paths[key] = min(times, key=times.get)
            tuning_cache.store(context, name, _tuned_paths[key])
    return _tuned_paths[key]


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tuned_configs() -> dict:
    """The configurations chosen so far (for benchmark reports)."""
    return {_key_name(key): cfg for key, cfg in _tuned.items()}


def tuned_backward_paths() -> dict:
    """The backward path chosen so far per geometry ("split" / "fused"), for benchmark reports."""
    return {_key_name(key): path for key, path in _tuned_paths.items()}


def _key_name(key: tuple) -> str:
    kernel, T, W, D, dtype, _device, bh = key
    return f"{kernel}:T{T}:W{W}:d{D}:{str(dtype).replace('torch.', '')}:bh{bh}"


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------
def _s3(x: torch.Tensor) -> tuple:
    """Strides of dims 0-2, from one ``stride()`` call (per-dim calls were ~15% of the host time per launch)."""
    return x.stride()[:3]


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _on_device(t: torch.Tensor):
    """A context making ``t``'s GPU the current one when it is not: Triton launches on the current CUDA device (and
    its stream), whatever device the arguments are on (triton.runtime.jit reads ``driver.active.get_current_device``),
    so a prior on cuda:1 in a process whose current device is cuda:0 would hand cuda:1 pointers to a cuda:0 launch."""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _geometry(spec: MaskSpec, dtype: torch.dtype, head_dim: int) -> dict:
    return dict(
        T=spec.text_len, W=spec.grid, N=spec.seq_len, KIND=KIND_CODE[spec.kind], TRANSPOSED=spec.transposed,
        CONV_R=spec.conv_radius, CONV_WRAP=WRAP_CODE[spec.conv_wrap], HEAD_DIM=head_dim,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def _slots(index: torch.Tensor) -> int:
    """Register slots for a visit list: the kernels hold each program's list in registers
    (``triton_kernels._visit_list``)."""
    return triton_next_pow2(index.shape[1])


def _forward(q, k, v, spec: MaskSpec, scale: float):
    kern = _kernels()
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, N, D = q.shape
    out = _alloc((B, H, N, D), q)
    lse = _alloc((B, H, N), q, torch.float32)  # base-2, kernel order
    geo = _geometry(spec, q.dtype, D)

    def launch(cfg: Config):
        lay = block_layout(spec, cfg.block_m, cfg.block_n, "kernel", q.device)
        kern._attn_fwd[(B * H, lay.num_q_blocks)](
            q, k, v, out, lse, lay.kv_index, lay.kv_full, lay.kv_count, lay.kv_index.stride(0),
            *_s3(q), *_s3(k), *_s3(v), *_s3(out),
            H, scale * LOG2E, **geo, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SLOTS=_slots(lay.kv_index),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_LAUNCH_OPTIONS,
        )

    with _on_device(q):
        launch(_pick("fwd", q, spec, launch))
    return out, lse


def _backward(do, q, k, v, out, lse, spec: MaskSpec, scale: float):
    kern = _kernels()
    do, q, k, v, out = (_unit_last(t) for t in (do, q, k, v, out))
    B, H, N, D = q.shape
    geo = _geometry(spec, q.dtype, D)
    delta = _alloc(lse.shape, lse)
    pre_block = 64
    dq, dk, dv = _alloc(q.shape, q), _alloc(k.shape, k), _alloc(v.shape, v)
    dq_acc = []  # the fused path's fp32 dQ buffer (B, H, N, D), made on first use

    def launch_dkdv(cfg: Config, fuse_dq: bool = False):
        lay = block_layout(spec, cfg.block_m, cfg.block_n, "kernel", q.device)
        kern._attn_bwd_dkdv[(B * H, lay.num_k_blocks)](
            q, k, v, do, dk, dv, dq_acc[0] if fuse_dq else dk, lse, delta,
            lay.q_index, lay.q_full, lay.q_count, lay.q_index.stride(0),
            *_s3(q), *_s3(k), *_s3(v), *_s3(do), *_s3(dk), *_s3(dv),
            H, scale * LOG2E, scale, **geo, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SLOTS=_slots(lay.q_index),
            FUSE_DQ=fuse_dq, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_LAUNCH_OPTIONS,
        )

    def launch_fused(cfg: Config):
        if not dq_acc:
            dq_acc.append(torch.empty((B, H, N, D), dtype=torch.float32, device=q.device))
        dq_acc[0].zero_()
        launch_dkdv(cfg, fuse_dq=True)
        dq.copy_(dq_acc[0])

    def launch_dq(cfg: Config):
        lay = block_layout(spec, cfg.block_m, cfg.block_n, "kernel", q.device)
        kern._attn_bwd_dq[(B * H, lay.num_q_blocks)](
            q, k, v, do, dq, lse, delta, lay.kv_index, lay.kv_full, lay.kv_count, lay.kv_index.stride(0),
            *_s3(q), *_s3(k), *_s3(v), *_s3(do), *_s3(dq),
            H, scale * LOG2E, scale, **geo, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SLOTS=_slots(lay.kv_index),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_LAUNCH_OPTIONS,
        )

    def run_split():
        launch_dkdv(_pick("dkdv", q, spec, launch_dkdv))
        launch_dq(_pick("dq", q, spec, launch_dq))

    def run_fused():
        launch_fused(_pick("dkdv_dq", q, spec, launch_fused))

    with _on_device(q):
        kern._attn_bwd_preprocess[(B * H, triton_cdiv(N, pre_block))](
            out, do, delta, *_s3(out), *_s3(do),
            H, T=geo["T"], W=geo["W"], N=N, TRANSPOSED=geo["TRANSPOSED"], HEAD_DIM=D, BLOCK_M=pre_block,
            **_LAUNCH_OPTIONS,
        )
        {"split": run_split, "fused": run_fused}[_backward_path(q, spec, run_split, run_fused)]()
    return dq, dk, dv


def _decode(q_new, k_cache, v_cache, spec: MaskSpec, position: int | torch.Tensor, scale: float):
    """``position``: an int, or a one-element integer tensor on the device (read by the kernel: no host sync, and a
    CUDA graph that captured the launch replays it for any position)."""
    kern = _kernels()
    in_memory = isinstance(position, torch.Tensor)
    q_new, k_cache, v_cache = _unit_last(q_new), _unit_last(k_cache), _unit_last(v_cache)
    B, H, _, D = q_new.shape
    out = _alloc((B, H, 1, D), q_new)
    contiguous = spec.kind == "causal"
    if contiguous:
        table = count = torch.zeros(1, dtype=torch.int32, device=q_new.device)
        stride_table = 0
    else:
        table, count = decode_table(spec, q_new.device)
        stride_table = table.stride(0)

    def launch(cfg: Config):
        kern._attn_decode[(B * H,)](
            q_new, k_cache, v_cache, out, table, count, stride_table, position if in_memory else int(position),
            *_s3(q_new)[:2], *_s3(k_cache), *_s3(v_cache), *_s3(out)[:2],
            H, scale * LOG2E, HEAD_DIM=D, BLOCK_N=cfg.block_n, CONTIGUOUS=contiguous, POSITION_IN_MEMORY=in_memory,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_LAUNCH_OPTIONS,
        )

    with _on_device(q_new):
        launch(_pick("decode", k_cache, spec, launch))  # k_cache: the tuning key's shape is the cache's
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, with fake implementations) and autograd
# ----------------------------------------------------------------------------------------------------------------
def _spec(kind: str, text_len: int, grid: int, conv_kernel: int, conv_wrap: str) -> MaskSpec:
    return MaskSpec(kind, text_len, grid, conv_kernel, conv_wrap)


@torch.library.custom_op("dalle_ds::sparse_attn_fwd", mutates_args=())
def sparse_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kind: str, text_len: int, grid: int, conv_kernel: int, conv_wrap: str, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, N, D) contiguous, lse (B, H, N) fp32: base-2 log-sum-exp of the scaled scores, kernel order)."""
    return _forward(q, k, v, _spec(kind, text_len, grid, conv_kernel, conv_wrap), scale)


@sparse_attn_fwd.register_fake
def _(q, k, v, kind, text_len, grid, conv_kernel, conv_wrap, scale):
    B, H, N, D = q.shape
    return q.new_empty(B, H, N, D), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("dalle_ds::sparse_attn_bwd", mutates_args=())
def sparse_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kind: str, text_len: int, grid: int, conv_kernel: int, conv_wrap: str, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    return _backward(do, q, k, v, out, lse, _spec(kind, text_len, grid, conv_kernel, conv_wrap), scale)


@sparse_attn_bwd.register_fake
def _(do, q, k, v, out, lse, kind, text_len, grid, conv_kernel, conv_wrap, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("dalle_ds::sparse_attn_decode", mutates_args=())
def sparse_attn_decode(
    q_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    kind: str, text_len: int, grid: int, conv_kernel: int, conv_wrap: str, position: int, scale: float,
) -> torch.Tensor:
    """One query (B, H, 1, D) at sequence index ``position`` against a raster-order KV cache (B, H, L, D)."""
    return _decode(q_new, k_cache, v_cache, _spec(kind, text_len, grid, conv_kernel, conv_wrap), position, scale)


@sparse_attn_decode.register_fake
def _(q_new, k_cache, v_cache, kind, text_len, grid, conv_kernel, conv_wrap, position, scale):
    return q_new.new_empty(q_new.shape)


def _plain_eager(*tensors) -> bool:
    """True when the launchers may be called directly instead of through the custom ops: not under torch.compile,
    no dispatch mode active (fake tensors, make_fx, FlopCounterMode) and plain tensors. The ops' Python dispatch
    costs about 30 us of host time per call (measured on the 2-core dev CPU: 63 us through the op vs 32 us direct,
    kernel launch stubbed), and with kernels of 0.1-0.7 ms that host time is visible in eager timings."""
    if torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None:
        return False
    return all(type(t) is torch.Tensor for t in tensors)


class SparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k, v, out, lse); backward recomputes tile by tile. Eager calls go to
    the launchers directly; traced ones through the custom ops (same launchers, so the same numbers)."""

    @staticmethod
    def forward(ctx, q, k, v, kind, text_len, grid, conv_kernel, conv_wrap, scale):
        if _plain_eager(q, k, v):
            out, lse = _forward(q, k, v, _spec(kind, text_len, grid, conv_kernel, conv_wrap), scale)
        else:
            out, lse = torch.ops.dalle_ds.sparse_attn_fwd(q, k, v, kind, text_len, grid, conv_kernel, conv_wrap,
                                                          scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (kind, text_len, grid, conv_kernel, conv_wrap, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        if _plain_eager(do, q, k, v):
            dq, dk, dv = _backward(do, q, k, v, out, lse, _spec(*ctx.args[:5]), ctx.args[5])
        else:
            dq, dk, dv = torch.ops.dalle_ds.sparse_attn_bwd(do, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def sparse_attention(q, k, v, spec: MaskSpec, scale: float | None = None) -> torch.Tensor:
    """Block-sparse attention with the Triton kernels; q, k, v (B, H, N, D) in raster order."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return SparseAttentionFunction.apply(
        q, k, v, spec.kind, spec.text_len, spec.grid, spec.conv_kernel, spec.conv_wrap, float(scale)
    )


def sparse_attention_decode(q_new, k_cache, v_cache, spec: MaskSpec, position: int | torch.Tensor,
                            scale: float | None = None):
    """KV-cached decoding step with the Triton decode kernel (no autograd). A tensor ``position`` (one integer on the
    device) is read by the kernel; that route calls the launcher directly (eager only: the custom op takes an int)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q_new.shape[-1])
    if isinstance(position, torch.Tensor):
        return _decode(q_new, k_cache, v_cache, spec, position, float(scale))
    if _plain_eager(q_new, k_cache, v_cache):  # one call per token and layer when sampling: skip the op's dispatch
        return _decode(q_new, k_cache, v_cache, spec, int(position), float(scale))
    return torch.ops.dalle_ds.sparse_attn_decode(
        q_new, k_cache, v_cache, spec.kind, spec.text_len, spec.grid, spec.conv_kernel, spec.conv_wrap,
        position, float(scale),
    )
