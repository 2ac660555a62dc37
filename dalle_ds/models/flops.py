"""Useful training FLOPs of the prior per sequence: the numerator of model TFLOP/s and MFU in ``bench_train``.

Convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", §2.1; Chowdhery et al. 2022, PaLM,
Appendix B "model FLOPs utilization"): a weight matrix of P parameters applied to one token costs 2·P FLOPs in the
forward pass (one multiply and one add per weight) and 4·P in the backward pass (gradient w.r.t. the input and
w.r.t. the weight), so **6·P per token for a training step**. Attention's two matrix products add PaLM's term; here
it is counted only on the (query, key) pairs the sparse mask keeps (FlashAttention papers' convention for causal and
sparse kernels: count the useful work only). Recomputation by activation checkpointing is **not** counted: MFU
measures useful work, the hardware may do more (:func:`recompute_flops_per_sequence` gives the extra).

Per sequence of S = T + W² positions (T text, W×W image), d = d_model, r = mlp_ratio, L layers, H heads of size
d_head = d / H, C_text = text_vocab_size + T (text classes: BPE ids plus one padding token per position), K = image
vocabulary::

    matmul_params_per_layer = (3 + 1 + 2·r)·d²          qkv (d → 3d), out-proj (d → d), fc (d → r·d), proj (r·d → d)
                                                        (= 12·d² for r = 4; biases are adds, not counted)
    matmul_param_positions  = L·(3 + 1 + 2r)·d² · S     every resblock matmul runs on all S positions
                            + d·C_text · (T − 1)        text head: on the T − 1 text positions that predict text
                            + d·K · W²                  image head: on the W² positions that predict image codes
    matmul_flops   = 6 · matmul_param_positions
    attention_flops = 3 · Σ_layers 2·2·d_head·H · kept(mask of layer ℓ)      = 12·d · Σ_ℓ kept_ℓ
                      (QKᵀ: 2·d_head FLOPs per kept (query, key) pair per head, PV the same; backward = 2 × forward)
    training_flops_per_sequence = matmul_flops + attention_flops

``kept(mask)`` is :func:`dalle_ds.ops.attention.masks.kept_elements` of the layer's :class:`MaskSpec` (the one mask
definition: text→text causal, image→all text, image→image row/column/conv); the layer's kind comes from the paper's
schedule :func:`~dalle_ds.ops.attention.masks.layer_kind` (column if (i − 2) mod 4 = 0, row otherwise, conv last),
exactly as :class:`dalle_ds.models.dalle.Attention` builds its spec. For a full (unmasked) N×N mask this reduces to
PaLM's 6·N + 12·L·H·d_head·S per token.

Not counted (they are O(S·d) or O(kept) elementwise work, not matmuls): embeddings (lookups), LayerNorm, GELU,
softmax, bias adds, residual adds, dropout, the cross-entropy, the optimizer update, gradient clipping. Tokens per
sequence for tokens/s are the S positions the model runs on.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from dalle_ds.config import DalleConfig
from dalle_ds.ops.attention.masks import MaskSpec, kept_elements, keys_per_query, layer_kind


@functools.lru_cache(maxsize=64)
def _kept(spec: MaskSpec) -> int:
    return kept_elements(spec)


def layer_mask_specs(cfg: DalleConfig) -> list[MaskSpec]:
    """The MaskSpec of every layer, built as :class:`dalle_ds.models.dalle.Attention` builds it."""
    return [MaskSpec(layer_kind(i, cfg.n_layers), cfg.text_len, cfg.image_grid, conv_kernel=cfg.conv_kernel)
            for i in range(1, cfg.n_layers + 1)]


@dataclass(frozen=True)
class FlopCount:
    """Per-sequence counts (one sequence = S positions). FLOPs are for one training step (forward + backward)."""

    seq_len: int
    resblock_matmul_params: int
    """Weights of the matrices inside the resblocks (all layers)."""
    text_head_params: int
    image_head_params: int
    matmul_param_positions: int
    """Σ over matmul weights of (weights × positions the matrix is applied to)."""
    kept_pairs: tuple[int, ...]
    """Kept (query, key) pairs of each layer's mask (per head, per sequence)."""
    matmul_flops: int
    attention_flops: int

    @property
    def training_flops(self) -> int:
        return self.matmul_flops + self.attention_flops

    @property
    def forward_flops(self) -> int:
        return self.training_flops // 3


