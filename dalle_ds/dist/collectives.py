"""Collectives that work on any backend for the small host-side tensors (flags, norms, hostnames) the reducers and
the topology exchange."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_anywhere_(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``dist.all_reduce`` of ``t`` in place over ``group``, whatever its backend: NCCL serves CUDA tensors only, so
    there a CPU tensor makes a round trip through the current CUDA device; gloo takes it as it is."""
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        d = t.cuda()
        dist.all_reduce(d, op=op, group=group)
        t.copy_(d)
    else:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group=None) -> None:
    """Every rank's ``inp`` concatenated into the flat ``out`` (world x inp.numel() elements). torch >= 2.13 names
    it ``all_gather_single`` (``all_gather_into_tensor`` is deprecated there); torch 2.11 has only the latter. Looked
    up at each call, so a wrapper installed on ``torch.distributed`` (tests counting bytes) sees it."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, group=None) -> None:
    """Sum ``inp`` (world x out.numel() elements) over the ranks and leave this rank's chunk in ``out``. torch >= 2.13
    names it ``reduce_scatter_single`` (``reduce_scatter_tensor`` is deprecated there); torch 2.11 has only the
    latter."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, inp, group=group)


def all_gather_anywhere(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t`` (same shape and dtype everywhere) stacked along a new first axis, ``[world, *t.shape]``,
    on ``t``'s device, whatever the backend: on NCCL a CPU tensor makes a round trip through the current CUDA device
    (as in :func:`all_reduce_anywhere_`)."""
    nccl_cpu = t.device.type == "cpu" and dist.get_backend(group) == "nccl"
    src = (t.cuda() if nccl_cpu else t).reshape(-1)
    out = torch.empty(dist.get_world_size(group) * src.numel(), dtype=t.dtype, device=src.device)
    all_gather_flat(out, src, group)
    out = out.view(-1, *t.shape)
    return out.cpu() if nccl_cpu else out
