"""Exponential moving average of the weights (paper: "an exponential moving average of the weights", decay 0.999
for the dVAE), kept in fp32 whatever the training precision.

``torch.optim.swa_utils.AveragedModel`` keeps the average in the model's own dtype; under bf16 training a 0.999
average of bf16 weights would lose every update smaller than bf16's resolution, so this keeps an fp32 shadow.
Under ZeRO-3 each rank averages only its own partition of every parameter (``param.ds_tensor``), so the EMA costs
1/world of the model per rank; :meth:`EMA.model_state_dict` gathers the partitions (a collective there).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn


def _local(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: the ZeRO-3 partition if there is one, else the tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.sharded = any(hasattr(p, "ds_tensor") for _, p in named)
        self.full_shapes = [tuple(getattr(p, "ds_shape", p.shape)) for _, p in named]
        self.shadow = [_local(p).detach().float().clone() for _, p in named]
        self.updates = 0

    @torch.no_grad()
    def update(self, params: Iterable[torch.Tensor]) -> None:
        cur = [_local(p).detach().float() for p in params]
        if self.updates == 0:
            torch._foreach_copy_(self.shadow, cur)
        else:
            torch._foreach_lerp_(self.shadow, cur, 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        """This rank's state (under ZeRO-3: its partitions; each rank checkpoints its own)."""
        return {"decay": self.decay, "updates": self.updates, "sharded": self.sharded,
                "shadow": {n: t.cpu() for n, t in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state["shadow"][n])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the module's parameter names (fp32, on CPU). Collective under ZeRO-3."""
        if not self.sharded:
            return {n: t.detach().cpu().clone() for n, t in zip(self.names, self.shadow)}
        out = {}
        world = dist.get_world_size()
        for n, shard, shape in zip(self.names, self.shadow, self.full_shapes):
            parts = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(parts, shard.contiguous())
            numel = int(torch.tensor(shape).prod()) if shape else 1
            out[n] = torch.cat([p.flatten() for p in parts])[:numel].view(shape).cpu()
        return out

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into an ordinary (unsharded) module of the same architecture."""
        weights = self.model_state_dict()
        for n, p in module.named_parameters():
            p.copy_(weights[n].to(p.dtype))
