"""The 1-6-9 16-bit format (and the unsigned 0-6-10 variant): codec and fused ops for PowerSGD and Adam state.

Format (full definition in ``format.py`` and docs/fp169.md): 1 sign, 6 exponent (bias 59), 9 significand bits;
max (2 - 2^-9) * 2^3 = 15.984375, min normal 2^-58, subnormals down to 2^-67; round to nearest even from fp32;
the top exponent code holds +-Inf (m = 0) and NaN (canonical 0x7F00); ``saturate=True`` clamps overflow and +-Inf to
+-max. 0-6-10: unsigned, bias 60, max 7.996, down to 2^-69. Codes are stored in ``torch.int16`` tensors.

Ops (each takes ``fmt="1-6-9" | "0-6-10"`` and ``backend="auto" | "cpp" | "cuda" | "reference"``)::

    encode(x, saturate=False, scale=1.0)            -> int16 codes of Q(fl32(x * scale))
    decode(codes, scale=1.0, dtype=torch.float32)   -> fl32(D(codes) / scale), rounded to dtype
    error_add_(err_codes, grad, scale=1.0)          -> bool: err = Q(D(err) + grad / scale) unless grad has a
                                                       nonfinite value (then err is untouched and False is returned)
    error_add_async_(...)                           -> same, returning a 0-dim bool tensor (no host sync on GPU)
    reduce_rows(codes[rows, n], divisor=1.0)        -> Q_sat(sum over rows in fp32 / divisor): the all-reduce's step
    all_finite(codes)                               -> 0-dim bool tensor: no Inf/NaN code
    adamw16_step_(p, grad, m, v, scalars)           -> one AdamW step with the mean's codes in 1-6-9 and the
                                                       variance's in 0-6-10, fused (csrc/fp169/adamw16.h)

Backends: ``"cpp"`` is the C++ op on CPU tensors, ``"cuda"`` the CUDA op on CUDA tensors (both JIT-built on first use
by :mod:`dalle_ds.ops.builder`, once per machine), ``"reference"`` the pure-torch definition (any device, slow).
``"auto"`` picks the op for the tensor's device and falls back to the reference with a one-time warning when the op
cannot be built; :func:`op_status` says why.
"""
from __future__ import annotations

import logging
import math
import numbers

import torch

from . import _ext, reference
from .format import FORMATS, FP169, FP0610, Format, get_format

__all__ = [
    "Format", "FP169", "FP0610", "FORMATS", "get_format",
    "encode", "decode", "error_add_", "error_add_async_", "reduce_rows", "all_finite", "adamw16_step_",
    "ADAMW16_SCALARS",
    "op_status", "resolve_backend", "BACKENDS", "MAX", "MAX_0610",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cpp", "cuda", "reference")
MAX = FP169.max  # 15.984375
MAX_0610 = FP0610.max  # 7.99609375
_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def op_status(build: bool = True) -> list[dict]:
    """``[{"name": "fp169_cpu" | "fp169_cuda", "available": bool, "reason": str}]``.

    With ``build=True`` (default) the library is loaded, and JIT-built if this machine has no cached build yet (one
    time, about 20 s for the CPU op), so the answer is definitive; ``build=False`` only inspects the cache.
    """
    return _ext.status(build=build)


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend that runs for a tensor on ``device``; raises RuntimeError (with the reason) if a forced backend
    cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    want = {"cpu": "cpp", "cuda": "cuda"}.get(device.type)
    if backend == "auto":
        if want is None:
            return "reference"
        st = _ext.load()
        if st["cpu" if want == "cpp" else "cuda"]:
            return want
        if want not in _warned:
            _warned.add(want)
            reason = st["cpu_reason" if want == "cpp" else "cuda_reason"]
            logger.warning("fp169: %s op unavailable (%s); using the slower torch reference", want, reason)
        return "reference"
    if backend != want:
        raise RuntimeError(f"fp169 backend {backend!r} cannot run on a {device.type} tensor")
    st = _ext.load()
    if not st["cpu" if want == "cpp" else "cuda"]:
        reason = st["cpu_reason" if want == "cpp" else "cuda_reason"]
        raise RuntimeError(f"fp169 backend {backend!r} is unavailable: {reason}")
    return want


def _check_scale(scale: float, what: str = "scale") -> float:
    if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) or (torch.is_tensor(scale)
                                                                            and scale.numel() == 1)):
        raise TypeError(f"{what} must be a number, got {scale!r}")
    scale = float(scale)
    s32 = float(torch.tensor(scale, dtype=torch.float32))
    if s32 == 0.0 or not math.isfinite(s32):
        raise ValueError(f"{what} must be finite and nonzero in fp32, got {scale!r}")
    return scale


