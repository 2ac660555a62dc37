"""Autoregressive sampling of image codes with a key/value cache that respects the sparse masks (paper §2.6).

The caption's T text positions (and the codes of an image prompt, if any) are run once (prefill); then each
remaining image code is drawn from the fp32 logits (temperature, optional top-k / top-p) and fed back through one
cached decode step per layer. ``use_cache=False`` recomputes the full forward pass for every code instead: the
reference the cached path is tested against, and the baseline of ``benchmarks/bench_sample.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dalle_ds.models.dalle import DALLE


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Paper: t = 1 (no temperature reduction)."""
    top_k: int = 0
    """Keep the k most likely codes (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest set of codes whose probability reaches p (1 = off)."""

    def validate(self) -> "SamplingConfig":
        for name, kinds in (("temperature", (int, float)), ("top_k", (int,)), ("top_p", (int, float))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise TypeError(f"{name} must be {'an int' if kinds == (int,) else 'a number'}, got {value!r}")
        if not self.temperature > 0:  # NaN too
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering; filtered entries become −inf. Each row's maximum is
    subtracted before the division by the temperature (the softmax is unchanged): at a tiny temperature the raw
    quotients overflow to ±inf, and inf − inf made the softmax NaN, which drew the last code every time."""
    logits = logits.float()
    top = logits.amax(-1, keepdim=True)
    logits = (logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top))) / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a code when the mass of the codes before it already reaches top_p (the first code always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` [B, K] (non-negative, rows need not sum to 1) by inverting the cumulative sum
    at one uniform number per row. Same distribution as ``torch.multinomial(probs, 1)``, which draws B·K
    exponentials: at K = 512 that was a tenth of a CPU sampling step. A zero-probability index is never drawn
    (its cumulative sum equals its predecessor's, and the search returns the first sum above the draw)."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def _draw(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    return draw(torch.softmax(filter_logits(logits, cfg), dim=-1), generator)


def check_image_prefix(prefix: torch.Tensor, batch: int, image_len: int, vocab: int) -> torch.Tensor:
    """``prefix`` as int64 codes [batch, P] with 0 ≤ P ≤ image_len, every code in [0, vocab); ValueError otherwise."""
    if prefix.dim() != 2 or prefix.shape[0] != batch:
        raise ValueError(f"image_prefix must be [batch={batch}, P] codes, got shape {tuple(prefix.shape)}")
    if prefix.dtype.is_floating_point or prefix.dtype.is_complex or prefix.dtype == torch.bool:
        raise ValueError(f"image_prefix must hold integer codes, got {prefix.dtype}")
    if prefix.shape[1] > image_len:
        raise ValueError(f"image_prefix has {prefix.shape[1]} codes; the image has only {image_len}")
    if prefix.numel() and not (0 <= int(prefix.min()) and int(prefix.max()) < vocab):
        raise ValueError(f"image_prefix codes must lie in [0, {vocab}), got {int(prefix.min())}..{int(prefix.max())}")
    return prefix.long()


@torch.no_grad()
def sample_image_tokens(model: DALLE, text: torch.Tensor, cfg: SamplingConfig | None = None,
                        generator: torch.Generator | None = None, use_cache: bool = True,
                        return_logits: bool = False, cuda_graph: bool = False,
                        image_prefix: torch.Tensor | None = None):
    """Draw one W² code sequence per row of ``text`` ([B, T] from ``prepare_text``).

    ``cuda_graph=True`` (CUDA, with the cache) replays the decode step from a CUDA graph captured once per batch
    size (:mod:`dalle_ds.sample.cuda_graph`), without the per-kernel host time: with the Triton decode kernel the
    same kernels run, so the logits are the same bit for bit.

    ``image_prefix`` [B, P]: the first P codes in raster order are given, not drawn (an image prompt, e.g. the top
    P / W rows of an encoded image, as in the paper's image-to-image translation, §3.3); the cached path runs them
    in the prefill with the text.

    Returns codes [B, W²] (the prefix in place) and, with ``return_logits``, the fp32 logits each drawn code was
    drawn from [B, W² − P, K].
    """
    cfg = (cfg or SamplingConfig()).validate()
    if cuda_graph and not use_cache:
        raise ValueError("cuda_graph=True replays the cached decode step; it needs use_cache=True")
    if cuda_graph and text.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors; the captions are on {text.device}")
    model.eval()
    B, n = text.shape[0], model.cfg.image_len
    tokens = torch.zeros(B, n, dtype=torch.long, device=text.device)
    first = 0
    if image_prefix is not None:
        image_prefix = check_image_prefix(image_prefix, B, n, model.cfg.image_vocab_size).to(text.device)
        first = image_prefix.shape[1]
        tokens[:, :first] = image_prefix
    all_logits = [] if return_logits else None
    step = None
    if use_cache and first < n:
        if cuda_graph:
            from dalle_ds.sample.cuda_graph import graphed_decode_step

            step = graphed_decode_step(model, B)
            cache = step.cache
        else:
            cache = model.new_cache(B)
        logits = model.prefill(text, cache, image_prefix)
    for i in range(first, n):
        if not use_cache:
            logits = model(text, tokens, return_logits=True).image_logits[:, i]
        if return_logits:
            all_logits.append(logits.clone() if step is not None else logits)  # a graph reuses its output buffer
        tokens[:, i] = _draw(logits, cfg, generator)
        if use_cache and i + 1 < n:
            logits = step(tokens[:, i], i) if step is not None else model.decode_step(tokens[:, i], i, cache)
    if return_logits:
        K = model.cfg.image_vocab_size
        stacked = torch.stack(all_logits, dim=1) if all_logits else torch.empty(B, 0, K, device=text.device)
        return tokens, stacked
    return tokens
