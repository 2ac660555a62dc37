"""The public entry points: ``attention`` and ``attention_decode``, dispatching over the backends.

Backends (in ``auto`` priority order):

* ``triton``: the block-sparse FlashAttention-style kernels (CUDA sm80+; CPU only under ``TRITON_INTERPRET=1``,
  and then only when asked for by name);
* ``flex``: FlexAttention with the same mask (CUDA: compiled, forward + backward; CPU: forward only, unfused);
* ``sdpa``: ``F.scaled_dot_product_attention`` with the dense boolean mask built from the same definition (any
  device, any float dtype, computed in the input dtype; O(N^2) mask memory, fused kernels where torch has them: on
  CPU about 2.6x faster than ``dense`` for forward+backward at 280 tokens). Used by ``auto`` on CPU.
* ``dense``: masked dense attention computed in fp32 (any device, any float dtype; O(N^2) memory): the reference.

Each backend states why it cannot run a given call; when none can, the error lists every reason (the
xformers dispatch pattern). q, k, v are always (B, H, N, D) in raster order: backends that transpose image states
(column attention) do it internally.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import flex as _flex
from . import triton_backend as _triton
from .masks import MaskSpec
from .reference import dense_mask, reference_attention, reference_decode

BACKEND_NAMES = ("triton", "flex", "sdpa", "dense")


@dataclass(frozen=True)
class _Backend:
    name: str
    reasons: Callable  # (q, k, v, spec, needs_grad, auto) -> list[str]
    run: Callable  # (q, k, v, spec, scale) -> out
    decode_reasons: Callable | None  # (q_new, k_cache, spec, auto) -> list[str]
    decode: Callable | None  # (q_new, k_cache, v_cache, spec, position, scale) -> out
    status: Callable  # () -> (available, reason)


def _is_float(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


# -- triton --------------------------------------------------------------------------------------------------------
def _triton_reasons(q, k, v, spec, needs_grad, auto):
    return _triton.not_supported_reasons(q, k, v, spec, auto=auto)


def _triton_decode_reasons(q_new, k_cache, spec, auto):
    return _triton.not_supported_reasons(q_new, k_cache, k_cache, spec, auto=auto)


# -- flex ----------------------------------------------------------------------------------------------------------
def _flex_reasons(q, k, v, spec, needs_grad, auto):
    if _flex.FLEX_IMPORT_ERROR:
        return [_flex.FLEX_IMPORT_ERROR]
    reasons = []
    if q.device.type == "cpu":
        if needs_grad:
            reasons.append("FlexAttention has no CPU backward")
        if auto:
            reasons.append("on CPU FlexAttention is an unfused reference (slower than dense); ask for it by name")
    elif q.device.type != "cuda":
        reasons.append(f"device type {q.device.type!r} unsupported")
    if not _is_float(q) or (q.dtype == torch.float64 and q.is_cuda):
        reasons.append(f"dtype={q.dtype} (supported: float16, bfloat16, float32; float64 on CPU)")
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        reasons.append(f"head dim {d} (supported: powers of two >= 16)")
    return reasons


def _flex_status():
    if _flex.FLEX_IMPORT_ERROR:
        return False, _flex.FLEX_IMPORT_ERROR
    if torch.cuda.is_available():
        return True, f"torch {torch.__version__}: compiled FlexAttention on CUDA (forward + backward)"
    return True, f"torch {torch.__version__}: CPU forward only (unfused eager reference; no CPU backward)"


# -- dense ---------------------------------------------------------------------------------------------------------
def _dense_reasons(q, k, v, spec, needs_grad, auto):
    return [] if _is_float(q) else [f"dtype={q.dtype} (needs a floating-point dtype)"]


def _dense_decode_reasons(q_new, k_cache, spec, auto):
    return [] if _is_float(q_new) else [f"dtype={q_new.dtype} (needs a floating-point dtype)"]


_BACKENDS = {
    "triton": _Backend(
        "triton", _triton_reasons, _triton.sparse_attention, _triton_decode_reasons,
        _triton.sparse_attention_decode, _triton.status,
    ),
    "flex": _Backend(
        "flex", _flex_reasons, lambda q, k, v, spec, scale: _flex.flex_sparse_attention(q, k, v, spec, scale),
        None, None, _flex_status,
    ),
    "sdpa": _Backend(
        "sdpa", _dense_reasons,
        lambda q, k, v, spec, scale: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(spec, q.device),
                                                                    scale=scale),
        None, None,
        lambda: (True, "always (torch SDPA with the dense boolean mask; input dtype)"),
    ),
    "dense": _Backend(
        "dense", _dense_reasons, lambda q, k, v, spec, scale: reference_attention(q, k, v, spec, scale),
        _dense_decode_reasons,
        lambda q, k, v, spec, position, scale: reference_decode(q, k, v, spec, position, scale),
        lambda: (True, "always (materializes the N x N scores; fp32 math)"),
    ),
}


def backend_status() -> list[dict]:
    """One dict per backend: ``name``, ``available`` (on some device of this machine) and ``reason``."""
    out = []
    for name in BACKEND_NAMES:
        ok, reason = _BACKENDS[name].status()
        out.append({"name": name, "available": bool(ok), "reason": reason})
    return out


def _check_inputs(q, k, v, spec: MaskSpec) -> None:
    if not isinstance(spec, MaskSpec):
        raise TypeError(f"mask_spec must be a MaskSpec, got {type(spec).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, N, D), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != spec.seq_len:
        raise ValueError(f"sequence length {q.shape[2]} != mask's T + W*W = {spec.seq_len} ({spec.name})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if q.shape[3] < 1:
        raise ValueError(f"head dim must be ≥ 1, got shape {tuple(q.shape)}")


def _no_backend_error(what: str, tried: dict[str, list[str]]) -> NotImplementedError:
    lines = [f"no attention backend can run {what}:"]
    lines += [f"  {name}: {'; '.join(reasons)}" for name, reasons in tried.items()]
    return NotImplementedError("\n".join(lines))


def select_backend(q, k, v, mask_spec: MaskSpec, backend: str = "auto") -> str:
    """The name of the backend ``attention`` would use (raises with every backend's reasons if none fits)."""
    _check_inputs(q, k, v, mask_spec)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    def what() -> str:  # built only for the error: this function runs on every attention call
        grad = " with grad" if needs_grad else ""
        return f"{mask_spec.name} on {q.device.type} {q.dtype} shape {tuple(q.shape)}{grad}"

    if backend == "auto":
        tried = {}
        for name in BACKEND_NAMES:
            reasons = _BACKENDS[name].reasons(q, k, v, mask_spec, needs_grad, True)
            if not reasons:
                return name
            tried[name] = reasons
        raise _no_backend_error(what(), tried)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    reasons = _BACKENDS[backend].reasons(q, k, v, mask_spec, needs_grad, False)
    if reasons:
        raise _no_backend_error(what(), {backend: reasons})
    return backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_spec: MaskSpec,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Causal masked attention for the DALL-E stream ``[T text][W x W image]``.

    Args:
        q, k, v: (B, H, N, D) with N = T + W*W, **raster order** for every mask (the backend transposes image
            states for column attention internally). Same dtype and device.
        mask_spec: which mask (:class:`MaskSpec`: row / column / conv / causal, T, W, conv kernel and wraparound).
        backend: "auto" (triton, then flex, then sdpa, then dense: the first that supports the call), or a name
            to force.
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        (B, H, N, D) in q's dtype, raster order. Differentiable (triton, sdpa, dense; flex on CUDA).
    """
    name = select_backend(q, k, v, mask_spec, backend)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _BACKENDS[name].run(q, k, v, mask_spec, scale)


def decode_backend(backend: str) -> str:
    """The backend that a model whose attention runs on ``backend`` decodes with: the same one where it has a decode
    path; otherwise "auto" (flex and sdpa have none: cached sampling then picks triton on a GPU, dense elsewhere)."""
    if backend != "auto" and backend in _BACKENDS and _BACKENDS[backend].decode is None:
        return "auto"
    return backend


def attention_decode(
    q_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    mask_spec: MaskSpec,
    position: int | torch.Tensor,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """One decoding step with a KV cache, for sampling.

    Args:
        q_new: (B, H, 1, D), the query at sequence index ``position`` (raster order, 0 <= position < N).
        k_cache, v_cache: (B, H, L, D), raster order, L > position; entries 0..position are read (the new token's
            own key/value must already be written at ``position``), later entries are ignored.
        position: an int, or a one-element integer tensor on q_new's device, read on the device (no host sync: the
            route a CUDA graph of the decode step takes, one capture for every position). A tensor's value cannot
            be range-checked here without a sync; the caller keeps it in range.
        mask_spec, backend, scale: as for :func:`attention` (backends: triton, dense).

    Returns:
        (B, H, 1, D): row ``position`` of ``attention(q, k, v, mask_spec)``.
    """
    if not isinstance(mask_spec, MaskSpec):
        raise TypeError(f"mask_spec must be a MaskSpec, got {type(mask_spec).__name__}")
    if q_new.dim() != 4 or q_new.shape[2] != 1:
        raise ValueError(f"q_new must be (B, H, 1, D), got {tuple(q_new.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != q_new.shape[:2] or k_cache.shape[3] != q_new.shape[3]:
        raise ValueError(
            f"caches must be (B, H, L, D) matching q_new {tuple(q_new.shape)}; "
            f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if isinstance(position, torch.Tensor):
        if position.numel() != 1 or position.dtype.is_floating_point or position.dtype == torch.bool:
            raise ValueError(f"a tensor position must hold one integer, got {position.dtype} {tuple(position.shape)}")
        if position.device != q_new.device:
            raise ValueError(f"position is on {position.device} but q_new on {q_new.device}")
    else:
        if isinstance(position, bool) or not isinstance(position, int):  # 5.7 was truncated to 5, True taken as 1
            raise TypeError(f"position must be an int or a one-element integer tensor, got {position!r}")
        if not 0 <= position < mask_spec.seq_len or position >= k_cache.shape[2]:
            raise ValueError(f"position {position} outside [0, min(N={mask_spec.seq_len}, L={k_cache.shape[2]}))")
    if scale is None:
        scale = 1.0 / math.sqrt(q_new.shape[-1])
    what = f"decode {mask_spec.name} on {q_new.device.type} {q_new.dtype}"
    if backend == "auto":
        tried = {}
        for name in BACKEND_NAMES:
            b = _BACKENDS[name]
            if b.decode is None:
                tried[name] = ["no decode path"]
                continue
            reasons = b.decode_reasons(q_new, k_cache, mask_spec, True)
            if not reasons:
                return b.decode(q_new, k_cache, v_cache, mask_spec, position, scale)
            tried[name] = reasons
        raise _no_backend_error(what, tried)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    b = _BACKENDS[backend]
    reasons = ["no decode path"] if b.decode is None else b.decode_reasons(q_new, k_cache, mask_spec, False)
    if reasons:
        raise _no_backend_error(what, {backend: reasons})
    return b.decode(q_new, k_cache, v_cache, mask_spec, position, scale)
