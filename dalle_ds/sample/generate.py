"""Autoregressive sampling of image codes with a key/value cache that respects the sparse masks (paper §2.6).

The caption's T text positions are run once (prefill); then each of the W² image codes is drawn from the fp32
logits (temperature, optional top-k / top-p) and fed back through one cached decode step per layer. ``use_cache=
False`` recomputes the full forward pass for every code instead: the reference the cached path is tested against,
and the baseline of ``benchmarks/bench_sample.py``.
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
        if not self.temperature > 0:  # NaN too
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering; filtered entries become −inf."""
    logits = logits.float() / cfg.temperature
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


@torch.no_grad()
def sample_image_tokens(model: DALLE, text: torch.Tensor, cfg: SamplingConfig | None = None,
                        generator: torch.Generator | None = None, use_cache: bool = True,
                        return_logits: bool = False, cuda_graph: bool = False):
    """Draw one W² code sequence per row of ``text`` ([B, T] from ``prepare_text``).

    ``cuda_graph=True`` (CUDA, with the cache) replays the decode step from a CUDA graph captured once per batch
    size (:mod:`dalle_ds.sample.cuda_graph`), without the per-kernel host time: with the Triton decode kernel the
    same kernels run, so the logits are the same bit for bit.

    Returns codes [B, W²] (and, with ``return_logits``, the fp32 logits each code was drawn from [B, W², K]).
    """
    cfg = (cfg or SamplingConfig()).validate()
    if cuda_graph and not use_cache:
        raise ValueError("cuda_graph=True replays the cached decode step; it needs use_cache=True")
    if cuda_graph and text.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors; the captions are on {text.device}")
    model.eval()
    B, n = text.shape[0], model.cfg.image_len
    tokens = torch.zeros(B, n, dtype=torch.long, device=text.device)
    all_logits = [] if return_logits else None
    step = None
    if use_cache:
        if cuda_graph:
            from dalle_ds.sample.cuda_graph import graphed_decode_step

            step = graphed_decode_step(model, B)
            cache = step.cache
        else:
            cache = model.new_cache(B)
        logits = model.prefill(text, cache)
    for i in range(n):
        if not use_cache:
            logits = model(text, tokens, return_logits=True).image_logits[:, i]
        if return_logits:
            all_logits.append(logits.clone() if step is not None else logits)  # a graph reuses its output buffer
        tokens[:, i] = _draw(logits, cfg, generator)
        if use_cache and i + 1 < n:
            logits = step(tokens[:, i], i) if step is not None else model.decode_step(tokens[:, i], i, cache)
    if return_logits:
        return tokens, torch.stack(all_logits, dim=1)
    return tokens
