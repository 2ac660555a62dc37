"""Stage 1: the discrete VAE of DALL-E (Ramesh et al., 2021, §2.1 and Appendix A).

The encoder maps an image to a grid of logits over K codes; the decoder maps a (relaxed) one-hot grid back to the
parameters of a logit-Laplace distribution over pixels. Architecture (Appendix A.1, and the layout of the openai/DALL-E
release):

* encoder: 7×7 input conv → ``groups`` groups of ``blocks_per_group`` resblocks, each group but the last followed by a
  2×2 max-pool (so the image is downsampled by ``2**(groups-1)``) → ReLU → **1×1 conv** to K logits;
* decoder: **1×1 conv** from K to ``decoder_init`` channels → groups of resblocks with nearest-neighbour ×2
  upsampling between them → ReLU → 1×1 conv to 2·C maps (location μ and log-scale ln b per channel);
* every resblock output is multiplied by ``1 / n_layers**2`` (n_layers = groups · blocks_per_group) before it joins
  the identity path: the paper's "multiplication of the outgoing activations ... by a small constant", with the
  constant of the official release.

Training objective (the ELBO with a β-weighted KL, Appendix A.2): Gumbel-softmax relaxation at temperature τ (added
noise and division by τ in the forward and the backward pass), logit-Laplace negative log-likelihood of the image,
and β·KL(q(z|x) ‖ uniform) summed over the grid. Both terms are summed per image as in the paper and divided by the
number of pixel values (3·H·W), so the loss is reported in nats per pixel value and β keeps its meaning.
Tokens for stage 2 are the **argmax** of the encoder logits, no Gumbel noise.

Options for small budgets (off by default, used by the CPU demo; docs/dvae_cpu_trials.md has the measurements):
``likelihood="gaussian"`` (fixed σ, a scaled squared error) instead of the logit-Laplace, ``code_embedding_std`` for
the decoder's code embeddings, and :func:`kmeans_init_head`, a data-dependent init of the encoder's last conv.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_ds.config import DVAEConfig
from dalle_ds.precision.native import bf16_is_native
from dalle_ds.precision.tf32 import ieee_cuda_convs

# Appendix A.3: pixels are mapped into (ε, 1 − ε) before the logit-Laplace likelihood is evaluated.
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] → [ε, 1 − ε], the support on which the logit-Laplace density is evaluated."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_nll(x01: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor,
                      eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Element-wise negative log-density of the logit-Laplace distribution at the mapped pixels.

    If logit(y) ~ Laplace(μ, b) then p(y) = exp(−|logit y − μ| / b) / (2 b y (1 − y)); y = map_pixels(x).
    """
    y = map_pixels(x01, eps)
    logit_y = torch.log(y) - torch.log1p(-y)
    return (logit_y - mu).abs() * torch.exp(-log_b) + log_b + math.log(2.0) + torch.log(y) + torch.log1p(-y)


# Fixed scale of the optional Gaussian likelihood, in the mapped pixel space [ε, 1 − ε].
GAUSSIAN_SIGMA = 0.1


