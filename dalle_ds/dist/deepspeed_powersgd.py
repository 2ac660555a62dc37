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
* **ZeRO-3**: the engine's ``DeepSpeedZeroOptimizer_Stage3`` is swapped (for the duration of
  ``deepspeed.initialize``; the engine imports the name from ``deepspeed.runtime.zero.stage3`` when it builds the
  optimizer) for a subclass whose ``__avg_scatter_grads`` -- the call that receives each bucket's full gradients
  (parameter shapes) when ``zero_optimization.reduce_scatter`` is true, and must return this rank's flat partition of
  each, averaged -- runs the reducer and returns the partitions (:meth:`HierarchicalPowerSGD.reduce_partitions_`).
  ``reduce_scatter`` is therefore forced to true. A nonfinite flag makes the global gradient norm infinite (the Inf
  lands in one rank's partition; the norm is summed over ranks), and ZeRO-3 skips the step on an invalid norm.
  ZeRO++'s quantized gradients (qgZ, another reduction), a ``gradient_predivide_factor`` other than 1 and engines
  that build another optimizer class (MiCS, SuperOffload) are refused.

Which parameters are compressed is a regular expression on parameter names (default: the four matrices of every
resblock; embeddings, unembeddings, gains and biases stay fp32, paper E); a matching matrix whose longer side does
not split over the machine's ranks also stays fp32.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch

from dalle_ds.config import ConfigError
from dalle_ds.train.ds_config import nonfinite_check_off, zero_stage

from .powersgd import HierarchicalPowerSGD, PowerSGDSettings, ReduceReport, zero3_chunk
from .topology import Topology

__all__ = ["PowerSGDExtension"]

log = logging.getLogger("dalle_ds.powersgd")

# what the host knows after each reduction (sizes and bytes); the nonfinite and zeroed counts and the skip flag stay
# on the device (``ReduceReport.counts``) until a log step or a checkpoint reads them
_SUMMED = ("shard_elements", "factor_elements", "uncompressed_elements", "bytes_intra", "bytes_inter",
           "bytes_uncompressed", "bytes_baseline", "recentered_elements")


class PowerSGDExtension:
    name = "powersgd"

    def __init__(self, cfg: Any):
        """``cfg``: a :class:`dalle_ds.config.PowerSGDConfig`."""
        self.cfg = cfg
        self.pattern = re.compile(cfg.compress)
        self.reducer: HierarchicalPowerSGD | None = None
        self._names: dict[int, str] = {}
        self._restore: tuple[Any, str, type] | None = None  # (module, class attribute, DeepSpeed's class)
        self._acc = ReduceReport()  # summed over the reductions since the last stats() call
        self._acc_since_step = 0  # engine step at the last stats() call
        self._counts: torch.Tensor | None = None  # device: [nonfinite gradients, zeroed buffers] since stats()
        # skipped steps: those read so far (host), those not yet read (device), and the current step's flag (device,
        # the max over its reductions: ZeRO-1/2/3 reduce several buckets and micro-batches a step)
        self._skipped_host = 0
        self._skipped_dev: torch.Tensor | None = None
        self._step_flag: torch.Tensor | None = None
        self._flag_step = -1
        self.compressed_keys: list[str] = []
        self._pending_skip: torch.Tensor | None = None  # ZeRO-0: read by the wrapped optimizer step

    # -- EngineLoop hooks ---------------------------------------------------------------------------------------
    def before_initialize(self, model: torch.nn.Module, ds_config: dict) -> None:
        self.stage = zero_stage(ds_config)
        _check_precision(ds_config)
        if self.stage in (1, 2):
            _check_zero_reduction_path(ds_config)
            off = nonfinite_check_off(ds_config)
            if off:
                raise ConfigError(f"powersgd: {off} turns off DeepSpeed's check for nonfinite gradients in ZeRO-"
                                  f"{self.stage}, and PowerSGD skips an update by leaving an Inf for that check; "
                                  "remove the key")
            zo = ds_config.setdefault("zero_optimization", {})
            zo["reduce_scatter"] = False  # route every bucket through gradient_reduction_w_predivide
            import deepspeed.runtime.engine as module
            attr, make = "DeepSpeedZeroOptimizer", _zero_optimizer_with
        elif self.stage == 3:
            _check_zero3_reduction_path(ds_config)
            ds_config.setdefault("zero_optimization", {})["reduce_scatter"] = True  # route buckets to __avg_scatter_grads
            import deepspeed.runtime.zero.stage3 as module
            attr, make = "DeepSpeedZeroOptimizer_Stage3", _zero3_optimizer_with
        if self.stage >= 1:
            base = getattr(module, attr)
            self._restore = (module, attr, base)
            self._hooked_class = attr
            setattr(module, attr, make(base, self))
        self._names = {id(p): n for n, p in model.named_parameters()}
        # under deepspeed.zero.Init a parameter's own shape is empty; ds_shape is the full one
        self._shapes = [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in model.named_parameters()
                        if p.requires_grad]

    def restore_deepspeed(self) -> None:
        """Put back the DeepSpeed ZeRO optimizer class that :meth:`before_initialize` swapped out (a no-op when
        there is none). :meth:`setup` does it; a caller whose ``deepspeed.initialize`` failed calls it, so that the
        next engine built in the process is not hooked to this extension."""
        if self._restore is not None:
            module, attr, base = self._restore
            setattr(module, attr, base)
            self._restore = None

    def setup(self, loop) -> None:
        self.restore_deepspeed()
        opt = loop.engine.optimizer
        if self.stage >= 1 and not getattr(opt, "_powersgd_hooked", False):
            raise ConfigError(f"powersgd: DeepSpeed built a {type(opt).__name__} for ZeRO stage {self.stage}, not the "
                              f"{self._hooked_class} whose gradient reduction PowerSGD replaces (MiCS and SuperOffload "
                              "build their own optimizer classes); nothing would be compressed")
        self.engine = loop.engine
        self._acc_since_step = self.engine.global_steps
        topo = Topology.build(self.cfg.local_size)
        if topo.rank == 0:
            log.info("powersgd: %s", topo.describe())
            if topo.machines == 1:
                log.warning("powersgd: all %d rank(s) are on one machine, so nothing crosses machines and PowerSGD "
                            "saves no bytes while its low-rank estimate still replaces the exact average; turn "
                            "powersgd.enabled off, or set powersgd.local_size below the rank count to emulate "
                            "several machines (tests)", topo.world_size)
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
        counts, self._counts = self._counts, None
        steps = max(1, self.engine.global_steps - self._acc_since_step)
        self._acc_since_step = self.engine.global_steps
        zeroed = float(counts[1]) if counts is not None else 0.0
        out = {"powersgd/skipped_steps": float(self.skipped_steps), "powersgd/zeroed_buffers": zeroed}
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

    def load_resharded_state(self, state: dict) -> None:
        """Resuming on another number of ranks (``state``: old rank 0's). The error buffers and Q matrices belong to
        the old machines' shards of each matrix, which no longer exist: error feedback starts again from zero (the
        residual not yet sent is dropped once, as at the first step of a run) and Q from its initialization."""
        old = state["reducer"]
        log.warning("PowerSGD: the checkpoint's error buffers are for %d machine(s) x %d rank(s), this job has %d x "
                    "%d: error feedback restarts from zero", old["machines"], old["local_size"],
                    self.reducer.topo.machines, self.reducer.topo.local_size)
        self.skipped_steps = int(state["skipped_steps"])

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps the reducer flagged for skipping so far (reads the device's count: log steps and
        checkpoints only)."""
        self._fold_step_flag()
        if self._skipped_dev is not None:
            self._skipped_host += int(self._skipped_dev.item())
            self._skipped_dev = None
        return self._skipped_host

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_host, self._skipped_dev, self._step_flag = int(value), None, None

    def _fold_step_flag(self) -> None:
        if self._step_flag is not None:
            f, self._step_flag = self._step_flag, None
            self._skipped_dev = f if self._skipped_dev is None else self._skipped_dev + f

    # -- the reduction ------------------------------------------------------------------------------------------
    def reduce(self, grads: list[tuple[str, torch.Tensor]]) -> ReduceReport:
        """Reduce in place, without reading the device back (this runs inside DeepSpeed's gradient hooks)."""
        rep = self.reducer.reduce_(grads, step=self.engine.global_steps, resolve=False)
        self._account(rep)
        return rep

    def _account(self, rep: ReduceReport) -> None:
        for k in _SUMMED:
            setattr(self._acc, k, getattr(self._acc, k) + getattr(rep, k))
        if rep.counts is None:  # a ZeRO-3 warm-up step: DeepSpeed's own check sees any nonfinite partition
            return
        c = rep.counts
        self._counts = c[1:] if self._counts is None else self._counts + c[1:]
        if self.engine.global_steps != self._flag_step:
            self._fold_step_flag()
            self._flag_step = self.engine.global_steps
        self._step_flag = c[0] if self._step_flag is None else torch.maximum(self._step_flag, c[0])
        if getattr(self, "stage", None) == 0:
            self._pending_skip = c[0] if self._pending_skip is None else torch.maximum(self._pending_skip, c[0])

    def reduce_partitions(self, params: list, group, dtype: torch.dtype) -> list[torch.Tensor]:
        """ZeRO-3: reduce the full gradients of ``params`` (a bucket) and return this rank's flat partition of each,
        averaged over the job, in ``dtype`` (DeepSpeed's ``__avg_scatter_grads`` contract)."""
        import torch.distributed as dist
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        topo = self.reducer.topo
        if world != topo.world_size or rank != topo.rank:
            raise RuntimeError(f"powersgd: ZeRO-3 partitions these gradients over {world} ranks (this one is {rank} "
                               f"there), not over the whole job ({topo.world_size} ranks, this one {topo.rank}); "
                               "expert or sequence parallelism is not supported")
        grads = []
        for p in params:
            if p.partition_numel() != zero3_chunk(p.ds_numel, world):
                raise RuntimeError(f"powersgd: {self.name_of(p)} has a ZeRO-3 partition of {p.partition_numel()} "
                                   f"elements, not ceil({p.ds_numel} / {world}); this DeepSpeed version partitions "
                                   "differently")
            grads.append((self.name_of(p), p.grad.view(p.ds_shape)))
        rep, parts = self.reducer.reduce_partitions_(grads, step=self.engine.global_steps, resolve=False)
        self._account(rep)
        return [t.to(dtype) for t in parts]

    def name_of(self, param: torch.nn.Parameter) -> str:
        return self._names[id(param)]

    def _wrap_optimizer_step(self, opt) -> None:
        """ZeRO-0 fp32: skip the optimizer step when the reducer flagged a nonfinite value, and tell the engine."""
        real_step = opt.step

        def step(*args, **kwargs):
            pending, self._pending_skip = self._pending_skip, None
            skip = pending is not None and bool(pending)  # the step's one read of the reducer's flag
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


def _check_zero3_reduction_path(ds_config: dict) -> None:
    """ZeRO-3 must reach the hooked ``__avg_scatter_grads`` with plain averaging. ZeRO++'s quantized gradients
    (``zero_quantized_gradients``) reduce through their own all-to-all inside that call, which PowerSGD replaces
    (qgZ would silently not run), and the hook averages over the job, so ``gradient_predivide_factor`` must be 1 (it
    is only a numerical device of the stock path)."""
    from deepspeed.runtime.zero.config import get_zero_config
    zc = get_zero_config(ds_config)
    if zc.zero_quantized_gradients:
        raise ConfigError("powersgd: not with zero_optimization.zero_quantized_gradients (ZeRO++ qgZ is another "
                          "compressed gradient reduction, and PowerSGD replaces the call that runs it); set it false")
    factor = float(ds_config.get("gradient_predivide_factor", 1.0))
    if factor != 1.0:
        raise ConfigError(f"powersgd: gradient_predivide_factor={factor} under ZeRO-3; the PowerSGD reduction "
                          "averages over the job itself, remove the key (or set 1.0)")


def _zero3_optimizer_with(base: type, ext: PowerSGDExtension) -> type:
    """A ``DeepSpeedZeroOptimizer_Stage3`` subclass whose bucket reduce-scatter is the PowerSGD reducer."""

    class PowerSGDZeroOptimizerStage3(base):
        _powersgd_hooked = True

        # the name-mangled private method that reduce-scatters one bucket's full gradients (stage3.py, 0.19.8)
        def _DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads(self, params_to_reduce, communication_data_type):
            group = self._get_param_partition_group(params_to_reduce[0])
            return ext.reduce_partitions(params_to_reduce, group, self.gradient_accumulation_dtype)

    PowerSGDZeroOptimizerStage3.__name__ = PowerSGDZeroOptimizerStage3.__qualname__ = f"PowerSGD{base.__name__}"
    return PowerSGDZeroOptimizerStage3


def _zero_optimizer_with(base: type, ext: PowerSGDExtension) -> type:
    """A ``DeepSpeedZeroOptimizer`` subclass whose full-bucket all-reduce is the PowerSGD reducer."""

    class PowerSGDZeroOptimizer(base):
        _powersgd_hooked = True

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
