"""The 1-6-9 and 0-6-10 16-bit formats: the bit-level definition (the same text is in docs/fp169.md).

DALL-E (Ramesh et al. 2021, arXiv 2102.12092, Appendix B.2 and E.2) stores PowerSGD's error buffers, the P and Q
matrices, their all-reduce and the Adam mean in a "1-6-9" format (1 sign, 6 exponent, 9 significand bits) whose
maximum is "slightly less than 16", and the Adam variance in an unsigned "0-6-10" format, clipped at 5. The paper gives
nothing else; the rest below is this project's definition, implemented once in C++ (``csrc/fp169/fp169.h``, for the
CPU and CUDA ops) and once in pure torch (``reference.py``, a different algorithm), and tested bit for bit.

1-6-9 (signed, bias 59)
-----------------------
A code is 16 bits ``s eeeeee mmmmmmmmm`` (bit 15 = sign s, bits 14..9 = exponent e, bits 8..0 = significand m)::

    e = 0           subnormal   (-1)^s * m * 2^-67                    (m = 0: +0 / -0)
    1 <= e <= 62    normal      (-1)^s * (1 + m/512) * 2^(e - 59)
    e = 63, m = 0   (-1)^s * Inf                                      (0x7E00, 0xFE00)
    e = 63, m != 0  NaN; the canonical NaN written by encode is 0x7F00 (top significand bit set, sign 0)

* Bias 59: the paper's "maximum slightly less than 16" means the largest exponent is +3; reserving the top exponent
  code for Inf/NaN (IEEE style; the paper clamps infinities, so they exist) puts it at code 62, hence 62 - 3 = 59.
* Largest finite: (2 - 2^-9) * 2^3 = 15.984375 (code 0x7DFF). Smallest normal: 2^-58 = 3.47e-18 (0x0200).
  Smallest subnormal: 2^-67 = 6.78e-21 (0x0001). Spacing: 2^-9 relative (unit roundoff 2^-10 = 9.8e-4).
  Compare fp16: max 65504, smallest normal 6.1e-5; bf16: smallest normal 1.2e-38 but 7 significand bits.

Conversion from fp32 (``encode``)
---------------------------------
* Round to nearest, ties to even, on the exact fp32 value, with gradual underflow: values below 2^-58 round to a
  multiple of 2^-67; |x| <= 2^-68 (half the smallest subnormal; the tie goes to the even code 0) becomes a zero
  with x's sign. A subnormal that rounds up to 2^-58 becomes the smallest normal, as in IEEE.
* Overflow: a finite x whose rounded magnitude would reach 16 (|x| >= 15.9921875, the midpoint between the maximum
  and 16, which ties to the even 16) becomes +-Inf; +-Inf stays +-Inf.
* Saturating mode (``saturate=True``): those overflows and +-Inf become +-15.984375 (sign kept). NaN stays NaN.
  The all-reduce always saturates (the paper clamps infinities in the all-reduce result to the format's maximum,
  retaining the sign).
* NaN (any payload, any sign) becomes the canonical NaN 0x7F00.
* Inputs in fp16/bf16 are widened to fp32 exactly first; float64 inputs are rounded to fp32 first.
* With a scale constant: ``encode(x, scale) = Q(fl32(x * scale))``; ``decode(c, scale) = fl32(D(c) / scale)``.
  A power-of-two scale is exact (barring fp32 over/underflow); any other value costs one extra fp32 rounding.

Conversion to fp32 (``decode``): exact for every code; NaN codes give the fp32 NaN 0x7FC00000; -0 stays -0.
fp16/bf16 outputs are the fp32 value rounded to nearest even by the usual IEEE rules (they may over/underflow).

0-6-10 (unsigned, bias 60), for the Adam variance
-------------------------------------------------
A code is 16 bits ``eeeeee mmmmmmmmmm`` (bits 15..10 = exponent e, bits 9..0 = significand m), no sign::

    e = 0           subnormal   m * 2^-69                             (m = 0: zero)
    1 <= e <= 62    normal      (1 + m/1024) * 2^(e - 60)
    e = 63, m = 0   +Inf (0xFC00);  e = 63, m != 0: NaN (canonical 0xFE00)

* Bias 60: the paper clips the variance estimate at 5, so the maximum only has to reach 5; with the top code reserved
  the largest exponent is 62 - bias, and 2^(62-bias) * (2 - 2^-10) >= 5 needs 62 - bias >= 2. Bias 60 is the largest
  such bias: less than one binade is spent above the clip, and the window sits one binade lower than 1-6-9's (two at
  the bottom, counting the tenth significand bit), which the variance needs more than the mean: it is a square, so
  its logarithmic range is twice as wide.
  Largest finite (2 - 2^-10) * 4 = 7.99609375 (0xFBFF); smallest normal 2^-59 = 1.73e-18; smallest subnormal
  2^-69 = 1.69e-21.
* Same rounding, overflow and saturation rules as 1-6-9 (overflow from 7.998046875 = 8 - 2^-9 up). -0 becomes +0.
  A negative nonzero value (or -Inf) is not representable: it becomes NaN, or 0 when saturating (saturation clamps
  to [0, max]).

Storage
-------
Codes are held in ``torch.int16`` tensors: the 16 bits are the code, so codes >= 0x8000 (negative 1-6-9 values,
large 0-6-10 values) read as negative integers; ``codes.view(torch.uint16)`` shows them unsigned. ``torch.uint16``
is not used for storage because torch 2.x implements few kernels for it (no shifts, no arithmetic, no comparisons),
while int16 works everywhere; collectives move the codes as bytes (``view(torch.uint8)``) since NCCL has no 16-bit
integer type.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Format", "FP169", "FP0610", "FORMATS", "get_format"]


@dataclass(frozen=True)
class Format:
    """A 16-bit binary floating-point format with IEEE-style Inf/NaN in the top exponent code."""

    name: str
    """Human name, e.g. ``"1-6-9"``."""
    exp_bits: int
    """Exponent field width."""
    man_bits: int
    """Significand (fraction) field width."""
    bias: int
    """Exponent bias: a normal code with exponent field e has value (1 + m / 2^man_bits) * 2^(e - bias)."""
    signed: bool
    """Whether bit ``exp_bits + man_bits`` is a sign bit."""
    op_id: int
    """The ``fmt`` integer the C++ ops take (0 = 1-6-9, 1 = 0-6-10)."""

    @property
    def exp_reserved(self) -> int:
        """Exponent code of Inf and NaN (all ones)."""
        return (1 << self.exp_bits) - 1

    @property
    def sign_bit(self) -> int:
        """Mask of the sign bit (0 for unsigned formats)."""
        return (1 << (self.exp_bits + self.man_bits)) if self.signed else 0

    @property
    def inf_code(self) -> int:
        """Code of +Inf."""
        return self.exp_reserved << self.man_bits

    @property
    def nan_code(self) -> int:
        """Canonical NaN code written by encode."""
        return self.inf_code | (1 << (self.man_bits - 1))

    @property
    def max_code(self) -> int:
        """Code of the largest finite value."""
        return self.inf_code - 1

    @property
    def max(self) -> float:
        """Largest finite value, (2 - 2^-man_bits) * 2^(exp_reserved - 1 - bias)."""
        return (2.0 - 2.0 ** -self.man_bits) * 2.0 ** (self.exp_reserved - 1 - self.bias)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, 2^(1 - bias)."""
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive subnormal value, 2^(1 - bias - man_bits)."""
        return 2.0 ** (1 - self.bias - self.man_bits)

    @property
    def eps(self) -> float:
        """Spacing of codes relative to the binade start, 2^-man_bits (unit roundoff is half of it)."""
        return 2.0 ** -self.man_bits


FP169 = Format(name="1-6-9", exp_bits=6, man_bits=9, bias=59, signed=True, op_id=0)
"""1 sign, 6 exponent (bias 59), 9 significand bits: max 15.984375, min normal 2^-58, min subnormal 2^-67."""

FP0610 = Format(name="0-6-10", exp_bits=6, man_bits=10, bias=60, signed=False, op_id=1)
"""Unsigned, 6 exponent (bias 60), 10 significand bits: max 7.99609375, min normal 2^-59, min subnormal 2^-69."""

FORMATS = {f.name: f for f in (FP169, FP0610)}


def get_format(fmt: "str | Format") -> Format:
    """Return the Format for ``"1-6-9"``, ``"0-6-10"`` (also ``"169"``, ``"0610"``) or a Format instance."""
    if isinstance(fmt, Format):
        return fmt
    key = {"169": "1-6-9", "fp169": "1-6-9", "0610": "0-6-10", "fp0610": "0-6-10"}.get(str(fmt), str(fmt))
    try:
        return FORMATS[key]
    except KeyError:
        raise ValueError(f"unknown 16-bit format {fmt!r}; expected one of {sorted(FORMATS)}") from None
