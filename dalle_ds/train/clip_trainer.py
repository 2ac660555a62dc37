"""Training the contrastive reranker: a small ``transformers.CLIPModel`` on the run's (image, caption) data, with
the symmetric InfoNCE loss over the global batch (every rank's pairs gathered, as CLIP does; on one rank this is
CLIPModel's own ``return_loss=True`` loss): :func:`contrastive_loss`. Opt-in, shapes data only:
hard negative captions (``hard_negatives``: the caption with one attribute made false,
:func:`dalle_ds.data.shapes.contrast_caption`), binding negatives (``binding_negatives``: the opposite relation and
the colours traded, :func:`dalle_ds.data.shapes.binding_captions`) and mirrored scenes as negative images
(``mirror_negatives``); and, for any data, training on dVAE round trips of the images (``dvae``)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dalle_ds.config import ClipTrainConfig, ConfigError, as_config_error
from dalle_ds.data.registry import build_dataset
from dalle_ds.data.shapes import (CONTRAST_ATTRIBUTES, binding_captions, contrast_attributes, contrast_caption,
                                  render_scene_tensor, spatial_contrast_scene)
from dalle_ds.sample.clip import ClipReranker, build_clip, clip_tokenizer_from_caption_tokenizer, image_processor_for
from dalle_ds.train import checkpoint as ckpt
from dalle_ds.train.data_loading import to_device, warn_if_evaluating_on_training_data
from dalle_ds.train.distributed import barrier, gather_rows_with_grad, is_rank0, rank, world_size
from dalle_ds.train.ds_config import check_rank0_evaluation_supported
from dalle_ds.train.engine_loop import EngineLoop, parameter_count
from dalle_ds.train.run_tokenizer import ensure_run_tokenizer

log = logging.getLogger("dalle_ds.clip")


class DvaeRoundTrip:
    """uint8 images → the same images encoded to dVAE codes and decoded again (bf16 autocast on CPU, where the
    dVAE's convolutions run 1.9× faster in bf16 channels_last: benchmarks/results/dvae_step_cpu_20261204)."""

    def __init__(self, path: str | Path, image_size: int):
        from dalle_ds.train.dvae_trainer import load_dvae

        with as_config_error("dvae"):
            self.dvae = load_dvae(path)
        if self.dvae.cfg.image_size != image_size:  # the round trip is what the prior's samples look like: same size
            raise ConfigError(f"dvae: {path} encodes {self.dvae.cfg.image_size} px images, the CLIP sees "
                              f"{image_size} px (model.image_size); train the reranker at the dVAE's size")
        self.autocast = self.dvae.bf16_inference(True)  # channels_last once, not per batch

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return self.dvae.reconstruct(images)


class ClipCollate:
    def __init__(self, reranker: ClipReranker, keep_scenes: bool = False, transform=None):
        self.reranker, self.keep_scenes, self.transform = reranker, keep_scenes, transform

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] → pixel values (after the optional transform, e.g. a dVAE round trip)."""
        return self.reranker.pixel_values(self.transform(images) if self.transform else images)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = torch.stack([s["image"] for s in samples])
        captions = [s.get("caption") or "" for s in samples]
        out = self.reranker.text_inputs(captions)
        out["pixel_values"] = self.images(images)
        out = {k: v.cpu() for k, v in out.items()}
        if self.keep_scenes:
            out["scenes"], out["captions"] = [s["scene"] for s in samples], captions
        return out


def hard_negative_captions(scenes: list[dict], per_image: int, rng: np.random.Generator) -> list[str]:
    """Up to ``per_image`` contrast captions per scene, each false in a different attribute (drawn without
    replacement from those the scene has), so every attribute is practised as often as the scenes allow."""
    out = []
    for scene in scenes:
        attrs = contrast_attributes(scene)
        for i in rng.permutation(len(attrs))[:per_image]:
            out.append(contrast_caption(scene, rng, attrs[i])[0])
    return out


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor,
                     b: int) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch of (image, caption) pairs, plus this rank's extra negatives.

    ``image_embeds`` [B + N, D] and ``text_embeds`` [B + M, D] are unit vectors (CLIPModel's ``image_embeds`` /
    ``text_embeds``): the first B rows are this rank's pairs, then N negative images (mirrored scenes) and M negative
    captions (each false for one image). Under data parallelism the pairs of every rank are gathered with gradient
    (:func:`~dalle_ds.train.distributed.gather_rows_with_grad`), as in CLIP (Radford et al., 2021) and open_clip, so
    each image picks its caption among all W·B captions (not only its rank's B) plus the local negatives, and each
    caption its image among all W·B images plus the local negative images. Each rank's loss covers its own B rows;
    with DeepSpeed averaging the gradients over ranks this is the gradient of the global-batch loss (the gather's
    backward sums what every rank's loss sends to a rank's embeddings). A negative has no partner, so it is only
    ever a wrong answer.
    On one rank with no negatives this is exactly CLIPModel's ``return_loss=True`` loss."""
    pairs_img, pairs_txt = image_embeds[:b], text_embeds[:b]
    all_img, offset = gather_rows_with_grad(pairs_img)
    all_txt, _ = gather_rows_with_grad(pairs_txt)
    target = torch.arange(offset, offset + b, device=image_embeds.device)
    per_image = scale * pairs_img @ torch.cat([all_txt, text_embeds[b:]]).T
    per_text = scale * pairs_txt @ torch.cat([all_img, image_embeds[b:]]).T
    if per_image.dtype in (torch.float16, torch.bfloat16):  # the softmax in fp32 at least
        per_image, per_text = per_image.float(), per_text.float()
    return 0.5 * (F.cross_entropy(per_image, target) + F.cross_entropy(per_text, target))


