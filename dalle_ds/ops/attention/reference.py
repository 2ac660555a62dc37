"""Dense masked attention from the element predicate: the test oracle and the always-available backend.

``reference_attention`` materializes the [B, H, N, N] scores, so it is O(N^2) in memory; it computes in fp32 by
default (``upcast=True``), in the input dtype with ``upcast=False`` (the "plain PyTorch in low precision" error
that the parity tests compare kernels against, as FlashAttention's tests do), or in any ``compute_dtype``
(float64 for the tightest tests). Autograd flows through it normally.
"""
from __future__ import annotations

import functools
import math

import torch

from .masks import MaskSpec, visible


@functools.lru_cache(maxsize=32)
def _dense_mask(spec: MaskSpec, device: str) -> torch.Tensor:
    return spec.dense(device=device)


def dense_mask(spec: MaskSpec, device="cpu") -> torch.Tensor:
    """Cached [N, N] boolean mask in raster order (rows = queries). A constant for torch.compile: a compiled graph
    holds the mask instead of tracing its construction into every call."""
    return _dense_mask_constant(spec.kind, spec.text_len, spec.grid, spec.conv_kernel, spec.conv_wrap,
                                str(torch.device(device)))


@torch.compiler.assume_constant_result
def _dense_mask_constant(kind: str, text_len: int, grid: int, conv_kernel: int, conv_wrap: str,
                         device: str) -> torch.Tensor:
    # the spec's fields, not the spec: torch 2.11's dynamo cannot rebuild a frozen dataclass to call a function
    # marked constant ("currently can't reconstruct arbitrary frozen dataclass instances"); 2.13's can
    return _dense_mask(MaskSpec(kind, text_len, grid, conv_kernel, conv_wrap), device)


@functools.lru_cache(maxsize=8192)
def _decode_windows(spec: MaskSpec, position: int, device: str) -> tuple[tuple[slice, torch.Tensor | None], ...]:
    keys = torch.arange(position + 1)
    keys = keys[visible(spec, torch.tensor(position), keys)]
    windows = []
    for part in (keys[keys < spec.text_len], keys[keys >= spec.text_len]):
        if len(part) == 0:
            continue
        step = math.gcd(*torch.diff(part).tolist()) if len(part) > 1 else 1
        lo, hi = int(part[0]), int(part[-1]) + 1
        window = torch.arange(lo, hi, step)
        keep = torch.isin(window, part)
        windows.append((slice(lo, hi, step), None if bool(keep.all()) else keep.to(device)))
    return tuple(windows)


def decode_windows(spec: MaskSpec, position: int, device="cpu") -> tuple[tuple[slice, torch.Tensor | None], ...]:
    """The keys query ``position`` may see, as at most two strided windows of the cache: the text keys, then the
    image keys (a row window of W + 1, a column every W-th key, a conv neighbourhood), each with a boolean keep-mask
    over the window, or None when every key in it is visible. Derived from :func:`visible`, cached. A decode step
    reads only these windows: for a row query with T = 24, W = 16 that is 41 keys of up to 280."""
    return _decode_windows(spec, int(position), str(torch.device(device)))


def _compute_dtype(x: torch.Tensor, upcast: bool, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    scale: float | None = None,
    *,
    upcast: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale, masked by spec) v`` for q, k, v of shape (B, H, N, D) in raster order.

    Returns a tensor of q's dtype. Every query sees at least itself, so no row is fully masked.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    dt = _compute_dtype(q, upcast, compute_dtype)
    mask = dense_mask(spec, q.device)
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale  # (B, H, N, N)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(dt)).to(q.dtype)


def reference_decode(
    q_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    spec: MaskSpec,
    position: int | torch.Tensor,
    scale: float | None = None,
    *,
    upcast: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One new query (B, H, 1, D) at raster sequence index ``position`` against cached keys/values (B, H, L, D).

    Only cache entries 0..position count (later entries may hold anything, NaN included). With an int position
    only the windows that hold visible keys are read (:func:`decode_windows`); a tensor position (one integer on
    the device) reads the whole cache under the mask row computed on the device, with no host sync, so that the
    step can be captured in a CUDA graph.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q_new.shape[-1])
    dt = _compute_dtype(q_new, upcast, compute_dtype)
    with torch.autocast(q_new.device.type, enabled=False):  # the math in ``dt`` even inside a bf16 resblock
        if isinstance(position, torch.Tensor):
            return _decode_at_tensor(q_new, k_cache, v_cache, spec, position, scale, dt).to(q_new.dtype)
        return _decode(q_new, k_cache, v_cache, spec, position, scale, dt).to(q_new.dtype)


def _decode_at_tensor(q_new, k_cache, v_cache, spec, position, scale, dt):
    keep = visible(spec, position.reshape(()), torch.arange(k_cache.shape[2], device=k_cache.device))  # (L,)
    scores = torch.matmul(q_new.to(dt) * scale, k_cache.to(dt).transpose(-1, -2))  # (B, H, 1, L)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.matmul(probs, torch.where(keep[:, None], v_cache.to(dt), 0.0))  # 0 * NaN would poison the sum


def _decode(q_new, k_cache, v_cache, spec, position, scale, dt):
    q = q_new.to(dt) * scale
    parts, values = [], []
    for window, keep in decode_windows(spec, position, q.device):
        k, v = k_cache[:, :, window].to(dt), v_cache[:, :, window].to(dt)
        s = torch.matmul(q, k.transpose(-1, -2))  # (B, H, 1, window length)
        parts.append(s if keep is None else s.masked_fill(~keep, float("-inf")))
        values.append(v)
    probs = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
    out, start = 0, 0
    for v in values:
        out = out + torch.matmul(probs[..., start:start + v.shape[2]], v)
        start += v.shape[2]
    return out
