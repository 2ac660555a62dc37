"""Caption → N candidate images → contrastive reranking → the best k (paper §2.6), as a reusable pipeline.

``TextToImage`` bundles the prior (with its tokenizer), the dVAE decoder and an optional reranker. ``generate``
draws ``num_candidates`` code sequences per caption with the KV-cached sampler, in batches of ``batch_size`` rows,
decodes them to images and orders each caption's candidates by reranker score (or keeps the sampling order when
there is no reranker).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dalle_ds.data.tokenizer import CaptionTokenizer
from dalle_ds.models.dalle import DALLE, prepare_text
from dalle_ds.models.dvae import DiscreteVAE
from dalle_ds.sample.clip import ClipReranker
from dalle_ds.sample.generate import SamplingConfig, sample_image_tokens


@dataclass
class CaptionResult:
    caption: str
    images: torch.Tensor            # uint8 [N, 3, H, W], best first when reranked
    scores: list[float] | None      # reranker scores in the same order (None without a reranker)
    order: list[int]                # original sampling index of each image
    timings: dict[str, float] = field(default_factory=dict)


class TextToImage:
    """The prior is moved to ``device`` and set up for inference in place: eval mode and, with 16-bit resblocks, its
    resblock matmul weights stored in 16 bits (:meth:`DALLE.to_inference_precision_`: same samples bit for bit, a
    quarter of the weight bytes per decode step). Pass a copy to keep training the original."""

    def __init__(self, prior: DALLE, tokenizer: CaptionTokenizer, dvae: DiscreteVAE,
                 reranker: ClipReranker | None = None, device: torch.device | str = "cpu",
                 dvae_bf16: bool | None = None):
        self.device = torch.device(device)
        self.prior = prior.to(self.device).eval().to_inference_precision_()
        self.dvae = dvae.to(self.device).eval()
        self.tokenizer, self.reranker = tokenizer, reranker
        self.dvae_autocast = dvae.bf16_inference(dvae_bf16)  # None: bf16 where it is native (DiscreteVAE)
        cfg = prior.cfg
        if (dvae.cfg.grid_size, dvae.cfg.vocab_size) != (cfg.image_grid, cfg.image_vocab_size):
            raise ValueError(f"the dVAE ({dvae.cfg.grid_size}×{dvae.cfg.grid_size} grid, K={dvae.cfg.vocab_size}) "
                             f"does not match the prior ({cfg.image_grid}×{cfg.image_grid}, "
                             f"K={cfg.image_vocab_size})")

    @classmethod
    def load(cls, prior_path: str | Path, dvae_path: str | Path | None = None, clip_path: str | Path | None = None,
             device: torch.device | str = "cpu", dvae_bf16: bool | None = None) -> "TextToImage":
        from dalle_ds.train.dalle_trainer import load_dalle
        from dalle_ds.train.dvae_trainer import load_dvae

        prior, meta = load_dalle(prior_path)
        tok_dir = Path(prior_path).parent / meta.get("tokenizer", "tokenizer")
        try:
            tokenizer = CaptionTokenizer.load(tok_dir, max_length=prior.cfg.text_len - 1)
        except (FileNotFoundError, ValueError) as e:
            # a fixed class: ValueError's subclasses (json.JSONDecodeError, UnicodeDecodeError) take other arguments
            kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
            raise kind(f"the prior {prior_path}'s caption tokenizer (saved beside it by train_dalle.py): {e}") from e
        if not dvae_path:
            dvae_path = meta.get("dvae")
            if not dvae_path:
                raise ValueError("the prior does not record its dVAE; pass --dvae")
            if not Path(dvae_path).is_absolute() and not Path(dvae_path).is_file():
                # priors exported before 2026-12-07 kept data.dvae as typed, relative to where training ran
                raise FileNotFoundError(f"the prior {prior_path} records its dVAE as {dvae_path!r}, a path relative to "
                                        "the folder it was trained in; pass --dvae")
        dvae = load_dvae(dvae_path)
        reranker = ClipReranker.from_pretrained(clip_path, device) if clip_path else None
        try:
            return cls(prior, tokenizer, dvae, reranker, device, dvae_bf16)
        except ValueError as e:
            raise ValueError(f"{e} (dVAE {dvae_path}, prior {prior_path})") from e

    def _clock(self) -> float:
        """Seconds, after the device's queued work is done (GPU work is asynchronous: without the wait, sampling
        time would be charged to whatever synchronizes next)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def text(self, captions: list[str]) -> torch.Tensor:
        ids, lengths = self.tokenizer.encode(captions)
        return prepare_text(ids, lengths, self.prior.cfg).to(self.device)

    @torch.no_grad()
    def sample_codes(self, captions: list[str], sampling: SamplingConfig, generator: torch.Generator | None = None,
                     use_cache: bool = True, cuda_graph: bool = False,
                     image_prefix: torch.Tensor | None = None) -> torch.Tensor:
        return sample_image_tokens(self.prior, self.text(captions), sampling, generator, use_cache=use_cache,
                                   cuda_graph=cuda_graph, image_prefix=image_prefix)

    @torch.no_grad()
    def encode_prompt(self, images: torch.Tensor, rows: int) -> torch.Tensor:
        """The top ``rows`` rows of code of each image (uint8 [N, 3, S, S] at the dVAE's resolution): the codes
        [N, rows · W] that prime the prior in :meth:`generate` (the paper's image-to-image translation, §3.3)."""
        W, size = self.prior.cfg.image_grid, self.dvae.cfg.image_size
        if isinstance(rows, bool) or not isinstance(rows, int):
            raise TypeError(f"rows must be an int, got {rows!r}")
        if not 0 <= rows <= W:
            raise ValueError(f"prompt rows must be in 0..{W} (the image grid is {W}×{W}), got {rows}")
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.dvae.cfg.channels, size, size):
            raise ValueError(f"prompt images must be [N, {self.dvae.cfg.channels}, {size}, {size}] (the dVAE's "
                             f"input), got {tuple(images.shape)}")
        with self.dvae_autocast:
            codes = self.dvae.encode(images.to(self.device))
        return codes.reshape(codes.shape[0], -1)[:, : rows * W]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        with self.dvae_autocast:
            return self.dvae.decode_uint8(codes)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images at the dVAE's resolution → codes → uint8 images (on the CPU): the most a sample can keep."""
        with self.dvae_autocast:
            return self.dvae.reconstruct(images.to(self.device)).cpu()

    @torch.no_grad()
    def generate(self, captions: list[str], num_candidates: int, sampling: SamplingConfig | None = None,
                 batch_size: int = 64, seed: int = 0, use_cache: bool = True, cuda_graph: bool = False,
                 prompt_codes: torch.Tensor | None = None) -> list[CaptionResult]:
        """``num_candidates`` images per caption, each caption's candidates ordered best first. ``cuda_graph``: see
        :func:`sample_image_tokens` (one capture per batch size: a full batch and, if rows are left over, the last).
        ``prompt_codes`` [len(captions), P] (from :meth:`encode_prompt`): each caption's candidates start from its
        row of given codes and only the rest is sampled."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of str (one caption is [caption]: a str was taken as a list of "
                            "its characters)")
        if not captions:
            raise ValueError("captions is empty")
        for name, value in (("num_candidates", num_candidates), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        if not isinstance(sampling, (SamplingConfig, type(None))):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        sampling = (sampling or SamplingConfig()).validate()
        rows = [c for c in captions for _ in range(num_candidates)]
        if prompt_codes is not None:
            if prompt_codes.dim() != 2 or prompt_codes.shape[0] != len(captions):
                raise ValueError(f"prompt_codes must be [{len(captions)} captions, P], got "
                                 f"{tuple(prompt_codes.shape)}")
            prompt_codes = prompt_codes.to(self.device).repeat_interleave(num_candidates, dim=0)
        images, t_sample, t_decode = [], 0.0, 0.0
        for b, start in enumerate(range(0, len(rows), batch_size)):
            gen = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + b)
            t0 = self._clock()
            prefix = None if prompt_codes is None else prompt_codes[start:start + batch_size]
            codes = self.sample_codes(rows[start:start + batch_size], sampling, gen, use_cache, cuda_graph, prefix)
            t1 = self._clock()
            images.append(self.decode(codes).cpu())
            t_sample, t_decode = t_sample + t1 - t0, t_decode + self._clock() - t1
        images = torch.cat(images)
        results = []
        for i, caption in enumerate(captions):
            cand = images[i * num_candidates:(i + 1) * num_candidates]
            t0 = time.perf_counter()
            if self.reranker is not None:
                order, scores = self.reranker.rerank(cand, caption, keep=num_candidates)
                order, scores = order.tolist(), scores[order].tolist()
            else:
                order, scores = list(range(num_candidates)), None
            t_rerank = time.perf_counter() - t0
            results.append(CaptionResult(caption, cand[order], scores, order, {"rerank_s": t_rerank}))
        share = 1.0 / max(len(captions), 1)
        for r in results:
            r.timings.update(sample_s=t_sample * share, decode_s=t_decode * share)
        return results
