import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dalle_ds.config import DALLE_PRESETS, DalleConfig
from dalle_ds.models.dalle import DALLE, count_parameters, prepare_text
from dalle_ds.sample.generate import SamplingConfig, draw, filter_logits, sample_image_tokens

CFG = DalleConfig(text_vocab_size=50, text_len=6, image_vocab_size=20, image_grid=4, d_model=32, n_layers=6,
                  n_heads=2, conv_kernel=3, attn_backend="dense")


def _batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (B, 8), generator=g)
    lengths = torch.tensor([0, 3, 8][:B])
    text = prepare_text(ids, lengths, CFG)
    image = torch.randint(0, 20, (B, 16), generator=g)
    return ids, lengths, text, image


def test_mask_schedule_per_layer():
    assert DALLE(CFG).mask_schedule == ["row", "column", "row", "row", "row", "conv"]
    big = DalleConfig(n_layers=64, d_model=64, n_heads=1, text_len=4, image_grid=4)
    with torch.device("meta"):
        sched = DALLE(big).mask_schedule
    assert sched[:4] == ["row", "column", "row", "row"] and sched[-1] == "conv"
    assert [i + 1 for i, k in enumerate(sched) if k == "column"] == list(range(2, 63, 4))
    assert sched.count("row") == 47


def test_per_position_padding_tokens():
    ids, lengths, text, _ = _batch()
    assert text[:, 0].tolist() == [CFG.bos_id] * 3
    # caption of length 0: every position after <bos> is its own padding token 50 + i
    assert text[0, 1:].tolist() == [50 + i for i in range(1, 6)]
    assert text[1, 1:4].tolist() == ids[1, :3].tolist() and text[1, 4:].tolist() == [54, 55]
    assert text[2, 1:].tolist() == ids[2, :5].tolist()  # truncated to T - 1 caption tokens
    # the padding tokens are distinct learned embeddings, not one shared id
    model = DALLE(CFG)
    e = model.text_emb.weight
    assert e.shape[0] == 50 + 6 and not torch.equal(e[54], e[55])


@torch.no_grad()  # values only (float() of a tensor that requires grad warns)
def test_loss_is_one_eighth_text_seven_eighths_image():
    _, _, text, image = _batch()
    model = DALLE(CFG)
    out = model(text, image, return_logits=True)
    assert out.image_logits.dtype == torch.float32 and out.image_logits.shape == (3, 16, 20)
    assert float(out.loss) == pytest.approx(float(out.text_loss) / 8 + 7 * float(out.image_loss) / 8, rel=1e-6)
    # each part is normalised by its own token count: compare with a hand computation
    h = model(text, image, return_logits=True)
    manual_img = F.cross_entropy(h.image_logits.reshape(-1, 20), image.reshape(-1))
    assert float(out.image_loss) == pytest.approx(float(manual_img), rel=1e-6)
    assert 0 < float(out.text_loss) < 2 * math.log(56) and 0 < float(out.image_loss) < 2 * math.log(20)


def test_image_positions_only_see_what_their_mask_allows():
    """Changing a future image code must not change earlier logits; the last (conv) layer limits the reach."""
    _, _, text, image = _batch(B=1)
    model = DALLE(CFG).eval()
    base = model(text, image, return_logits=True).image_logits
    changed = image.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 20
    after = model(text, changed, return_logits=True).image_logits
    # logits at index i predict code i from codes < i: indices ≤ 10 are unchanged, some later ones change
    torch.testing.assert_close(after[:, :11], base[:, :11], rtol=0, atol=0)
    assert not torch.allclose(after[:, 11:], base[:, 11:])


