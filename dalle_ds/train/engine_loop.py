"""What every trainer here shares: a DeepSpeed engine around the model, an fp32 EMA of the weights, a resumable
data order, atomic checkpoints with exact resume, a stop with a checkpoint on SIGTERM / SIGINT / SIGUSR1
(:mod:`dalle_ds.train.preemption`), a tqdm bar on rank 0, and metrics through DeepSpeed's monitors.

A subclass provides ``train_step(batches) -> dict`` (one optimizer update; it may call ``self.micro_steps``),
``evaluate(tag) -> dict | None`` and ``finish(summary, ema_weights)``; ``train()`` runs the loop. The statistics a
``train_step`` returns may be Python numbers or 0-dim tensors on the device: only those of a logged step are read,
all at once, so the host does not wait for the GPU after every micro-batch (each ``float(tensor)`` would).

Extensions (e.g. a gradient reducer) plug into the engine's life cycle; each may define any of:
``before_initialize(model, ds_config)`` (before ``deepspeed.initialize``; may edit the config dict),
``client_optimizer() -> (model_parameters, optimizer factory)`` (what ``deepspeed.initialize`` gets instead of the
config's optimizer), ``client_lr_scheduler(ds_config) -> (ds_config, scheduler factory)`` (the config and client
scheduler ``deepspeed.initialize`` gets), ``after_initialize(engine)`` (right after it, before the EMA copies the
weights), ``setup(loop)`` (after that, before resume), ``after_backward(loop, micro)`` (after every
``engine.backward``), ``after_update(loop, stats)`` (after every ``train_step``, with its statistics),
``stats() -> dict`` (called at each logged step, merged into its statistics; it covers the steps since the previous
call), ``before_save(loop)`` (on every rank, before a checkpoint is written), ``state_dict()`` /
``load_state_dict(state)`` (this rank's state, saved in the checkpoint's per-rank file), ``load_resharded_state(
state)`` (resuming on another number of ranks: old rank 0's state; without it, ``load_state_dict`` takes that),
``after_universal_load(engine)`` (right after DeepSpeed loaded a universal checkpoint). Each has a unique ``name``.

A DeepSpeed config whose scheduler is ``PlateauHalving`` (the paper's halving on plateaus, :mod:`dalle_ds.train.
plateau`) adds the extension that runs it.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dalle_ds.precision.native import bf16_is_native
from dalle_ds.train import checkpoint as ckpt
from dalle_ds.train.data_loading import StepBatches
from dalle_ds.train.ds_config import precision_mode, zero_stage
from dalle_ds.train.distributed import (all_reduce_mean, barrier, check_same_on_every_rank, device, is_rank0,
                                         rank, world_size)
from dalle_ds.train.ema import EMA
from dalle_ds.train.monitor_resume import continue_logs
from dalle_ds.train.plateau import PlateauExtension, plateau_params
from dalle_ds.train.preemption import StopSignals
from dalle_ds.utils.seeds import seed63

log = logging.getLogger("dalle_ds.train")


class WaitTimed:
    """An iterator that adds up the seconds its ``next`` spends waiting for the wrapped one (the DataLoader)."""

    def __init__(self, it):
        self.it, self.waited = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.waited += time.perf_counter() - start


class Pace:
    """Training pace since the last logged step: ``perf/step_seconds`` (host wall time per update),
    ``perf/samples_per_second`` (global batch × updates / seconds) and ``perf/data_wait_fraction`` (the share of
    that time the loop waited for batches: above a few percent, the data workers hold the GPUs back; add
    ``data.num_workers``). Saves and evaluations are left out (``restart`` after them). On a GPU the host runs
    ahead of the device between the steps whose statistics it reads, so over an interval ending at such a read the
    host time is the device's."""

    def __init__(self, step: int, batches: WaitTimed):
        self.batches = batches
        self.restart(step)

    def restart(self, step: int) -> None:
        self.step, self.start, self.waited = step, time.perf_counter(), self.batches.waited

    def stats(self, step: int, global_batch: int) -> dict[str, float]:
        seconds, updates = time.perf_counter() - self.start, step - self.step
        if updates <= 0 or seconds <= 0:
            return {}
        return {"perf/step_seconds": seconds / updates, "perf/samples_per_second": updates * global_batch / seconds,
                "perf/data_wait_fraction": (self.batches.waited - self.waited) / seconds}


