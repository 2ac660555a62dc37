"""Block-sparse causal attention for the DALL-E prior: row, column and conv masks over ``[T text][W x W image]``.

One mask definition (:mod:`.masks`), from which come the block layouts (:mod:`.layouts`), the dense reference
(:mod:`.reference`), the FlexAttention backend (:mod:`.flex`) and the Triton kernels' in-block masks
(:mod:`.triton_kernels`, launched by :mod:`.triton_backend`). Use it through :func:`attention` /
:func:`attention_decode`; ``backend_status()`` says what can run here.

    >>> spec = MaskSpec("row", text_len=256, grid=32)        # N = 256 + 32 * 32 = 1280
    >>> out = attention(q, k, v, spec)                        # q, k, v: (B, H, 1280, D), raster order
"""
from .dispatch import BACKEND_NAMES, attention, attention_decode, backend_status, decode_backend, select_backend
from .layouts import BlockLayout, block_layout, block_status, decode_table
from .masks import MaskSpec, kept_elements, kernel_order_index, kernel_to_raster, layer_kind, layer_schedule, visible
from .reference import dense_mask, reference_attention, reference_decode

__all__ = [
    "BACKEND_NAMES",
    "BlockLayout",
    "MaskSpec",
    "attention",
    "attention_decode",
    "backend_status",
    "block_layout",
    "block_status",
    "decode_backend",
    "decode_table",
    "dense_mask",
    "kept_elements",
    "kernel_order_index",
    "kernel_to_raster",
    "layer_kind",
    "layer_schedule",
    "reference_attention",
    "reference_decode",
    "select_backend",
    "visible",
]