def count_flops(cfg: DalleConfig) -> FlopCount:
    """Useful training FLOPs per sequence for ``cfg`` (formula in the module docstring)."""
    d, L, r = cfg.d_model, cfg.n_layers, cfg.mlp_ratio
    S, T, W2 = cfg.seq_len, cfg.text_len, cfg.image_len
    per_layer = (3 + 1 + 2 * r) * d * d
    text_head, image_head = d * cfg.text_classes, d * cfg.image_vocab_size
    param_positions = L * per_layer * S + text_head * (T - 1) + image_head * W2
    kept = tuple(_kept(s) for s in layer_mask_specs(cfg))
    head_dim, heads = cfg.head_dim, cfg.n_heads
    attention = 3 * sum(2 * 2 * head_dim * heads * k for k in kept)
    return FlopCount(seq_len=S, resblock_matmul_params=L * per_layer, text_head_params=text_head,
                     image_head_params=image_head, matmul_param_positions=param_positions, kept_pairs=kept,
                     matmul_flops=6 * param_positions, attention_flops=attention)


def training_flops_per_sequence(cfg: DalleConfig) -> int:
    return count_flops(cfg).training_flops


def recompute_flops_per_sequence(cfg: DalleConfig) -> int:
    """Extra (not useful) FLOPs of activation checkpointing: every resblock branch's forward runs again in the
    backward pass, i.e. its matmuls (2·params·S) and attention (4·d·kept per layer); the heads are not recomputed."""
    c = count_flops(cfg)
    return 2 * c.resblock_matmul_params * c.seq_len + 4 * cfg.d_model * sum(c.kept_pairs)


# ---- one training step, by part: what bench_train compares each profiled part with ---------------------------
ADAM_BYTES_PER_PARAM = 28
"""AdamW on fp32 master weights, per parameter: read the weight, gradient and two moments, write the weight and the
moments (7 × 4 bytes)."""
BF16_EXTRA_BYTES_PER_PARAM = 6
"""DeepSpeed's bf16 mode, per parameter: refresh the bf16 copy of each updated fp32 weight (read 4, write 2)."""
GRAD_NORM_BYTES_PER_PARAM = 4
"""Gradient clipping reads every fp32 gradient once for the global norm."""


