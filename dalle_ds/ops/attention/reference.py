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
    """Cached [N, N] boolean mask in raster order (rows = queries)."""
    return _dense_mask(spec, str(torch.device(device)))


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
    position: int,
    scale: float | None = None,
    *,
    upcast: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One new query (B, H, 1, D) at raster sequence index ``position`` against cached keys/values (B, H, L, D).

    Only cache entries 0..position are read (later entries may hold anything).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q_new.shape[-1])
    dt = _compute_dtype(q_new, upcast, compute_dtype)
    keys = torch.arange(position + 1, device=q_new.device)
    vis = visible(spec, torch.tensor(position, device=q_new.device), keys)  # (position + 1,)
    kc, vc = k_cache[:, :, : position + 1].to(dt), v_cache[:, :, : position + 1].to(dt)
    scores = torch.matmul(q_new.to(dt), kc.transpose(-1, -2)) * scale  # (B, H, 1, position + 1)
    scores = scores.masked_fill(~vis, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vc).to(q_new.dtype)
