"""Exponential moving average of the weights (paper: "an exponential moving average of the weights", decay 0.999
for the dVAE), kept in fp32 whatever the training precision.

``torch.optim.swa_utils.AveragedModel`` keeps the average in the model's own dtype; under bf16 training a 0.999
average of bf16 weights would lose every update smaller than bf16's resolution, so this keeps an fp32 shadow.
Under ZeRO-3 each rank averages only its own partition of every parameter (``param.ds_tensor``), so the EMA costs
1/world of the model per rank; :meth:`EMA.model_state_dict` gathers the partitions (a collective there).

The paper's prior (App. B.2) averages "by asynchronously copying the model parameters from the GPU to the CPU once
every 25 updates, using a decay coefficient of 0.99": ``every`` and ``host`` do that. With ``host`` the shadow lives
in host memory, which frees 4 bytes per parameter of GPU memory (per parameter of the rank's partition under
ZeRO-3; of the whole model under ZeRO 0-2). At each ``every``-th update the parameters are copied into pinned host
buffers without a host wait (in their own dtype: 2 bytes per bf16 parameter cross the link), and a worker thread
waits for the copy and folds it into the shadow, while the training loop goes on queueing GPU work. The fold is
finished before the next one starts and before the shadow is read (state, weights, export), so the average holds
the same values as a synchronous update's, only computed later.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from dalle_ds.dist.collectives import all_gather_anywhere


def _local(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: the ZeRO-3 partition if there is one, else the tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


#: fp32 copies of non-fp32 (bf16 / fp16) parameters made per ``torch._foreach_lerp_`` call in :meth:`EMA.update`;
#: fp32 parameters are averaged in place of any copy. Bounds the update's extra memory at this, not an fp32 model.
UPDATE_CHUNK_BYTES = 64 << 20


class EMA:
    """``decay``: per update; ``every``: average at every ``every``-th optimizer step (:meth:`step`); ``host``: keep
    the shadow in host memory and fold the parameters into it asynchronously (see the module docstring)."""

    def __init__(self, module: nn.Module, decay: float, every: int = 1, host: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"EMA every must be an int ≥ 1, got {every!r}")
        self.decay, self.every, self.host = decay, every, bool(host)
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.sharded = any(hasattr(p, "ds_tensor") for _, p in named)
        self.full_shapes = [tuple(getattr(p, "ds_shape", p.shape)) for _, p in named]
        locals_ = [_local(p).detach() for _, p in named]
        self.shadow = [t.float().to("cpu" if host else t.device, copy=True) for t in locals_]
        self.updates = 0
        self._staging: list[torch.Tensor] = []
        self._pending: Future | None = None
        self._worker: ThreadPoolExecutor | None = None
        if host:
            pin = any(t.is_cuda for t in locals_)  # pinned buffers make the device-to-host copies asynchronous
            self._staging = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in locals_]
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema-fold")

    def step(self, global_step: int, params: Iterable[torch.Tensor]) -> bool:
        """Average after optimizer step ``global_step`` if it is a multiple of ``every``; returns whether it did."""
        if global_step % self.every:
            return False
        if self.host:
            self._update_host(params)
        else:
            self.update(params)
        return True

    def wait(self) -> None:
        """Finish a pending host fold (a no-op on the device path); reading the shadow does this first."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    @torch.no_grad()
    def _update_host(self, params: Iterable[torch.Tensor]) -> None:
        self.wait()  # the worker reads the staging buffers until its fold is done
        copied_on = set()
        for buf, p in zip(self._staging, params, strict=True):
            src = _local(p).detach()
            buf.copy_(src, non_blocking=src.is_cuda)
            if src.is_cuda:
                copied_on.add(src.device)
        done = []
        for dev in copied_on:  # the copies are queued on each device's current stream; the worker waits for them
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))
            done.append(event)
        first = self.updates == 0
        self.updates += 1
        self._pending = self._worker.submit(self._fold, done, first)

    @torch.no_grad()
    def _fold(self, done: list, first: bool) -> None:
        for event in done:
            event.synchronize()
        weight = 1.0 - self.decay
        for shadow, buf in zip(self.shadow, self._staging):
            if first:
                shadow.copy_(buf)
            else:
                shadow.lerp_(buf.float(), weight)

    @torch.no_grad()
    def update(self, params: Iterable[torch.Tensor]) -> None:
        """``shadow += (1 - decay) * (param - shadow)`` (the first update copies), a group of tensors at a time: an
        fp32 parameter is read as it is, and fp32 copies of lower-precision ones exist for one group only
        (:data:`UPDATE_CHUNK_BYTES`), not for the whole model at once. The same lerp, element for element, as one
        ``torch._foreach_lerp_`` over all of them."""
        weight = 1.0 - self.decay
        shadows: list[torch.Tensor] = []
        currents: list[torch.Tensor] = []
        copied = 0

        def flush() -> None:
            if shadows:
                if self.updates == 0:
                    torch._foreach_copy_(shadows, currents)
                else:
                    torch._foreach_lerp_(shadows, currents, weight)
                shadows.clear()
                currents.clear()

        for shadow, p in zip(self.shadow, params, strict=True):
            t = _local(p).detach()
            if t.dtype != torch.float32:
                copied += t.numel() * 4
            shadows.append(shadow)
            currents.append(t.float())  # no copy for an fp32 tensor
            if copied >= UPDATE_CHUNK_BYTES:
                flush()
                copied = 0
        flush()
        self.updates += 1

    def state_dict(self) -> dict:
        """This rank's state (under ZeRO-3: its partitions; each rank checkpoints its own). With ``host`` its
        tensors are the shadow itself (no second host copy of it): save them before the next :meth:`step`."""
        self.wait()
        return {"decay": self.decay, "updates": self.updates, "sharded": self.sharded,
                "shadow": {n: t.cpu() for n, t in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        self.wait()
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        # the decay stays this run's (config ema_decay; a resume that changes it is warned about and then applies it)
        self.updates = int(state["updates"])
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state["shadow"][n])

    def load_resharded(self, old: Sequence[dict]) -> None:
        """Under ZeRO-3, on another number of ranks than the run that saved it: this rank's partitions, cut from the
        per-rank states ``old`` (in rank order) of that run. DeepSpeed partitions a parameter as its flattened
        elements padded to a multiple of the world size, rank r holding the r-th equal share; each old state holds one
        such share of the old world, this rank's shadow has the size of its share of the new one. The states may be
        loaded with ``mmap=True``: only the slices this rank needs are read."""
        if not self.sharded:
            raise ValueError("EMA.load_resharded is for ZeRO-3 partitions; an unsharded EMA loads its whole state")
        self.wait()
        self.updates = int(old[0]["updates"])  # the decay stays this run's, as in load_state_dict
        me = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        for i, (n, shape) in enumerate(zip(self.names, self.full_shapes)):
            shards = [s["shadow"][n].reshape(-1) for s in old]
            numel = math.prod(shape)
            if sum(t.numel() for t in shards) < numel:
                raise ValueError(f"EMA states of {len(old)} rank(s) hold fewer than the {numel} elements of {n}")
            mine = self.shadow[i].view(-1)
            mine.zero_()  # the padding past the last element stays zero
            lo, hi = me * mine.numel(), min((me + 1) * mine.numel(), numel)
            old_part = shards[0].numel()
            pos = lo
            while pos < hi:  # copy from each old share that overlaps [lo, hi)
                k, off = divmod(pos, old_part)
                take = min(hi - pos, old_part - off)
                mine[pos - lo: pos - lo + take].copy_(shards[k][off: off + take])
                pos += take

    def model_state_dict(self, dst: int | None = None) -> dict[str, torch.Tensor]:
        """The averaged weights under the module's parameter names (fp32, on CPU). Collective under ZeRO-3.

        ``dst``: the only rank that uses them; the others get ``{}`` and skip the host copy (under ZeRO-3 they
        still take part in every gather, which needs all ranks). None: every rank gets them."""
        self.wait()
        keep = dst is None or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == dst
        if not self.sharded:
            return {n: t.detach().cpu().clone() for n, t in zip(self.names, self.shadow)} if keep else {}
        out = {}
        for n, shard, shape in zip(self.names, self.shadow, self.full_shapes):
            # every rank's partition (equal sizes, padded); a CPU partition (ZeRO-3 offload_param) goes through the
            # GPU on NCCL, which takes CUDA tensors only
            parts = all_gather_anywhere(shard.contiguous())
            if keep:
                numel = int(torch.tensor(shape).prod()) if shape else 1
                out[n] = parts.flatten()[:numel].view(shape).cpu()
        return out

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into an ordinary (unsharded) module of the same architecture (collective under
        ZeRO-3). Unsharded, each weight is copied from the average where it is, with no trip through the host."""
        self.wait()
        if self.sharded:
            weights = self.model_state_dict()
            for n, p in module.named_parameters():
                p.copy_(weights[n].to(p.dtype))
            return
        shadow = dict(zip(self.names, self.shadow))
        for n, p in module.named_parameters():
            p.copy_(shadow[n])
