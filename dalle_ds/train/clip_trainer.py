"""Training the contrastive reranker: a small ``transformers.CLIPModel`` on the run's (image, caption) data, with
the symmetric InfoNCE loss CLIPModel computes (``return_loss=True``) over in-batch negatives."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dalle_ds.config import ClipTrainConfig
from dalle_ds.data.registry import build_dataset
from dalle_ds.sample.clip import ClipReranker, build_clip, clip_tokenizer_from_caption_tokenizer, image_processor_for
from dalle_ds.train.distributed import barrier, is_rank0, world_size
from dalle_ds.train.engine_loop import EngineLoop
from dalle_ds.train.run_tokenizer import ensure_run_tokenizer

log = logging.getLogger("dalle_ds.clip")


class ClipCollate:
    def __init__(self, reranker: ClipReranker):
        self.reranker = reranker

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = torch.stack([s["image"] for s in samples])
        captions = [s.get("caption") or "" for s in samples]
        out = self.reranker.text_inputs(captions)
        out["pixel_values"] = self.reranker.pixel_values(images)
        return {k: v.cpu() for k, v in out.items()}


class ClipTrainer(EngineLoop):
    job_name = "clip"
    postfix_keys = ("loss",)

    def __init__(self, cfg: ClipTrainConfig, ds_config: dict, run_dir: str | Path, resume: bool = True):
        run_dir = Path(run_dir)
        d, m = cfg.data, cfg.model
        train_ds = build_dataset(d.name, d.train_split, **d.dataset_kwargs(d.train_split, m.image_size))
        split = d.resolved_eval_split
        self.eval_ds = build_dataset(d.name, split, **d.dataset_kwargs(split, m.image_size))
        caption_tok = ensure_run_tokenizer(cfg.tokenizer, train_ds, run_dir / "caption_tokenizer", 16384,
                                           m.text_len - 2)
        tokenizer = clip_tokenizer_from_caption_tokenizer(caption_tok, m.text_len)
        torch.manual_seed(cfg.seed)
        model = build_clip(m, tokenizer)
        # DeepSpeed's initial broadcast views each parameter as bytes, which fails for 0-dim tensors; CLIP's
        # logit_scale is one, so it trains as shape [1] (broadcasting keeps the maths identical) and is saved 0-dim.
        model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))
        self.tokenizer = tokenizer
        self.reranker = ClipReranker(model, tokenizer, image_processor_for(m.image_size))
        super().__init__(cfg, model, ds_config, run_dir, train_ds, ClipCollate(self.reranker), seed=cfg.seed,
                         num_workers=d.num_workers, ema_decay=cfg.ema_decay, resume=resume)
        if is_rank0():
            log.info("CLIP: %.2fM parameters, %d×%d images, %d text positions; %d pairs; world size %d",
                     sum(p.numel() for p in model.parameters()) / 1e6, m.image_size, m.image_size, m.text_len,
                     len(train_ds), world_size())

    def train_step(self, batches) -> dict[str, float]:
        eng = self.engine
        outs = self.micro_steps(batches, lambda b, i: eng(**{k: v.to(self.device) for k, v in b.items()},
                                                         return_loss=True))
        return {**self.mean_over(outs, ("loss",)), "lr": float(eng.get_lr()[0]),
                "logit_scale": float(eng.module.logit_scale.detach().exp().squeeze())}

    @torch.no_grad()
    def evaluate(self, tag: str) -> dict[str, Any] | None:
        """Rank 0: image→caption top-1 retrieval among the eval split's captions (EMA weights)."""
        metrics = None
        n = min(self.cfg.data.eval_samples, len(self.eval_ds))
        if is_rank0() and n > 1:
            reranker = self.ema_reranker(self.ema.model_state_dict())
            samples = [self.eval_ds[i] for i in range(n)]
            img = reranker.image_embeddings(torch.stack([s["image"] for s in samples]))
            txt = reranker.text_embeddings([s["caption"] for s in samples])
            # captions can repeat: a retrieval is right when the chosen caption equals the true one
            chosen = (img @ txt.T).argmax(-1).tolist()
            right = sum(samples[c]["caption"] == samples[i]["caption"] for i, c in enumerate(chosen))
            metrics = {"retrieval_top1": right / n, "retrieval_chance": 1.0 / n, "n": n}
            self.log("clip_eval", metrics, self.engine.global_steps)
            log.info("CLIP eval: image→caption top-1 %.3f among %d captions", right / n, n)
        barrier()
        return metrics

    def ema_reranker(self, weights: dict[str, torch.Tensor]) -> ClipReranker:
        """A separate CLIP holding ``weights`` (the training module is left alone)."""
        model = build_clip(self.cfg.model, self.tokenizer)
        model.load_state_dict({k: v.reshape(()) if k == "logit_scale" else v for k, v in weights.items()})
        return ClipReranker(model, self.tokenizer, self.reranker.processor, self.device)

    def finish(self, summary: dict[str, Any], ema_weights: dict[str, torch.Tensor]) -> None:
        self.ema_reranker(ema_weights).save(self.run_dir / "clip", {"steps": summary["steps"],
                                                                    "eval": summary["eval"]})