@pytest.mark.parametrize("backend", ["dense", "flex", "sdpa"])
def test_cached_sampling_equals_full_forward(backend):
    """Also for a prior trained on flex or sdpa, which have no decode path: cached sampling decodes on "auto"."""
    torch.manual_seed(0)
    model = DALLE(dataclasses.replace(CFG, attn_backend=backend)).eval()
    _, _, text, _ = _batch()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    tok_c, logits_c = sample_image_tokens(model, text, generator=g1, use_cache=True, return_logits=True)
    tok_f, logits_f = sample_image_tokens(model, text, generator=g2, use_cache=False, return_logits=True)
    assert torch.equal(tok_c, tok_f)
    torch.testing.assert_close(logits_c, logits_f, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # (flex on a CPU has no backward)
        full = model(text, tok_c, return_logits=True).image_logits  # one pass over the sampled sequence
    torch.testing.assert_close(logits_c, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt_len", [0, 1, 6, 15, 16])
def test_sampling_from_an_image_prompt(prompt_len):
    """The first P codes are given (the cached path runs them in the prefill under each layer's mask): they come
    back unchanged, cached and full-forward sampling draw the same rest, and each drawn code's logits are those of
    one forward pass over the finished sequence."""
    torch.manual_seed(0)
    model = DALLE(CFG).eval()
    _, _, text, image = _batch()
    prefix = image[:, :prompt_len]
    out = {}
    for cached in (True, False):
        out[cached] = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(5), use_cache=cached,
                                          return_logits=True, image_prefix=prefix)
    (tok, logits), (tok_f, logits_f) = out[True], out[False]
    assert torch.equal(tok[:, :prompt_len], prefix) and torch.equal(tok, tok_f)
    assert logits.shape == (3, 16 - prompt_len, 20)
    torch.testing.assert_close(logits, logits_f, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        full = model(text, tok, return_logits=True).image_logits[:, prompt_len:]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    # the prompt conditions the rest: another prompt (same draws) changes the first drawn code's distribution
    if 0 < prompt_len < 16:
        other = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(5), return_logits=True,
                                    image_prefix=(prefix + 1) % 20)[1]
        assert not torch.allclose(other[:, 0], logits[:, 0])


def test_image_prompt_errors():
    model = DALLE(CFG).eval()
    _, _, text, image = _batch()
    for bad, match in [(image[:2, :4], r"\[batch=3, P\]"), (image[:, :4].float(), "integer codes"),
                       (torch.cat([image, image[:, :1]], 1), "only 16"), (image[:, :4] + 20, r"\[0, 20\)"),
                       (image[:, :4] - 21, r"\[0, 20\)")]:
        with pytest.raises(ValueError, match=match):
            sample_image_tokens(model, text, image_prefix=bad)


def test_cached_sampling_runs_the_resblocks_in_their_training_precision():
    """With bf16 resblocks the cached steps compute q, k, v (and the MLP) under the same autocast as training."""
    torch.manual_seed(0)
    model = DALLE(dataclasses.replace(CFG, resblock_dtype="bfloat16")).eval()
    _, _, text, _ = _batch()
    seen = []
    for layer in model.layers:
        layer.attn.fn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tokens, logits = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(3), return_logits=True)
    assert set(seen) == {torch.bfloat16} and len(seen) == CFG.n_layers * CFG.image_len  # prefill + 15 steps
    full = model(text, tokens, return_logits=True).image_logits
    torch.testing.assert_close(logits, full, rtol=0, atol=5e-3)


@pytest.mark.parametrize("resblock_dtype", ["bfloat16", "float16"])
def test_16bit_cache_and_inference_weights_change_no_bit(resblock_dtype):
    """With 16-bit resblocks the keys and values are computed in 16 bits: the default cache stores them so (half
    the bytes of an fp32 one) and the logits of every cached step are the same bits as with an fp32 cache; storing
    the resblock matmul weights in 16 bits for inference (``to_inference_precision_``) also changes no bit."""
    torch.manual_seed(0)
    model = DALLE(dataclasses.replace(CFG, resblock_dtype=resblock_dtype,
                                      resblock_grad_scaling=resblock_dtype == "float16")).eval()
    dt = getattr(torch, resblock_dtype)
    _, _, text, _ = _batch()
    B = text.shape[0]
    codes = torch.randint(0, CFG.image_vocab_size, (B, CFG.image_len), generator=torch.Generator().manual_seed(2))

    def step_logits(cache):
        out = [model.prefill(text, cache)]
        out += [model.decode_step(codes[:, i], i, cache) for i in range(CFG.image_len - 1)]
        return torch.stack(out, 1)

    cache = model.new_cache(B)
    assert {c[k].dtype for c in cache for k in "kv"} == {dt}
    ref = step_logits(model.new_cache(B, dtype=torch.float32))
    assert ref.dtype == torch.float32 and torch.equal(step_logits(cache), ref)
    tok, logits = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(3), return_logits=True)

    assert model.to_inference_precision_() is model
    linears = [m for b in model.resblocks for m in b.fn.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * CFG.n_layers and {p.dtype for m in linears for p in m.parameters()} == {dt}
    others = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert others and all(".fn." not in n for n in others)  # norms, embeddings, heads stay fp32
    assert torch.equal(step_logits(model.new_cache(B)), ref)
    tok2, logits2 = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(3), return_logits=True)
    assert torch.equal(tok2, tok) and torch.equal(logits2, logits)