def training_step_parts(cfg: DalleConfig, sequences: int, params: int, precision: str, zero: int,
                        ranks: int) -> dict[str, dict]:
    """The work of one optimizer step on one rank, split as a profile splits it: ``{part: {"flops": n} or
    {"bytes": n}}``.

    ``sequences``: sequences this rank runs per step (micro batch × accumulation). The matmul FLOPs of
    :func:`count_flops` split into the resblocks' (bf16 in bf16 runs) and the output heads' (fp32 logits: IEEE fp32
    or TF32 matmuls, a different rate); attention on the kept mask pairs; the optimizer's bytes per parameter
    (:data:`ADAM_BYTES_PER_PARAM`, + :data:`BF16_EXTRA_BYTES_PER_PARAM` in bf16, + :data:`GRAD_NORM_BYTES_PER_PARAM`)
    on this rank's share of the parameters (ZeRO ≥ 1 partitions the update over the ranks). Not counted: norms,
    activations' elementwise work, the loss, communication."""
    fc = count_flops(cfg)
    T, W2, S = cfg.text_len, cfg.image_len, cfg.seq_len
    heads = 6 * (fc.text_head_params * (T - 1) + fc.image_head_params * W2)
    per_param = ADAM_BYTES_PER_PARAM + GRAD_NORM_BYTES_PER_PARAM + (BF16_EXTRA_BYTES_PER_PARAM if precision == "bf16"
                                                                    else 0)
    owned = -(-params // ranks) if zero >= 1 else params
    return {"resblock matmuls": {"flops": sequences * 6 * fc.resblock_matmul_params * S},
            "output heads": {"flops": sequences * heads},
            "attention": {"flops": sequences * fc.attention_flops},
            "optimizer": {"bytes": owned * per_param}}


# ---- sampling: what a perfect KV-cached sampler must compute and move --------------------------------------------
@dataclass(frozen=True)
class SamplingStep:
    """One forward call of cached sampling for a batch: the prefill (text positions) or one decode step."""

    flops: int
    bytes: int
    """Weights read once for the whole batch, plus per row: the cached keys/values the masks make visible, and the
    new keys/values written."""


def sampling_steps(cfg: DalleConfig, batch: int, param_bytes: int = 2, cache_bytes: int = 2) -> list[SamplingStep]:
    """The prefill and the W² − 1 decode steps that draw one image per caption for ``batch`` captions.

    Per row, with V_ℓ(p) = keys query p sees in layer ℓ (:func:`~dalle_ds.ops.attention.masks.keys_per_query`, the
    one mask definition) and P = L·(3 + 1 + 2r)·d² resblock matmul weights::

        prefill (text positions 0..T−1, then the image head on position T−1):
            FLOPs  2·P·T + Σ_ℓ 4·d·Σ_{p<T} V_ℓ(p) + 2·d·K
            bytes  writes of K and V: L·T·2·d·cache_bytes
        decode step at image position i (sequence position p = T + i, i = 0 .. W² − 2):
            FLOPs  2·(P + d·K) + Σ_ℓ 4·d·V_ℓ(p)
            bytes  Σ_ℓ (V_ℓ(p) + 1)·2·d·cache_bytes            (read the visible K/V, write the new K/V)

    and once per call for the whole batch the weights, (P + d·K)·param_bytes (prefill: P + d·K as well). Not
    counted: embeddings, norms, the text head (sampling never reads it), the draws, activations (O(d) per row). A
    perfect implementation is bound per call by max(bytes / bandwidth, FLOPs / matmul rate): see
    :func:`sampling_floor_seconds`."""
    d, L, r, K, T = cfg.d_model, cfg.n_layers, cfg.mlp_ratio, cfg.image_vocab_size, cfg.text_len
    P = L * (3 + 1 + 2 * r) * d * d
    weights = (P + d * K) * param_bytes
    specs = layer_mask_specs(cfg)
    per_kind = {spec: keys_per_query(spec).tolist() for spec in set(specs)}  # once per mask kind, not per layer
    seen = [per_kind[spec] for spec in specs]  # [L] x [S]
    text_pairs = sum(sum(v[:T]) for v in seen)
    steps = [SamplingStep(flops=batch * (2 * P * T + 4 * d * text_pairs + 2 * d * K),
                          bytes=weights + batch * L * T * 2 * d * cache_bytes)]
    for p in range(T, T + cfg.image_len - 1):
        keys = sum(v[p] for v in seen)
        steps.append(SamplingStep(flops=batch * (2 * (P + d * K) + 4 * d * keys),
                                  bytes=weights + batch * (keys + L) * 2 * d * cache_bytes))
    return steps


def sampling_floor_seconds(steps: list[SamplingStep], bytes_per_s: float, flops_per_s: float) -> float:
    """Time a perfect sampler needs: each call takes max(bytes / bandwidth, FLOPs / rate) (a roofline per call)."""
    return sum(max(st.bytes / bytes_per_s, st.flops / flops_per_s) for st in steps)
