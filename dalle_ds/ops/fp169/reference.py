"""Pure-torch reference of the 1-6-9 / 0-6-10 codec and the fused ops (the definition is in ``format.py``).

It shares no code with the C++ (``csrc/fp169/fp169.h``) and deliberately uses a different algorithm: the C++ rounds
by integer arithmetic on the fp32 bit pattern, this file rounds *values* in float64 (frexp for the binade,
``torch.round`` (half to even) on the value divided by its quantum, which is exact in float64) and builds codes from
the rounded value. Tests require the two to agree bit for bit. It runs on any device, slowly (float64 temporaries).

Every function is format-generic (any :class:`~dalle_ds.ops.fp169.format.Format`); tests also instantiate IEEE fp16
and bf16 as Formats and check this reference against torch's own conversions.
"""
from __future__ import annotations

import torch

from .format import FP169, Format, get_format

__all__ = ["encode", "decode", "error_add_", "reduce_rows", "pow2", "codes_to_int", "int_to_codes"]


def pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact 2^k in float64 for an integer tensor k in [-1022, 1023] (built from the exponent field)."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def codes_to_int(codes: torch.Tensor) -> torch.Tensor:
    """int16 codes -> int64 in [0, 65535] (the unsigned bit pattern)."""
    return codes.to(torch.int64) & 0xFFFF


def int_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 65535] -> int16 codes with the same 16 bits."""
    bits = bits.to(torch.int64)
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)


def _scale32(scale: float, device: torch.device) -> torch.Tensor:
    s = torch.tensor(scale, dtype=torch.float32, device=device)
    if s.item() == 0 or not torch.isfinite(s):
        raise ValueError(f"scale must be finite and nonzero in fp32, got {scale!r}")
    return s


def _to_fp32(x: torch.Tensor) -> torch.Tensor:
    if not (x.is_floating_point()):
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    return x.to(torch.float32)


def encode(x: torch.Tensor, saturate: bool = False, scale: float = 1.0, fmt: "str | Format" = FP169) -> torch.Tensor:
    """Q(fl32(x * scale)) as int16 codes of the same shape (see format.py for the rounding rules)."""
    f = get_format(fmt)
    x32 = _to_fp32(x)
    if scale != 1.0:
        x32 = x32 * _scale32(scale, x32.device)
    nan = torch.isnan(x32)
    inf = torch.isinf(x32)
    negative = torch.signbit(x32)
    a = torch.where(nan | inf, 0.0, x32.abs()).to(torch.float64)  # finite magnitudes, exact in float64

    # Binade of a: a in [2^e, 2^(e+1)); below the normal range the quantum stays that of the subnormals.
    _, exp = torch.frexp(a)  # a = mant * 2^exp, mant in [0.5, 1); a = 0 gives exp = 0
    e = torch.clamp(exp.to(torch.int64) - 1, min=1 - f.bias)
    quantum_exp = e - f.man_bits
    n_quanta = torch.round(a * pow2(-quantum_exp))  # exact scaling, then round half to even
    q = n_quanta * pow2(quantum_exp)  # the rounded magnitude (exact in float64)

    # Code of the rounded magnitude.
    normal = q >= f.min_normal
    _, exp_q = torch.frexp(q)
    eq = exp_q.to(torch.int64) - 1
    biased = torch.where(normal, eq + f.bias, torch.zeros_like(eq))
    man_normal = q * pow2(f.man_bits - eq) - (1 << f.man_bits)  # (q / 2^eq - 1) * 2^M
    man_sub = q * pow2(torch.full_like(eq, f.bias + f.man_bits - 1))  # q / 2^(1 - bias - M)
    man = torch.where(normal, man_normal, man_sub).to(torch.int64)
    mag = (biased << f.man_bits) | man

    overflow = (q > f.max) | inf
    mag = torch.where(overflow, f.max_code if saturate else f.inf_code, mag)
    if f.signed:
        bits = torch.where(negative, mag | f.sign_bit, mag)
    else:
        bad_negative = negative & (x32 != 0)  # -0 is +0; other negatives are not representable
        bits = torch.where(bad_negative, 0 if saturate else f.nan_code, mag)
    bits = torch.where(nan, f.nan_code, bits)
    return int_to_codes(bits)


def decode(
    codes: torch.Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float32, fmt: "str | Format" = FP169
) -> torch.Tensor:
    """fl32(D(codes) / scale), then rounded to ``dtype`` (to nearest even), same shape as codes."""
    f = get_format(fmt)
    if codes.dtype != torch.int16:
        raise TypeError(f"codes must be torch.int16, got {codes.dtype}")
    c = codes_to_int(codes)
    e = (c >> f.man_bits) & f.exp_reserved
    m = c & ((1 << f.man_bits) - 1)
    normal = ((1 << f.man_bits) + m).to(torch.float64) * pow2(e - f.bias - f.man_bits)
    sub = m.to(torch.float64) * pow2(torch.full_like(e, 1 - f.bias - f.man_bits))
    mag = torch.where(e == 0, sub, normal)
    mag = torch.where(e == f.exp_reserved, torch.where(m == 0, float("inf"), float("nan")), mag)
    if f.signed:
        negative = (c & f.sign_bit) != 0
        val = torch.where(negative & ~torch.isnan(mag), -mag, mag)  # every NaN code decodes to +qNaN, 0x7FC00000
    else:
        val = mag
    out = val.to(torch.float32)  # exact: every code is an fp32 value
    if scale != 1.0:
        out = out / _scale32(scale, out.device)
    out = out.to(dtype)
    # one NaN pattern per dtype, as the C++ op writes: torch's own fp32 -> bf16 cast gives 0x7FC0 or, vectorized on
    # an AVX-512 CPU, 0xFFFF; a 0-d tensor is converted by the scalar path (c10's 0x7FC0 / 0x7E00 / 0x7FC00000)
    return torch.where(torch.isnan(out), torch.full((), float("nan"), dtype=dtype, device=out.device), out)


def error_add_(err: torch.Tensor, grad: torch.Tensor, scale: float = 1.0, saturate: bool = False,
               fmt: "str | Format" = FP169) -> bool:
    """err = Q(fl32(D(err) + fl32(grad / scale))) if every grad value is finite (returns True); else err is left
    untouched and False is returned."""
    if err.shape != grad.shape:
        raise ValueError(f"err {tuple(err.shape)} and grad {tuple(grad.shape)} differ in shape")
    g = _to_fp32(grad)
    if not bool(torch.isfinite(g).all()):
        return False
    if scale != 1.0:
        g = g / _scale32(scale, g.device)
    err.copy_(encode(decode(err, fmt=fmt) + g, saturate=saturate, fmt=fmt))
    return True


def reduce_rows(codes: torch.Tensor, divisor: float = 1.0, saturate: bool = True,
                fmt: "str | Format" = FP169) -> torch.Tensor:
    """codes [rows, n] -> [n] codes of Q(fl32(sum_i D(codes[i]) / divisor)), summed in fp32 in row order."""
    if codes.dim() != 2 or codes.shape[0] < 1:
        raise ValueError(f"codes must be [rows >= 1, n], got {tuple(codes.shape)}")
    d = decode(codes, fmt=fmt)
    acc = d[0].clone()
    for i in range(1, d.shape[0]):
        acc = acc + d[i]
    if divisor != 1.0:
        acc = acc / _scale32(divisor, acc.device)
    return encode(acc, saturate=saturate, fmt=fmt)