def parameter_count(model: torch.nn.Module) -> int:
    """The model's parameter count, ZeRO-3 partitioned or not (the trainers log it): a partitioned parameter's
    ``numel()`` is 0 outside a gather, and its full size is ``ds_numel``."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


class EngineLoop:
    job_name = "train"
    tag_samples_with_epoch = False  # True: training samples carry "sample_key" (epoch, index); see StepBatches

    def __init__(self, cfg: Any, model: torch.nn.Module, ds_config: dict, run_dir: str | Path, train_ds: Dataset,
                 collate_fn: Callable, *, seed: int, num_workers: int, ema_decay: float, resume: bool = True,
                 extensions: list | tuple = (), ema_every: int = 1, ema_on_host: bool = False):
        import deepspeed

        if not resume:  # an earlier run's checkpoints and logs would mix with this one's (the dVAE; the prior and
            ckpt.set_aside_for_new_run(run_dir, self.job_name)  # CLIP do it first, before their tokenizer)
        self.extensions = list(extensions)
        plateau = plateau_params(ds_config)
        if plateau is not None:
            self.extensions.append(PlateauExtension(plateau))
        for ext in self.extensions:
            if hasattr(ext, "before_initialize"):
                ext.before_initialize(model, ds_config)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self._precision = precision_mode(ds_config)  # recorded in each checkpoint's layout (a resume must match it)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = device()
        self.seed = seed
        # Every rank reads the earlier run's configs (so a refusal ends all ranks alike, none left waiting in a
        # collective), then rank 0 replaces them.
        changed = ckpt.check_resume(self.run_dir, self.job_name, asdict(cfg), ds_config) if resume else []
        # The checkpoint to resume and how it was trained, read before this run's configs replace the earlier ones.
        # On another number of ranks, ZeRO's sharded optimizer state loads from DeepSpeed's universal form of it and
        # this loop's own per-rank state is regrouped (_load_resharded).
        self._resume_tag = ckpt.resume_tag(self.ckpt_dir) if resume else None
        if self._resume_tag is not None:
            ckpt.set_aside_later_tags(self.run_dir, self._resume_tag)
        self._saved_layout = (ckpt.saved_layout(self.run_dir, self.job_name, self._resume_tag)
                              if self._resume_tag is not None else None)
        reshard = self._saved_layout is not None and self._saved_layout["world_size"] != world_size()
        # Each rank opens the data itself; the sampler splits it by index, so a rank that read fewer samples (an
        # image it could not decode this time, other files under the same path) would train on overlapping ones.
        check_same_on_every_rank("the training set's size", len(train_ds),
                                 "every rank must read the same data (the same path on every node, every sample "
                                 "readable on every node)")
        barrier()
        if is_rank0():
            if changed:
                log.warning("resuming %s with a changed config: %s", self.run_dir, ", ".join(changed))
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / f"{self.job_name}_run_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            (self.run_dir / f"{self.job_name}_ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        model_parameters, client_optimizer = model.parameters(), None
        for ext in self.extensions:
            if hasattr(ext, "client_optimizer"):
                model_parameters, client_optimizer = ext.client_optimizer()
        engine_config, client_scheduler = ds_config, None
        for ext in self.extensions:
            if hasattr(ext, "client_lr_scheduler"):
                engine_config, client_scheduler = ext.client_lr_scheduler(engine_config)
        universal = reshard and zero_stage(ds_config) >= 1
        if universal:  # DeepSpeed reads <tag>/universal, made by ckpt.universal_tag, instead of the rank shards
            engine_config = {**engine_config, "checkpoint": {**engine_config.get("checkpoint", {}),
                                                             "load_universal": True}}
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model_parameters,
                                                     optimizer=client_optimizer, lr_scheduler=client_scheduler,
                                                     config=engine_config)
        if (is_rank0() and self.device.type == "cpu" and self.engine.torch_autocast_enabled()
                and self.engine.torch_autocast_dtype() == torch.bfloat16
                and not bf16_is_native(self.device)):
            log.warning("bf16 autocast on a CPU without native bf16 (AVX-512 BF16 / AMX) runs emulated and slower "
                        "than fp32: set torch_autocast.enabled=false in the DeepSpeed config")
        for ext in self.extensions:
            if hasattr(ext, "after_initialize"):
                ext.after_initialize(self.engine)
        self.ema = EMA(self.engine.module, ema_decay, every=ema_every, host=ema_on_host)
        # Since the last log, on the device: [sum of the finite global gradient norms, their count, how many of
        # them gradient_clipping scaled down] (float64; None until the first update that reports a norm).
        self._grad_norms: torch.Tensor | None = None
        for ext in self.extensions:
            if hasattr(ext, "setup"):
                ext.setup(self)
        self.batches = StepBatches(train_ds, self.engine.train_micro_batch_size_per_gpu(), world_size(), rank(),
                                   seed, num_workers, collate_fn, self.device,
                                   tag_epoch=self.tag_samples_with_epoch)
        self.resumed_from = None
        self._saved_step: int | None = None  # the step of the last committed checkpoint this process knows of
        if self._resume_tag is not None:
            if reshard and is_rank0():
                log.warning("resuming %s on %d rank(s); checkpoint %s was written by %d: %s", self.run_dir,
                            world_size(), self._resume_tag, self._saved_layout["world_size"],
                            "loading its universal form (ZeRO's optimizer state re-partitioned)" if universal
                            else "ZeRO-0 keeps no sharded state")
            state, own = ckpt.load_checkpoint(self.engine, self.ckpt_dir, self._resume_tag, universal=universal,
                                              own_state=not reshard)
            for ext in self.extensions if universal else ():
                if hasattr(ext, "after_universal_load"):
                    ext.after_universal_load(self.engine)
            if reshard:
                self._load_resharded(state)
            else:
                if (self.ema.sharded or self._stateful_extensions()) and own is None:
                    raise RuntimeError(f"checkpoint in {self.ckpt_dir} lacks this rank's own state (rank{rank()}.pt): "
                                       "was it written with a different ZeRO stage or extensions?")
                self.ema.load_state_dict(own["ema"] if self.ema.sharded else state["ema"])
                for ext in self._stateful_extensions():
                    ext.load_state_dict(own["extensions"][ext.name])
                self._load_data_position(state["data"])
            self.load_extra_state(state.get("extra", {}))
            self.resumed_from = self._saved_step = self.engine.global_steps
            if is_rank0():  # the logs read as an uninterrupted run's (steps logged past the checkpoint are replayed)
                dropped = continue_logs(self.engine.monitor, self.resumed_from, self.engine.global_samples)
                if dropped:
                    log.info("monitor logs: dropped %d CSV rows and TensorBoard events after step %d (those "
                             "updates run again)", dropped, self.resumed_from)
                if self.resumed_from >= cfg.steps:  # e.g. steps lowered by mistake: say it before "finishing"
                    log.warning("the checkpoint in %s is at step %d, not before steps=%d: nothing is left to train; "
                                "this run only evaluates and exports the checkpoint's weights (raise steps to "
                                "train on)", self.ckpt_dir, self.resumed_from, cfg.steps)

    @property
    def start_note(self) -> str:
        """How this run started, for the trainers' start-up line: "resumed from step N" or "a new run"."""
        return "a new run" if self.resumed_from is None else f"resumed from step {self.resumed_from}"

    def _layout(self) -> dict[str, Any]:
        """How this run trains, saved with each checkpoint (ckpt.saved_layout reads it back)."""
        return {"world_size": world_size(), "micro_batch": self.engine.train_micro_batch_size_per_gpu(),
                "train_batch_size": self.engine.train_batch_size(), "zero_stage": self.engine.zero_optimization_stage(),
                "precision": self._precision}

    def _load_resharded(self, state: dict[str, Any]) -> None:
        """The rest of a resume on another number of ranks, after DeepSpeed loaded the weights and optimizer state.

        * Data: the position carries over as samples consumed in the epoch (ckpt.resume_data_position): with the same
          global batch, each update reads the samples it would have read on the old ranks.
        * EMA: unsharded, it is in the client state; under ZeRO-3 each rank cuts its new partitions from every old
          rank's file (memory-mapped: only the slices it needs are read).
        * Extensions' per-rank state: that of old rank 0 (what they keep is the same on every rank: per-resblock
          scales, the plateau schedule), through ``load_resharded_state`` where an extension has one (PowerSGD, whose
          error buffers belong to the old ranks' shards)."""
        before = self._saved_layout
        tag_dir = self.ckpt_dir / self._resume_tag
        self._load_data_position(state["data"])
        files = [tag_dir / f"rank{r}.pt" for r in range(before["world_size"])]
        needs_files = self.ema.sharded or bool(self._stateful_extensions())
        missing = [f.name for f in files if not f.is_file()] if needs_files else []
        if missing:
            raise RuntimeError(f"checkpoint {tag_dir} lacks the per-rank state of rank(s) {', '.join(missing)} of the "
                               f"{before['world_size']} that wrote it: resume it on that many ranks")
        if self.ema.sharded:
            self.ema.load_resharded([torch.load(f, map_location="cpu", weights_only=False, mmap=True)["ema"]
                                     for f in files])
        else:
            self.ema.load_state_dict(state["ema"])
        if self._stateful_extensions():
            first = torch.load(files[0], map_location="cpu", weights_only=False)["extensions"]
            for ext in self._stateful_extensions():
                getattr(ext, "load_resharded_state", ext.load_state_dict)(first[ext.name])

    def _load_data_position(self, data_state: dict[str, int]) -> None:
        """Restore the data loader's position. It is saved in global micro-batches; when this run's global
        micro-batch (micro-batch x ranks) differs from the checkpoint's -- another number of ranks, or another
        micro-batch on the same ranks (gradient accumulation making up the same global batch) -- it carries over as
        samples consumed in the epoch (ckpt.resume_data_position), so each update reads the samples it would have
        read under the old layout."""
        before, now = self._saved_layout, self._layout()
        if before is None or "micro_batch" not in before:  # no record of the old layout: as saved
            self.batches.load_state_dict(data_state)
            return
        old_micro, new_micro = (x["micro_batch"] * x["world_size"] for x in (before, now))
        position, repeated = ckpt.resume_data_position(data_state, old_micro, new_micro)
        self.batches.load_state_dict(position)
        if not is_rank0():
            return
        if old_micro != new_micro:
            log.info("data position: %d samples into epoch %d, from global micro-batches of %d samples to %d",
                     int(data_state["index"]) * old_micro, position["epoch"], old_micro, new_micro)
        if before.get("train_batch_size", now["train_batch_size"]) != now["train_batch_size"]:
            log.warning("the global batch changes from %d to %d samples per update (train_batch_size); the learning "
                        "rate schedule goes on by update count", before["train_batch_size"], now["train_batch_size"])
        if repeated:
            log.warning("the data position (%d samples into epoch %d) is not a whole number of this run's global "
                        "micro-batches (%d samples): %d samples are read again", position["index"] * new_micro
                        + repeated, position["epoch"], new_micro, repeated)

    # -- hooks for subclasses -----------------------------------------------------------------------------------
    def train_step(self, batches) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, tag: str) -> dict[str, Any] | None:
        return None

    def finish(self, summary: dict[str, Any], ema_weights: dict[str, torch.Tensor]) -> None:
        """Rank 0 only: write the exported artifacts (``ema_weights``: the full averaged weights)."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- shared machinery ---------------------------------------------------------------------------------------
    def _stateful_extensions(self) -> list:
        return [e for e in self.extensions if hasattr(e, "state_dict")]

    def micro_steps(self, batches, fn: Callable[[dict, int], Any], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Run ``fn(batch, micro) -> output with .loss`` for each micro-batch of one optimizer update; returns the
        mean over the micro-batches of each scalar output attribute in ``keys``, and ``lr``: the learning rate this
        update ran with (read before ``engine.step()`` steps the scheduler to the next update's rate).

        The means are 0-dim float64 tensors where the outputs are (summed in micro-batch order, then divided: the
        numbers a running Python float sum would give), read by the host only at a logged step. Only those scalars are
        kept: each micro-batch's output (logits, reconstructions...) is released before the next forward."""
        sums: dict[str, torch.Tensor] = {}
        lr = float(self.engine.get_lr()[0])
        steps = self.engine.gradient_accumulation_steps()
        for micro in range(steps):
            out = fn(next(batches), micro)
            self.engine.backward(out.loss)
            for ext in self.extensions:
                if hasattr(ext, "after_backward"):
                    ext.after_backward(self, micro)
            self.engine.step()
            for k in keys:
                v = getattr(out, k).detach().to(torch.float64)
                sums[k] = sums[k] + v if k in sums else v
            del out
        # ZeRO 1-3 compute the global gradient norm; a ZeRO-0 torch optimizer does not (None)
        self._record_grad_norm(self.engine.get_global_grad_norm())
        self.ema.step(self.engine.global_steps, self.engine.module.parameters())
        return {**{k: v / steps for k, v in sums.items()}, "lr": lr}

    def _record_grad_norm(self, norm: float | torch.Tensor | None) -> None:
        """Add one update's global gradient norm (a tensor or a float; ``None``: not computed) to the running
        sums on the device, skipping a nonfinite one (a skipped update), without reading it on the host."""
        if norm is None:
            return
        t = torch.as_tensor(norm, dtype=torch.float64).detach().reshape(())  # a float: on the CPU; a tensor: in place
        finite = torch.isfinite(t)
        clip = float(self.engine.gradient_clipping() or 0.0)
        row = torch.stack([torch.where(finite, t, 0.0), finite.to(torch.float64),
                           (finite & (t > clip)).to(torch.float64)])
        if self._grad_norms is None:
            self._grad_norms = row
        else:
            self._grad_norms = self._grad_norms + row.to(self._grad_norms.device)

    def grad_norm_stats(self) -> dict[str, float]:
        """Mean global gradient norm (before clipping) over the updates since the last call, and the fraction of
        them that ``gradient_clipping`` scaled down (read from the device here, once per logged step)."""
        sums, self._grad_norms = self._grad_norms, None
        if sums is None:
            return {}
        total, count, clipped = sums.tolist()
        if count == 0:
            return {}
        out = {"grad_norm": total / count}
        if float(self.engine.gradient_clipping() or 0.0) > 0:
            out["grad_clipped"] = clipped / count
        return out

    @staticmethod
    def to_floats(stats: dict[str, Any]) -> dict[str, Any]:
        """``stats`` with every tensor read as a Python float, all of them in one transfer per device."""
        tensors = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
        out = dict(stats)
        by_device: dict[torch.device, list[str]] = {}
        for k in tensors:
            by_device.setdefault(stats[k].device, []).append(k)
        for keys in by_device.values():
            values = torch.stack([stats[k].detach().reshape(()).to(torch.float64) for k in keys]).tolist()
            out.update(zip(keys, values))
        return out

    def _writes_model_states(self) -> bool:
        """Whether DeepSpeed writes this rank's ``client_state`` (the model-states file): data-parallel rank 0 (or
        each node's local rank 0 with node-local storage) only; the other ranks' is dropped. DeepSpeed's own flag,
        set when the engine is built; without it, assume it does."""
        return bool(getattr(self.engine, "save_non_zero_checkpoint", True))

    def save(self) -> None:
        for ext in self.extensions:
            if hasattr(ext, "before_save"):
                ext.before_save(self)
        state = {"data": self.batches.state_dict(), "run_config": asdict(self.cfg), "extra": self.extra_state()}
        own: dict[str, Any] = {}
        if self.ema.sharded:  # every rank checkpoints its own partitions
            own["ema"] = self.ema.state_dict()
        elif self._writes_model_states():  # elsewhere the host copy of the whole average would go unused
            state["ema"] = self.ema.state_dict()
        if self._stateful_extensions():
            own["extensions"] = {e.name: e.state_dict() for e in self._stateful_extensions()}
        ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.engine.global_steps, state,
                             keep=self.cfg.keep_checkpoints, rank_state=own or None, layout=self._layout())
        self._saved_step = self.engine.global_steps

    def log(self, prefix: str, values: dict[str, float], step: int) -> None:
        self.engine.monitor.write_events([(f"{prefix}/{k}", float(v), step) for k, v in values.items()
                                          if isinstance(v, (int, float))])

    def train(self, stop_at: int | None = None, stop_signals: Sequence[signal.Signals] = ()) -> dict[str, Any]:
        """Train to ``cfg.steps``; ``stop_at`` stops early after a checkpoint, as a preempted job would; so does one
        of ``stop_signals`` received by any rank (after the step that follows the one it arrives in:
        :mod:`dalle_ds.train.preemption`), and the summary's ``stopped_by`` names it."""
        with StopSignals(stop_signals) as stop:
            return self._train(stop_at, stop)

    def _train(self, stop_at: int | None, stop: StopSignals) -> dict[str, Any]:
        c, eng = self.cfg, self.engine
        end = c.steps if stop_at is None else min(stop_at, c.steps)
        batches = WaitTimed(iter(self.batches))
        bar = tqdm(total=c.steps, initial=eng.global_steps, desc=self.job_name, disable=not is_rank0(),
                   dynamic_ncols=True, mininterval=1.0)
        t0, history, stopped_by = time.time(), [], 0
        pace = Pace(eng.global_steps, batches)
        while eng.global_steps < end:
            # torch's global generator (dropout, a data loader's worker seeds) is seeded per (run seed, update,
            # rank): a resumed run draws what the uninterrupted one drew, and the ranks draw different masks
            torch.manual_seed(seed63(f"{self.seed}/update/{eng.global_steps}/{rank()}"))
            stats = self.train_step(batches)
            step = eng.global_steps
            for ext in self.extensions:
                if hasattr(ext, "after_update"):
                    ext.after_update(self, stats)
            bar.update(1)
            if c.log_every and (step % c.log_every == 0 or step == c.steps):
                stats = self.to_floats(stats)
                stats.update(self.grad_norm_stats())
                if self.device.type == "cuda":  # next to the start-up estimate; the mean over ranks of their peaks
                    stats["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                stats.update(pace.stats(step, eng.train_batch_size()))
                for ext in self.extensions:  # only when logging: they summarize the steps since their last call
                    if hasattr(ext, "stats"):
                        stats.update(ext.stats())
                stats = all_reduce_mean(stats)
                history.append({"step": step, **stats})
                bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if k in self.postfix_keys})
                self.log(self.job_name, stats, step)
                pace.restart(step)
            stopped_by = stop.agreed()  # a collective: every rank, after every step
            if stopped_by and step < c.steps:
                break
            if c.save_every and step % c.save_every == 0 and step < c.steps:
                self.save()
                pace.restart(step)  # the pace covers training steps only
            if c.eval_every and step % c.eval_every == 0 and step < c.steps:
                self.evaluate(f"step{step:06d}")
                pace.restart(step)
        bar.close()
        summary = {"steps": eng.global_steps, "train_seconds": time.time() - t0, "world_size": world_size(),
                   "resumed_from": self.resumed_from, "eval": None, "history": history}
        # Unless this step's checkpoint exists (saved in the loop, or the one resumed at or past the end): saving it
        # again would rewrite, in place, the files of the tag that `latest` names.
        if self._saved_step != eng.global_steps:
            self.save()
        if eng.global_steps < c.steps:  # stopped early: the checkpoint is the artifact
            if stopped_by:
                summary["stopped_by"] = signal.Signals(stopped_by).name
            if is_rank0():
                (self.run_dir / f"{self.job_name}_partial_metrics.json").write_text(json.dumps(summary, indent=2))
            return summary
        summary["eval"] = self.evaluate("final")
        ema_weights = self.ema.model_state_dict(dst=0)  # a collective under ZeRO-3; only rank 0 keeps a host copy
        if is_rank0():
            self.finish(summary, ema_weights)
            (self.run_dir / f"{self.job_name}_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        barrier()
        return summary

    postfix_keys: tuple[str, ...] = ("loss",)
