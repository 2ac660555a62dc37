"""The 1-6-9 / 0-6-10 definition, checked on the pure-torch reference (no C++ build needed).

Expected codes below are worked out by hand from docs/fp169.md, not computed by the code under test.
"""
import math

import pytest
import torch

from dalle_ds.ops.fp169 import FP169, FP0610, Format, all_finite, get_format
from dalle_ds.ops.fp169 import reference as ref

ALL_CODES = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)


def u16(codes: torch.Tensor) -> list:
    return [int(c) & 0xFFFF for c in codes.reshape(-1)]


def random_fp32_bits(n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniformly random 32-bit patterns: every sign, exponent (Inf/NaN, subnormals) and significand."""
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int64, generator=gen)
    return bits.to(torch.int32).view(torch.float32)


@pytest.fixture
def gen():
    g = torch.Generator()
    g.seed()  # fresh each run; printed on failure through the test id below
    print("generator seed:", g.initial_seed())
    return g


def test_format_constants():
    assert FP169.max == (2 - 2**-9) * 2**3 == 15.984375
    assert FP169.min_normal == 2.0**-58 and FP169.min_subnormal == 2.0**-67
    assert (FP169.inf_code, FP169.nan_code, FP169.max_code, FP169.sign_bit) == (0x7E00, 0x7F00, 0x7DFF, 0x8000)
    assert FP0610.max == (2 - 2**-10) * 4 == 7.99609375 and FP0610.max >= 5  # the paper clips the variance at 5
    assert FP0610.min_normal == 2.0**-59 and FP0610.min_subnormal == 2.0**-69
    assert (FP0610.inf_code, FP0610.nan_code, FP0610.max_code, FP0610.sign_bit) == (0xFC00, 0xFE00, 0xFBFF, 0)
    assert get_format("169") is FP169 and get_format("0-6-10") is FP0610
    with pytest.raises(ValueError):
        get_format("1-5-10")


# (value, expected code, expected code when saturating)
EDGES_169 = [
    (0.0, 0x0000, None), (-0.0, 0x8000, None),
    (1.0, 0x7600, None), (-1.0, 0xF600, None), (1.5, 0x7700, None), (0.5, 0x7400, None),
    (1 + 2**-9, 0x7601, None),
    (1 + 2**-10, 0x7600, None),              # tie -> even (0x7600)
    (1 + 3 * 2**-10, 0x7602, None),          # tie -> even (0x7602)
    (1 + 2**-10 + 2**-20, 0x7601, None),     # just above the tie
    (-(1 + 2**-10 + 2**-20), 0xF601, None),
    (2 - 2**-11, 0x7800, None),              # rounds up into the next binade (2.0 = e 60)
    (15.984375, 0x7DFF, None),               # max
    (-15.984375, 0xFDFF, None),
    (15.9921875 - 2**-20, 0x7DFF, None),     # just below the overflow threshold
    (15.9921875, 0x7E00, 0x7DFF),            # tie between max and 16 -> even (16) -> overflow
    (-15.9921875, 0xFE00, 0xFDFF),
    (16.0, 0x7E00, 0x7DFF), (1e30, 0x7E00, 0x7DFF), (-3.4e38, 0xFE00, 0xFDFF),
    (math.inf, 0x7E00, 0x7DFF), (-math.inf, 0xFE00, 0xFDFF),
    (math.nan, 0x7F00, None), (-math.nan, 0x7F00, None),
    (2.0**-58, 0x0200, None),                # min normal
    (2.0**-58 - 2**-68, 0x0200, None),       # 511.5 subnormal quanta: tie -> even (512 = min normal)
    (2.0**-58 - 2**-67, 0x01FF, None),       # largest subnormal
    (2.0**-67, 0x0001, None),                # min subnormal
    (-(2.0**-67), 0x8001, None),
    (2.0**-68, 0x0000, None),                # half the min subnormal: tie -> even (0)
    (-(2.0**-68), 0x8000, None),
    (2.0**-68 * (1 + 2**-23), 0x0001, None), # just above half
    (3 * 2.0**-68, 0x0002, None),            # 1.5 quanta: tie -> even (2)
    (5 * 2.0**-68, 0x0002, None),            # 2.5 quanta: tie -> even (2)
    (1e-45, 0x0000, None),                   # fp32 subnormal
    (-1e-45, 0x8000, None),
]

EDGES_0610 = [
    (0.0, 0x0000, None), (-0.0, 0x0000, None),
    (1.0, 0xF000, None), (5.0, 0xF900, None), (7.99609375, 0xFBFF, None), (7.998046875 - 2**-20, 0xFBFF, None),
    (1 + 2**-11, 0xF000, None), (1 + 3 * 2**-11, 0xF002, None),
    (7.998046875, 0xFC00, 0xFBFF),           # tie between max and 8 -> even (8) -> overflow
    (math.inf, 0xFC00, 0xFBFF), (math.nan, 0xFE00, None),
    (-1.0, 0xFE00, 0x0000), (-math.inf, 0xFE00, 0x0000), (-(2.0**-80), 0xFE00, 0x0000),
    (2.0**-59, 0x0400, None), (2.0**-69, 0x0001, None), (2.0**-70, 0x0000, None), (3 * 2.0**-70, 0x0002, None),
]


@pytest.mark.parametrize("fmt,edges", [(FP169, EDGES_169), (FP0610, EDGES_0610)], ids=["1-6-9", "0-6-10"])
@pytest.mark.parametrize("saturate", [False, True])
def test_reference_edge_cases(fmt, edges, saturate):
    x = torch.tensor([v for v, _, _ in edges], dtype=torch.float64).to(torch.float32)
    want = [(s if (saturate and s is not None) else c) for _, c, s in edges]
    got = u16(ref.encode(x, saturate=saturate, fmt=fmt))
    bad = [(v, hex(w), hex(g)) for (v, _, _), w, g in zip(edges, want, got) if w != g]
    assert not bad, f"(value, expected, got): {bad}"


@pytest.mark.parametrize("fmt", [FP169, FP0610], ids=lambda f: f.name)
def test_reference_decode_values(fmt):
    d = ref.decode(ALL_CODES, fmt=fmt).to(torch.float64)
    bits = torch.arange(65536).view(-1)
    c = (bits.to(torch.int32) & 0xFFFF).to(torch.int64)
    c = torch.cat([c[32768:], c[:32768]])  # ALL_CODES starts at 0x8000
    e, m = (c >> fmt.man_bits) & fmt.exp_reserved, c & ((1 << fmt.man_bits) - 1)
    # Independent formula in Python floats on a sample of codes.
    for i in torch.randint(0, 65536, (2000,)).tolist() + [0, 1, 32767, 32768, 65535]:
        ci, ei, mi = int(c[i]), int(e[i]), int(m[i])
        sign = -1.0 if (fmt.signed and ci & fmt.sign_bit) else 1.0
        if ei == fmt.exp_reserved:
            expect = sign * math.inf if mi == 0 else math.nan
        elif ei == 0:
            expect = sign * mi * 2.0 ** (1 - fmt.bias - fmt.man_bits)
        else:
            expect = sign * (1 + mi / 2**fmt.man_bits) * 2.0 ** (ei - fmt.bias)
        got = float(d[i])
        same = got == expect and math.copysign(1, got) == math.copysign(1, expect)
        assert (math.isnan(expect) and math.isnan(got)) or same, (hex(ci), got, expect)
    # Positive finite codes decode to strictly increasing values.
    pos = d[(c < fmt.inf_code)]
    order = torch.argsort(c[(c < fmt.inf_code)])
    assert bool((pos[order][1:] > pos[order][:-1]).all())


@pytest.mark.parametrize("fmt", [FP169, FP0610], ids=lambda f: f.name)
def test_reference_nan_codes_decode_to_one_pattern(fmt):
    """docs/fp169.md: every NaN code (either sign, any payload) decodes to +qNaN, for fp32 0x7FC00000, and rounded
    to fp16 / bf16 0x7E00 / 0x7FC0, the patterns the C++ op writes (torch's vectorized bf16 cast would give 0xFFFF)."""
    for dtype, ibits, want in ((torch.float32, torch.int32, 0x7FC00000), (torch.float16, torch.int16, 0x7E00),
                               (torch.bfloat16, torch.int16, 0x7FC0)):
        for scale in (1.0, 3.0):
            d = ref.decode(ALL_CODES, scale=scale, dtype=dtype, fmt=fmt)
            nan = torch.isnan(d)
            assert int(nan.sum()) == ((1 << fmt.man_bits) - 1) * (2 if fmt.signed else 1)
            patterns = set(d[nan].view(ibits).tolist())
            assert patterns == {want}, (dtype, [hex(p & 0xFFFFFFFF) for p in patterns])


@pytest.mark.parametrize("fmt", [FP169, FP0610], ids=lambda f: f.name)
def test_reference_decode_encode_identity_all_codes(fmt):
    d = ref.decode(ALL_CODES, fmt=fmt)
    keep = ~torch.isnan(d)
    n_nan = (1 << fmt.man_bits) - 1
    assert int((~keep).sum()) == n_nan * (2 if fmt.signed else 1)
    back = ref.encode(d[keep], fmt=fmt)
    assert torch.equal(back, ALL_CODES[keep])
    assert torch.equal(ref.encode(d[keep], saturate=True, fmt=fmt)[torch.isfinite(d[keep])],
                       ALL_CODES[keep][torch.isfinite(d[keep])])


IEEE = {
    "fp16": (Format("fp16", 5, 10, 15, True, -1), torch.float16),
    "bf16": (Format("bf16", 8, 7, 127, True, -1), torch.bfloat16),
}


@pytest.mark.parametrize("name", sorted(IEEE))
def test_reference_algorithm_matches_torch_ieee_conversions(name, gen):
    """The reference is format-generic: instantiated as fp16/bf16 it must reproduce torch's fp32 -> fp16/bf16
    rounding (nearest even, subnormals, overflow to Inf) and the exact widening back."""
    fmt, dtype = IEEE[name]
    x = random_fp32_bits(200_000, gen)
    x = torch.cat([x, torch.randn(50_000, generator=gen) * 2.0 ** torch.randint(-30, 30, (50_000,), generator=gen)])
    x = x[~torch.isnan(x)]
    assert torch.equal(ref.encode(x, fmt=fmt), x.to(dtype).view(torch.int16))
    codes = ALL_CODES[~torch.isnan(ALL_CODES.view(dtype))]
    assert torch.equal(ref.decode(codes, fmt=fmt).view(torch.int32), codes.view(dtype).float().view(torch.int32))


@pytest.mark.parametrize("fmt", [FP169, FP0610], ids=lambda f: f.name)
def test_reference_is_round_to_nearest(fmt, gen):
    """On random finite in-range values the result is a nearest code: the error is at most half a spacing."""
    x = torch.exp(torch.empty(100_000).uniform_(math.log(1e-22), math.log(fmt.max), generator=gen))
    if fmt.signed:
        x = x * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1)
    q = ref.decode(ref.encode(x, fmt=fmt), fmt=fmt).double()
    xd = x.double()
    _, ex = torch.frexp(xd.abs())
    quantum = torch.pow(2.0, torch.clamp(ex.double() - 1, min=1 - fmt.bias) - fmt.man_bits)
    assert bool(((q - xd).abs() <= quantum / 2).all())
    assert bool((torch.sign(q) * torch.sign(xd) >= 0).all())


def test_reference_scale_and_decode_dtype():
    x = torch.tensor([1e-3, -2.5, 3e-7])
    codes = ref.encode(x, scale=1024.0)  # power-of-two scale: exact
    assert torch.equal(codes, ref.encode(x * 1024))
    assert torch.equal(ref.decode(codes, scale=1024.0), ref.decode(codes) / 1024)
    assert ref.decode(codes, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        ref.encode(x, scale=0.0)


def test_reference_error_add_semantics():
    err = ref.encode(torch.tensor([1.0, -2.0, 0.0, 15.0]))
    before = err.clone()
    assert ref.error_add_(err, torch.tensor([2.0, 2.0, 1e-20, 4.0]), scale=2.0)
    assert u16(err) == u16(ref.encode(torch.tensor([2.0, -1.0, 5e-21, 17.0])))
    assert u16(err)[3] == 0x7E00  # overflow -> Inf without saturation
    for bad in (math.nan, math.inf, -math.inf):
        err = before.clone()
        assert not ref.error_add_(err, torch.tensor([1.0, bad, 0.0, 0.0]))
        assert torch.equal(err, before)


def test_all_finite():
    assert bool(all_finite(ref.encode(torch.tensor([1.0, -15.9, 0.0]))))
    assert not bool(all_finite(ref.encode(torch.tensor([1.0, math.inf]))))
    assert not bool(all_finite(ref.encode(torch.tensor([1.0, -math.inf]))))
    assert not bool(all_finite(ref.encode(torch.tensor([math.nan]))))
    assert bool(all_finite(ref.encode(torch.tensor([7.5, 0.0]), fmt=FP0610), fmt=FP0610))
    assert not bool(all_finite(ref.encode(torch.tensor([9.0]), fmt=FP0610), fmt=FP0610))


def test_underflow_range_vs_fp16():
    """The point of the format: gradients divided by a large scale survive (fp16 flushes them)."""
    g = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 1e-9
    q = ref.decode(ref.encode(g))
    assert int((q == 0).sum()) == 0 and float(((q - g).abs() / g.abs()).max()) <= 2**-10
    assert int((g.half() == 0).sum()) > 9_000
