"""Stage-1 training loop: the dVAE on a DeepSpeed engine.

Per optimizer update ``step`` (0-based, = ``engine.global_steps`` before the update):
  τ = cosine(step; tau_start → tau_end over tau_anneal_steps), β = cosine(step; 0 → kl_weight over kl_anneal_steps),
  one forward/backward per micro-batch (DeepSpeed accumulates), ``engine.step()``, then the fp32 EMA update.
The learning rate follows the DeepSpeed config's scheduler (paper: cosine decay).

Everything random is a function of (seed, step, rank): the data order (seed, epoch) and the Gumbel noise (seed,
step, rank, micro-step), so a run resumed from a checkpoint reproduces the uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dalle_ds.config import DVAEConfig, DVAETrainConfig
from dalle_ds.data.images import collate_samples
from dalle_ds.data.registry import build_dataset
from dalle_ds.eval.dvae_eval import evaluate_reconstructions
from dalle_ds.models.dvae import DiscreteVAE, count_parameters
from dalle_ds.train import checkpoint as ckpt
from dalle_ds.train.data_loading import StepBatches, step_generator
from dalle_ds.train.distributed import all_reduce_mean, barrier, device, is_rank0, rank, world_size
from dalle_ds.train.ema import EMA
from dalle_ds.train.schedules import cosine_anneal
from dalle_ds.utils.images import reconstruction_grid, save_png

log = logging.getLogger("dalle_ds.dvae")


def build_datasets(cfg: DVAETrainConfig):
    d, size = cfg.data, cfg.model.image_size
    train = build_dataset(d.name, d.train_split, **d.dataset_kwargs(d.train_split, size))
    evals = build_dataset(d.name, d.resolved_eval_split, **d.dataset_kwargs(d.resolved_eval_split, size))
    return train, evals


def shapes_score_fn(recons, scenes) -> dict[str, float]:
    from dalle_ds.eval.shapes_scorer import score_images

    scores = score_images(recons, scenes)
    return {f"scorer_{k}": v for k, v in _flatten(scores).items() if isinstance(v, (int, float))}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def export_dvae(path: Path, model_cfg: DVAEConfig, state_dict: dict, step: int, metrics: dict | None = None) -> None:
    """The artifact stage 2 and sampling load: EMA weights + model config (written atomically)."""
    ckpt.atomic_torch_save({"kind": "dalle_ds.dvae", "config": asdict(model_cfg), "state_dict": state_dict,
                            "step": step, "metrics": metrics or {}}, path)


def load_dvae(path: str | Path, map_location: str | torch.device = "cpu") -> DiscreteVAE:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dVAE file not found: {p}")
    blob = torch.load(p, map_location=map_location, weights_only=False)
    if not isinstance(blob, dict) or blob.get("kind") != "dalle_ds.dvae":
        raise ValueError(f"{p} is not a dVAE exported by dalle_ds (expected the dvae.pt a run writes)")
    model = DiscreteVAE(DVAEConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


class DVAETrainer:
    def __init__(self, cfg: DVAETrainConfig, ds_config: dict, run_dir: str | Path, resume: bool = True):
        import deepspeed

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = device()
        if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            raise ValueError("the dVAE trainer keeps a full EMA copy and supports ZeRO stages 0-2; "
                             "use a stage ≤ 2 config (the dVAE is small enough)")
        if is_rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "dvae_run_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            (self.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = DiscreteVAE(cfg.model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                     config=ds_config)
        self.ema = EMA(self.engine.module, cfg.ema_decay)
        self.train_ds, self.eval_ds = build_datasets(cfg)
        self.batches = StepBatches(self.train_ds, self.engine.train_micro_batch_size_per_gpu(), world_size(),
                                   rank(), cfg.seed, cfg.data.num_workers, collate_samples)
        self.resumed_from = None
        if resume:
            state = ckpt.load_checkpoint(self.engine, self.ckpt_dir)
            if state is not None:
                self.ema.load_state_dict(state["ema"])
                self.batches.load_state_dict(state["data"])
                self.resumed_from = self.engine.global_steps
        if is_rank0():
            log.info("dVAE: %.2fM parameters, %d×%d → %d×%d codes (K=%d); world size %d; resumed from step %s",
                     count_parameters(model) / 1e6, cfg.model.image_size, cfg.model.image_size,
                     cfg.model.grid_size, cfg.model.grid_size, cfg.model.vocab_size, world_size(),
                     self.resumed_from)

    # ------------------------------------------------------------------------------------------------------------
    def schedules(self, step: int) -> tuple[float, float]:
        c = self.cfg
        tau = cosine_anneal(step, c.tau_start, c.tau_end, c.tau_anneal_steps)
        beta = cosine_anneal(step, 0.0, c.kl_weight, c.kl_anneal_steps)
        return tau, beta

    def train_step(self, batches) -> dict[str, float]:
        eng, c = self.engine, self.cfg
        step = eng.global_steps
        tau, beta = self.schedules(step)
        stats = {"loss": 0.0, "nll": 0.0, "kl": 0.0}
        ga = eng.gradient_accumulation_steps()
        for micro in range(ga):
            batch = next(batches)
            gen = step_generator(c.seed, step, rank(), micro, self.device)
            out = eng(batch["image"].to(self.device), tau=tau, kl_weight=beta, generator=gen)
            eng.backward(out.loss)
            eng.step()
            for k in stats:
                stats[k] += float(getattr(out, k).detach()) / ga
        self.ema.update(eng.module.parameters())
        stats.update(tau=tau, kl_weight=beta, lr=float(eng.get_lr()[0]))
        return stats

    def save(self) -> None:
        state = {"ema": self.ema.state_dict(), "data": self.batches.state_dict(), "run_config": asdict(self.cfg)}
        ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.engine.global_steps, state, keep=self.cfg.keep_checkpoints)

    def ema_model(self) -> DiscreteVAE:
        model = DiscreteVAE(self.cfg.model).to(self.device)
        model.load_state_dict(self.ema.model_state_dict())
        return model.eval()

    def evaluate(self, tag: str) -> dict[str, float] | None:
        """Rank 0 evaluates the EMA weights and writes a reconstruction grid; the other ranks wait."""
        metrics = None
        if is_rank0() and self.cfg.data.eval_samples > 0:
            score_fn = shapes_score_fn if self.cfg.data.name == "shapes" else None
            metrics, ex = evaluate_reconstructions(self.ema_model(), self.eval_ds, self.cfg.data.eval_samples,
                                                   device=self.device, score_fn=score_fn)
            grid = reconstruction_grid(ex["originals"], ex["recons"], ncol=8, scale=2)
            save_png(grid, self.run_dir / f"reconstructions_{tag}.png",
                     title=f"dVAE step {self.engine.global_steps}: originals (odd rows) / reconstructions (even rows)")
            self.engine.monitor.write_events(
                [(f"dvae_eval/{k}", float(v), self.engine.global_steps) for k, v in metrics.items()
                 if isinstance(v, (int, float))])
        barrier()
        return metrics

    def train(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``cfg.steps``; ``stop_at`` stops early after a checkpoint, as a preempted job would."""
        c, eng = self.cfg, self.engine
        end = c.steps if stop_at is None else min(stop_at, c.steps)
        batches = iter(self.batches)
        bar = tqdm(total=c.steps, initial=eng.global_steps, desc="dVAE", disable=not is_rank0(),
                   dynamic_ncols=True, mininterval=1.0)
        t0, history = time.time(), []
        while eng.global_steps < end:
            stats = self.train_step(batches)
            step = eng.global_steps
            bar.update(1)
            if c.log_every and (step % c.log_every == 0 or step == c.steps):
                stats = all_reduce_mean(stats)
                history.append({"step": step, **stats})
                bar.set_postfix(loss=f"{stats['loss']:.4f}", nll=f"{stats['nll']:.3f}", kl=f"{stats['kl']:.2f}",
                                tau=f"{stats['tau']:.3f}")
                eng.monitor.write_events([(f"dvae/{k}", v, step) for k, v in stats.items()])
            if c.save_every and step % c.save_every == 0 and step < c.steps:
                self.save()
            if c.eval_every and step % c.eval_every == 0 and step < c.steps:
                self.evaluate(f"step{step:06d}")
        bar.close()
        train_seconds = time.time() - t0
        self.save()
        summary = {"steps": eng.global_steps, "train_seconds": train_seconds, "world_size": world_size(),
                   "resumed_from": self.resumed_from, "eval": None, "history": history}
        if eng.global_steps < c.steps:  # stopped early: the checkpoint is the artifact
            if is_rank0():
                (self.run_dir / "dvae_partial_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
            return summary
        metrics = summary["eval"] = self.evaluate("final")
        if is_rank0():
            export_dvae(self.run_dir / "dvae.pt", c.model, self.ema.model_state_dict(), eng.global_steps, metrics)
            (self.run_dir / "dvae_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        barrier()
        return summary
