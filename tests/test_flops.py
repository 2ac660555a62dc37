"""The useful-FLOP count of dalle_ds.models.flops against independent counts: a case done on paper, the nn.Linear
modules of a real model, torch's FlopCounterMode on a real forward + backward, and the attention masks counted by
brute force from the spec's rules (written here again, not imported from masks.py)."""
import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dalle_ds.config import DALLE_PRESETS, DalleConfig
from dalle_ds.models.dalle import DALLE
from dalle_ds.models.flops import (SamplingStep, count_flops, recompute_flops_per_sequence, sampling_floor_seconds,
                                   sampling_steps, training_flops_per_sequence, training_step_parts)

# T = 4 text, W = 2 (4 image tokens), S = 8; 3 layers = row, column, conv; conv_kernel 1 (the conv window is the
# query itself); d = 8, 2 heads of 4; text classes 10 + 4 = 14; 6 image codes.
PAPER = DalleConfig(text_vocab_size=10, text_len=4, image_vocab_size=6, image_grid=2, d_model=8, n_layers=3,
                    n_heads=2, conv_kernel=1, attn_backend="dense")


def test_paper_case():
    c = count_flops(PAPER)
    # kept pairs: text→text causal 4·5/2 = 10; image→text 4 queries × 4 = 16; image→image:
    #   row (q−2 ≤ k ≤ q): image p = 0, 1, 2, 3 sees 1, 2, 3, 3 keys = 9 → 35
    #   column (same column, earlier rows): 1, 1, 2, 2 = 6 → 32
    #   conv, kernel 1: only itself, 4 → 30
    assert c.kept_pairs == (35, 32, 30)
    # attention: 3 (fwd+bwd) × 4·d_head·H (= 4·8) × (35 + 32 + 30) = 12 · 8 · 97
    assert c.attention_flops == 9312
    # matmuls: 3 layers × 12·8² = 2304 weights × 8 positions = 18432; text head 8·14 × 3 positions = 336;
    # image head 8·6 × 4 positions = 192; sum 18960, × 6
    assert c.matmul_param_positions == 18960 and c.matmul_flops == 113760
    assert training_flops_per_sequence(PAPER) == 123072
    # recompute: forward of the resblocks again: 2 · 2304 · 8 + 4 · 8 · 97
    assert recompute_flops_per_sequence(PAPER) == 36864 + 3104


def _positions(cfg: DalleConfig, name: str) -> int:
    if name == "text_head":
        return cfg.text_len - 1
    if name == "image_head":
        return cfg.image_len
    return cfg.seq_len


@pytest.mark.parametrize("preset", ["test", "tiny"])
def test_matmul_params_by_walking_linear_modules(preset):
    cfg = DALLE_PRESETS[preset]
    with torch.device("meta"):
        model = DALLE(cfg)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "text_head" in linears and "image_head" in linears and len(linears) == 4 * cfg.n_layers + 2
    total = sum(m.weight.numel() * _positions(cfg, n) for n, m in linears.items())
    assert count_flops(cfg).matmul_param_positions == total
    # and nothing else in the model is a matmul weight: the rest are embeddings (lookups) and 1-D gains/biases
    rest = {n for n, p in model.named_parameters() if p.dim() == 2} - {f"{n}.weight" for n in linears}
    assert all(n.split(".")[0] in ("text_emb", "text_pos", "image_emb", "row_emb", "col_emb") for n in rest), rest


def test_matmul_flops_match_flop_counter_on_real_step():
    """torch's FlopCounterMode on a real forward + backward: the Linear modules' mm/addmm FLOPs are 6·N·tokens."""
    cfg = dataclasses.replace(DALLE_PRESETS["test"], attn_backend="dense")
    torch.manual_seed(0)
    model = DALLE(cfg)
    B = 3
    text = torch.randint(0, cfg.text_classes, (B, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len))
    counter = FlopCounterMode(display=False)
    with counter:
        model(text, image).loss.backward()
    per_module = counter.get_flop_counts()
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    measured = 0
    for n in linear_names:
        counts = per_module.get(f"DALLE.{n}") or per_module.get(n)
        assert counts, f"no FLOPs recorded for {n}: {sorted(per_module)[:8]}"
        measured += sum(counts.values())
    assert measured == B * count_flops(cfg).matmul_flops


def _brute_visible(kind: str, T: int, W: int, K: int, q: int, k: int) -> bool:
    """The paper's mask rules (docs/attention.md), written independently of dalle_ds.ops.attention.masks."""
    if k > q:
        return False
    if k < T:  # text keys: causal for text queries, all of them for image queries
        return True
    if q < T:
        return False
    pq, pk = q - T, k - T
    off = pq - pk
    if kind == "row":
        return off <= W
    if kind == "column":
        return off % W == 0
    R = K // 2  # conv, raster wraparound: offsets {0..R} ∪ {dr·W + dc : 1 ≤ dr ≤ R, |dc| ≤ R}
    return off <= R or any(dr * W - R <= off <= dr * W + R for dr in range(1, R + 1))


