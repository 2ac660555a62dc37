"""Per-resblock gradient scaling (Ramesh et al., 2021, §2.4, Figure 4 and Appendix D.1).

Why: standard loss scaling multiplies every gradient by one number, so it only avoids fp16 underflow when the
smallest and largest activation gradients of the whole network fit in fp16's exponent range. The paper found that the
activation-gradient norms of a deep transformer shrink monotonically from the early resblocks to the late ones, and
at 12B parameters the spread no longer fits. So each resblock (attention and MLP blocks count separately) gets its
own scale, and only the resblock's *branch* sees the scaled numbers:

* backward, at the branch's output: the **incoming** gradient is multiplied by the block's scale ``s_k`` (fp32 × s_k,
  then cast to the branch's compute dtype, e.g. fp16);
* backward, at the branch's input: the **outgoing** gradient is divided by ``s_k`` in fp32, and Inf/NaN are set to
  zero ("filter") before it joins the fp32 identity path, so one overflowing block does not poison the gradient of
  every earlier block (which would drop all of their scales). The block's nonfinite event is recorded instead;
* the block's parameter gradients come out multiplied by ``s_k`` and are divided by it before the optimizer
  (:func:`unscale_block_grads_`), which also reports whether the update must be skipped; under DeepSpeed ZeRO, whose
  hooks consume gradients during the backward, :func:`install_unscale_hooks` divides each gradient as it is produced.

Scale rules (Appendix D.1), applied once per update by :meth:`ResblockGradScaler.update`: init M·2^13 (M =
data-parallel replicas); ×2^(1/1000) after an update whose gradients in that block are all finite; otherwise ÷√2
and skip the whole update; no two divisions of the same scale within 125 updates; clamp to [M·2^7, M·2^24].

"An update" here is one call of :meth:`~ResblockGradScaler.update`, i.e. one optimizer-step attempt, skipped or not:
a block whose gradients were finite grows even when another block forced the skip (the paper's scales evolve per
block; its Figure 12 shows independent trajectories).

Loss normalisation (Appendix D.3): the paper divides the loss by the *global* batch and multiplies the scales by M.
This project's loss is the per-rank mean and DeepSpeed averages gradients over ranks, so the scale actually applied
inside the backward is ``s_k / M``: the numbers the fp16 branch sees equal the paper's (loss / global batch) · s_k,
the stored and logged scales are the paper's (including M), and the all-reduced gradients are the true mean.

The scales are kept on the host in float64 (a bf16 or fp16 model cast by DeepSpeed never touches them: this object
is not a module and has no buffers); a float32 copy per device feeds the autograd ops.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from dalle_ds.dist.collectives import all_reduce_anywhere_

INIT_LOG2, MIN_LOG2, MAX_LOG2 = 13, 7, 24
GROWTH = 2.0 ** (1.0 / 1000.0)
BACKOFF = 1.0 / math.sqrt(2.0)
BACKOFF_WINDOW = 125


class ResblockGradScaler:
    """One gradient scale per resblock, their update rules, and the nonfinite flags recorded during backward.

    ``num_blocks``: resblocks in the model (2 × layers). ``replicas``: M, the data-parallel world size. ``group``:
    the process group over which flags are all-reduced (MAX) so every rank takes the same decision (default: the
    world, when torch.distributed is initialized).
    """

    def __init__(self, num_blocks: int, replicas: int = 1, *, init_log2: float = INIT_LOG2,
                 min_log2: float = MIN_LOG2, max_log2: float = MAX_LOG2, growth: float = GROWTH,
                 backoff: float = BACKOFF, backoff_window: int = BACKOFF_WINDOW, group: Any = None):
        if num_blocks < 1:
            raise ValueError(f"ResblockGradScaler: num_blocks must be ≥ 1, got {num_blocks}")
        if replicas < 1:
            raise ValueError(f"ResblockGradScaler: replicas (M) must be ≥ 1, got {replicas}")
        if not min_log2 <= init_log2 <= max_log2:
            raise ValueError(f"ResblockGradScaler: need min_log2 ≤ init_log2 ≤ max_log2, got "
                             f"{min_log2}, {init_log2}, {max_log2}")
        if growth < 1 or not 0 < backoff < 1 or backoff_window < 0:
            raise ValueError("ResblockGradScaler: need growth ≥ 1, 0 < backoff < 1 and backoff_window ≥ 0")
        self.num_blocks, self.replicas = num_blocks, replicas
        self.init_log2, self.min_log2, self.max_log2 = init_log2, min_log2, max_log2
        self.growth, self.backoff, self.backoff_window = growth, backoff, backoff_window
        self.group = group
        self.scales = torch.full((num_blocks,), replicas * 2.0 ** init_log2, dtype=torch.float64)
        self.last_division = [-(10 ** 12)] * num_blocks  # update index of each scale's last ÷√2
        self.updates = 0  # update() calls so far
        self.skipped = 0  # of which skipped
        self._device_scales: dict[torch.device, torch.Tensor] = {}
        self._flags: dict[torch.device, torch.Tensor] = {}  # per-block nonfinite flags (0/1), one per device
        self._other_nonfinite: dict[torch.device, torch.Tensor] = {}  # nonfinite grads outside every resblock
        self.last_flags: list[bool] = [False] * num_blocks  # the flags the latest update() acted on
        self._synced: tuple[list[bool], bool] | None = None  # the latest sync_flags() result, until update()
        self.unscale_in_hooks = False  # set by install_unscale_hooks

    # -- bounds ------------------------------------------------------------------------------------------------------
    @property
    def min_scale(self) -> float:
        return self.replicas * 2.0 ** self.min_log2

    @property
    def max_scale(self) -> float:
        return self.replicas * 2.0 ** self.max_log2

    def reset(self, replicas: int | None = None) -> None:
        """Back to the initial state (e.g. once the data-parallel world size M is known)."""
        fresh = ResblockGradScaler(self.num_blocks, replicas or self.replicas, init_log2=self.init_log2,
                                   min_log2=self.min_log2, max_log2=self.max_log2, growth=self.growth,
                                   backoff=self.backoff, backoff_window=self.backoff_window, group=self.group)
        fresh.unscale_in_hooks = self.unscale_in_hooks
        self.__dict__.update(fresh.__dict__)

    def set_replicas(self, replicas: int) -> None:
        """Move to a new data-parallel size M (e.g. a run resumed on a different number of GPUs): the scales and
        their bounds carry M as a factor, so they are multiplied by M_new / M_old; the fp16 numbers stay the same."""
        if replicas < 1:
            raise ValueError(f"ResblockGradScaler: replicas (M) must be ≥ 1, got {replicas}")
        self.scales *= replicas / self.replicas
        self.replicas = replicas
        self._device_scales.clear()

    # -- used by the autograd ops during backward --------------------------------------------------------------------
    def applied_scale(self, k: int, device: torch.device) -> torch.Tensor:
        """The factor used inside the backward for block k: s_k / M (see the module docstring), fp32 on ``device``."""
        t = self._device_scales.get(device)
        if t is None:
            t = (self.scales / self.replicas).to(device=device, dtype=torch.float32)
            self._device_scales[device] = t
        return t[k]

    def _flag_tensor(self, device: torch.device) -> torch.Tensor:
        t = self._flags.get(device)
        if t is None:
            t = self._flags[device] = torch.zeros(self.num_blocks, dtype=torch.float32, device=device)
        return t

    def record_nonfinite(self, k: int, nonfinite: torch.Tensor) -> None:
        """OR a 0-dim bool tensor into block k's flag without a host sync."""
        f = self._flag_tensor(nonfinite.device)
        f[k] = torch.maximum(f[k], nonfinite.to(f.dtype))

    def record_other_nonfinite(self, nonfinite: torch.Tensor) -> None:
        """Nonfinite gradients outside the resblocks (embeddings, heads): skip the update, change no scale."""
        t = self._other_nonfinite.get(nonfinite.device)
        if t is None:
            t = self._other_nonfinite[nonfinite.device] = torch.zeros((), dtype=torch.float32,
                                                                      device=nonfinite.device)
        t.copy_(torch.maximum(t, nonfinite.to(t.dtype)))

    # -- the decision ----------------------------------------------------------------------------------------------
    def sync_flags(self) -> tuple[list[bool], bool]:
        """(per-block nonfinite flags, nonfinite outside the blocks), all-reduced MAX over the group.

        One host sync. Does not clear the flags (``update`` does)."""
        devices = list(self._flags) + [d for d in self._other_nonfinite if d not in self._flags]
        device = devices[0] if devices else torch.device("cpu")
        buf = torch.zeros(self.num_blocks + 1, dtype=torch.float32, device=device)
        for f in self._flags.values():
            buf[:-1] = torch.maximum(buf[:-1], f.to(device))
        for o in self._other_nonfinite.values():
            buf[-1] = torch.maximum(buf[-1], o.to(device))
        if dist.is_available() and dist.is_initialized():
            all_reduce_anywhere_(buf, self.group, op=dist.ReduceOp.MAX)
        host = buf.cpu().tolist()
        self._synced = ([v > 0 for v in host[:-1]], host[-1] > 0)
        return self._synced

    def update(self, flags: Sequence[bool] | None = None, other_nonfinite: bool = False) -> bool:
        """Apply the scale rules for one update; return True when the update must be skipped.

        ``flags``: per-block nonfinite flags; default: the recorded ones, all-reduced (the result of the latest
        ``sync_flags``, e.g. by :func:`unscale_block_grads_`, else a fresh one). Clears the recorded flags. Every rank
        must call it once per optimizer step (it may all-reduce)."""
        if flags is None:
            flags, other_nonfinite = self._synced if self._synced is not None else self.sync_flags()
        if len(flags) != self.num_blocks:
            raise ValueError(f"ResblockGradScaler.update: {len(flags)} flags for {self.num_blocks} blocks")
        t = self.updates
        for k, bad in enumerate(flags):
            if bad:
                if t - self.last_division[k] >= self.backoff_window:
                    self.scales[k] *= self.backoff
                    self.last_division[k] = t
            else:
                self.scales[k] *= self.growth
        self.scales.clamp_(self.min_scale, self.max_scale)
        self.updates += 1
        skip = bool(any(flags)) or bool(other_nonfinite)
        self.skipped += int(skip)
        self.last_flags = [bool(f) for f in flags]
        self._device_scales.clear()
        self._synced = None
        for f in self._flags.values():
            f.zero_()
        for o in self._other_nonfinite.values():
            o.zero_()
        return skip

    # -- logging and checkpoints -----------------------------------------------------------------------------------
    def log2_scales(self) -> list[float]:
        return [math.log2(s) for s in self.scales.tolist()]

    def log_dict(self, prefix: str = "grad_scale_log2/") -> dict[str, float]:
        """Per-block log2 scales keyed ``{prefix}{k:03d}_{attn|mlp}`` (block 2i is layer i's attention)."""
        return {f"{prefix}{k:03d}_{'attn' if k % 2 == 0 else 'mlp'}": v for k, v in enumerate(self.log2_scales())}

    def state_dict(self) -> dict[str, Any]:
        return {"scales": self.scales.tolist(), "last_division": list(self.last_division), "updates": self.updates,
                "skipped": self.skipped, "replicas": self.replicas,
                "rules": {"init_log2": self.init_log2, "min_log2": self.min_log2, "max_log2": self.max_log2,
                          "growth": self.growth, "backoff": self.backoff, "backoff_window": self.backoff_window}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = len(state["scales"])
        if n != self.num_blocks:
            raise ValueError(f"ResblockGradScaler.load_state_dict: the checkpoint has {n} block scales, this model "
                             f"has {self.num_blocks} resblocks")
        for key, value in state.get("rules", {}).items():
            setattr(self, key, value)
        self.replicas = int(state["replicas"])
        self.scales = torch.tensor(state["scales"], dtype=torch.float64)
        self.last_division = [int(v) for v in state["last_division"]]
        self.updates, self.skipped = int(state["updates"]), int(state.get("skipped", 0))
        self._device_scales.clear()


# ------------------------------------------------------------------------------------------------------------------
# The autograd ops around a resblock's branch
# ------------------------------------------------------------------------------------------------------------------

class _BranchInput(torch.autograd.Function):
    """Forward: identity. Backward: the outgoing gradient ÷ s_k in fp32, Inf/NaN → 0 (recorded), back to x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scaler: ResblockGradScaler, k: int) -> torch.Tensor:
        ctx.scaler, ctx.k, ctx.dtype = scaler, k, x.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.float() / ctx.scaler.applied_scale(ctx.k, grad.device)
        finite = torch.isfinite(g)
        ctx.scaler.record_nonfinite(ctx.k, ~finite.all())
        g = torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))
        return g.to(ctx.dtype), None, None


class _BranchOutput(torch.autograd.Function):
    """Forward: cast the branch output to the residual stream's dtype. Backward: incoming gradient × s_k in fp32, then
    cast to the branch's dtype (this is where fp16 overflows when s_k is too large)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, scaler: ResblockGradScaler, k: int, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.scaler, ctx.k, ctx.dtype = scaler, k, y.dtype
        return y.to(out_dtype) if y.dtype != out_dtype else y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.float() * ctx.scaler.applied_scale(ctx.k, grad.device)
        return g.to(ctx.dtype), None, None, None


def scaled_branch_input(x: torch.Tensor, scaler: ResblockGradScaler, k: int) -> torch.Tensor:
    return _BranchInput.apply(x, scaler, k)


def scaled_branch_output(y: torch.Tensor, scaler: ResblockGradScaler, k: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _BranchOutput.apply(y, scaler, k, out_dtype)


# ------------------------------------------------------------------------------------------------------------------
# Before the optimizer
# ------------------------------------------------------------------------------------------------------------------

def _any_nonfinite(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([~torch.isfinite(g).all() for g in grads]).any()


def unscale_block_grads_(blocks: Sequence[nn.Module], scaler: ResblockGradScaler,
                         other_params: Iterable[nn.Parameter] = ()) -> bool:
    """Divide each block's parameter gradients (``.grad``) by the scale applied in its backward, record nonfinite
    parameter gradients per block (and in ``other_params``: embeddings, heads), all-reduce the flags, and return True
    when the update must be skipped. Call once per optimizer step, after the last backward of the step, then
    :meth:`ResblockGradScaler.update`.

    ``blocks[k]`` must be the module whose branch used scale k (its parameters are exactly the scaled ones).
    """
    if len(blocks) != scaler.num_blocks:
        raise ValueError(f"unscale_block_grads_: {len(blocks)} blocks for {scaler.num_blocks} scales")
    if scaler.unscale_in_hooks:
        raise RuntimeError("unscale_block_grads_: the gradients were already unscaled by install_unscale_hooks")
    for k, block in enumerate(blocks):
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        if not grads:
            continue
        s = scaler.applied_scale(k, grads[0].device)
        for g in grads:  # in fp32: s_k/M can exceed fp16's range
            g.div_(s.to(g.dtype)) if g.dtype in (torch.float32, torch.float64) else g.copy_(g.float() / s)
        scaler.record_nonfinite(k, _any_nonfinite(grads))
    others = [p.grad for p in other_params if p.grad is not None]
    if others:
        scaler.record_other_nonfinite(_any_nonfinite(others))
    flags, other = scaler.sync_flags()
    return any(flags) or other


def install_unscale_hooks(blocks: Sequence[nn.Module], scaler: ResblockGradScaler) -> list:
    """Unscale at the source instead: a gradient hook on every parameter of block k divides its gradient by the
    applied scale (in fp32) and records block k's nonfinite flag, before the gradient is accumulated into ``.grad``.

    This is the route under DeepSpeed ZeRO-1/2/3, whose own post-accumulate hooks move gradients into partitioned
    buffers during the backward (``.grad`` is not there to unscale afterwards). Nonfinite values are left in place, so
    DeepSpeed's overflow check skips the step as well. Returns the hook handles; afterwards
    :func:`unscale_block_grads_` refuses to run (it would divide twice).
    """
    if len(blocks) != scaler.num_blocks:
        raise ValueError(f"install_unscale_hooks: {len(blocks)} blocks for {scaler.num_blocks} scales")

    def make(k: int):
        def hook(g: torch.Tensor) -> torch.Tensor:
            u = g.float() / scaler.applied_scale(k, g.device)
            scaler.record_nonfinite(k, ~torch.isfinite(u).all())
            return u.to(g.dtype)
        return hook

    handles = [p.register_hook(make(k)) for k, block in enumerate(blocks) for p in block.parameters()
               if p.requires_grad]
    scaler.unscale_in_hooks = True
    return handles
