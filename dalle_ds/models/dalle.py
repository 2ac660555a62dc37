"""Stage 2: the DALL-E transformer prior (Ramesh et al., 2021, §2.2 and Appendix B.1).

The stream is ``[T text positions][W·W image positions]`` (paper: 256 + 32·32 = 1280), modelled autoregressively by
a decoder-only transformer in which position p predicts token p + 1:

* **text**: position 0 holds ``<bos>``, then the lowercased BPE caption, then **per-position padding tokens**: each of
  the T text positions i has its own learned padding token (id ``text_vocab_size + i``), used where the caption is
  shorter (not a shared pad id and not masked out). Text positions also get a learned position embedding.
* **image**: dVAE codes in raster order, each embedding summed with a learned **row** and **column** embedding.
* **attention**: one jointly normalised softmax per layer; text→text causal, every image token sees all text, and
  image→image uses the layer's sparse mask: column if (i − 2) mod 4 = 0, row otherwise, conv on the last layer
  (1-based i). The masks, their block layouts and the kernels live in :mod:`dalle_ds.ops.attention`.
* **loss**: cross-entropy on text targets (positions 0..T−2 predict text 1..T−1, padding tokens included: predicting
  where a caption ends is part of modelling text) and on image targets (positions T−1..N−2 predict the W² codes),
  each averaged over its own token count, combined as 1/8 text + 7/8 image. Logits are computed in fp32 (their
  matmuls in IEEE fp32, or in TF32 on CUDA tensor cores with ``logits_matmul="tf32"``).

Pre-LayerNorm resblocks; the attention block and the MLP block are separate resblocks (``ResBlock``), which is the
granularity of the paper's per-resblock gradient scaling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dalle_ds.config import DalleConfig
from dalle_ds.ops.attention import MaskSpec, attention, attention_decode, decode_backend, layer_kind
from dalle_ds.precision.resblock_scaling import (ResblockGradScaler, scaled_branch_input, scaled_branch_output,
                                                 unscale_block_grads_)
from dalle_ds.precision.tf32 import tf32_linear

TEXT_LOSS_WEIGHT, IMAGE_LOSS_WEIGHT = 1.0 / 8.0, 7.0 / 8.0  # paper §2.2


def prepare_text(ids: torch.Tensor, lengths: torch.Tensor, cfg: DalleConfig) -> torch.Tensor:
    """Tokenizer output (ids [B, L] without <bos>, lengths [B]) → the model's T text ids.

    Position 0 is <bos>; positions 1..len hold the caption (cut to T − 1 tokens); every later position i holds its
    own padding token ``text_vocab_size + i``.
    """
    B, T = ids.shape[0], cfg.text_len
    out = torch.empty(B, T, dtype=torch.long, device=ids.device)
    out[:, 0] = cfg.bos_id
    n = min(ids.shape[1], T - 1)
    out[:, 1:1 + n] = ids[:, :n]
    pos = torch.arange(T, device=ids.device)
    pad = pos[None, :] > lengths.clamp(max=T - 1)[:, None]
    return torch.where(pad, cfg.text_vocab_size + pos[None, :], out)


class Attention(nn.Module):
    def __init__(self, cfg: DalleConfig, layer: int):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.kind = layer_kind(layer, cfg.n_layers)
        self.spec = MaskSpec(self.kind, cfg.text_len, cfg.image_grid, conv_kernel=cfg.conv_kernel)
        self.backend = cfg.attn_backend
        self.decode_backend = decode_backend(cfg.attn_backend)  # flex / sdpa train; cached sampling needs a decode

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, H, N, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        out = attention(q, k, v, self.spec, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(x.shape))

    # -- KV-cached inference ---------------------------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """Sequence positions 0..n−1 at once: the T text positions, causal in every layer kind (the masks differ
        only image→image), then any image positions of a prompt under this layer's mask (every mask is causal, so
        the first n rows and columns of the full mask are the whole story for these positions)."""
        q, k, v = self._heads(x)
        n = x.shape[1]
        cache["k"][:, :, :n], cache["v"][:, :, :n] = k, v
        if n <= self.spec.text_len:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            idx = torch.arange(n, device=x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.spec.visible(idx[:, None], idx[None, :]))
        return self.proj(out.transpose(1, 2).reshape(x.shape))

    def decode(self, x: torch.Tensor, cache: dict, position: int | torch.Tensor) -> torch.Tensor:
        """One cached step at sequence index ``position``: an int, or a one-element tensor on the device (written
        and read on the device, so a CUDA graph of the step serves every position)."""
        q, k, v = self._heads(x)  # [B, H, 1, D]
        if isinstance(position, torch.Tensor):
            at = position.reshape(1).long()  # index_copy_ takes int64 indices
            cache["k"].index_copy_(2, at, k.to(cache["k"].dtype))
            cache["v"].index_copy_(2, at, v.to(cache["v"].dtype))
        else:
            cache["k"][:, :, position], cache["v"][:, :, position] = k[:, :, 0], v[:, :, 0]
        out = attention_decode(q, cache["k"], cache["v"], self.spec, position, backend=self.decode_backend)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class MLP(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class ResBlock(nn.Module):
    """``x + dropout(f(LayerNorm(x)))``: one resblock in the paper's sense (attention and MLP count separately).

    Opt-in (DalleConfig): the branch ``dropout(f(LayerNorm(x)))`` may run under autocast in fp16/bf16 while the
    residual stream stays fp32; with per-resblock gradient scaling (``scaler`` and ``index`` are set by
    :class:`DALLE`) the branch is wrapped in the scale/unscale-and-filter ops of :mod:`dalle_ds.precision`; with
    activation checkpointing the branch is recomputed in the backward pass (non-reentrant: parameter gradients
    are kept even when the input needs no grad).
    """

    def __init__(self, cfg: DalleConfig, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.fn = fn
        self.drop = nn.Dropout(cfg.dropout)
        self.compute_dtype = getattr(torch, cfg.resblock_dtype)
        self.checkpoint = cfg.activation_checkpointing
        self.scaler: ResblockGradScaler | None = None  # set by DALLE when cfg.resblock_grad_scaling
        self.index = -1  # this block's scale index

    def branch(self, x: torch.Tensor, fn=None) -> torch.Tensor:
        """``dropout(f(LayerNorm(x)))`` in the block's compute dtype; ``fn`` replaces ``self.fn`` (the cached
        sampler passes the attention's prefill / decode step, so it runs in the same precision as training)."""
        fn = fn or self.fn
        scaler = self.scaler if torch.is_grad_enabled() else None
        h = scaled_branch_input(x, scaler, self.index) if scaler is not None else x
        if self.compute_dtype != torch.float32 and x.dtype == torch.float32:
            # no cast cache without grad (sampling): it saves nothing there, and a CUDA graph capture wants none
            with torch.autocast(x.device.type, dtype=self.compute_dtype, cache_enabled=torch.is_grad_enabled()):
                y = self.drop(fn(self.norm(h)))
        else:
            y = self.drop(fn(self.norm(h)))
        if scaler is not None:
            return scaled_branch_output(y, scaler, self.index, x.dtype)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return x + checkpoint(self.branch, x, use_reentrant=False)
        return x + self.branch(x)


