"""A collective that works on any backend for the small host-side tensors (flags, norms) the reducers exchange."""
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
