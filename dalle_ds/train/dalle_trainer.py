"""Stage-2 training loop: the transformer prior on a DeepSpeed engine.

Data: (caption, image codes) pairs from token shards, or images encoded on the fly by a trained dVAE. Captions are
tokenized in the DataLoader (the tokenizer is trained on the training captions on first use and saved in the run
folder, so a run is self-contained) and laid out by :func:`dalle_ds.models.dalle.prepare_text`.

Optimization comes from the DeepSpeed config (AdamW, warm-up then decay, gradient clipping at 4 in the shipped
configs, ZeRO stage, precision). The EMA of the weights is what gets exported and sampled from; the validation loss
is reported for both the live and the EMA weights (live only under ZeRO-3, where the EMA is sharded).

With ``model.resblock_grad_scaling`` (fp16 resblocks, paper §2.4) the scale manager's state is saved in the
checkpoint, every logged step carries each block's log2 scale (``grad_scale_log2/<k>_<attn|mlp>``, plotted by
``launch/plot_scales.py``), and ``grad_scale_skip`` marks updates skipped for nonfinite gradients.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from dalle_ds.config import ConfigError, DalleConfig, DalleTrainConfig, as_config_error
from dalle_ds.data.augment import describe_crops
from dalle_ds.data.registry import build_dataset
from dalle_ds.data.token_shards import TokenShardDataset
from dalle_ds.data.tokenizer import CaptionTokenizer
from dalle_ds.models.dalle import DALLE, prepare_text
from dalle_ds.precision.resblock_scaling import install_unscale_hooks
from dalle_ds.train import checkpoint as ckpt
from dalle_ds.train.data_loading import loader_kwargs, sample_seed, to_device, warn_if_evaluating_on_training_data
from dalle_ds.train.distributed import is_rank0, rank, world_size
from dalle_ds.train.ds_config import check_compile_supported, nonfinite_check_off, zero_stage
from dalle_ds.train.engine_loop import EngineLoop, parameter_count
from dalle_ds.train.extensions import build_extensions
from dalle_ds.train.run_tokenizer import ensure_run_tokenizer

log = logging.getLogger("dalle_ds.dalle")


class CaptionCollate:
    """Batch samples into {"text": [B, T] prepared ids, "image_tokens": [B, W²] | "image": uint8 [B, 3, H, W]}.

    With ``bpe_dropout`` > 0 each caption is segmented with that rate of BPE dropout, seeded by (``seed``, the
    sample's ``"sample_key"`` (epoch, index)): a sample gets a new segmentation every epoch and the same one in a
    resumed run. Samples without a key (validation, probes) are segmented plainly.
    """

    def __init__(self, tokenizer: CaptionTokenizer, model_cfg: DalleConfig, bpe_dropout: float = 0.0, seed: int = 0):
        self.tokenizer, self.model_cfg = tokenizer, model_cfg
        self.bpe_dropout, self.seed = bpe_dropout, seed

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [s.get("caption") or "" for s in samples]
        if self.bpe_dropout > 0 and all("sample_key" in s for s in samples):
            seeds = [sample_seed(self.seed, "bpe_dropout", s["sample_key"]) for s in samples]
            ids, lengths = self.tokenizer.encode(captions, bpe_dropout=self.bpe_dropout, seeds=seeds)
        else:
            ids, lengths = self.tokenizer.encode(captions)
        out: dict[str, Any] = {"text": prepare_text(ids, lengths, self.model_cfg), "caption": captions}
        if "image_tokens" in samples[0]:
            out["image_tokens"] = torch.stack([s["image_tokens"] for s in samples])
        else:
            out["image"] = torch.stack([s["image"] for s in samples])
        if "scene" in samples[0]:
            out["scene"] = [s["scene"] for s in samples]
        return out


def build_prior(model_cfg: DalleConfig, ds_config: dict, weights: dict[str, torch.Tensor] | None = None) -> DALLE:
    """The prior, built so that under ZeRO-3 no rank ever holds all of it: inside ``deepspeed.zero.Init`` every
    parameter is partitioned as soon as its module is constructed, then each is gathered in turn for its
    initialization (rank 0's values are kept, so every rank agrees) and released. Other stages build it plainly.

    ``weights``: an exported prior's state dict (``init_from``), taken instead of the initialization: a strict
    ``load_state_dict``, or under ZeRO-3 rank 0's copy written into each gathered parameter."""
    stage3 = zero_stage(ds_config) >= 3
    if stage3:
        import deepspeed
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = DALLE(model_cfg)
    else:
        model = DALLE(model_cfg)
    if weights is not None:
        differ = sorted({n for n, _ in model.named_parameters()} ^ set(weights))
        if differ:
            raise ConfigError(f"the exported prior's weights do not match the model's parameters: {differ[:5]}")
    if not stage3:
        if weights is not None:
            model.load_state_dict(weights, strict=True)
        return model
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if weights is None:
                model.init_parameter(name, p)
            elif is_rank0():
                with torch.no_grad():
                    p.copy_(weights[name])
    return model


def export_dalle(path: Path, model_cfg: DalleConfig, state_dict: dict, step: int, extra: dict) -> None:
    ckpt.atomic_torch_save({"kind": "dalle_ds.dalle", "config": asdict(model_cfg), "state_dict": state_dict,
                            "step": step, **extra}, path)


def load_dalle(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DALLE, dict]:
    """Load an exported prior; returns (model, the export's metadata: tokenizer and dvae paths, step...)."""
    blob = ckpt.load_artifact(path, "dalle_ds.dalle", "prior", map_location)
    model = DALLE(DalleConfig(**blob.pop("config")))
    model.load_state_dict(blob.pop("state_dict"))
    return model.eval(), blob


class DalleTrainer(EngineLoop):
    job_name = "dalle"
    tag_samples_with_epoch = True  # BPE dropout seeds each caption by (epoch, index)
    postfix_keys = ("loss", "text_loss", "image_loss")

    def __init__(self, cfg: DalleTrainConfig, ds_config: dict, run_dir: str | Path, resume: bool = True):
        if cfg.compile:
            check_compile_supported(ds_config)  # before any data, tokenizer or model is built
        run_dir = Path(run_dir)
        # another job's checkpoints are refused here, before the tokenizer is written into the folder; without
        # resuming, an earlier run's checkpoints, logs and tokenizer are moved aside first
        resuming = resume and ckpt.has_checkpoint_of(run_dir, self.job_name)
        if not resume:  # (a tokenizer or init_from naming this folder's own keeps its tokenizer in place)
            ckpt.set_aside_for_new_run(run_dir, self.job_name, also=("tokenizer",), keep=(
                cfg.data.tokenizer, Path(cfg.init_from).parent / "tokenizer" if cfg.init_from else None))
        d = cfg.data
        self.dvae = None
        if d.train_tokens:
            with as_config_error("data.train_tokens / val_tokens"):  # every rank reads the same folder: fails alike
                train_ds = TokenShardDataset(d.train_tokens)
                val_ds = TokenShardDataset(d.val_tokens) if d.val_tokens else None
            grid, vocab = train_ds.grid_size, train_ds.vocab_size
            if val_ds is not None and (val_ds.grid_size, val_ds.vocab_size) != (grid, vocab):
                raise ConfigError(f"train and val shards disagree: {grid}/{vocab} vs {val_ds.grid_size}/"
                                 f"{val_ds.vocab_size} (grid/vocabulary): were they made by the same dVAE?")
            encoded_by = train_ds.meta.get("dvae")
            if d.dvae and encoded_by and Path(d.dvae).resolve() != Path(encoded_by).resolve():
                # the exported prior names one dVAE, and sampling decodes with it: it must be the shards' own
                raise ConfigError(f"data.dvae: {d.dvae} is not the dVAE that encoded data.train_tokens ({encoded_by}, "
                                  "in its meta.json); with token shards leave data.dvae unset (the shards' dVAE is "
                                  "recorded in the exported prior)")
        else:
            from dalle_ds.train.dvae_trainer import load_dvae

            with as_config_error("data.dvae"):
                self.dvae = load_dvae(d.dvae)
            img = d.images
            img.validate(self.dvae.cfg.image_size, "data.images")
            split = img.resolved_eval_split
            with as_config_error("data.images"):
                train_ds = build_dataset(img.name, img.train_split, **img.dataset_kwargs(
                    img.train_split, self.dvae.cfg.image_size, crop="prior", seed=cfg.seed))
                val_ds = build_dataset(img.name, split, **img.dataset_kwargs(split, self.dvae.cfg.image_size))
            if d.val_batches > 0:
                warn_if_evaluating_on_training_data(img, "data.images")
            grid, vocab = self.dvae.cfg.grid_size, self.dvae.cfg.vocab_size
        init = self._init_weights_source(cfg, run_dir, resuming)
        tokenizer_source = d.tokenizer or (init["tokenizer_dir"] if init else None)
        self.tokenizer = ensure_run_tokenizer(tokenizer_source, train_ds, run_dir / "tokenizer",
                                              d.tokenizer_vocab_size, cfg.model.text_len - 1, resuming)
        model_cfg = replace(cfg.model, text_vocab_size=self.tokenizer.vocab_size, image_vocab_size=vocab,
                            image_grid=grid, bos_id=self.tokenizer.bos_id).validate()
        if init:
            # the ids must mean the words they meant in the prior's training
            theirs = CaptionTokenizer.load(init["tokenizer_dir"], max_length=cfg.model.text_len - 1)
            if theirs.hf.get_vocab() != self.tokenizer.hf.get_vocab():
                used = f"data.tokenizer={d.tokenizer}" if d.tokenizer else f"the run folder's {run_dir / 'tokenizer'}"
                raise ConfigError(f"init_from={cfg.init_from}: {used} has another vocabulary than that prior's "
                                  f"tokenizer ({init['tokenizer_dir']}); leave data.tokenizer unset (in a new --out) "
                                  "to use the prior's")
            differ = ckpt.architecture_differences(init["config"], asdict(model_cfg))
            if differ:
                raise ConfigError(f"init_from={cfg.init_from}: that prior's architecture differs from this run's "
                                  f"({differ}); the text vocabulary comes from the tokenizer, the image vocabulary "
                                  "and grid from the dVAE behind the data")
        cfg = replace(cfg, model=model_cfg)
        self.val_ds = val_ds
        self.collate = CaptionCollate(self.tokenizer, model_cfg)  # validation: plain BPE
        train_collate = CaptionCollate(self.tokenizer, model_cfg, bpe_dropout=d.bpe_dropout, seed=cfg.seed)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_prior(model_cfg, ds_config, init["state_dict"] if init else None)
        if init:
            if is_rank0():
                log.info("weights from %s (step %s of its run); optimizer, schedule and EMA start afresh",
                         cfg.init_from, init.get("step"))
        if cfg.compile:
            model.compile_resblocks()
        self.grad_scaler = model.grad_scaler
        if self.grad_scaler is not None:
            self._setup_resblock_scaling(model, ds_config)
        super().__init__(cfg, model, ds_config, run_dir, train_ds, train_collate, seed=cfg.seed,
                         num_workers=d.num_workers, ema_decay=cfg.ema_decay, resume=resume,
                         extensions=build_extensions(cfg), ema_every=cfg.ema_every, ema_on_host=cfg.ema_on_host)
        self._ds_skipped = self.engine.skipped_steps  # restored on resume
        if self.dvae is not None:
            self.dvae = self.dvae.to(self.device)
        if is_rank0():
            n = parameter_count(model)
            log.info("prior: %.2fM parameters, %d layers (%s), T=%d text + %d×%d image tokens, text vocab %d, "
                     "image vocab %d; %d training pairs (images: %s); world size %d; %s",
                     n / 1e6, model_cfg.n_layers, ",".join(model.mask_schedule), model_cfg.text_len, grid, grid,
                     model_cfg.text_vocab_size, vocab, len(train_ds), describe_crops(train_ds), world_size(),
                     self.start_note)
            log.info("%s", self._memory_estimate_line(model_cfg, ds_config))

    @staticmethod
    def _init_weights_source(cfg: DalleTrainConfig, run_dir: Path, resuming: bool) -> dict | None:
        """The exported prior named by ``init_from`` (memory-mapped), with its tokenizer folder; None without one, or
        when the run folder holds a checkpoint to resume (which wins)."""
        if not cfg.init_from:
            return None
        if resuming:
            if is_rank0():
                log.info("init_from=%s is not used: %s holds a checkpoint to resume", cfg.init_from, run_dir)
            return None
        try:
            blob = ckpt.load_artifact(cfg.init_from, "dalle_ds.dalle", "prior (init_from)", mmap=True)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"init_from: {e}") from e
        blob["tokenizer_dir"] = str(Path(cfg.init_from).parent / blob.get("tokenizer", "tokenizer"))
        return blob

    def _memory_estimate_line(self, model_cfg: DalleConfig, ds_config: dict) -> str:
        from dalle_ds.models.memory import estimate_for_run
        psgd = next((e for e in self.extensions if getattr(e, "name", "") == "powersgd"), None)
        psgd_args = {} if psgd is None else dict(powersgd_rank=psgd.cfg.rank, powersgd_compress=psgd.cfg.compress,
                                                 gpus_per_machine=psgd.reducer.topo.local_size)
        return estimate_for_run(model_cfg, ds_config, world_size(), adam_moments=self.cfg.adam_moments,
                                micro_batch=self.engine.train_micro_batch_size_per_gpu(),
                                ema="host" if self.cfg.ema_on_host else "device", **psgd_args)[1]

    def _setup_resblock_scaling(self, model: DALLE, ds_config: dict) -> None:
        """Per-resblock gradient scaling (paper §2.4, App. D) under DeepSpeed: the model keeps fp32 parameters and
        scales each resblock itself, so DeepSpeed's fp16 mode (one global loss scale, every parameter cast) must be
        off. Gradients are unscaled as they are produced (hooks: ZeRO moves them out of ``.grad`` during the
        backward) and a nonfinite one is left in place for DeepSpeed's overflow check to skip the step, which ZeRO
        stages 1-3 do in fp32 and bf16 mode; stage 0 in fp32 would apply it, hence refused."""
        where = "deepspeed config"
        if ds_config.get("fp16", {}).get("enabled"):
            raise ConfigError(f"{where}: fp16.enabled must be false with model.resblock_grad_scaling (the model "
                              "scales per resblock; DeepSpeed's fp16 mode would cast every parameter and add a "
                              "global loss scale); see ds_configs/zero*_fp16_resblock.json")
        if zero_stage(ds_config) < 1:
            raise ConfigError(f"{where}: model.resblock_grad_scaling needs zero_optimization.stage ≥ 1 (stage 0 "
                              "does not skip an update whose gradients are not finite)")
        off = nonfinite_check_off(ds_config)
        if off:
            raise ConfigError(f"{where}: {off} turns off DeepSpeed's check for nonfinite gradients, which "
                              "model.resblock_grad_scaling relies on to skip an overflowing update; remove the key")
        self.grad_scaler.reset(replicas=world_size())  # M: init M·2^13, clamp [M·2^7, M·2^24]
        install_unscale_hooks(model.resblocks, self.grad_scaler)

    def extra_state(self) -> dict[str, Any]:
        return {"grad_scaler": self.grad_scaler.state_dict()} if self.grad_scaler is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
            self.grad_scaler.set_replicas(world_size())

    def image_tokens(self, batch: dict) -> torch.Tensor:
        if "image_tokens" in batch:
            return to_device(batch["image_tokens"], self.device)
        return self.dvae.encode(to_device(batch["image"], self.device)).flatten(1)

    def train_step(self, batches) -> dict[str, float]:
        eng = self.engine
        stats = self.micro_steps(batches, lambda b, i: eng(to_device(b["text"], self.device), self.image_tokens(b)),
                                 ("loss", "text_loss", "image_loss"))
        if self.grad_scaler is not None:
            skip = self.grad_scaler.update()  # flags all-reduced: every rank moves its scales identically
            ds_skipped = eng.skipped_steps - self._ds_skipped
            self._ds_skipped = eng.skipped_steps
            stats["grad_scale_skip"] = float(skip)
            stats["grad_scale_skipped_total"] = float(self.grad_scaler.skipped)  # since step 0 (kept on resume)
            stats["grad_scale_skip_mismatch"] = float(skip != (ds_skipped > 0))  # should stay 0
            stats.update(self.grad_scaler.log_dict())
        return stats

    @torch.no_grad()
    def _val_loss(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean losses over the first ``val_batches`` × micro-batch × world held-out pairs (or all of them), each
        rank taking every world-th pair, summed across ranks: the mean over those pairs whatever the world size.

        Every rank runs the same number of forward passes, the most any rank needs: under ZeRO-3 each forward
        gathers the layers' parameters with collectives, so a rank with a batch fewer (pairs not a multiple of
        world × micro-batch) would reach the all-reduce below while the others still gather, and all would hang.
        A rank out of pairs runs one more of the split's first pair instead and leaves it out of the sums.
        """
        mb, world = self.engine.train_micro_batch_size_per_gpu(), world_size()
        n = min(len(self.val_ds), self.cfg.data.val_batches * mb * world)
        mine = Subset(self.val_ds, range(rank(), n, world))
        passes = math.ceil(math.ceil(n / world) / mb)  # rank 0's batches: it has the most pairs
        batches = iter(DataLoader(mine, batch_size=mb, collate_fn=self.collate,
                                  **loader_kwargs(self.device, num_workers=0)))
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        was_training = model.training
        model.eval()
        for _ in range(passes):
            batch = next(batches, None)
            counted = batch is not None
            if not counted:  # this rank's pairs are done: keep its collectives in step with the other ranks'
                batch = self.collate([self.val_ds[0]])
            out = model(to_device(batch["text"], self.device), self.image_tokens(batch))
            if counted:  # summed on the device: no host sync per batch
                k = len(batch["caption"])
                losses = torch.stack([out.loss, out.text_loss, out.image_loss]).detach().to(torch.float64) * k
                totals += torch.cat([losses, losses.new_tensor([k])])
        model.train(was_training)
        if world > 1:
            dist.all_reduce(totals)
        loss, text_loss, image_loss, pairs = totals.tolist()
        c = max(pairs, 1.0)
        return {"loss": loss / c, "text_loss": text_loss / c, "image_loss": image_loss / c, "pairs": pairs}

    def evaluate(self, tag: str) -> dict[str, Any] | None:
        if self.val_ds is None or self.cfg.data.val_batches == 0:
            return None
        metrics = {f"val_{k}": v for k, v in self._val_loss(self.engine.module).items()}
        if not self.ema.sharded:
            with torch.device("meta"):  # no initialization: every weight is overwritten by the average next
                ema_model = DALLE(self.cfg.model)
            ema_model.to_empty(device=self.device)
            self.ema.copy_to(ema_model)
            metrics.update({f"val_ema_{k}": v for k, v in self._val_loss(ema_model).items() if k != "pairs"})
        if is_rank0():
            self.log("dalle_eval", metrics, self.engine.global_steps)
            log.info("step %d: %s", self.engine.global_steps,
                     ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "loss" in k))
        return metrics

    def finish(self, summary: dict[str, Any], ema_weights: dict[str, torch.Tensor]) -> None:
        meta = {"tokenizer": "tokenizer", "dvae": self._shard_dvae() or self._given_dvae(), "metrics": summary["eval"]}
        export_dalle(self.run_dir / "dalle.pt", self.cfg.model, ema_weights, summary["steps"], meta)

    def _given_dvae(self) -> str | None:
        """``data.dvae`` as an absolute path: sampling and evaluation run from other folders, where a path relative
        to this run's working directory (``--set data.dvae=runs/dvae/dvae.pt``) named no file (the token shards'
        meta.json records theirs absolute too)."""
        return os.path.abspath(self.cfg.data.dvae) if self.cfg.data.dvae else None

    def _shard_dvae(self) -> str | None:
        return getattr(self.batches.dataset, "meta", {}).get("dvae")
