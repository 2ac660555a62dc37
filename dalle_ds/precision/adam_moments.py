"""AdamW with its moments stored in 16 bits, as the DALL-E paper trains its transformer (App. B.2).

The paper keeps "most parameters, Adam moments, and activations" in 16 bits (§2.4) and names the formats: "a 1-6-9
format for the running mean ... and a 0-6-10 format for the running variance. We clip the estimate for running
variance by value to 5." Gains, biases, embeddings and unembeddings keep fp32 moments (App. D). Both formats are
defined once in :mod:`dalle_ds.ops.fp169` (bit layout, rounding, saturation); this optimizer only stores its state in
them.

Per step and tensor, one fused pass (``fp169.adamw16_step_``: the C++ op on CPU, the CUDA op on a GPU; the
arithmetic is written once in csrc/fp169/adamw16.h) decodes each element's codes, updates them with the gradient as
fp32 AdamW does, encodes them back and steps the parameter, one fp32 rounding per operation:

    m = b1·m + (1 - b1)·g                      stored in 1-6-9, saturating at ±15.98 (|m| ≤ max|g|)
    v = min(b2·v + (1 - b2)·g², clip)          stored in 0-6-10 (clip = 5: the format reaches 7.996)
    p = p·(1 - lr·wd) - (m / (sqrt(v) · 1/sqrt(1 - b2^t) + eps)) · lr / (1 - b1^t)

So the update of step t uses the moments as they are after rounding to 16 bits, as a 16-bit state must: the same
numbers as an fp32 AdamW whose moments are rounded to their formats after every update
(``tests/test_adam_moments.py`` checks this bit for bit against such an emulation written with the pure-torch codec,
and the fused op against the same arithmetic in torch ops, which is what runs when the op cannot be built).
State per parameter element: 4 bytes instead of fp32 AdamW's 8.

The formats' significands (9 and 10 bits) resolve a relative change of about 2^-10: an update moves the variance by
(1 - b2)·(g²/v - 1) of itself, which with b2 = 0.999 is rounded away unless g² differs from v by more than about
half. For unit Gaussian gradients at a steady state, 17% of the variance updates were rounded away with b2 = 0.999
and 0.4% with the paper's transformer value b2 = 0.96 (App. B.2), over 200 steps of 100k elements
(``tests/test_adam_moments.py`` keeps the contrast). A warning is logged when 1 - b1 or 1 - b2 is below 2^-9.

Param groups choose their moments with ``moments="16bit"`` (the default) or ``"fp32"`` (the paper's fp32 islands).
Works as a DeepSpeed client optimizer under ZeRO 0-3: DeepSpeed hands it one flat fp32 partition per param group
and keeps the groups' keys (``dalle_ds.train.adam16``).
"""
from __future__ import annotations

import logging
import math

import torch

from dalle_ds.config import ADAM_MOMENTS as MOMENTS
from dalle_ds.ops import fp169

log = logging.getLogger(__name__)

MEAN_FORMAT, VARIANCE_FORMAT = "1-6-9", "0-6-10"
VARIANCE_CLIP = 5.0  # paper App. B.2: "We clip the estimate for running variance by value to 5"
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