@pytest.mark.parametrize("T,W,K,L", [(5, 4, 3, 6), (3, 6, 5, 5), (0, 5, 3, 3)])
def test_kept_pairs_by_brute_force(T, W, K, L):
    cfg = DalleConfig(text_vocab_size=8, text_len=max(T, 2), image_vocab_size=8, image_grid=W, d_model=8,
                      n_layers=L, n_heads=2, conv_kernel=K)
    T = cfg.text_len
    S = cfg.seq_len
    with torch.device("meta"):
        model = DALLE(cfg)
    schedule = model.mask_schedule  # the model's own per-layer kinds
    assert schedule[-1] == "conv" and (L < 2 or schedule[1] == "column")
    expected = tuple(sum(_brute_visible(kind, T, W, K, q, k) for q in range(S) for k in range(S))
                     for kind in schedule)
    c = count_flops(cfg)
    assert c.kept_pairs == expected
    # the dense boolean mask of each layer's own spec agrees too
    assert tuple(int(layer.attn.fn.spec.dense().sum()) for layer in model.layers) == expected
    assert c.attention_flops == 12 * cfg.d_model * sum(expected)


def test_paper_shape_sparsity_and_scale():
    """At 256 + 32×32 the sparse masks keep 38–44% of causal pairs (research notes §5.3), and the 1.3B preset's
    FLOPs per token are ≈ 6·N (attention adds a few percent at d = 2048)."""
    cfg = DALLE_PRESETS["1.3B"]
    c = count_flops(cfg)
    causal = cfg.seq_len * (cfg.seq_len + 1) // 2
    assert all(0.37 < k / causal < 0.45 for k in c.kept_pairs)
    n = c.resblock_matmul_params
    per_token = c.training_flops / cfg.seq_len
    assert 6 * n < per_token < 6 * n * 1.2


def test_sampling_steps_paper_case():
    """Cached sampling of PAPER (above) for 3 captions, bf16 weights and cache, counted on paper."""
    steps = sampling_steps(PAPER, batch=3, param_bytes=2, cache_bytes=2)
    assert len(steps) == 4  # the prefill, then decode steps at image positions 0, 1, 2 (the last code needs none)
    P, dK = 3 * 12 * 8 * 8, 8 * 6  # resblock weights 2304, image head 48
    weights = (P + dK) * 2
    # prefill: every layer is text-causal on the 4 text positions: 1 + 2 + 3 + 4 = 10 keys each, 3 layers
    assert steps[0] == SamplingStep(flops=3 * (2 * P * 4 + 4 * 8 * 30 + 2 * dK),
                                    bytes=weights + 3 * 3 * 4 * 2 * 8 * 2)
    # decode at sequence position p = 4 + i; keys seen (text 4 + image): row 1, 2, 3; column 1, 1, 2; conv 1, 1, 1
    for i, keys in enumerate([4 * 3 + 1 + 1 + 1, 4 * 3 + 2 + 1 + 1, 4 * 3 + 3 + 2 + 1]):
        assert steps[1 + i] == SamplingStep(flops=3 * (2 * (P + dK) + 4 * 8 * keys),
                                            bytes=weights + 3 * (keys + 3) * 2 * 8 * 2), i
    # the floor: a roofline per call
    fast_mem = sampling_floor_seconds(steps, bytes_per_s=1e30, flops_per_s=1.0)
    assert fast_mem == sum(st.flops for st in steps)
    assert sampling_floor_seconds(steps, bytes_per_s=1.0, flops_per_s=1e30) == sum(st.bytes for st in steps)
    mixed = sampling_floor_seconds(steps, bytes_per_s=1.0, flops_per_s=1.0)
    assert mixed == sum(max(st.bytes, st.flops) for st in steps)


def test_training_step_parts_paper_case():
    """PAPER (above), 5 sequences a step on a rank, counted by hand; the FLOP parts add up to count_flops."""
    parts = training_step_parts(PAPER, sequences=5, params=1001, precision="bf16", zero=2, ranks=4)
    assert parts["resblock matmuls"] == {"flops": 5 * 6 * 2304 * 8}
    assert parts["output heads"] == {"flops": 5 * 6 * (336 + 192)}  # text head 8·14 × 3, image head 8·6 × 4
    assert parts["attention"] == {"flops": 5 * 9312}
    # AdamW 28 + grad norm 4 + bf16 copy 6 bytes, on this rank's ceil(1001 / 4) = 251 parameters under ZeRO-2
    assert parts["optimizer"] == {"bytes": 251 * 38}
    flops = sum(v.get("flops", 0) for v in parts.values())
    assert flops == 5 * training_flops_per_sequence(PAPER)
    # fp32, ZeRO-0: every rank updates every parameter, no bf16 copy
    assert training_step_parts(PAPER, 5, 1001, "fp32", 0, 4)["optimizer"] == {"bytes": 1001 * 32}
