"""Stage-1 training loop: the dVAE on a DeepSpeed engine.

Per optimizer update ``step`` (0-based, = ``engine.global_steps`` before the update):
  τ = cosine(step; tau_start → tau_end over tau_anneal_steps), β = cosine(step; 0 → kl_weight over kl_anneal_steps),
  one forward/backward per micro-batch (DeepSpeed accumulates), ``engine.step()``, then the fp32 EMA update.
The learning rate follows the DeepSpeed config's scheduler (paper: cosine decay).

Everything random is a function of (seed, step, rank): the data order (seed, epoch) and the Gumbel noise (seed,
step, rank, micro-step), so a run resumed from a checkpoint reproduces the uninterrupted run.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dalle_ds.config import DVAEConfig, DVAETrainConfig, as_config_error
from dalle_ds.data.images import collate_samples
from dalle_ds.data.augment import describe_crops
from dalle_ds.data.registry import build_dataset
from dalle_ds.eval.dvae_eval import evaluate_reconstructions
from dalle_ds.models.dvae import DiscreteVAE, kmeans_init_head
from dalle_ds.train import checkpoint as ckpt
from dalle_ds.train.channels_last import ChannelsLast
from dalle_ds.train.data_loading import step_generator, to_device, warn_if_evaluating_on_training_data
from dalle_ds.train.distributed import barrier, is_rank0, rank, world_size
from dalle_ds.train.ds_config import check_rank0_evaluation_supported
from dalle_ds.train.engine_loop import EngineLoop, parameter_count
from dalle_ds.train.schedules import cosine_anneal
from dalle_ds.utils.dicts import flatten
from dalle_ds.utils.images import reconstruction_grid, save_png

log = logging.getLogger("dalle_ds.dvae")


def build_datasets(cfg: DVAETrainConfig):
    """The train and eval splits; the dVAE needs no captions, so a folder or WebDataset without them loads too."""
    d, size = cfg.data, cfg.model.image_size
    extra = {"require_caption": False} if d.name in ("imagefolder", "webdataset") else {}
    train = build_dataset(d.name, d.train_split, **d.dataset_kwargs(d.train_split, size, crop="dvae", seed=cfg.seed),
                          **extra)
    evals = build_dataset(d.name, d.resolved_eval_split, **d.dataset_kwargs(d.resolved_eval_split, size), **extra)
    if d.eval_samples > 0:
        warn_if_evaluating_on_training_data(d)
    return train, evals


def shapes_score_fn(recons, scenes) -> dict[str, float]:
    from dalle_ds.eval.shapes_scorer import score_images

    scores = score_images(recons, scenes)
    return {f"scorer_{k}": v for k, v in flatten(scores, sep="/").items() if isinstance(v, (int, float))}


def export_dvae(path: Path, model_cfg: DVAEConfig, state_dict: dict, step: int, metrics: dict | None = None) -> None:
    """The artifact stage 2 and sampling load: EMA weights + model config (written atomically)."""
    ckpt.atomic_torch_save({"kind": "dalle_ds.dvae", "config": asdict(model_cfg), "state_dict": state_dict,
                            "step": step, "metrics": metrics or {}}, path)


def load_dvae(path: str | Path, map_location: str | torch.device = "cpu") -> DiscreteVAE:
    blob = ckpt.load_artifact(path, "dalle_ds.dvae", "dVAE", map_location)
    model = DiscreteVAE(DVAEConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


class DVAETrainer(EngineLoop):
    job_name = "dvae"
    postfix_keys = ("loss", "nll", "kl", "tau")

    def __init__(self, cfg: DVAETrainConfig, ds_config: dict, run_dir: str | Path, resume: bool = True):
        check_rank0_evaluation_supported(ds_config, "dVAE", "the dVAE is small enough")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = DiscreteVAE(cfg.model)
        with as_config_error("data"):  # shards or folders that do not load (every rank reads the same data)
            self.train_ds, self.eval_ds = build_datasets(cfg)
        if cfg.head_init == "kmeans":  # same images and generator on every rank → identical weights
            n = min(cfg.head_init_images, len(self.train_ds))
            images = collate_samples([self.train_ds[i] for i in range(n)])["image"]
            used = kmeans_init_head(model, images, generator=torch.Generator().manual_seed(cfg.seed))
            if is_rank0():
                log.info("encoder head: k-means init on %d images; the argmax uses %d of %d codes",
                         n, used, cfg.model.vocab_size)
        super().__init__(cfg, model, ds_config, run_dir, self.train_ds, collate_samples, seed=cfg.seed,
                         num_workers=cfg.data.num_workers, ema_decay=cfg.ema_decay, resume=resume,
                         extensions=[ChannelsLast()] if cfg.channels_last else [])
        if is_rank0():
            log.info("dVAE: %.2fM parameters, %d×%d → %d×%d codes (K=%d); %d training images (%s); world size %d; "
                     "%s", parameter_count(model) / 1e6, cfg.model.image_size, cfg.model.image_size,
                     cfg.model.grid_size, cfg.model.grid_size, cfg.model.vocab_size, len(self.train_ds),
                     describe_crops(self.train_ds), world_size(), self.start_note)

    def schedules(self, step: int) -> tuple[float, float]:
        c = self.cfg
        tau = cosine_anneal(step, c.tau_start, c.tau_end, c.tau_anneal_steps)
        beta = cosine_anneal(step, 0.0, c.kl_weight, c.kl_anneal_steps)
        return tau, beta

    def train_step(self, batches) -> dict[str, float]:
        eng = self.engine
        step = eng.global_steps
        tau, beta = self.schedules(step)

        def micro(batch, i):
            gen = step_generator(self.seed, step, rank(), i, self.device)
            return eng(to_device(batch["image"], self.device), tau=tau, kl_weight=beta, generator=gen)

        stats = self.micro_steps(batches, micro, ("loss", "nll", "kl"))
        stats.update(tau=tau, kl_weight=beta)
        return stats

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
            self.log("dvae_eval", metrics, self.engine.global_steps)
        barrier()
        return metrics

    def finish(self, summary: dict[str, Any], ema_weights: dict[str, torch.Tensor]) -> None:
        export_dvae(self.run_dir / "dvae.pt", self.cfg.model, ema_weights, summary["steps"], summary["eval"])