class AdamW16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose moments are stored in the paper's 16-bit formats
    for groups with ``moments="16bit"``, in fp32 for groups with ``moments="fp32"``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, moments: str = "16bit", variance_clip: float = VARIANCE_CLIP,
                 chunk: int = 1 << 24, backend: str = "auto"):
        if not lr >= 0.0:
            raise ValueError(f"lr must be ≥ 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"eps must be > 0 and weight_decay ≥ 0, got eps={eps}, weight_decay={weight_decay}")
        top = fp169.get_format(VARIANCE_FORMAT).max
        if not 0.0 < variance_clip <= top:
            raise ValueError(f"variance_clip must be in (0, {top}] (the 0-6-10 maximum), got {variance_clip}")
        if chunk < 1:
            raise ValueError(f"chunk must be ≥ 1, got {chunk}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, moments=moments,
                        variance_clip=variance_clip)
        if backend not in fp169.BACKENDS:
            raise ValueError(f"backend must be one of {fp169.BACKENDS}, got {backend!r}")
        self.chunk, self.backend = int(chunk), backend
        super().__init__(params, defaults)  # checks each group through add_param_group

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    @staticmethod
    def _check_group(group: dict) -> None:
        if group["moments"] not in MOMENTS:
            raise ValueError(f"moments must be one of {MOMENTS}, got {group['moments']!r}")
        b1, b2 = group["betas"]
        if group["moments"] == "16bit" and min(1.0 - b1, 1.0 - b2) < 2.0 ** -9:
            log.warning("AdamW16: betas %s update the 16-bit moments by less than 2^-9 of themselves per step, "
                        "below what their 9-10 significand bits resolve: small changes are rounded away (the paper "
                        "trains with betas (0.9, 0.96))", (b1, b2))

    def state_bytes(self) -> int:
        """Bytes of optimizer state held in tensors (moments; not the step counts)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for k, t in st.items()
                   if k in _MOMENT_KEYS)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW16 does not support sparse gradients")
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        sixteen = group["moments"] == "16bit"
        if not state:
            state["step"] = 0
            kind = dict(dtype=torch.int16) if sixteen else dict(dtype=torch.float32)
            # code 0 is +0 in both formats
            state["exp_avg"] = torch.zeros(p.shape, device=p.device, **kind)
            state["exp_avg_sq"] = torch.zeros(p.shape, device=p.device, **kind)
        state["step"] += 1
        t = state["step"]
        lr, eps, wd, clip = group["lr"], group["eps"], group["weight_decay"], group["variance_clip"]
        b1, b2 = group["betas"]
        step_size = lr / (1.0 - b1 ** t)
        target = p if p.is_contiguous() else p.contiguous()  # updated in place; a copy is written back at the end
        if sixteen:  # one fused pass (csrc/fp169/adamw16.h), or the same arithmetic in torch ops without the op
            fp169.adamw16_step_(target, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                [b1, 1.0 - b1, b2, 1.0 - b2, clip, 1.0 - lr * wd, 1.0 / math.sqrt(1.0 - b2 ** t),
                                 eps, step_size], backend=self.backend, chunk=self.chunk)
        else:
            self._fp32_moments_update(target, p.grad, state, b1, b2, lr, eps, wd, step_size,
                                      math.sqrt(1.0 - b2 ** t))
        if target is not p:
            p.copy_(target)

    def _fp32_moments_update(self, target, grad, state, b1, b2, lr, eps, wd, step_size, root_c2) -> None:
        """torch's AdamW arithmetic (the paper's fp32 islands), chunk by chunk."""
        flat_p, flat_g = target.view(-1), grad.reshape(-1)
        flat_m, flat_v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        for start in range(0, flat_p.numel(), self.chunk):
            end = min(start + self.chunk, flat_p.numel())
            g = flat_g[start:end].float()
            m, v = flat_m[start:end], flat_v[start:end]
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            x = flat_p[start:end]
            if wd != 0.0:
                x.mul_(1.0 - lr * wd)
            denom = v.sqrt().div_(root_c2).add_(eps)
            if x.dtype == torch.float32:
                x.addcdiv_(m, denom, value=-step_size)
            else:  # the step in fp32, then rounded once (in fp16, eps = 1e-8 would round to 0 and 0/0 to NaN)
                x.add_((m / denom).to(x.dtype), alpha=-step_size)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that the moments keep the dtype they were saved in: torch casts every saved state
        tensor of a floating-point parameter to the parameter's dtype, which would turn a 16-bit code into its
        integer value, and the fp32 moments of a bf16 / fp16 parameter into 16-bit values."""
        saved = {}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for index, saved_id in enumerate(saved_ids):
            st = state_dict["state"].get(saved_id, {})
            for key in _MOMENT_KEYS:
                if isinstance(st.get(key), torch.Tensor):
                    saved[(index, key)] = st[key]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for (index, key), value in saved.items():
            p = params[index]
            self.state[p][key] = value.to(device=p.device, copy=True)