class ClipTrainer(EngineLoop):
    job_name = "clip"
    postfix_keys = ("loss",)

    def __init__(self, cfg: ClipTrainConfig, ds_config: dict, run_dir: str | Path, resume: bool = True):
        check_rank0_evaluation_supported(ds_config, "CLIP", "the reranker is small")
        run_dir = Path(run_dir)
        # another job's checkpoints are refused here, before the tokenizer is written into the folder; without
        # resuming, an earlier run's checkpoints, logs and tokenizer are moved aside first
        resuming = resume and ckpt.has_checkpoint_of(run_dir, self.job_name)
        if not resume:  # (a tokenizer naming this folder's own stays in place)
            ckpt.set_aside_for_new_run(run_dir, self.job_name, also=("caption_tokenizer",), keep=(cfg.tokenizer,))
        d, m = cfg.data, cfg.model
        split = d.resolved_eval_split
        with as_config_error("data"):  # shards or folders that do not load
            train_ds = build_dataset(d.name, d.train_split, **d.dataset_kwargs(d.train_split, m.image_size))
            self.eval_ds = build_dataset(d.name, split, **d.dataset_kwargs(split, m.image_size))
        if d.eval_samples > 0:
            warn_if_evaluating_on_training_data(d)
        self.uses_scenes = cfg.hard_negatives > 0 or cfg.mirror_negatives or cfg.binding_negatives
        if self.uses_scenes and "scene" not in train_ds[0]:
            raise ConfigError(f"clip_run: hard_negatives / mirror_negatives / binding_negatives need scenes to build "
                              f"negatives from, and dataset {d.name!r} has none (only the shapes data does); set "
                              "hard_negatives=0, mirror_negatives=false and binding_negatives=false")
        caption_tok = ensure_run_tokenizer(cfg.tokenizer, train_ds, run_dir / "caption_tokenizer", 16384,
                                           m.text_len - 2, resuming)
        tokenizer = clip_tokenizer_from_caption_tokenizer(caption_tok, m.text_len)
        torch.manual_seed(cfg.seed)
        model = build_clip(m, tokenizer)
        # DeepSpeed's initial broadcast views each parameter as bytes, which fails for 0-dim tensors; CLIP's
        # logit_scale is one, so it trains as shape [1] (broadcasting keeps the maths identical) and is saved 0-dim.
        model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))
        self.tokenizer = tokenizer
        self.reranker = ClipReranker(model, tokenizer, image_processor_for(m.image_size))
        round_trip = DvaeRoundTrip(cfg.dvae, m.image_size) if cfg.dvae else None
        self.collate = ClipCollate(self.reranker, self.uses_scenes, round_trip)
        super().__init__(cfg, model, ds_config, run_dir, train_ds, self.collate, seed=cfg.seed,
                         num_workers=d.num_workers, ema_decay=cfg.ema_decay, resume=resume)
        if is_rank0():
            log.info("CLIP: %.2fM parameters, %d×%d images, %d text positions; %d pairs; world size %d",
                     parameter_count(model) / 1e6, m.image_size, m.image_size, m.text_len,
                     len(train_ds), world_size())

    def train_step(self, batches) -> dict[str, float]:
        eng = self.engine

        def forward(batch: dict[str, Any], micro: int):
            inputs = {k: to_device(v, self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            b = inputs["pixel_values"].shape[0]  # the pairs; negatives are appended after them
            if self.uses_scenes:
                # Seeded by (seed, update, rank, micro-batch): a resumed run draws the same negatives.
                rng = np.random.default_rng([self.cfg.seed, eng.global_steps, rank(), micro])
                negatives = hard_negative_captions(batch["scenes"], self.cfg.hard_negatives, rng)
                if self.cfg.binding_negatives:
                    negatives += [c for sc in batch["scenes"] for c in binding_captions(sc)]
                # one padded length; the reranker here is the data side's (CPU): move its tensors to the engine
                text = self.reranker.text_inputs(batch["captions"] + negatives)
                inputs.update({k: v.to(self.device) for k, v in text.items()})
                if self.cfg.mirror_negatives:
                    mirrored = [m for m in (spatial_contrast_scene(sc, rng) for sc in batch["scenes"]) if m is not None]
                    if mirrored:
                        extra = torch.stack([render_scene_tensor(m) for m in mirrored])
                        inputs["pixel_values"] = torch.cat([inputs["pixel_values"],
                                                            self.collate.images(extra).to(self.device)])
            out = eng(**inputs)
            out.loss = contrastive_loss(out.image_embeds, out.text_embeds, eng.module.logit_scale.exp(), b)
            return out

        stats = self.micro_steps(batches, forward, ("loss",))
        # a tensor, read only if this step is logged (EngineLoop.to_floats): no host sync per update
        return {**stats, "logit_scale": eng.module.logit_scale.detach().exp().squeeze()}

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
            if "scene" in samples[0]:
                metrics.update(self.contrast_accuracy(reranker, img, txt, [s["scene"] for s in samples]))
            self.log("clip_eval", metrics, self.engine.global_steps)
            contrast = {k: round(v, 3) for k, v in metrics.items() if k.startswith("contrast")}
            log.info("CLIP eval: image→caption top-1 %.3f among %d captions%s", right / n, n,
                     f"; true caption over a contrast caption {contrast}" if contrast else "")
        barrier()
        return metrics

    def contrast_accuracy(self, reranker: ClipReranker, img: torch.Tensor, txt: torch.Tensor,
                          scenes: list[dict]) -> dict[str, float]:
        """How often an image scores its own caption above the same caption with one attribute made false, per
        attribute (what a reranker must get right to pick a sample that follows the caption)."""
        rng = np.random.default_rng(self.cfg.seed)
        right: dict[str, list[bool]] = {}
        for attr in CONTRAST_ATTRIBUTES:
            rows = [i for i, sc in enumerate(scenes) if attr in contrast_attributes(sc)]
            if rows:
                fake = reranker.text_embeddings([contrast_caption(scenes[i], rng, attr)[0] for i in rows])
                true_sim = (img[rows] * txt[rows]).sum(-1)
                right[attr] = ((img[rows] * fake).sum(-1) < true_sim).tolist()
        mirrored = [(i, m) for i, m in enumerate(spatial_contrast_scene(sc, rng) for sc in scenes) if m is not None]
        if mirrored:  # the same caption against its scene mirrored (position / relation made false)
            rows = [i for i, _ in mirrored]
            fake_img = reranker.image_embeddings(torch.stack([render_scene_tensor(m) for _, m in mirrored]))
            won = ((fake_img * txt[rows]).sum(-1) < (img[rows] * txt[rows]).sum(-1)).tolist()
            # Apart: a one-object mirror tests position; a two-object one tests binding (which coloured shape is
            # the upper / left one), which the relation contrast mostly does not (it often only swaps the axis).
            for key, n_objects in (("mirror_position", 1), ("mirror_relation", 2)):
                picked = [w for w, i in zip(won, rows) if len(scenes[i]["objects"]) == n_objects]
                if picked:
                    right[key] = picked
        out = {f"contrast_{a}": sum(v) / len(v) for a, v in right.items()}
        out["contrast_all"] = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
        return out

    def ema_reranker(self, weights: dict[str, torch.Tensor]) -> ClipReranker:
        """A separate CLIP holding ``weights`` (the training module is left alone)."""
        model = build_clip(self.cfg.model, self.tokenizer)
        model.load_state_dict({k: v.reshape(()) if k == "logit_scale" else v for k, v in weights.items()})
        return ClipReranker(model, self.tokenizer, self.reranker.processor, self.device)

    def finish(self, summary: dict[str, Any], ema_weights: dict[str, torch.Tensor]) -> None:
        self.ema_reranker(ema_weights).save(self.run_dir / "clip", {"steps": summary["steps"],
                                                                    "eval": summary["eval"]})