class FP32Head(nn.Linear):
    """An output head whose logits are computed in fp32 whatever the parameter dtype (paper App. D.2: text and image
    logits in fp32). Called as a module, so ZeRO-3 gathers its weight for the forward and the backward (a bare
    ``F.linear(x, head.weight)`` outside the head's own forward finds the weight partitioned in the backward).

    ``matmul="tf32"`` runs its matmuls (forward and backward) in TF32 on CUDA tensor cores: fp32 inputs rounded to a
    10-bit significand, fp32 accumulation, fp32 logits (:mod:`dalle_ds.precision.tf32`); ``"fp32"`` is IEEE fp32."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, matmul: str = "fp32"):
        super().__init__(in_features, out_features, bias=bias)
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = x.float(), self.weight.float()
        if self.matmul == "tf32":  # on a CPU the same numbers as F.linear (no TF32 there)
            y = tf32_linear(x, w)
            return y if self.bias is None else y + self.bias.float()
        return F.linear(x, w, None if self.bias is None else self.bias.float())


class Layer(nn.Module):
    def __init__(self, cfg: DalleConfig, layer: int):
        super().__init__()
        self.attn = ResBlock(cfg, Attention(cfg, layer))
        self.mlp = ResBlock(cfg, MLP(cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))

    def step(self, x: torch.Tensor, cache: dict, position: int | torch.Tensor | None) -> torch.Tensor:
        """Prefill (position None) or one cached decode step at ``position`` (int or one-element device tensor)."""
        a = self.attn
        if position is None:
            x = x + a.branch(x, lambda h: a.fn.prefill(h, cache))
        else:
            x = x + a.branch(x, lambda h: a.fn.decode(h, cache, position))
        return self.mlp(x)


@dataclass
class DalleOutput:
    loss: torch.Tensor
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    image_logits: torch.Tensor | None = field(default=None)


class DALLE(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.text_emb = nn.Embedding(cfg.text_classes, d)
        self.text_pos = nn.Embedding(cfg.text_len, d)
        self.image_emb = nn.Embedding(cfg.image_vocab_size, d)
        self.row_emb = nn.Embedding(cfg.image_grid, d)
        self.col_emb = nn.Embedding(cfg.image_grid, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(1, cfg.n_layers + 1))
        self.final_norm = nn.LayerNorm(d)
        self.text_head = FP32Head(d, cfg.text_classes, bias=False, matmul=cfg.logits_matmul)
        self.image_head = FP32Head(d, cfg.image_vocab_size, bias=False, matmul=cfg.logits_matmul)
        self.grad_scaler: ResblockGradScaler | None = None
        if cfg.resblock_grad_scaling:
            self.grad_scaler = ResblockGradScaler(len(self.resblocks))
            for k, block in enumerate(self.resblocks):
                block.scaler, block.index = self.grad_scaler, k
        self.reset_parameters()

    @property
    def resblocks(self) -> list[ResBlock]:
        """The 2·n_layers resblocks in order (layer i's attention block is 2i, its MLP block 2i + 1)."""
        return [b for layer in self.layers for b in (layer.attn, layer.mlp)]

    def resblock_matmul_weight_names(self) -> list[str]:
        """Names of the resblocks' matmul weights (attention qkv / proj, MLP fc / proj): the parameters the paper keeps
        in 16 bits with 16-bit Adam moments; gains, biases, embeddings and the heads are its fp32 islands (App. D)."""
        ids = {id(m.weight) for block in self.resblocks for m in block.fn.modules() if isinstance(m, nn.Linear)}
        return [name for name, param in self.named_parameters() if id(param) in ids]

    def compile_resblocks(self, **compile_kwargs) -> None:
        """``torch.compile`` every resblock in place, block by block as torchtitan's ``apply_compile`` does: a
        block's graph is small and compiles in seconds, and blocks of one kind (MLP; attention of one mask kind)
        reuse each other's compiled code. Inductor fuses the elementwise work around the matmuls (LayerNorm, bias,
        GELU, dropout, the residual add, dtype casts): by a rough count, ~20 memory-bound passes per layer at
        d_model 1024, a quarter of the matmul time; attention stays the backend's kernel (the Triton custom op
        traces as one node).
        Checkpointing and per-resblock gradient scaling compose with it (tests/test_compile.py). For training:
        the first steps are slow while Inductor compiles, and a new shape or grad mode compiles again."""
        for block in self.resblocks:
            block.compile(**compile_kwargs)

    def to_inference_precision_(self) -> "DALLE":
        """For sampling: store every resblock's matmul weights and biases (attention qkv / proj, MLP fc / proj) in
        the resblocks' 16-bit compute dtype, the dtype autocast casts them to on every call. The outputs stay the
        same bit for bit (the same round-to-nearest cast, made once instead of per call), while a cached decode step
        reads 2 bytes per matmul parameter instead of 8 (the fp32 weight read and its bf16 copy written and read
        again: the weights are the bulk of a small batch's bytes). LayerNorms, embeddings and the fp32 heads keep
        their dtype. Inference only: the fp32 values are gone, so do not train the model afterwards. A no-op when
        the resblocks compute in fp32. Returns the model."""
        compute = getattr(torch, self.cfg.resblock_dtype)
        if compute == torch.float32:
            return self
        for block in self.resblocks:
            for module in block.fn.modules():
                if isinstance(module, nn.Linear):
                    module.to(compute)
        return self

    def unscale_grads_(self) -> bool:
        """With per-resblock scaling: divide each resblock's parameter gradients by its scale, check every gradient
        for Inf/NaN (all-reduced over ranks) and return True when this update must be skipped; then call
        ``self.grad_scaler.update()``. A no-op returning False without scaling."""
        if self.grad_scaler is None:
            return False
        inside = {id(p) for b in self.resblocks for p in b.parameters()}
        return unscale_block_grads_(self.resblocks, self.grad_scaler,
                                    [p for p in self.parameters() if id(p) not in inside])

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor) -> None:
        """The initialization of one parameter (called per parameter under ZeRO-3, where each is gathered in turn)."""
        std = self.cfg.init_std
        if p.dim() == 1:
            nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
        elif name.endswith("fn.proj.weight"):  # output projections of resblocks: GPT-2 style 1/sqrt(2L)
            nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
        else:
            nn.init.normal_(p, std=std)

    @property
    def mask_schedule(self) -> list[str]:
        return [layer.attn.fn.kind for layer in self.layers]

    # -- embeddings and heads ------------------------------------------------------------------------------------
    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(text.shape[1], device=text.device)
        return self.text_emb(text) + self.text_pos(pos)[None]

    def embed_image(self, tokens: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """Image codes at raster positions start, start+1, ... with their row and column embeddings (``start``: an
        int or a one-element tensor on the device)."""
        pos = torch.arange(tokens.shape[1], device=tokens.device) + start
        W = self.cfg.image_grid
        return self.image_emb(tokens) + self.row_emb(pos // W)[None] + self.col_emb(pos % W)[None]

    def _logits(self, head: FP32Head, h: torch.Tensor) -> torch.Tensor:
        return head(self.final_norm(h))  # fp32 logits (paper: text and image logits in fp32)

    def _check_ids(self, name: str, ids: torch.Tensor, length: int | None, batch: int | None = None) -> None:
        """``ids`` must be int64 [B, length] (``length`` None: any), B ≥ 1 (and = ``batch`` when given). Shapes and
        dtypes only: a range check would cost a host sync per step (out-of-range ids end in embedding's IndexError)."""
        if not torch.is_tensor(ids):
            raise TypeError(f"{name} must be a tensor of int64 ids, got {type(ids).__name__}")
        if ids.dtype != torch.long:
            raise TypeError(f"{name} must hold int64 ids, got {ids.dtype}")
        if ids.dim() != 2 or (length is not None and ids.shape[1] != length) or ids.shape[0] < 1:
            want = f"[B ≥ 1, {length}]" if length is not None else "[B ≥ 1, n]"
            raise ValueError(f"{name} must be {want}, got shape {tuple(ids.shape)}")
        if batch is not None and ids.shape[0] != batch:
            raise ValueError(f"{name} has batch {ids.shape[0]}, but text has {batch}")

    # -- training ------------------------------------------------------------------------------------------------
    def forward(self, text: torch.Tensor, image_tokens: torch.Tensor, return_logits: bool = False) -> DalleOutput:
        """``text``: [B, T] from :func:`prepare_text`; ``image_tokens``: [B, W²] raster-order codes."""
        cfg = self.cfg
        self._check_ids("text", text, cfg.text_len)
        self._check_ids("image_tokens", image_tokens, cfg.image_len, batch=text.shape[0])
        x = torch.cat([self.embed_text(text), self.embed_image(image_tokens)], dim=1)
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x)
        T = cfg.text_len
        text_logits = self._logits(self.text_head, x[:, : T - 1])
        image_logits = self._logits(self.image_head, x[:, T - 1: -1])
        text_loss = F.cross_entropy(text_logits.reshape(-1, cfg.text_classes), text[:, 1:].reshape(-1))
        image_loss = F.cross_entropy(image_logits.reshape(-1, cfg.image_vocab_size), image_tokens.reshape(-1))
        loss = TEXT_LOSS_WEIGHT * text_loss + IMAGE_LOSS_WEIGHT * image_loss
        return DalleOutput(loss, text_loss.detach(), image_loss.detach(), image_logits if return_logits else None)

    # -- KV-cached inference (used by dalle_ds.sample) -----------------------------------------------------------
    def new_cache(self, batch: int, dtype: torch.dtype | None = None, device=None) -> list[dict]:
        """Per layer, key and value buffers [batch, heads, seq_len, head_dim], in ``dtype``. Default: the dtype the
        keys and values are computed in: the resblocks' autocast dtype when it is 16-bit and the parameters are
        fp32 (storing those bf16/fp16 values in fp32 would change nothing but double the cache and the bytes each
        decode step reads), else the parameters'. Entries are written before they are read, so the buffers start
        uninitialized."""
        cfg = self.cfg
        ref = self.text_emb.weight
        if dtype is None:
            compute = getattr(torch, cfg.resblock_dtype)
            dtype = compute if ref.dtype == torch.float32 and compute != torch.float32 else ref.dtype
        shape = (batch, cfg.n_heads, cfg.seq_len, cfg.head_dim)
        return [{"k": torch.empty(shape, dtype=dtype, device=device or ref.device),
                 "v": torch.empty(shape, dtype=dtype, device=device or ref.device)}
                for _ in self.layers]

    @torch.no_grad()
    def prefill(self, text: torch.Tensor, cache: list[dict], image_prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Run the T text positions and, if given, the first P image codes ``image_prefix`` [B, P] (a prompt: the
        paper's image-to-image translation primes the prior with the top of an image, §3.3); return the fp32
        logits for image code P [B, K]."""
        self._check_ids("text", text, self.cfg.text_len)  # a shorter text would leave cache entries unwritten
        if image_prefix is not None:
            self._check_ids("image_prefix", image_prefix, None, batch=text.shape[0])
            if image_prefix.shape[1] >= self.cfg.image_len:
                raise ValueError(f"image_prefix has {image_prefix.shape[1]} codes; at most {self.cfg.image_len - 1} "
                                 "leave a code to predict")
        if cache[0]["k"].shape[0] != text.shape[0]:
            raise ValueError(f"cache is for batch {cache[0]['k'].shape[0]}, text has {text.shape[0]} "
                             "(new_cache(batch))")
        x = self.embed_text(text)
        if image_prefix is not None and image_prefix.shape[1]:
            x = torch.cat([x, self.embed_image(image_prefix)], dim=1)
        for layer, c in zip(self.layers, cache):
            x = layer.step(x, c, None)
        return self._logits(self.image_head, x[:, -1])

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, image_pos: int | torch.Tensor, cache: list[dict]) -> torch.Tensor:
        """Feed image code ``tokens`` [B] at raster position ``image_pos``; return logits for the next code [B, K].
        ``image_pos`` may be a one-element integer tensor on the device: the step then makes no host sync and
        depends on the position only through that tensor (:mod:`dalle_ds.sample.cuda_graph` captures it once); an
        int is checked against the grid, a tensor is not (that would sync)."""
        if not torch.is_tensor(image_pos):
            if isinstance(image_pos, bool) or not isinstance(image_pos, int):
                raise TypeError(f"image_pos must be an int or a one-element integer tensor, got {image_pos!r}")
            if not 0 <= image_pos < self.cfg.image_len:
                raise ValueError(f"image_pos must be in [0, {self.cfg.image_len}), got {image_pos}")
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be [B] codes (one per sequence), got shape {tuple(tokens.shape)}")
        x = self.embed_image(tokens[:, None], start=image_pos.reshape(()) if torch.is_tensor(image_pos) else image_pos)
        position = self.cfg.text_len + image_pos
        for layer, c in zip(self.layers, cache):
            x = layer.step(x, c, position)
        return self._logits(self.image_head, x[:, -1])


def count_parameters(cfg: DalleConfig) -> int:
    """Parameter count without allocating (built on the meta device)."""
    with torch.device("meta"):
        model = DALLE(cfg)
    return sum(p.numel() for p in model.parameters())
