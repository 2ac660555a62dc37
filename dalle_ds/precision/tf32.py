"""A linear layer whose fp32 matmuls, forward and backward, run in TF32 on CUDA tensor cores, and only those.

Why: the prior's output heads compute fp32 logits (paper App. D.2). In IEEE fp32 a GPU runs them on the CUDA cores:
an H100 SXM does ~67 TFLOP/s there against ~495 dense TF32 and ~989 dense bf16 on its tensor cores (NVIDIA H100
datasheet). The heads are 7.8% of the 125M preset's training FLOPs, 3.1% of the 350M one's
(dalle_ds/models/flops.py), so in IEEE fp32 they may cost a large share of a bf16 step. TF32 keeps fp32's range,
fp32 accumulation and fp32 logits, and rounds the matmul inputs to a 10-bit significand (fp16's).

How: PyTorch decides TF32 per process (``torch.backends.cuda.matmul``), and autograd runs a backward outside any
``with`` block around the forward, so the switch is made inside a custom autograd function, in the forward and again
in the backward, and restored on exit. The flag is saved and restored through the same (PyTorch ≥ 2.9) API, so
the process's setting is exactly what it was outside the call. On a CPU the flag changes nothing (no TF32 there).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class _fp32_precision(contextlib.AbstractContextManager):
    """Inside: ``backend.fp32_precision = value`` (PyTorch ≥ 2.9's per-backend setting; setup.py requires ≥ 2.11).
    The previous setting comes back on exit. Reusable and re-entrant, like ``torch.autocast`` (callers keep one and
    enter it per batch)."""

    def __init__(self, backend, value: str):
        self.backend, self.value, self._saved = backend, value, []

    def __enter__(self):
        self._saved.append(self.backend.fp32_precision)
        self.backend.fp32_precision = self.value
        return self

    def __exit__(self, *exc):
        self.backend.fp32_precision = self._saved.pop()
        return False


def tf32_cuda_matmuls():
    """Inside: CUDA fp32 matmuls may use TF32 tensor cores (PyTorch's default: IEEE)."""
    return _fp32_precision(torch.backends.cuda.matmul, "tf32")


def ieee_cuda_convs():
    """Inside: cuDNN fp32 convolutions run in IEEE fp32. PyTorch's default lets them use TF32 (a 10-bit significand
    on the inputs), so an "fp32" convolutional network on an Ampere or later GPU is not fp32 unless asked; on a CPU
    the setting changes nothing."""
    return _fp32_precision(torch.backends.cudnn.conv, "ieee")


class _TF32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        with tf32_cuda_matmuls():
            return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx = gw = None
        with tf32_cuda_matmuls():
            if ctx.needs_input_grad[0]:
                gx = grad @ weight
            if ctx.needs_input_grad[1]:
                gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return gx, gw


def tf32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) with its forward and backward matmuls in TF32 on CUDA."""
    return _TF32Linear.apply(x, weight)