def _values(x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"expected a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    x = x.detach()  # the ops have no autograd formula; codes are storage, not differentiable values
    if x.dtype not in _VALUE_DTYPES:
        x = x.to(torch.float32)
    return x.contiguous()


def _check_codes(codes: torch.Tensor, name: str = "codes") -> None:
    if not torch.is_tensor(codes):
        raise TypeError(f"{name} must be a torch.int16 tensor of codes, got {type(codes).__name__}")
    if codes.dtype != torch.int16:
        raise TypeError(f"{name} must hold 16-bit codes as torch.int16, got {codes.dtype}")


def _check_out(out: torch.Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
    if out.dtype != dtype or out.shape != shape or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )


def encode(x: torch.Tensor, saturate: bool = False, scale: float = 1.0, *, fmt: "str | Format" = "1-6-9",
           backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Encode ``x * scale`` (rounded once to fp32) into int16 codes of the same shape.

    ``x``: float32/float16/bfloat16 (other float dtypes are rounded to fp32 first). ``saturate``: clamp overflow and
    +-Inf to +-max instead of +-Inf. ``out``: optional contiguous int16 tensor of x's shape to write into.
    """
    f = get_format(fmt)
    scale = _check_scale(scale)
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    b = resolve_backend(x.device, backend)
    if out is not None:
        _check_out(out, x.shape, torch.int16, x.device)
    if b == "reference":
        codes = reference.encode(x, saturate=saturate, scale=scale, fmt=f)
        return codes if out is None else out.copy_(codes)
    xc = _values(x)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.int16, device=x.device)
    torch.ops.dalle_ds_fp169.encode_out(xc, out, scale, bool(saturate), f.op_id)
    return out


def decode(codes: torch.Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float32, *,
           fmt: "str | Format" = "1-6-9", backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode int16 codes to ``D(codes) / scale`` (fp32 division), rounded to ``dtype`` (float32/float16/bfloat16)."""
    f = get_format(fmt)
    _check_codes(codes)
    scale = _check_scale(scale)
    if dtype not in _VALUE_DTYPES:
        raise TypeError(f"dtype must be one of {_VALUE_DTYPES}, got {dtype}")
    b = resolve_backend(codes.device, backend)
    if out is not None:
        _check_out(out, codes.shape, dtype, codes.device)
    if b == "reference":
        vals = reference.decode(codes, scale=scale, dtype=dtype, fmt=f)
        return vals if out is None else out.copy_(vals)
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    torch.ops.dalle_ds_fp169.decode_out(codes.contiguous(), out, scale, f.op_id)
    return out


def error_add_async_(err_codes: torch.Tensor, grad: torch.Tensor, scale: float = 1.0, *, saturate: bool = False,
                     fmt: "str | Format" = "1-6-9", backend: str = "auto") -> torch.Tensor:
    """``err_codes = Q(D(err_codes) + grad / scale)`` in place, unless ``grad`` holds an Inf/NaN: then ``err_codes`` is
    left untouched. Returns a 0-dim bool tensor on err's device, True when ``grad`` was finite (and the add done);
    on CUDA nothing waits for the GPU.

    ``grad``: float32/float16/bfloat16 with err's number of elements. The finiteness test is on ``grad`` itself;
    a sum that overflows the format becomes +-Inf in the buffer (or +-max with ``saturate=True``), see
    :func:`all_finite`.
    """
    f = get_format(fmt)
    _check_codes(err_codes, "err_codes")
    scale = _check_scale(scale)
    if grad.numel() != err_codes.numel():
        raise ValueError(f"grad has {grad.numel()} elements but err_codes has {err_codes.numel()}")
    if grad.device != err_codes.device:
        raise ValueError(f"grad is on {grad.device} but err_codes is on {err_codes.device}")
    b = resolve_backend(err_codes.device, backend)
    if b == "reference":
        ok = reference.error_add_(err_codes, grad.reshape(err_codes.shape), scale=scale, saturate=saturate, fmt=f)
        return torch.tensor(ok, device=err_codes.device)
    if not err_codes.is_contiguous():
        raise ValueError("err_codes must be contiguous for the C++/CUDA op (it is updated in place)")
    nonfinite = torch.empty(1, dtype=torch.int32, device=err_codes.device)
    torch.ops.dalle_ds_fp169.error_add_(err_codes, _values(grad), nonfinite, scale, bool(saturate), f.op_id)
    return (nonfinite == 0).reshape(())


def error_add_(err_codes: torch.Tensor, grad: torch.Tensor, scale: float = 1.0, *, saturate: bool = False,
               fmt: "str | Format" = "1-6-9", backend: str = "auto") -> bool:
    """Like :func:`error_add_async_` but returns a Python bool (synchronizes with the GPU)."""
    return bool(error_add_async_(err_codes, grad, scale, saturate=saturate, fmt=fmt, backend=backend))


def reduce_rows(codes: torch.Tensor, divisor: float = 1.0, *, saturate: bool = True, fmt: "str | Format" = "1-6-9",
                backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """codes ``[rows, n]`` -> ``[n]`` codes of ``Q(fl32(sum_i D(codes[i])) / divisor)``, the sum taken in fp32 in row
    order (deterministic). ``saturate`` (default True) clamps overflow and +-Inf to +-max, as the all-reduce does."""
    f = get_format(fmt)
    _check_codes(codes)
    divisor = _check_scale(divisor, "divisor")
    if codes.dim() != 2 or codes.shape[0] < 1:
        raise ValueError(f"codes must be [rows >= 1, n], got {tuple(codes.shape)}")
    b = resolve_backend(codes.device, backend)
    shape = torch.Size([codes.shape[1]])
    if out is not None:
        _check_out(out, shape, torch.int16, codes.device)
    if b == "reference":
        res = reference.reduce_rows(codes, divisor=divisor, saturate=saturate, fmt=f)
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty(shape, dtype=torch.int16, device=codes.device)
    torch.ops.dalle_ds_fp169.reduce_rows_out(codes.contiguous(), out, divisor, bool(saturate), f.op_id)
    return out


def all_finite(codes: torch.Tensor, fmt: "str | Format" = "1-6-9") -> torch.Tensor:
    """0-dim bool tensor: True when no code is +-Inf or NaN (pure torch, any device)."""
    f = get_format(fmt)
    _check_codes(codes)
    exponent = (codes.to(torch.int32) >> f.man_bits) & f.exp_reserved
    return (exponent != f.exp_reserved).all()


#: The order of ``adamw16_step_``'s scalars (csrc/fp169/fp169_kernels.h, AdamW16Scalars).
ADAMW16_SCALARS = ("b1", "1-b1", "b2", "1-b2", "clip", "decay", "1/sqrt(1-b2^t)", "eps", "step_size")


def adamw16_step_(p: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, v_codes: torch.Tensor,
                  scalars: "list[float]", *, backend: str = "auto", chunk: int = 1 << 24) -> None:
    """One AdamW step of ``p`` (in place) whose Adam mean is stored as 1-6-9 codes ``m_codes`` and variance as
    0-6-10 codes ``v_codes`` (both updated in place, saturating; the variance clipped by value first).

    ``scalars``: the :data:`ADAMW16_SCALARS` of this step as Python floats (each is rounded once to fp32). The
    arithmetic, one fp32 rounding per operation, is written out in csrc/fp169/adamw16.h; the C++ and CUDA ops run
    it fused, one pass over the five arrays, and the ``"reference"`` backend runs the same operations as torch ops
    (over ``chunk`` elements at a time, with the pure-torch codec), bit for bit the same results.

    ``p``: contiguous float32/float16/bfloat16; ``grad``: float32/float16/bfloat16 with p's number of elements (any
    other float dtype is rounded to fp32 first); codes: contiguous int16 tensors of that size; all on one device.
    """
    _check_codes(m_codes, "m_codes")
    _check_codes(v_codes, "v_codes")
    if m_codes.data_ptr() == v_codes.data_ptr() and m_codes.numel():
        raise ValueError("m_codes and v_codes are the same buffer: the mean and the variance need their own")
    if isinstance(scalars, (dict, str)) or not all(
            (isinstance(x, numbers.Real) and not isinstance(x, bool)) or (torch.is_tensor(x) and x.numel() == 1)
            for x in scalars):
        raise TypeError(f"scalars must be a list of {len(ADAMW16_SCALARS)} numbers {list(ADAMW16_SCALARS)}, got "
                        f"{scalars!r}")
    if len(scalars) != len(ADAMW16_SCALARS):
        raise ValueError(f"scalars must be {list(ADAMW16_SCALARS)}, got {len(scalars)} values")
    if not torch.is_tensor(grad) or not grad.is_floating_point():  # the reference took int64 gradients, the op not
        raise TypeError(f"grad must be a floating-point tensor, got {getattr(grad, 'dtype', type(grad).__name__)}")
    if p.dtype not in _VALUE_DTYPES or not p.is_contiguous():
        raise ValueError(f"p must be a contiguous float32/float16/bfloat16 tensor, got {p.dtype} "
                         f"(contiguous={p.is_contiguous()})")
    for name, t in (("grad", grad), ("m_codes", m_codes), ("v_codes", v_codes)):
        if t.numel() != p.numel() or t.device != p.device:
            raise ValueError(f"{name} must have p's {p.numel()} elements on {p.device}, got {t.numel()} on {t.device}")
        if name != "grad" and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    values = [float(x) for x in scalars]
    b = resolve_backend(p.device, backend)
    if b != "reference":
        torch.ops.dalle_ds_fp169.adamw16_step_(p, _values(grad), m_codes, v_codes, values)
        return
    b1, c1, b2, c2, clip, decay, inv_root_c2, eps, step_size = values
    flat_p, flat_g = p.detach().view(-1), grad.detach().reshape(-1)  # a Parameter is updated in place, as by the op
    flat_m, flat_v = m_codes.view(-1), v_codes.view(-1)
    for start in range(0, flat_p.numel(), chunk):
        end = min(start + chunk, flat_p.numel())
        g = flat_g[start:end].float()
        # One rounding per torch op (scalars become fp32; add_/sub_ without alpha are single roundings).
        m = reference.decode(flat_m[start:end], fmt=FP169).mul_(b1).add_(g * c1)
        v = reference.decode(flat_v[start:end], fmt=FP0610).mul_(b2).add_((g * g).mul_(c2)).clamp_(max=clip)
        flat_m[start:end] = reference.encode(m, saturate=True, fmt=FP169)
        flat_v[start:end] = reference.encode(v, saturate=True, fmt=FP0610)
        m = reference.decode(flat_m[start:end], fmt=FP169)
        v = reference.decode(flat_v[start:end], fmt=FP0610)
        x = flat_p[start:end] if p.dtype == torch.float32 else flat_p[start:end].float()
        x.mul_(decay)
        # The square root in float64, rounded to fp32: torch's fp32 sqrt on CPU is not correctly rounded (18% of
        # results one ulp off on an AVX-512 build); the ops use the IEEE fp32 square root.
        root = v.double().sqrt_().float()
        x.sub_(m.div_(root.mul_(inv_root_c2).add_(eps)).mul_(step_size))
        if p.dtype != torch.float32:
            flat_p[start:end] = x
