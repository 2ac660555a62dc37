"""Per-resblock gradient scaling (dalle_ds.precision; paper §2.4 and Appendix D.1): the scale rules, the injected-
overflow behaviour on the prior, gradient parity with and without scaling, checkpoints, and the cross-rank flags."""
import dataclasses
import math
import os

import pytest
import torch

from dalle_ds.config import ConfigError, DalleConfig
from dalle_ds.models.dalle import DALLE
from prior_batches import inject_inf_gradient, random_batch
from dalle_ds.precision import ResblockGradScaler, unscale_block_grads_
from dalle_ds.precision.resblock_scaling import BACKOFF_WINDOW, GROWTH

CFG = DalleConfig(text_vocab_size=50, text_len=6, image_vocab_size=20, image_grid=4, d_model=32, n_layers=3,
                  n_heads=2, conv_kernel=3, attn_backend="dense")


def _batch(B=4, seed=0):
    return random_batch(CFG, B, seed)


def _model(**kw) -> DALLE:
    torch.manual_seed(0)
    return DALLE(dataclasses.replace(CFG, **kw))


def _grads(model: DALLE) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------------------------
# The rules
# ------------------------------------------------------------------------------------------------------------------

def test_init_and_growth_on_clean_updates():
    s = ResblockGradScaler(4, replicas=8)
    assert s.scales.tolist() == [8 * 2.0 ** 13] * 4
    assert (s.min_scale, s.max_scale) == (8 * 2.0 ** 7, 8 * 2.0 ** 24)
    for _ in range(1000):
        assert s.update([False] * 4) is False
    assert s.log2_scales() == pytest.approx([3 + 13 + 1.0] * 4, abs=1e-9)  # ×2^(1/1000) per update → ×2 per 1000
    assert s.updates == 1000 and s.skipped == 0


def test_nonfinite_block_divides_only_its_scale_and_skips():
    s = ResblockGradScaler(3)
    skip = s.update([False, True, False])
    assert skip is True and s.skipped == 1
    assert s.scales[1] == pytest.approx(2.0 ** 13 / math.sqrt(2))
    assert s.scales[0] == s.scales[2] == pytest.approx(2.0 ** 13 * GROWTH)  # clean blocks still grow
    assert s.last_flags == [False, True, False]
    # nonfinite values outside every resblock (embeddings, heads): skip, but no scale is divided
    before = s.scales.clone()
    assert s.update([False] * 3, other_nonfinite=True) is True
    assert torch.allclose(s.scales, before * GROWTH)


def test_no_two_divisions_of_a_scale_within_the_window():
    s = ResblockGradScaler(2)
    s.update([True, False])  # update 0: block 0 divided
    once = 2.0 ** 13 / math.sqrt(2)
    for t in range(1, BACKOFF_WINDOW):  # updates 1..124: flagged every time, never divided again
        assert s.update([True, False]) is True
    assert s.scales[0] == pytest.approx(once)
    assert s.update([True, True]) is True  # update 125: allowed again for block 0; block 1's first division
    assert s.scales[0] == pytest.approx(once / math.sqrt(2))
    assert s.scales[1] == pytest.approx(2.0 ** 13 * GROWTH ** 125 / math.sqrt(2))
    # the window is per scale: block 1 was just divided, block 0 too; a clean update lets both grow
    s.update([False, False])
    assert s.scales[0] == pytest.approx(once / math.sqrt(2) * GROWTH)


def test_scales_are_clamped():
    s = ResblockGradScaler(2, replicas=2, backoff_window=0)
    for _ in range(40):
        s.update([True, False])
    assert s.scales[0] == 2 * 2.0 ** 7  # 40 divisions by √2 from 2^14 would be 2^-6
    s2 = ResblockGradScaler(1, replicas=2, growth=2.0)
    for _ in range(20):
        s2.update([False])
    assert s2.scales[0] == 2 * 2.0 ** 24


