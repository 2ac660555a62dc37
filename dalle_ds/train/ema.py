"""Exponential moving average of the weights (paper: "an exponential moving average of the weights", decay 0.999
for the dVAE), kept in fp32 whatever the training precision.

``torch.optim.swa_utils.AveragedModel`` keeps the average in the model's own dtype; under bf16 training a 0.999
average of bf16 weights would lose every update smaller than bf16's resolution, so this keeps an fp32 shadow.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, _ in module.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in module.named_parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self, params: Iterable[torch.Tensor]) -> None:
        cur = [p.detach().float() for p in params]
        if self.updates == 0:
            torch._foreach_copy_(self.shadow, cur)
        else:
            torch._foreach_lerp_(self.shadow, cur, 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {n: t.cpu() for n, t in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state["shadow"][n])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the module's parameter names (fp32, on CPU)."""
        return {n: t.detach().cpu().clone() for n, t in zip(self.names, self.shadow)}

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for (n, p), s in zip(module.named_parameters(), self.shadow):
            p.copy_(s.to(p.dtype))
