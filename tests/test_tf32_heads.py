"""``logits_matmul="tf32"``: the output heads' matmuls, and only they, run with CUDA TF32 allowed, in the forward and
the backward; the process's TF32 setting is unchanged outside; gradients are the ones of ``F.linear``."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dalle_ds.config import DALLE_PRESETS, ConfigError
from dalle_ds.models.dalle import DALLE
from dalle_ds.precision.tf32 import tf32_cuda_matmuls, tf32_linear
from prior_batches import random_batch

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class MatmulFlags(TorchDispatchMode):
    """Records (output shape, CUDA fp32 matmul setting) at every matmul that runs."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in MATMULS:
            self.seen.append((tuple(out.shape), torch.backends.cuda.matmul.fp32_precision))
        return out


@pytest.mark.parametrize("before", ["none", "ieee", "tf32"])
def test_setting_restored(before):
    m = torch.backends.cuda.matmul
    old = m.fp32_precision
    try:
        m.fp32_precision = before
        with tf32_cuda_matmuls():
            assert m.fp32_precision == "tf32"
        assert m.fp32_precision == before
        with pytest.raises(KeyError), tf32_cuda_matmuls():
            raise KeyError("restored on an exception too")
        assert m.fp32_precision == before
        m.fp32_precision = "none"  # the legacy getters work again after the new API was used inside
        assert torch.get_float32_matmul_precision() == "highest" and m.allow_tf32 is False
    finally:
        m.fp32_precision = old


def test_gradients_are_linear_ones():
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tf32_linear, (x, w))
    g = torch.randn(3, 5, 4, dtype=torch.float64)
    ours = torch.autograd.grad(tf32_linear(x, w), (x, w), g)
    ref = torch.autograd.grad(F.linear(x, w), (x, w), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _run(cfg, batch):
    torch.manual_seed(0)
    model = DALLE(cfg)
    flags = MatmulFlags()
    with flags:
        out = model(*batch)
        out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, flags.seen


def test_only_the_heads_use_tf32_forward_and_backward():
    cfg = dataclasses.replace(DALLE_PRESETS["test"], d_model=48, n_heads=3)  # d apart from both class counts
    batch = random_batch(cfg, B=4)  # B·positions (60, 64) apart from the class counts too
    loss32, grads32, seen32 = _run(cfg, batch)
    loss_tf, grads_tf, seen_tf = _run(dataclasses.replace(cfg, logits_matmul="tf32"), batch)
    # on a CPU TF32 changes no number: same loss and gradients as the IEEE heads
    assert torch.equal(loss32, loss_tf)
    for n in grads32:
        assert torch.equal(grads32[n], grads_tf[n]), n
    assert {flag for _, flag in seen32} == {torch.backends.cuda.matmul.fp32_precision}
    classes = {cfg.text_classes, cfg.image_vocab_size}
    tf32 = [shape for shape, flag in seen_tf if flag == "tf32"]
    # each head: one forward matmul (logits, last dim = classes), the input gradient and the weight gradient
    assert len(tf32) == 6, seen_tf
    assert sorted(shape[-1] for shape in tf32 if shape[-1] != cfg.d_model) == sorted(classes)  # logits
    assert sorted(shape for shape in tf32 if shape[0] in classes) == sorted((c, cfg.d_model) for c in classes)  # dW
    assert len(seen_tf) == len(seen32)  # every other matmul ran with the process's setting
    assert torch.backends.cuda.matmul.fp32_precision != "tf32"


def test_bad_value_refused():
    with pytest.raises(ConfigError, match="logits_matmul"):
        dataclasses.replace(DALLE_PRESETS["test"], logits_matmul="fp16").validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tf32_logits_close_and_not_ieee():
    torch.manual_seed(0)
    x = torch.randn(8, 512, 1024, device="cuda")
    w = torch.randn(8192, 1024, device="cuda") * 0.02
    ref = F.linear(x.double(), w.double())
    ieee, tf = F.linear(x, w), tf32_linear(x, w)
    err_ieee = ((ieee - ref).abs().max() / ref.abs().max()).item()
    err_tf = ((tf - ref).abs().max() / ref.abs().max()).item()
    # TF32 rounds the inputs to 10 significand bits (unit roundoff 2^-11): errors ~1e-3 of the largest logit, far
    # above IEEE fp32's; if TF32 were silently off, the two would be equal
    assert err_ieee < 1e-5 < err_tf < 5e-3, (err_ieee, err_tf)