def test_state_dict_round_trip_keeps_the_window():
    s = ResblockGradScaler(3, replicas=2)
    for t in range(10):
        s.update([t == 3, t % 4 == 0, False])
    state = s.state_dict()
    t2 = ResblockGradScaler(3)
    t2.load_state_dict(state)
    assert t2.scales.tolist() == s.scales.tolist() and t2.updates == s.updates == 10
    assert t2.replicas == 2 and t2.last_division == s.last_division and t2.skipped == s.skipped
    for flags in ([True, True, False], [False, False, True]):  # block 0: inside its window, must not divide
        assert s.update(flags) == t2.update(flags)
    assert t2.scales.tolist() == s.scales.tolist()
    assert t2.log_dict()["grad_scale_log2/000_attn"] == pytest.approx(math.log2(float(s.scales[0])))
    with pytest.raises(ValueError, match="4 resblocks"):
        ResblockGradScaler(4).load_state_dict(state)
    # resumed on 8 replicas instead of 2: the scales carry M, the applied s/M is unchanged
    applied = [float(t2.applied_scale(k, torch.device("cpu"))) for k in range(3)]
    t2.set_replicas(8)
    assert t2.scales.tolist() == pytest.approx([4 * v for v in s.scales.tolist()])
    assert [float(t2.applied_scale(k, torch.device("cpu"))) for k in range(3)] == pytest.approx(applied)
    assert t2.min_scale == 8 * 2.0 ** 7


def test_bad_arguments_and_configs_are_refused():
    with pytest.raises(ValueError, match="replicas"):
        ResblockGradScaler(2, replicas=0)
    with pytest.raises(ValueError, match="2 flags for 3 blocks"):
        ResblockGradScaler(3).update([False, False])
    with pytest.raises(ConfigError, match="resblock_grad_scaling=true"):
        dataclasses.replace(CFG, resblock_dtype="float16").validate()
    with pytest.raises(ConfigError, match="resblock_dtype"):
        dataclasses.replace(CFG, resblock_dtype="half").validate()