def test_inference_precision_leaves_an_fp32_model_alone():
    model = DALLE(CFG)
    before = {n: p for n, p in model.named_parameters()}
    model.to_inference_precision_()
    assert all(p is before[n] and p.dtype == torch.float32 for n, p in model.named_parameters())
    assert {c["k"].dtype for c in model.new_cache(1)} == {torch.float32}


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]]).repeat(20_000, 1)  # unnormalized ok
    idx = draw(probs, torch.Generator().manual_seed(0))
    first, second = idx[0::2], idx[1::2]
    freq = torch.bincount(first, minlength=5).float() / len(first)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]), rtol=0, atol=0.015)  # ~4.5 sigma
    assert torch.all(second == 4)
    one_hot = torch.zeros(4, 7)
    one_hot[torch.arange(4), torch.tensor([0, 6, 3, 5])] = 1.0
    assert draw(one_hot).tolist() == [0, 6, 3, 5]


def test_filtering():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, SamplingConfig(top_k=2))).tolist() == [[False, False, True, True]]
    p = torch.softmax(logits, -1)[0]  # ≈ [0.64, 0.24, 0.09, 0.03]
    kept = ~torch.isinf(filter_logits(logits, SamplingConfig(top_p=float(p[0] + p[1]) - 1e-3)))
    assert kept.tolist() == [[True, True, False, False]]
    # the temperature divides the logits less their row maximum (the same softmax)
    torch.testing.assert_close(filter_logits(logits, SamplingConfig(temperature=2.0)), (logits - 3.0) / 2)
    torch.testing.assert_close(torch.softmax(filter_logits(logits, SamplingConfig(temperature=2.0)), -1),
                               torch.softmax(logits / 2, -1))
    # a tiny temperature is the argmax, not an overflow: the raw quotients were ±inf and the softmax NaN
    tiny = torch.softmax(filter_logits(torch.tensor([[0.5, 2.0, -1.0, 1.9]]), SamplingConfig(temperature=1e-40)), -1)
    assert tiny.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0).validate()
    for bad, needle in (({"temperature": "1"}, "temperature must be a number, got '1'"),
                        ({"top_k": 2.5}, "top_k must be an int, got 2.5"), ({"top_k": None}, "top_k must be an int")):
        with pytest.raises(TypeError, match=needle):
            SamplingConfig(**bad).validate()


def test_preset_parameter_counts_on_meta_device():
    n12 = count_parameters(DALLE_PRESETS["12B"])
    assert 11.5e9 < n12 < 12.5e9
    c = DALLE_PRESETS["12B"]
    assert (c.n_layers, c.n_heads, c.d_model, c.text_len, c.image_len) == (64, 62, 3968, 256, 1024)
    # hand count: 12 d² + 13 d per layer, embeddings, heads
    d, L = c.d_model, c.n_layers
    emb = (c.text_classes + c.text_len + c.image_vocab_size + 2 * c.image_grid) * d
    per_layer = 12 * d * d + 13 * d
    heads = (c.text_classes + c.image_vocab_size) * d
    assert n12 == emb + L * per_layer + 2 * d + heads


def test_bad_config():
    from dalle_ds.config import ConfigError

    with pytest.raises(ConfigError, match="divisible"):
        DALLE(DalleConfig(d_model=30, n_heads=4, n_layers=1, text_len=4, image_grid=2))


def test_bad_inputs_are_named_errors_not_deep_ones():
    """Shapes, dtypes and batch sizes are checked where they enter (no host sync: ids are not range-checked)."""
    cfg = DALLE_PRESETS["tiny"]
    model = DALLE(cfg).eval()
    text = torch.randint(0, cfg.text_vocab_size, (2, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len))
    with pytest.raises(TypeError, match="image_tokens must hold int64 ids, got torch.int32"):
        model(text, image.int())
    with pytest.raises(ValueError, match="image_tokens has batch 1, but text has 2"):
        model(text, image[:1])
    with pytest.raises(ValueError, match=r"text must be \[B ≥ 1, 24\], got shape \(0, 24\)"):
        model(text[:0], image[:0])
    with pytest.raises(ValueError, match=r"text must be \[B ≥ 1, 24\], got shape \(24,\)"):
        model(text[0], image)
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match=r"text must be \[B ≥ 1, 24\], got shape \(2, 10\)"):  # was a silent read
        model.prefill(text[:, :10], cache)                                                    # of unwritten cache
    with pytest.raises(ValueError, match="cache is for batch 2, text has 1"):
        model.prefill(text[:1], cache)
    model.prefill(text, cache)
    with pytest.raises(ValueError, match=r"image_pos must be in \[0, 256\), got 256"):
        model.decode_step(image[:, 0], cfg.image_len, cache)
    with pytest.raises(TypeError, match="image_pos must be an int"):
        model.decode_step(image[:, 0], 5.7, cache)
    with pytest.raises(ValueError, match=r"tokens must be \[B\] codes"):
        model.decode_step(image[:, :1], 0, cache)
