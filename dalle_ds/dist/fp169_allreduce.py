"""All-reduce of 1-6-9 codes over any process group, moving the bytes of a 16-bit ring all-reduce.

No collective library sums the 1-6-9 format (DALL-E, arXiv 2102.12092, E.2 used a custom kernel), so the reduction is
done here in two collectives that only move bytes:

1. reduce-scatter as an all-to-all: the flat buffer (padded, see below) is cut into W equal chunks; rank r receives
   chunk r from every rank (``all_to_all_single`` on the codes viewed as uint8: NCCL has no 16-bit integer type);
2. rank r decodes its W received copies, sums them in fp32 in rank order (deterministic), optionally divides by W,
   clamps to +-max with the sign kept (the paper clamps infinities to the format's maximum; NaN stays NaN) and
   re-encodes: one fused pass of :func:`dalle_ds.ops.fp169.reduce_rows`;
3. an all-gather (``all_gather_single``) of the reduced chunks gives every rank the whole result, written back in place.

Per rank and call this sends ``2 * (W - 1) * chunk * 2`` bytes (and receives as much), with ``chunk`` the padded
chunk length: exactly what a 16-bit ring all-reduce of ``W * chunk`` elements sends. ``chunk`` is
``ceil(n / (8 W)) * 8`` so that every chunk starts on a 16-byte boundary (the vectorized kernels' requirement); the
padding is at most ``8 W - 1`` zero codes. :class:`CommCounter` records the bytes and :func:`ring_allreduce_bytes`
gives the unpadded ideal for comparison.

Several tensors can be reduced in one call (one pair of collectives, the paper's "single, grouped all-reduce").
The result is identical on every rank (each chunk is reduced by exactly one rank).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from ..ops import fp169
from .collectives import all_gather_flat

__all__ = ["CommCounter", "COUNTER", "all_reduce_fp169_", "padded_chunk", "ring_allreduce_bytes", "allreduce_bytes"]

_ALIGN = 8  # elements: 8 codes = 16 bytes


@dataclass
class CommCounter:
    """Bytes moved by this process's 16-bit collectives (only the bytes that leave/arrive from other ranks)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0
    elements: int = 0
    """Payload elements reduced (before padding)."""
    padded_elements: int = 0
    """Elements after padding to ``W * chunk``."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, sent: int, received: int, elements: int, padded: int) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received
            self.calls += 1
            self.elements += elements
            self.padded_elements += padded

    def reset(self) -> None:
        with self._lock:
            self.bytes_sent = self.bytes_received = self.calls = self.elements = self.padded_elements = 0

    def as_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "calls": self.calls,
                "elements": self.elements, "padded_elements": self.padded_elements}


COUNTER = CommCounter()
"""Process-wide counter updated by every :func:`all_reduce_fp169_` call (in addition to a per-call ``counter``)."""


def padded_chunk(numel: int, world_size: int) -> int:
    """Elements per rank's chunk: ``ceil(numel / (8 W)) * 8``."""
    return math.ceil(numel / (_ALIGN * world_size)) * _ALIGN


def allreduce_bytes(numel: int, world_size: int) -> int:
    """Bytes one rank sends in :func:`all_reduce_fp169_` for ``numel`` codes: ``2 (W - 1) chunk * 2``."""
    return 2 * (world_size - 1) * padded_chunk(numel, world_size) * 2


def ring_allreduce_bytes(numel: int, world_size: int, itemsize: int = 2) -> int:
    """Bytes one rank sends in a ring all-reduce of ``numel`` items: ``2 (W - 1) / W * numel * itemsize``
    (rounded up to whole chunks)."""
    return 2 * (world_size - 1) * math.ceil(numel / world_size) * itemsize


def all_reduce_fp169_(
    tensors: "torch.Tensor | Sequence[torch.Tensor]",
    group: "dist.ProcessGroup | None" = None,
    *,
    average: bool = False,
    fmt: str = "1-6-9",
    counter: CommCounter | None = None,
    backend: str = "auto",
) -> "torch.Tensor | list[torch.Tensor]":
    """Sum (``average=True``: mean) int16 codes across ``group`` in place; returns the argument.

    ``tensors``: one int16 tensor or a sequence (reduced together in one pair of collectives), all on the device the
    process group communicates from (CPU for gloo, the current GPU for NCCL). Values are decoded and summed in fp32,
    divided by W when averaging, then re-encoded with saturation: an overflowing sum or an Inf becomes +-max, NaN stays
    NaN. Callers that must know whether anything was nonfinite should all-reduce their own flags (as the paper does:
    clamped values cannot tell). ``counter`` (and the module's :data:`COUNTER`) receive the bytes sent and received.
    ``backend`` selects the decode/sum/encode kernel (see :mod:`dalle_ds.ops.fp169`).
    """
    single = isinstance(tensors, torch.Tensor)
    items = [tensors] if single else list(tensors)
    if not items:
        return tensors
    device = items[0].device
    for t in items:
        if t.dtype != torch.int16:
            raise TypeError(f"all_reduce_fp169_ needs int16 codes, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    world = dist.get_world_size(group)
    numel = sum(t.numel() for t in items)
    if numel == 0:
        return tensors
    chunk = padded_chunk(numel, world)

    # Pack (padding with +0 codes).
    send = torch.zeros(world * chunk, dtype=torch.int16, device=device)
    offset = 0
    for t in items:
        send[offset:offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()

    if world > 1:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv.view(torch.uint8), send.view(torch.uint8), group=group)
    else:
        recv = send
    reduced = fp169.reduce_rows(recv.view(world, chunk), divisor=float(world) if average else 1.0, saturate=True,
                                fmt=fmt, backend=backend)
    if world > 1:
        result = torch.empty_like(send)
        all_gather_flat(result.view(torch.uint8), reduced.view(torch.uint8), group)
    else:
        result = reduced

    offset = 0
    for t in items:
        t.copy_(result[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()

    moved = 2 * (world - 1) * chunk * 2
    for c in (COUNTER, counter):
        if c is not None:
            c.add(sent=moved, received=moved, elements=numel, padded=world * chunk)
    return tensors