# ------------------------------------------------------------------------------------------------------------------
# On the model
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_injected_overflow_lowers_only_that_scale_and_skips_the_update(dtype):
    model = _model(resblock_grad_scaling=True, resblock_dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    text, image = _batch()
    k = 3  # layer 1's MLP block
    handle = inject_inf_gradient(model.resblocks[k].fn.fc)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scales = model.grad_scaler.scales.clone()

    model(text, image).loss.backward()
    skip = model.unscale_grads_()
    assert skip is True
    # the filter kept the overflow inside block k: every other block's and the embeddings' gradients are finite
    for j, block in enumerate(model.resblocks):
        finite = all(torch.isfinite(p.grad).all() for p in block.parameters())
        assert finite == (j != k), j
    assert torch.isfinite(model.text_emb.weight.grad).all() and torch.isfinite(model.image_emb.weight.grad).all()
    assert model.grad_scaler.update() is True
    if not skip:
        opt.step()
    opt.zero_grad()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    new = model.grad_scaler.scales
    assert new[k] == pytest.approx(scales[k] / math.sqrt(2))
    others = [j for j in range(len(new)) if j != k]
    assert torch.allclose(new[others], scales[others] * GROWTH)

    handle.remove()  # the next update is clean: it is taken, and scale k grows again (no division)
    model(text, image).loss.backward()
    assert model.unscale_grads_() is False and model.grad_scaler.update() is False
    opt.step()
    assert not torch.equal(model.resblocks[k].fn.fc.weight, before["layers.1.mlp.fn.fc.weight"])
    assert new[k] == pytest.approx(scales[k] / math.sqrt(2) * GROWTH)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_gradient_parity_with_and_without_scaling():
    text, image = _batch()
    ref = _model()
    ref(text, image).loss.backward()
    want = _grads(ref)
    for kw, tol in [({"resblock_grad_scaling": True}, 1e-5),
                    ({"resblock_grad_scaling": True, "resblock_dtype": "float16"}, 5e-3)]:
        for replicas in (1, 4):
            model = _model(**kw)
            model.grad_scaler.reset(replicas=replicas)
            out = model(text, image)
            out.loss.backward()
            assert model.unscale_grads_() is False
            assert model.grad_scaler.update() is False
            got = _grads(model)
            inside = model.resblocks[2].fn.qkv.weight.grad
            assert torch.isfinite(inside).all()
            for n, g in got.items():
                assert _rel_err(g, want[n]) < tol, (kw, replicas, n, _rel_err(g, want[n]))


def test_scaling_is_exactly_what_reaches_the_fp16_branch():
    """The fp16 gradient inside block k is (fp32 gradient) · s_k / M: check it at the MLP hidden layer."""
    seen: dict[str, torch.Tensor] = {}

    def probe(name):
        def fwd_hook(_mod, _inp, out):
            out.register_hook(lambda g: seen.__setitem__(name, g.detach().clone()))
        return fwd_hook

    text, image = _batch()
    for name, kw in [("fp32", {}), ("scaled", {"resblock_grad_scaling": True, "resblock_dtype": "float16"})]:
        model = _model(**kw)
        if model.grad_scaler is not None:
            model.grad_scaler.reset(replicas=2)
            model.grad_scaler.scales[1] *= 4  # block 1 (layer 0's MLP) differs from the others
        model.resblocks[1].fn.fc.register_forward_hook(probe(name))
        model(text, image).loss.backward()
    assert seen["scaled"].dtype == torch.float16 and seen["fp32"].dtype == torch.float32
    applied = 2.0 ** 13 * 4  # (M · 2^13 · 4) / M
    assert _rel_err(seen["scaled"].float() / applied, seen["fp32"]) < 5e-3


def test_scaling_survives_gradient_accumulation_and_no_grad():
    text, image = _batch()
    ref = _model()
    for i in range(2):
        ref(*_batch(seed=i)).loss.backward()
    model = _model(resblock_grad_scaling=True)
    for i in range(2):
        model(*_batch(seed=i)).loss.backward()
    assert model.unscale_grads_() is False
    for n, g in _grads(model).items():
        assert _rel_err(g, ref.get_parameter(n).grad) < 1e-5
    with torch.no_grad():  # inference needs no scaler state
        assert torch.isfinite(model(text, image).loss)


def test_unscale_checks_block_count():
    model = _model(resblock_grad_scaling=True)
    with pytest.raises(ValueError, match="5 blocks for 6 scales"):
        unscale_block_grads_(model.resblocks[:5], model.grad_scaler)


# ------------------------------------------------------------------------------------------------------------------
# Two ranks: flags are all-reduced so every rank takes the same decision
# ------------------------------------------------------------------------------------------------------------------

def _worker(rank: int, world: int, out_dir: str) -> None:
    s = ResblockGradScaler(4, replicas=2)
    s.record_nonfinite(rank + 1, torch.tensor(True))  # rank 0 overflows in block 1, rank 1 in block 2
    skip = s.update()
    torch.save({"skip": skip, "scales": s.scales.tolist(), "flags": s.last_flags},
               os.path.join(out_dir, f"r{rank}.pt"))


def test_flags_are_all_reduced_across_ranks(tmp_path):
    from dalle_ds.dist.local_ranks import run_local_ranks

    run_local_ranks(_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    assert r0 == r1
    assert r0["skip"] is True and r0["flags"] == [False, True, True, False]
    assert r0["scales"][1] == r0["scales"][2] == pytest.approx(2 * 2.0 ** 13 / math.sqrt(2))


def test_unscale_hooks_match_the_explicit_unscale_and_flag_the_block():
    """The DeepSpeed route: gradients unscaled as they are produced (before ZeRO's post-accumulate hooks)."""
    from dalle_ds.precision import install_unscale_hooks

    text, image = _batch()
    explicit = _model(resblock_grad_scaling=True, resblock_dtype="float16")
    explicit(text, image).loss.backward()
    explicit.unscale_grads_()
    hooked = _model(resblock_grad_scaling=True, resblock_dtype="float16")
    handles = install_unscale_hooks(hooked.resblocks, hooked.grad_scaler)
    assert len(handles) == sum(1 for b in hooked.resblocks for _ in b.parameters())
    hooked(text, image).loss.backward()
    for n, g in _grads(hooked).items():
        assert _rel_err(g, explicit.get_parameter(n).grad) < 1e-6, n
    with pytest.raises(RuntimeError, match="already unscaled"):
        hooked.unscale_grads_()
    assert hooked.grad_scaler.update() is False

    hooked.zero_grad()
    handle = inject_inf_gradient(hooked.resblocks[4].fn.qkv)
    hooked(text, image).loss.backward()
    handle.remove()
    assert not torch.isfinite(hooked.resblocks[4].fn.qkv.weight.grad).all()  # left for DeepSpeed's overflow check
    assert hooked.grad_scaler.update() is True
    assert hooked.grad_scaler.last_flags == [k == 4 for k in range(6)]