def gaussian_nll(x01: torch.Tensor, mu: torch.Tensor, sigma: float = GAUSSIAN_SIGMA,
                 eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Element-wise negative log-density of N(sigmoid(μ), σ²) at the mapped pixels (a scaled squared error).

    The mean is sigmoid(μ) so that reconstructions are read out exactly as for the logit-Laplace (its median).
    """
    y = map_pixels(x01, eps)
    return (y - torch.sigmoid(mu)) ** 2 / (2 * sigma ** 2) + math.log(sigma * math.sqrt(2 * math.pi))


class EncoderBlock(nn.Module):
    """Bottleneck resblock: id + gain · (relu→3×3→relu→3×3→relu→3×3→relu→1×1)."""

    def __init__(self, c_in: int, c_out: int, post_gain: float):
        super().__init__()
        hid = max(c_out // 4, 1)
        self.id_path = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c_in, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, c_out, 1),
        )
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    """Bottleneck resblock: id + gain · (relu→1×1→relu→3×3→relu→3×3→relu→3×3)."""

    def __init__(self, c_in: int, c_out: int, post_gain: float):
        super().__init__()
        hid = max(c_out // 4, 1)
        self.id_path = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c_in, hid, 1),
            nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, c_out, 3, padding=1),
        )
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group_widths(cfg: DVAEConfig) -> list[int]:
    # Channel width doubles per group: n_hid, 2·n_hid, 4·n_hid, 8·n_hid for the paper's 4 groups.
    return [cfg.hidden * 2 ** g for g in range(cfg.groups)]


class Encoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        n_layers = cfg.groups * cfg.blocks_per_group
        gain = 1.0 / n_layers ** 2
        widths = _group_widths(cfg)
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, widths[0], 7, padding=3)]
        c = widths[0]
        for g, w in enumerate(widths):
            for _ in range(cfg.blocks_per_group):
                layers.append(EncoderBlock(c, w, gain))
                c = w
            if g < cfg.groups - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), nn.Conv2d(c, cfg.vocab_size, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        n_layers = cfg.groups * cfg.blocks_per_group
        gain = 1.0 / n_layers ** 2
        widths = list(reversed(_group_widths(cfg)))
        # The 1×1 input conv doubles as a code embedding: decode_tokens() indexes its weight directly.
        self.input = nn.Conv2d(cfg.vocab_size, cfg.decoder_init, 1)
        if cfg.code_embedding_std > 0:
            nn.init.normal_(self.input.weight, std=cfg.code_embedding_std)
            nn.init.zeros_(self.input.bias)
        layers: list[nn.Module] = []
        c = cfg.decoder_init
        for g, w in enumerate(widths):
            for _ in range(cfg.blocks_per_group):
                layers.append(DecoderBlock(c, w, gain))
                c = w
            if g < cfg.groups - 1:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReLU(), nn.Conv2d(c, 2 * cfg.channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.input(z))

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode integer codes [B, h, w] without building the K-channel one-hot tensor."""
        weight = self.input.weight[:, :, 0, 0]  # [init, K]
        h = F.embedding(tokens, weight.t()) + self.input.bias  # [B, h, w, init]
        return self.net(h.permute(0, 3, 1, 2).contiguous())


@dataclass
class DVAEOutput:
    loss: torch.Tensor          # scalar: (NLL + β·KL) / (3·H·W), averaged over the batch
    nll: torch.Tensor           # scalar: logit-Laplace NLL, nats per pixel value
    kl: torch.Tensor            # scalar: KL(q ‖ uniform), nats per grid cell
    logits: torch.Tensor        # [B, K, h, w] encoder logits
    recon: torch.Tensor         # [B, C, H, W] reconstruction in [0, 1] (detached)


class DiscreteVAE(nn.Module):
    """The dVAE: ``forward`` computes the training loss, ``encode``/``decode`` map images ↔ tokens."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    # -- inference ---------------------------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor, check_range: bool = True) -> None:
        """``images`` must be [B ≥ 1, C, S, S] at the model's channels and size, uint8 or float; float ones in
        [0, 1] when ``check_range`` (a host sync: done for inference, not in the training step). A 0..255 float
        image would otherwise be encoded as a different, saturated image, without an error."""
        c = self.cfg
        if not torch.is_tensor(images):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        want = (c.channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want or images.shape[0] < 1:
            raise ValueError(f"images must be [B ≥ 1, {c.channels}, {c.image_size}, {c.image_size}] (this dVAE's "
                             f"channels and size), got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
            raise TypeError(f"images must be uint8 (0..255) or float in [0, 1], got {images.dtype}")
        if check_range and images.dtype.is_floating_point:
            lo, hi = float(images.min()), float(images.max())
            if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
                raise ValueError(f"float images must lie in [0, 1] (or pass uint8 0..255), got {lo:g}..{hi:g}")

    def check_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Integer codes [B, h, w] (or flat [B, h·w]) on this dVAE's grid, as [B, h, w]; the range is checked too."""
        c = self.cfg
        if not torch.is_tensor(tokens) or tokens.dtype.is_floating_point or tokens.dtype.is_complex \
                or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integer codes, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
        g = c.grid_size
        if tokens.dim() == 2 and tokens.shape[1] == g * g:
            tokens = tokens.view(tokens.shape[0], g, g)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (g, g) or tokens.shape[0] < 1:
            raise ValueError(f"tokens must be [B ≥ 1, {g}, {g}] or [B ≥ 1, {g * g}] codes, got shape "
                             f"{tuple(tokens.shape)}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"codes must lie in [0, {c.vocab_size}), got {lo}..{hi}")
        return tokens

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] in 0..255 (or float in [0, 1]) → float in [ε, 1 − ε], the network's input domain."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return map_pixels(x)

    def _to_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input in its weights' dtype: bf16 under DeepSpeed's bf16 mode (which casts the parameters,
        not the inputs), unchanged for fp32 weights (autocast then picks the compute dtype)."""
        return x.to(next(self.encoder.parameters()).dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images → integer codes [B, h, w] (argmax of the encoder logits; no Gumbel noise, as in the paper)."""
        self.check_images(images)
        return self.encoder(self._to_weights(self.preprocess(images))).argmax(dim=1)

    def decode_stats(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder.forward_tokens(tokens)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Integer codes [B, h, w] (or flat [B, h·w]) → images in [0, 1], float [B, C, H, W]."""
        return self._decode(self.check_codes(tokens))

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` of codes [B, h, w] known to be valid (checked, or this dVAE's own argmax)."""
        stats = self.decoder.forward_tokens(codes.long())
        return unmap_pixels(torch.sigmoid(stats[:, : self.cfg.channels].float()))

    @staticmethod
    def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
        return (pixels * 255).round().to(torch.uint8)

    @torch.no_grad()
    def decode_uint8(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` quantized to uint8 [B, C, H, W] (the images samples are saved, scored and reranked as)."""
        return self._to_uint8(self.decode(tokens))

    def bf16_inference(self, enabled: bool | None = None) -> contextlib.AbstractContextManager:
        """A context for :meth:`encode` / :meth:`decode` under bf16 autocast, the way the CPU demo's dVAE trains;
        converts the weights to channels_last once (then every convolution returns channels_last, the fast layout
        for bf16 on CPU). ``enabled=None``: on where bf16 is native (any GPU; a CPU with AVX-512 BF16 or AMX,
        where 64×64 decoding ran 9.1 → 3.1 ms an image on one core; elsewhere it is emulated and slower).
        Codes and pixels move slightly: 99.3% of codes equal (tests/test_token_shards.py), pixels within a few
        levels of 255. Disabled: fp32, IEEE also on a GPU (where cuDNN's default would run the convolutions in
        TF32), so that fp32 codes are the same codes on every device up to summation order."""
        device = next(self.parameters()).device
        if enabled is None:
            enabled = bf16_is_native(device)
        if not enabled:
            return ieee_cuda_convs()
        if device.type == "cpu":
            self.to(memory_format=torch.channels_last)
        return torch.autocast(device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images → codes → images, uint8 [B, C, H, W]: what the prior's samples look like at best."""
        return self._to_uint8(self._decode(self.encode(images)))  # its own codes: no second check (a host sync)

    # -- training ----------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, tau: float, kl_weight: float,
                generator: torch.Generator | None = None) -> DVAEOutput:
        self.check_images(images, check_range=False)  # shapes only: no host sync in the training step
        if not tau > 0:
            raise ValueError(f"tau (the Gumbel-softmax temperature) must be > 0, got {tau}")
        x01 = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        logits = self.encoder(self._to_weights(map_pixels(x01)))
        # Gumbel noise from Exp(1): −log E ~ Gumbel(0, 1). An explicit generator keeps resume exact.
        expo = torch.empty_like(logits, dtype=torch.float32).exponential_(generator=generator)
        gumbel = -expo.log()
        z = torch.softmax((logits.float() + gumbel) / tau, dim=1).to(logits.dtype)
        stats = self.decoder(z).float()
        c = self.cfg.channels
        mu, log_b = stats[:, :c], stats[:, c:]
        nll = logit_laplace_nll(x01, mu, log_b) if self.cfg.likelihood == "logit_laplace" else gaussian_nll(x01, mu)
        log_q = torch.log_softmax(logits.float(), dim=1)
        # KL(q ‖ uniform over K) = Σ_k q_k log q_k + log K, per grid cell.
        kl = (log_q.exp() * log_q).sum(dim=1) + math.log(self.cfg.vocab_size)
        n_pix = x01[0].numel()
        per_image = nll.flatten(1).sum(1) + kl_weight * kl.flatten(1).sum(1)
        loss = (per_image / n_pix).mean()
        with torch.no_grad():
            recon = unmap_pixels(torch.sigmoid(mu))
        return DVAEOutput(loss=loss, nll=nll.mean(), kl=kl.mean(), logits=logits, recon=recon)


@torch.no_grad()
def kmeans_init_head(model: DiscreteVAE, images: torch.Tensor, iters: int = 15, scale: float = 4.0,
                     generator: torch.Generator | None = None) -> int:
    """Data-dependent init of the encoder's last 1×1 conv: k-means on the features it reads.

    The K centroids μ_k of the encoder's final features over ``images`` (uint8 or [0, 1]) become a nearest-centroid
    rule, logit_k = s·(μ_k·f − ‖μ_k‖²/2) with s = ``scale`` / total feature variance, so every code starts out owning
    a region of feature space (with PyTorch's default init the argmax is the same code almost everywhere). Only an
    initialisation: the model and objective are unchanged. Returns the number of codes the argmax uses on ``images``.
    """
    head = model.encoder.net[-1]
    body = model.encoder.net[:-1]
    feats = body(model.preprocess(images))
    f = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).float()
    k = head.out_channels
    pick = torch.randint(0, len(f), (k,), generator=generator) if len(f) < k else \
        torch.randperm(len(f), generator=generator)[:k]
    mu = f[pick].clone()
    for _ in range(iters):
        assign = torch.cdist(f, mu).argmin(1)
        sums = torch.zeros_like(mu).index_add_(0, assign, f)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        mu = torch.where(empty[:, None], mu, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # re-seed empty clusters from random features
            mu[empty] = f[torch.randint(0, len(f), (int(empty.sum()),), generator=generator)]
    s = scale / f.var(0).sum().clamp_min(1e-8)
    head.weight.copy_((s * mu)[:, :, None, None].to(head.weight.dtype))
    head.bias.copy_((-s * mu.pow(2).sum(1) / 2).to(head.bias.dtype))
    return int(torch.unique(head(feats).argmax(1)).numel())  # body then head = the encoder's forward
