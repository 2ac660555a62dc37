"""FlexAttention backend (``torch.nn.attention.flex_attention``) built from the same element predicate.

``mask_mod`` is :func:`masks.visible` in the kernel order, so column attention runs on transposed image states
here too (one gather in, one out): in raster order its stride-W pattern leaves no block to skip. The
``BlockMask`` comes from FlexAttention's own ``create_block_mask`` (an independent derivation the tests compare
with :mod:`layouts`).

Support (torch 2.11-2.13): CUDA runs the compiled (Triton-generated) kernel, forward and backward. CPU runs
forward only: eager FlexAttention there is an unfused reference that materializes the scores, and FlexAttention
has no CPU backward; ``compile=True`` on CPU uses Inductor's C++ template (about 30 s to compile per shape).
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from .masks import MaskSpec, kernel_order_index

try:  # FlexAttention exists in every torch this project supports; keep the import failure readable anyway.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    FLEX_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - torch < 2.5
    create_block_mask = flex_attention = None
    FLEX_IMPORT_ERROR = f"torch.nn.attention.flex_attention unavailable: {e}"

DEFAULT_BLOCK_SIZE = 128  # FlexAttention's default sparse block size


def mask_mod_for(spec: MaskSpec, order: str = "kernel"):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for ``spec`` in the kernel or raster order."""
    if order == "kernel":

        def mask_mod(b, h, q_idx, kv_idx):
            return spec.visible_in_kernel_order(q_idx, kv_idx)

    elif order == "raster":

        def mask_mod(b, h, q_idx, kv_idx):
            return spec.visible(q_idx, kv_idx)

    else:
        raise ValueError(f"order must be 'kernel' or 'raster', got {order!r}")
    mask_mod.__name__ = f"{spec.name}_{order}"
    return mask_mod


@functools.lru_cache(maxsize=64)
def _block_mask_cached(spec: MaskSpec, device: str, block_size: int, order: str):
    n = spec.seq_len
    return create_block_mask(mask_mod_for(spec, order), None, None, n, n, device=device, BLOCK_SIZE=block_size)


def block_mask_for(spec: MaskSpec, device="cpu", block_size: int = DEFAULT_BLOCK_SIZE, order: str = "kernel"):
    """Cached FlexAttention ``BlockMask`` (batch- and head-independent) for ``spec``."""
    if create_block_mask is None:
        raise RuntimeError(FLEX_IMPORT_ERROR)
    return _block_mask_cached(spec, str(torch.device(device)), int(block_size), order)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    scale: float | None = None,
    *,
    compile: bool | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    order: str = "kernel",
) -> torch.Tensor:
    """Masked attention through FlexAttention; q, k, v are (B, H, N, D) in raster order, and so is the output.

    ``compile`` defaults to True on CUDA, False on CPU. ``order="raster"`` skips the transposition (for
    benchmarks that show what it buys).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if compile is None:
        compile = q.is_cuda
    block_mask = block_mask_for(spec, q.device, block_size, order)
    perm = None
    if order == "kernel" and spec.transposed:
        perm = kernel_order_index(spec, q.device)  # an involution: the same gather undoes it
        q, k, v = (t.index_select(-2, perm) for t in (q, k, v))
    fn = _compiled_flex() if compile else flex_attention
    with warnings.catch_warnings():
        # Eager flex warns that it is unfused; that is the documented CPU path here.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = fn(q, k, v, block_mask=block_mask, scale=scale)
    return out if perm is None else out.index_select(-2, perm)
