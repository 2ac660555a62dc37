"""The hierarchical PowerSGD reducer inside a DeepSpeed engine, as a trainer extension (see
:class:`dalle_ds.train.engine_loop.EngineLoop`).

DeepSpeed 0.19.8 has no communication-hook API; the hook points below were read in its source (and shown in
../shared/research/comm_anchors.md §3.4 to reproduce the stock reduction bit for bit):

* **ZeRO-0**: ``engine.enable_backward_allreduce = False`` turns the engine's own all-reduce off; at each
  gradient-accumulation boundary ``after_backward`` reduces every ``p.grad`` in place before ``engine.step()``.
  The fp32 ZeRO-0 engine never looks for overflow, so the optimizer's ``step`` is wrapped to skip (and report
  ``overflow``, which the engine reads to count the skipped step and hold the LR schedule) when the reducer says so.
* **ZeRO-1 and 2**: the engine's ``DeepSpeedZeroOptimizer`` is swapped (for the duration of ``deepspeed.initialize``)
  for a subclass whose ``gradient_reduction_w_predivide`` -- the call that receives each flat gradient bucket when
  ``zero_optimization.reduce_scatter`` is false -- runs the reducer on the bucket's parameters. ``reduce_scatter`` is
  therefore forced to false. The optimizer's own overflow check sees the Inf the reducer writes on a nonfinite flag
  and skips the step. ZeRO-2 reduces at every micro-batch (its buckets fill during backward), so with gradient
  accumulation each micro-batch is compressed on its own (error feedback carries what is lost). Without
  ``contiguous_gradients`` (DeepSpeed's default is true) the buckets bypass that call, so false is refused.
* **DeepSpeed's fp16 mode** is refused (its loss scale would leak into the error buffers, and ZeRO-0's skipped steps
  would never lower it); fp16 resblocks go through ``model.resblock_grad_scaling`` with fp32 master weights.
* **ZeRO-3** is refused: its reduction is a sharded reduce-scatter of flat chunks that do not line up with matrix
  rows, so it needs the strided chunk assignment sketched in comm_anchors §3.4; not built yet.

Which parameters are compressed is a regular expression on parameter names (default: the four matrices of every
resblock; embeddings, unembeddings, gains and biases stay fp32, paper E); a matching matrix whose longer side does
not split over the machine's ranks also stays fp32.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from dalle_ds.config import ConfigError
from dalle_ds.train.ds_config import zero_stage

from .powersgd import HierarchicalPowerSGD, PowerSGDSettings, ReduceReport
from .topology import Topology

__all__ = ["PowerSGDExtension"]

_SUMMED = ("shard_elements", "factor_elements", "uncompressed_elements", "bytes_intra", "bytes_inter",
           "bytes_uncompressed", "bytes_baseline", "nonfinite_grads", "zeroed_buffers", "recentered_elements")


class PowerSGDExtension:
    name = "powersgd"

    def __init__(self, cfg: Any):
        """``cfg``: a :class:`dalle_ds.config.PowerSGDConfig`."""
        self.cfg = cfg
        self.pattern = re.compile(cfg.compress)
        self.reducer: HierarchicalPowerSGD | None = None
        self._names: dict[int, str] = {}
        self._restore: tuple[Any, Any] | None = None
        self._acc = ReduceReport()  # summed over the reductions since the last stats() call
        self._acc_since_step = 0  # engine step at the last stats() call
        self._skip_counted_step = -1  # the step whose skip was last counted (ZeRO-1/2 reduce several buckets a step)
        self.skipped_steps = 0
        self.compressed_keys: list[str] = []
        self._pending_skip = False

    # -- EngineLoop hooks ---------------------------------------------------------------------------------------
    def before_initialize(self, model: torch.nn.Module, ds_config: dict) -> None:
        self.stage = zero_stage(ds_config)
        if self.stage >= 3:
            raise ConfigError("powersgd: ZeRO stage 3 is not supported (its flat reduce-scatter chunks do not follow "
                             "matrix rows); use ZeRO stage 0, 1 or 2 with powersgd.enabled")
        _check_precision(ds_config)
        if self.stage in (1, 2):
            _check_zero_reduction_path(ds_config)
            zo = ds_config.setdefault("zero_optimization", {})
            zo["reduce_scatter"] = False  # route every bucket through gradient_reduction_w_predivide
            import deepspeed.runtime.engine as ds_engine
            base = ds_engine.DeepSpeedZeroOptimizer
            self._restore = (ds_engine, base)
            ds_engine.DeepSpeedZeroOptimizer = _zero_optimizer_with(base, self)
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]

    def setup(self, loop) -> None:
        if self._restore is not None:
            module, base = self._restore
            module.DeepSpeedZeroOptimizer = base
            self._restore = None
        self.engine = loop.engine
        self._acc_since_step = self.engine.global_steps
        topo = Topology.build(self.cfg.local_size)
        settings = PowerSGDSettings(rank=self.cfg.rank, start_step=self.cfg.start_step, seed=self.cfg.seed,
                                    orthogonalization=self.cfg.orthogonalization,
                                    warm_start=self.cfg.warm_start, error_dtype=self.cfg.error_dtype,
                                    recenter_every=self.cfg.recenter_every, track_rounding=self.cfg.diagnostics)
        self.reducer = HierarchicalPowerSGD(topo, settings, device=loop.device)
        self.compressed_keys = [n for n, shape in self._shapes
                                if self.pattern.search(n) and self.reducer.register(n, shape)]
        if not self.compressed_keys:
            raise ConfigError(f"powersgd: no parameter matches powersgd.compress={self.cfg.compress!r} (or none "
                             f"splits over {topo.local_size} ranks per machine); nothing would be compressed")
        if self.stage == 0:
            self.engine.enable_backward_allreduce = False
            self._wrap_optimizer_step(self.engine.optimizer)

    def after_backward(self, loop, micro: int) -> None:
        if self.stage != 0 or not self.engine.is_gradient_accumulation_boundary():
            return
        grads = [(self._names[id(p)], p.grad) for p in self.engine.module.parameters() if p.grad is not None]
        self.reduce(grads)

    def stats(self) -> dict[str, float]:
        """Since the previous call: compression rate, bytes per optimizer step (intra + inter + fp32 rest, and a
        fp32 ring all-reduce of everything for comparison), error buffers zeroed for being nonfinite (this rank) and
        buffer elements re-centered (this rank); now: skipped steps so far, error-buffer norm, and with
        ``powersgd.diagnostics`` the delayed / machine-specific split of the buffers (a collective)."""
        a, self._acc = self._acc, ReduceReport()
        steps = max(1, self.engine.global_steps - self._acc_since_step)
        self._acc_since_step = self.engine.global_steps
        out = {"powersgd/skipped_steps": float(self.skipped_steps), "powersgd/zeroed_buffers": float(a.zeroed_buffers)}
        if self.cfg.recenter_every:
            out["powersgd/recentered_elements"] = float(a.recentered_elements)
        if a.shard_elements:
            out["powersgd/compression_rate"] = 1.0 - a.factor_elements / a.shard_elements
        sent = a.bytes_intra + a.bytes_inter + a.bytes_uncompressed
        if sent:
            out.update({"powersgd/bytes_sent": sent / steps, "powersgd/bytes_inter_machine": a.bytes_inter / steps,
                        "powersgd/bytes_uncompressed": a.bytes_uncompressed / steps,
                        "powersgd/bytes_baseline_fp32": a.bytes_baseline / steps})
        if self.reducer is not None and self.reducer.shards:
            out["powersgd/error_norm"] = self.reducer.error_sq_norm() ** 0.5  # one buffer decoded at a time
            if self.cfg.diagnostics:
                out.update({f"powersgd/{k}": v for k, v in self.reducer.diagnostics().items()})
        return out

    def state_dict(self) -> dict:
        return {"reducer": self.reducer.state_dict(self.cfg.checkpoint_buffers), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.reducer.load_state_dict(state["reducer"])
        self.skipped_steps = int(state["skipped_steps"])

    # -- the reduction ------------------------------------------------------------------------------------------
    def reduce(self, grads: list[tuple[str, torch.Tensor]]) -> ReduceReport:
        rep = self.reducer.reduce_(grads, step=self.engine.global_steps)
        for k in _SUMMED:
            setattr(self._acc, k, getattr(self._acc, k) + getattr(rep, k))
        if rep.skip and self._skip_counted_step != self.engine.global_steps:
            self.skipped_steps += 1
            self._skip_counted_step = self.engine.global_steps
        self._pending_skip = self._pending_skip or rep.skip
        return rep

    def name_of(self, param: torch.nn.Parameter) -> str:
        return self._names[id(param)]

    def _wrap_optimizer_step(self, opt) -> None:
        """ZeRO-0 fp32: skip the optimizer step when the reducer flagged a nonfinite value, and tell the engine."""
        real_step = opt.step

        def step(*args, **kwargs):
            skip, self._pending_skip = self._pending_skip, False
            opt.overflow = skip
            return None if skip else real_step(*args, **kwargs)

        opt.overflow = False
        opt.step = step


def _check_precision(ds_config: dict) -> None:
    """Refuse DeepSpeed's fp16 mode. Its dynamic loss scale is lowered inside ``FP16_Optimizer.step()``, which a step
    the reducer skips never reaches (ZeRO-0: an overflow caused by the loss scale would repeat at every step), and in
    every stage the gradients the reducer sees are multiplied by the loss scale while its ``grad_scale`` is 1, so the
    error buffers would hold loss-scaled residuals that each loss-scale change (x2 or /2) silently rescales. The
    project's fp16 route is per-resblock scaling with fp32 master weights (``model.resblock_grad_scaling``, which
    already requires fp16.enabled=false), where the reducer divides by each resblock's scale."""
    from deepspeed.runtime.precision_config import get_float16_config  # how the engine reads the section
    if get_float16_config(ds_config).enabled:
        raise ConfigError("powersgd: not with DeepSpeed's fp16 mode (deepspeed config fp16.enabled is true): a step "
                          "PowerSGD skips never reaches FP16_Optimizer.step(), where the loss scale is lowered, and "
                          "its error buffers would hold loss-scaled residuals; set fp16.enabled=false and use bf16, "
                          "fp32, or fp16 resblocks with model.resblock_grad_scaling "
                          "(ds_configs/zero*_fp16_resblock.json)")


