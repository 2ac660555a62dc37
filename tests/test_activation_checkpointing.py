"""Activation checkpointing of every resblock (DalleConfig.activation_checkpointing, torch non-reentrant checkpoint):
identical gradients, gradients even when the block input needs none, and less saved activation memory (measured)."""
import dataclasses

import pytest
import torch

from dalle_ds.config import DalleConfig
from dalle_ds.models.dalle import DALLE, ResBlock, MLP
from dalle_ds.models.memory import saved_activation_bytes
from prior_batches import random_batch

CFG = DalleConfig(text_vocab_size=50, text_len=6, image_vocab_size=20, image_grid=4, d_model=32, n_layers=4,
                  n_heads=2, conv_kernel=3, attn_backend="dense")


def _batch(B=4, seed=0):
    return random_batch(CFG, B, seed)


def _run(ckpt: bool, **kw) -> tuple[float, dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = DALLE(dataclasses.replace(CFG, activation_checkpointing=ckpt, **kw))
    text, image = _batch()
    torch.manual_seed(1)  # dropout masks: the checkpoint replays the RNG state in the recomputation
    saved, loss = saved_activation_bytes(model, lambda: model(text, image).loss)
    loss.backward()
    if model.grad_scaler is not None:
        assert model.unscale_grads_() is False
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, saved


@pytest.mark.parametrize("kw", [{}, {"dropout": 0.1},
                                {"resblock_grad_scaling": True, "resblock_dtype": "float16"}],
                         ids=["fp32", "dropout", "fp16-scaled"])
def test_identical_gradients_and_less_saved_memory(kw):
    loss0, g0, saved0 = _run(False, **kw)
    loss1, g1, saved1 = _run(True, **kw)
    assert loss0 == loss1
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
    assert 0 < saved1 < saved0, (saved1, saved0)
    # what is left with checkpointing: one block input per resblock plus the embeddings / head / loss side
    if not kw:
        B, N, d = 4, CFG.seq_len, CFG.d_model
        assert saved1 < saved0 / 2 and saved1 >= 2 * CFG.n_layers * B * N * d * 4


def test_parameter_gradients_when_the_input_needs_no_grad():
    """The reentrant checkpoint's pitfall: an input without requires_grad silently drops parameter gradients."""
    cfg = dataclasses.replace(CFG, activation_checkpointing=True)
    block = ResBlock(cfg, MLP(cfg))
    x = torch.randn(2, 5, cfg.d_model)  # requires_grad=False
    block(x).square().sum().backward()
    assert block.fn.fc.weight.grad is not None and block.norm.weight.grad.abs().sum() > 0


def test_no_checkpoint_under_no_grad():
    torch.manual_seed(0)
    model = DALLE(dataclasses.replace(CFG, activation_checkpointing=True)).eval()
    text, image = _batch()
    with torch.no_grad():
        a = model(text, image).loss
    model.cfg = dataclasses.replace(model.cfg, activation_checkpointing=False)
    for b in model.resblocks:
        b.checkpoint = False
    with torch.no_grad():
        assert torch.equal(a, model(text, image).loss)
