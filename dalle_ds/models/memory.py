"""Training memory of the prior: a measurement of saved activations, and a per-GPU estimate for a preset.

Why: at 12B parameters the model state alone (fp32 master weights, gradients and two Adam moments: 16 bytes per
parameter) is ~190 GB, so whether a run fits a GPU depends on the ZeRO stage, the GPU count, the precision and
activation checkpointing (paper §2.4: "we also use activation checkpointing and recompute the activations within
the resblocks during the backward pass"). This module answers "does it fit" before launching, and measures what
autograd actually saves on a small model so the activation arithmetic is checked rather than assumed.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.autograd.graph import saved_tensors_hooks

from dalle_ds.config import ADAM_MOMENTS, DalleConfig


def billions(n: int, digits: int = 2) -> str:
    """A parameter count for people: "12.03 B", or "73.92 M" below a tenth of a billion (tiny presets read 0.00 B)."""
    return f"{n / 1e9:.{digits}f} B" if n >= 1e8 else f"{n / 1e6:.{digits}f} M"


def saved_activation_bytes(model: nn.Module, run: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Run ``run()`` (a forward pass returning the loss) and return (bytes autograd keeps for the backward, loss).

    Counts each storage once, excluding the model's parameters (a matmul saves its weight, which costs nothing
    extra). Under torch's non-reentrant activation checkpointing the tensors saved inside a checkpointed region are
    not kept (the checkpoint's own hooks take precedence over these), but the region's input is: resblocks with
    ``checkpoint`` set have their input counted through a forward pre-hook.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def note(t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes() > 0:
            kept[st.data_ptr()] = st.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        if getattr(mod, "checkpoint", False) is True and torch.is_grad_enabled():
            note(args[0])

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules() if hasattr(m, "checkpoint")]
    try:
        with saved_tensors_hooks(pack, lambda t: t):
            loss = run()
    finally:
        for h in handles:
            h.remove()
    return sum(kept.values()), loss


# ------------------------------------------------------------------------------------------------------------------
# Per-GPU estimate
# ------------------------------------------------------------------------------------------------------------------

EMA_PLACES = ("device", "host", "none")
"""Where the trainers' fp32 weight average lives (dalle_ds/train/ema.py): beside the model (the default), in host
memory (``ema_on_host``, the paper's App. B.2), or nowhere (a run without one)."""
PRECISIONS = ("bf16", "fp16-resblock", "fp32")
"""bf16: DeepSpeed bf16 mode (16-bit params/grads/activations, fp32 master weights and Adam moments in the
optimizer). fp16-resblock: fp32 parameters, gradients and Adam moments in DeepSpeed's fp32 mode, the resblock
branches computed in fp16 by the model with per-resblock gradient scaling (fp32 residual stream). fp32: no 16-bit."""


def parameter_breakdown(cfg: DalleConfig) -> dict[str, int]:
    """Closed-form parameter counts: ``matmul`` (resblock weight matrices, 16-bit in the paper's scheme) and
    ``fp32_islands`` (gains, biases, embeddings, unembeddings: fp32 in the paper, App. D.2)."""
    d, L, f = cfg.d_model, cfg.n_layers, cfg.mlp_ratio
    emb = (cfg.text_classes + cfg.text_len + cfg.image_vocab_size + 2 * cfg.image_grid) * d
    heads = (cfg.text_classes + cfg.image_vocab_size) * d
    matmul = L * (3 * d * d + d * d + 2 * f * d * d)
    gains_biases = L * (2 * d + 3 * d + d + 2 * d + f * d + d) + 2 * d
    return {"matmul": matmul, "fp32_islands": emb + heads + gains_biases, "per_layer_matmul": matmul // L,
            "total": matmul + emb + heads + gains_biases}


def activation_bytes(cfg: DalleConfig, micro_batch: int, precision: str, checkpointing: bool,
                     attention: str = "flash") -> dict[str, float]:
    """Bytes autograd keeps for one micro-batch: ``kept`` after the forward pass (resblocks + outside), and
    ``total`` = kept + ``recompute_peak`` (with checkpointing, the one block being recomputed in the backward).

    Per resblock, what this model saves (b·n·d = one activation, r = residual-stream bytes, a = branch bytes):
    attention: LN input (r) + LN output cast (a) + qkv (3a) + attention output (a) + proj input (a) = r + 6a;
    MLP: LN input (r) + fc input (a) + gelu input (f·a) + proj input (f·a) = r + (1 + 2f)a; LayerNorm statistics
    8·b·n each. ``attention="dense"`` adds the fp32 probabilities, 4·b·h·n². fp16-resblock also keeps the fp16
    copies of the weights that autocast makes (2 bytes × matmul parameters per block). With checkpointing only each
    resblock's input is kept (r per block), plus one block's full activations during its recomputation.
    Outside the resblocks: the embedding sum, the final LayerNorm input, fp32 logits and their log-softmax.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if attention not in ("flash", "dense"):
        raise ValueError(f"attention must be flash or dense, got {attention!r}")
    r, a = {"bf16": (2, 2), "fp16-resblock": (4, 2), "fp32": (4, 4)}[precision]
    b, n, d, h, f = micro_batch, cfg.seq_len, cfg.d_model, cfg.n_heads, cfg.mlp_ratio
    act = b * n * d
    ln_stats = 8 * b * n
    attn = (r + 6 * a) * act + ln_stats + (4 * b * h * n * n if attention == "dense" else 4 * b * h * n)
    mlp = (r + (1 + 2 * f) * a) * act + ln_stats
    if precision == "fp16-resblock":
        attn += 2 * 4 * d * d
        mlp += 2 * 2 * f * d * d
    blocks = cfg.n_layers * (attn + mlp)
    recompute = 0
    if checkpointing:
        blocks, recompute = 2 * cfg.n_layers * r * act, max(attn, mlp)
    logits = b * ((cfg.text_len - 1) * cfg.text_classes + cfg.image_len * cfg.image_vocab_size) * 4
    rest = 2 * r * act + 4 * act + 2 * logits
    return {"resblocks": float(blocks), "outside": float(rest), "kept": float(blocks + rest),
            "recompute_peak": float(recompute), "total": float(blocks + rest + recompute)}


#: DeepSpeed's default ``zero_optimization.reduce_bucket_size`` (elements), used when no DeepSpeed config is given.
DS_DEFAULT_REDUCE_BUCKET = 500_000_000


#: DeepSpeed's default ``stage3_param_persistence_threshold`` (elements): smaller parameters stay whole on every rank.
DS_DEFAULT_PERSISTENCE_THRESHOLD = 100_000


def _meta_prior(cfg: DalleConfig) -> nn.Module:
    """The prior with every parameter on the meta device: shapes without memory."""
    from dalle_ds.models.dalle import DALLE

    with torch.device("meta"):
        return DALLE(cfg)


def largest_layer_parameters(model: nn.Module) -> int:
    """Parameters of the largest module that owns parameters directly (what ZeRO-3 gathers at once)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def persistent_parameters(model: nn.Module, threshold: int) -> int:
    """Elements of the parameters ZeRO-3 never partitions: each of at most ``threshold`` elements (DeepSpeed's
    ``stage3_param_persistence_threshold``; gains, biases and the smaller matrices), kept whole on every rank."""
    return sum(p.numel() for p in model.parameters() if p.numel() <= threshold)


def estimate_per_gpu(cfg: DalleConfig, *, zero: int, gpus: int, precision: str = "bf16", micro_batch: int = 1,
                     offload: bool = False, attention: str = "flash", adam_moments: str = "fp32",
                     ds_config: dict | None = None, powersgd_rank: int = 0, gpus_per_machine: int = 8,
                     powersgd_error_dtype: str = "fp169", powersgd_compress: str | None = None,
                     ema: str = "device") -> dict[str, float]:
    """Bytes per GPU for the model state under a ZeRO stage, with Ψ parameters and N data-parallel GPUs.

    The ZeRO paper's accounting (Rajbhandari et al. 2020, §3: 16-bit params and grads, 12Ψ of fp32 master weights
    and Adam moments; stage 1 partitions the optimizer state, stage 2 also the gradients, stage 3 also the
    parameters), corrected by what DeepSpeed 0.19.8 was measured to hold (``benchmarks/memory_check.py``: every
    storage reachable from the engine at the optimizer step, ZeRO 0-3, 1 and 2 ranks, on CPU):

    * ``optimizer``: besides the two fp32 Adam moments (8Ψ), an fp32 master copy (4Ψ) and an fp32 copy of the
      gradient that the step reads (4Ψ): 16Ψ in bf16 mode at every stage, and in fp32 mode under ZeRO ≥ 1 (DeepSpeed's
      ZeRO optimizer clones an fp32 partition even when the parameters are fp32); without ZeRO an fp32 model needs
      only the moments (8Ψ). Divided by N under ZeRO ≥ 1. For ZeRO-2 in bf16 this makes 2Ψ + 18Ψ/N with the
      gradient partition: DeepSpeed's own estimate (``estimate_zero2_model_states_mem_needs``).
    * ``gradients``: 2 or 4 bytes per parameter, divided by N under ZeRO ≥ 2.
    * ``deepspeed_buffers`` (ZeRO-3): the contiguous-gradient bucket, ``reduce_bucket_size`` elements of the
      parameters' dtype (from ``ds_config``, else DeepSpeed's default 5e8; measured); the persistent parameters,
      those of at most ``stage3_param_persistence_threshold`` elements (default 1e5), whole on every rank instead of
      a 1/N share (measured); and the gathered working set DeepSpeed's estimator assumes, 4 bytes per parameter of
      the largest layer (``estimate_zero3_model_states_mem_needs``; released parameters are not visible at the step,
      so not measured here).

    ``powersgd_rank`` > 0 (total rank per machine of ``gpus_per_machine`` GPUs): the hierarchical PowerSGD reducer's
    state (``powersgd``): the error buffer of this GPU's shard of every compressed matrix (``powersgd_compress``,
    default the ``powersgd.compress`` default), 1/``gpus_per_machine`` of it in 1-6-9 (or fp32), and the fixed Q matrices
    (``dalle_ds.dist.powersgd.state_bytes_per_gpu``, the shapes ``register`` allocates). It is not divided by N:
    the paper's buffers are sharded inside a machine and replicated across machines.

    ``ema``: the trainers' fp32 weight average (``dalle_ds/train/ema.py``), 4 bytes per parameter the rank holds: the
    whole model under ZeRO 0-2, its 1/N partition under ZeRO-3. ``"device"``: on the GPU (``ema``); ``"host"``: in
    host memory with a pinned staging copy in the parameters' dtype (``host_ema``); ``"none"``: not counted.

    ``offload``: the optimizer state lives in CPU memory (``host_optimizer``). ``adam_moments="16bit"``: the resblock
    matmul weights' two moments take 2 bytes each instead of 4 (paper App. B.2, dalle_ds.precision.adam_moments).
    Not counted: ZeRO-1/2's transient reduction buckets during the backward (none were held at the step or after
    the backward in the measurement), ZeRO-3 prefetching beyond one layer, allocator fragmentation, the CUDA context.
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero}")
    if gpus < 1 or micro_batch < 1:
        raise ValueError("gpus and micro_batch must be ≥ 1")
    if offload and zero == 0:
        raise ValueError("optimizer offload needs ZeRO stage ≥ 1")
    if adam_moments not in ADAM_MOMENTS:
        raise ValueError(f"adam_moments must be {' or '.join(ADAM_MOMENTS)}, got {adam_moments!r}")
    if offload and adam_moments == "16bit":
        raise ValueError("16-bit Adam moments run on the GPU (optimizer offload uses DeepSpeed's fp32 CPU Adam)")
    if ema not in EMA_PLACES:
        raise ValueError(f"ema must be one of {', '.join(EMA_PLACES)}, got {ema!r}")
    if powersgd_rank and (gpus_per_machine < 1 or gpus % gpus_per_machine):
        raise ValueError(f"gpus_per_machine={gpus_per_machine} must divide gpus={gpus}")
    counts = parameter_breakdown(cfg)
    psi = counts["total"]
    p_bytes = g_bytes = 2 if precision == "bf16" else 4
    o_bytes = 8 if (p_bytes == 4 and zero == 0) else 16  # moments, + fp32 master and gradient copies (see above)
    params, grads, optim = p_bytes * psi, g_bytes * psi, o_bytes * psi
    if adam_moments == "16bit":
        optim -= 4 * counts["matmul"]  # two moments of 2 bytes instead of 4 on the matmul weights
    if zero >= 1:
        optim /= gpus
    if zero >= 2:
        grads /= gpus
    buffers = 0.0
    meta = _meta_prior(cfg) if zero >= 3 or powersgd_rank else None  # built once: the shapes of the terms below
    powersgd = 0.0
    if powersgd_rank:
        import re

        from dalle_ds.config import PowerSGDConfig
        from dalle_ds.dist.powersgd import PowerSGDSettings, state_bytes_per_gpu
        pattern = re.compile(powersgd_compress or PowerSGDConfig().compress)
        shapes = [tuple(p.shape) for n, p in meta.named_parameters() if pattern.search(n)]
        per_gpu_rank = PowerSGDSettings(rank=powersgd_rank).per_gpu_rank(gpus_per_machine)
        powersgd = float(state_bytes_per_gpu(shapes, gpus_per_machine, per_gpu_rank, powersgd_error_dtype))
    if zero >= 3:
        params /= gpus
        zero_cfg = (ds_config or {}).get("zero_optimization", {})
        if zero_cfg.get("contiguous_gradients", True):
            buffers += float(zero_cfg.get("reduce_bucket_size", DS_DEFAULT_REDUCE_BUCKET)) * p_bytes
        buffers += 4.0 * largest_layer_parameters(meta)
        threshold = int(zero_cfg.get("stage3_param_persistence_threshold", DS_DEFAULT_PERSISTENCE_THRESHOLD))
        buffers += p_bytes * persistent_parameters(meta, threshold) * (1.0 - 1.0 / gpus)  # whole, not 1/N
    held = psi / gpus if zero >= 3 else float(psi)  # the parameters (or partitions) this rank holds
    ema_bytes = {"device": (4.0 * held, 0.0), "host": (0.0, (4.0 + p_bytes) * held), "none": (0.0, 0.0)}[ema]
    out = {"parameters": params, "gradients": grads, "optimizer": 0.0 if offload else optim,
           "host_optimizer": optim if offload else 0.0, "deepspeed_buffers": buffers, "powersgd": powersgd,
           "ema": ema_bytes[0], "host_ema": ema_bytes[1]}
    states = params + grads + out["optimizer"] + buffers + powersgd + out["ema"]
    for ckpt in (False, True):
        acts = activation_bytes(cfg, micro_batch, precision, ckpt, attention)["total"]
        key = "activations_checkpointed" if ckpt else "activations"
        out[key] = acts
        out["total_checkpointed" if ckpt else "total"] = states + acts
    out["num_parameters"] = float(psi)
    return out


def format_estimate(name: str, est: dict[str, float], *, zero: int, gpus: int, precision: str, micro_batch: int,
                    offload: bool, adam_moments: str = "fp32") -> str:
    gib = 2.0 ** 30
    lines = [f"{name}: {billions(est['num_parameters'], 3)} parameters; ZeRO-{zero} over {gpus} GPU(s), {precision}, "
             f"micro-batch {micro_batch}{', optimizer offloaded to CPU' if offload else ''}"
             f"{', 16-bit Adam moments' if adam_moments == '16bit' else ''}",
             f"  {'parameters':<34} {est['parameters'] / gib:10.2f} GiB",
             f"  {'gradients':<34} {est['gradients'] / gib:10.2f} GiB",
             f"  {'optimizer state (Adam)':<34} {est['optimizer'] / gib:10.2f} GiB"]
    if est.get("deepspeed_buffers"):
        lines.append(f"  {'DeepSpeed buffers (ZeRO-3)':<34} {est['deepspeed_buffers'] / gib:10.2f} GiB")
    if est.get("powersgd"):
        lines.append(f"  {'PowerSGD error buffers and Q':<34} {est['powersgd'] / gib:10.2f} GiB")
    if est.get("ema"):
        lines.append(f"  {'EMA of the weights (fp32)':<34} {est['ema'] / gib:10.2f} GiB")
    if offload:
        lines.append(f"  {'  (in host memory, per GPU)':<34} {est['host_optimizer'] / gib:10.2f} GiB")
    if est.get("host_ema"):
        lines.append(f"  {'EMA, in host memory per GPU':<34} {est['host_ema'] / gib:10.2f} GiB")
    lines += [f"  {'activations, no checkpointing':<34} {est['activations'] / gib:10.2f} GiB",
              f"  {'activations, checkpointed':<34} {est['activations_checkpointed'] / gib:10.2f} GiB",
              f"  {'total per GPU, no checkpointing':<34} {est['total'] / gib:10.2f} GiB",
              f"  {'total per GPU, checkpointed':<34} {est['total_checkpointed'] / gib:10.2f} GiB",
              "  (optimizer state: fp32 master weights, the fp32 gradient copy and Adam moments, as DeepSpeed "
              "holds them; not counted: ZeRO-1/2 transient reduction buckets, fragmentation, the CUDA context)"]
    return "\n".join(lines)


def estimate_for_run(cfg: DalleConfig, ds_config: dict, world_size: int, *, adam_moments: str = "fp32",
                     micro_batch: int | None = None, powersgd_rank: int = 0, gpus_per_machine: int = 1,
                     powersgd_compress: str | None = None, ema: str = "device") -> tuple[dict[str, float], str]:
    """:func:`estimate_per_gpu` for a prior run as the trainer sets it up: the ZeRO stage, precision (DeepSpeed's bf16
    mode, or fp16 resblocks with per-resblock scaling on fp32 parameters, else fp32), micro-batch and optimizer
    offload read from the filled-in DeepSpeed config (``micro_batch``: the engine's, when given); activations with or
    without checkpointing as the model says.
    Returns the estimate and a one-line summary (the trainer logs it at start-up)."""
    from dalle_ds.train.ds_config import optimizer_offload, precision_mode, zero_stage

    zero = zero_stage(ds_config)
    if precision_mode(ds_config) == "bf16":  # also the older "bfloat16" section
        precision = "bf16"
    elif cfg.resblock_grad_scaling:
        precision = "fp16-resblock"
    else:
        precision = "fp32"
    offload = zero >= 1 and optimizer_offload(ds_config)
    micro = int(micro_batch or ds_config.get("train_micro_batch_size_per_gpu", 1))
    attention = "dense" if cfg.attn_backend == "dense" else "flash"
    est = estimate_per_gpu(cfg, zero=zero, gpus=world_size, precision=precision, micro_batch=micro, offload=offload,
                           attention=attention, adam_moments=adam_moments, ds_config=ds_config,
                           powersgd_rank=powersgd_rank, gpus_per_machine=gpus_per_machine,
                           powersgd_compress=powersgd_compress, ema=ema)
    ckpt = cfg.activation_checkpointing
    gib = 2.0 ** 30
    states = est["total"] - est["activations"]
    acts = est["activations_checkpointed" if ckpt else "activations"]
    line = (f"estimated memory per GPU: {states / gib:.2f} GiB of model states (ZeRO-{zero}, {precision}, "
            f"{world_size} GPU(s){', PowerSGD buffers' if powersgd_rank else ''}"
            f"{', optimizer offloaded' if offload else ''}{', EMA on the host' if ema == 'host' else ''})"
            f" + {acts / gib:.2f} GiB of activations (micro-batch {micro}, "
            f"{'checkpointed' if ckpt else 'no checkpointing'}) = {(states + acts) / gib:.2f} GiB; not counted: "
            "transient buckets, fragmentation, the CUDA context (python -m dalle_ds.models --memory)")
    return est, line