def _check_zero_reduction_path(ds_config: dict) -> None:
    """ZeRO-1/2 must reach the hooked ``gradient_reduction_w_predivide``. In DeepSpeed 0.19.8
    (runtime/zero/stage_1_and_2.py) ``reduce_ipg_grads`` calls it (through ``average_tensor``) only when
    ``self.contiguous_gradients``; otherwise the bucket goes to ``buffered_reduce_fallback`` (or
    ``_buffered_reduce_fallback_preserving_fp32``), a plain ``allreduce_bucket`` that PowerSGD never sees. The
    optimizer sets ``contiguous_gradients = contiguous_gradients or self.cpu_offload`` (an ``offload_optimizer``
    device other than "none" forces it on), and the key defaults to true: read both the way the engine does."""
    from deepspeed.runtime.zero.config import get_zero_config
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    zc = get_zero_config(ds_config)
    offload = zc.offload_optimizer is not None and zc.offload_optimizer.device != OffloadDeviceEnum.none
    if not (zc.contiguous_gradients or offload):
        raise ConfigError("powersgd: zero_optimization.contiguous_gradients is false, which sends DeepSpeed's "
                          "ZeRO-1/2 reduction through buffered_reduce_fallback, a plain all-reduce that never calls "
                          "the hook PowerSGD replaces, so nothing would be compressed; set "
                          "zero_optimization.contiguous_gradients=true (DeepSpeed's default) or remove the key")


def _zero_optimizer_with(base: type, ext: PowerSGDExtension) -> type:
    """A ``DeepSpeedZeroOptimizer`` subclass whose full-bucket all-reduce is the PowerSGD reducer."""

    class PowerSGDZeroOptimizer(base):
        def gradient_reduction_w_predivide(self, tensor, communication_data_type):
            if tensor.numel() == 0:
                return tensor
            bucket = self.ipg_buckets[communication_data_type]
            grads, offset = [], 0
            for group, index, _ in bucket.params:
                p = self.bit16_groups[group][index]
                grads.append((ext.name_of(p), tensor.narrow(0, offset, p.numel()).view(p.shape)))
                offset += p.numel()
            if offset != tensor.numel():
                raise RuntimeError(f"powersgd: bucket layout mismatch ({offset} parameter elements, bucket of "
                                   f"{tensor.numel()}); this DeepSpeed version lays buckets out differently")
            ext.reduce(grads)
            return tensor

    PowerSGDZeroOptimizer.__name__ = PowerSGDZeroOptimizer.__qualname__ = f"PowerSGD{base.__name__}"
    return PowerSGDZeroOptimizer
