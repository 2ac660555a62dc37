// fp169.h: the bit logic of the 16-bit "1-6-9" format (and its unsigned "0-6-10" sibling), written once for the
// host and the device. Every C++ and CUDA op in csrc/fp169/ calls these functions and nothing else for the format.
//
// Provenance: the bit split (1 sign, 6 exponent, 9 significand bits; 0-6-10 for the Adam variance) and "a maximum
// slightly less than 16" are from Ramesh et al. 2021 (DALL-E, arXiv 2102.12092, Appendix B.2 and E.2). Everything else
// (bias 59, subnormals, round-to-nearest-even, the Inf/NaN codes, saturation, bias 60 for 0-6-10) is this project's
// choice, written out in docs/fp169.md and dalle_ds/ops/fp169/format.py. The Python reference
// (dalle_ds/ops/fp169/reference.py) implements the same definition with a different algorithm (float64 frexp and
// round) and shares no code with this file; tests compare the two bit for bit.
//
// Layout of a code (uint16), for Format<E, M, B, signed>:
//     [sign (1 bit, signed formats only)] [exponent e (E bits)] [significand m (M bits)]
//     e == 0            subnormal: (-1)^s * m * 2^(1 - B - M)            (m == 0: signed zero)
//     1 <= e <= 2^E-2   normal:    (-1)^s * (1 + m / 2^M) * 2^(e - B)
//     e == 2^E-1        m == 0: (-1)^s * Inf;   m != 0: NaN (canonical code: top significand bit set, sign 0)
//
// Conversion from fp32 rounds to nearest, ties to even, with gradual underflow into the subnormals. A finite value that
// rounds past the largest finite code becomes Inf, or the largest finite code with the input's sign when `saturate` is
// set (saturate also clamps +-Inf to +-max; NaN stays NaN). Unsigned formats: -0 becomes +0; a negative nonzero
// value (or -Inf) becomes NaN, or 0 when saturating. Rounding is integer arithmetic on the fp32 bit pattern; the few
// fp32 operations used for subnormal results (an exact power-of-two scaling, a truncating conversion and an exact
// subtraction in encode; one exact multiply in decode) see only normal numbers or zero. So results do not depend on
// the floating-point environment (rounding mode, flush-to-zero, denormals-are-zero, contraction).
//
// The same template also describes IEEE fp16 (Format<5, 10, 15, true>) and bf16 (Format<8, 7, 127, true>); the ops use
// those instances to widen fp16 inputs and to round decoded values into fp16/bf16 outputs.
#pragma once

#include <stdint.h>
#if !defined(__CUDACC__) && !defined(__HIPCC__)
#include <string.h>
#endif

// FP169_HD marks a function as callable from host and device code. nvcc defines __CUDACC__; a plain C++ compiler
// sees ordinary inline functions.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FP169_HD __host__ __device__ __forceinline__
#else
#define FP169_HD inline
#endif

namespace dalle_ds {
namespace fp169 {

// A 16-bit (or narrower) binary floating-point format with IEEE-style Inf/NaN in the top exponent code.
template <int kExpBits_, int kManBits_, int kBias_, bool kSigned_>
struct Format {
  static constexpr int kExpBits = kExpBits_;
  static constexpr int kManBits = kManBits_;
  static constexpr int kBias = kBias_;
  static constexpr bool kSigned = kSigned_;

  static_assert(kExpBits >= 2 && kManBits >= 2 && kManBits <= 22, "unsupported field widths");
  static_assert(kExpBits + kManBits + (kSigned ? 1 : 0) <= 16, "codes are stored in 16 bits");
  static_assert(kBias >= 1 && kBias <= 127, "the smallest normal must not be below fp32's (bias <= 127)");
  static_assert((1 << kExpBits) - 2 - kBias <= 127, "the largest finite value must be an fp32 normal");
  static_assert(kBias == 127 || 1 - kBias - kManBits > -126,
                "subnormals must be fp32 normals (1-6-9, 0-6-10, fp16), or the exponent must align with fp32's (bf16)");

  static constexpr uint32_t kExpReserved = (1u << kExpBits) - 1u;                  // exponent code of Inf/NaN
  static constexpr uint32_t kManMask = (1u << kManBits) - 1u;
  static constexpr uint32_t kMagMask = (1u << (kExpBits + kManBits)) - 1u;         // all bits but the sign
  static constexpr uint32_t kSignBit = kSigned ? (1u << (kExpBits + kManBits)) : 0u;
  static constexpr uint32_t kInf = kExpReserved << kManBits;                       // +Inf
  static constexpr uint32_t kNaN = kInf | (1u << (kManBits - 1));                  // canonical (quiet) NaN
  static constexpr uint32_t kMaxFinite = kInf - 1u;                                // largest finite magnitude
  // fp32 and this format share the exponent encoding up to this offset (fp32 bias 127 minus ours).
  static constexpr uint32_t kExpOffset = 127u - kBias;
  // Number of fp32 significand bits dropped when rounding to this format.
  static constexpr int kShift = 23 - kManBits;
};

using Fp169 = Format<6, 9, 59, true>;    // max (2 - 2^-9) * 2^3 = 15.984375, min normal 2^-58, min subnormal 2^-67
using Fp0610 = Format<6, 10, 60, false>; // max (2 - 2^-10) * 2^2 = 7.99609375, min normal 2^-59, min subn. 2^-69
using Half = Format<5, 10, 15, true>;    // IEEE binary16 (to round decoded values into fp16 outputs)
using BFloat16 = Format<8, 7, 127, true>;

#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define FP169_HAS_BIT_CAST 1
#endif
#endif

FP169_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#elif defined(FP169_HAS_BIT_CAST)
  return __builtin_bit_cast(uint32_t, f);  // like memcpy, but keeps loops vectorizable
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FP169_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#elif defined(FP169_HAS_BIT_CAST)
  return __builtin_bit_cast(float, u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// fp32 bit pattern -> code of format F (in the low 16 bits). Written as selects rather than early returns so that it
// vectorizes on the host and does not diverge on the device.
template <class F>
FP169_HD uint32_t encode_bits(uint32_t u, bool saturate) {
  const uint32_t a = u & 0x7FFFFFFFu;  // |x|
  const uint32_t e32 = a >> 23;        // fp32 biased exponent

  // Normal result (|x| >= 2^(1-B)): re-bias the exponent in place, then round away kShift bits to nearest-even.
  // A carry out of the significand bumps the exponent, which is what rounding up to the next binade means; a result
  // at or above the reserved exponent is an overflow. Inf inputs land there too (their rebased pattern is huge).
  const uint32_t r = a - (F::kExpOffset << 23);  // only used when e32 > kExpOffset, so it does not wrap
  const uint32_t half_ulp = (1u << (F::kShift - 1)) - 1u;
  const uint32_t normal = (r + half_ulp + ((r >> F::kShift) & 1u)) >> F::kShift;

  // Subnormal result (|x| < 2^(1-B)): the code is |x| / 2^(1-B-M) rounded to an integer, nearest-even.
  uint32_t sub;
  if constexpr (F::kExpOffset == 0) {
    // bf16-like (fp32's exponent bias): subnormals line up with fp32's, the rounding above covers them too.
    sub = normal;
  } else {
    // F's smallest subnormal is above fp32's subnormal range (1-6-9, 0-6-10, fp16), so every fp32 subnormal rounds
    // to 0 and all arithmetic below is on normal numbers or zero, exact, and independent of the rounding mode and of
    // flush-to-zero/denormals-are-zero: y = |x| * 2^(B+M-1) (exact power-of-two scaling, y < 2^M), its integer part by
    // truncating conversion, the exact remainder, then the nearest-even decision. (Vectorizes without per-lane
    // variable shifts, which baseline x86-64 lacks.)
    // Larger inputs are replaced by 0 (their result comes from the normal branch) so y stays below 2^M.
    const uint32_t a_small = a & (0u - static_cast<uint32_t>(e32 <= F::kExpOffset));
    const float to_units = bits_as_float(static_cast<uint32_t>(126 + F::kBias + F::kManBits) << 23);
    const float y = bits_as_float(a_small) * to_units;
    const int32_t whole = static_cast<int32_t>(y);
    const float rem = y - static_cast<float>(whole);
    // Round up iff rem > 0.5, or rem == 0.5 and whole is odd. rem >= 0, so comparing its bit pattern with 0.5's
    // (0x3F000000) as integers orders like the values; adding the odd bit turns "== and odd" into ">".
    const uint32_t odd = static_cast<uint32_t>(whole) & 1u;
    sub = static_cast<uint32_t>(whole) + static_cast<uint32_t>(float_as_bits(rem) + odd > 0x3F000000u);
  }

  // Blends with all-ones/all-zeros masks (not ?: or &&) keep compilers from introducing branches.
  const uint32_t use_normal = 0u - static_cast<uint32_t>(e32 > F::kExpOffset);
  uint32_t mag = (normal & use_normal) | (sub & ~use_normal);
  const uint32_t overflow = 0u - static_cast<uint32_t>(mag >= F::kInf);  // also +-Inf inputs
  const uint32_t sat = 0u - static_cast<uint32_t>(saturate);
  mag = (mag & ~overflow) | (((F::kMaxFinite & sat) | (F::kInf & ~sat)) & overflow);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(a > 0x7F800000u);
  const uint32_t negative = 0u - (u >> 31);

  uint32_t code;
  if constexpr (F::kSigned) {
    code = (F::kSignBit & negative) | mag;
  } else {
    // Unsigned: -0 is +0; negative nonzero values are not representable (NaN, or 0 when saturating).
    const uint32_t bad = negative & (0u - static_cast<uint32_t>(a != 0u));
    code = (mag & ~bad) | (F::kNaN & ~sat & bad);
  }
  return (F::kNaN & is_nan) | (code & ~is_nan);
}

// Code of format F -> fp32 bit pattern. Exact (every code is an fp32 value); NaN codes give the canonical fp32 quiet
// NaN 0x7FC00000.
template <class F>
FP169_HD uint32_t decode_bits(uint32_t c) {
  // Sign bit moved to fp32's bit 31 (kSignBit is 0 for unsigned formats).
  const uint32_t sign = (c & F::kSignBit) << (31 - F::kExpBits - F::kManBits);
  const uint32_t mag = c & F::kMagMask;
  const uint32_t e = mag >> F::kManBits;
  const uint32_t m = mag & F::kManMask;

  // Normal: move exponent and significand into fp32 position, then re-bias the exponent field.
  const uint32_t normal = (mag << F::kShift) + (F::kExpOffset << 23);

  // Subnormal: value m * 2^(1-B-M).
  uint32_t sub;
  if constexpr (F::kExpOffset == 0) {
    sub = mag << F::kShift;  // bf16-like: the same bits as the fp32 subnormal
  } else {
    // Every subnormal of F is an fp32 normal (1-6-9, 0-6-10, fp16): one exact fp32 multiply of two normal numbers
    // (m < 2^M converts exactly; the power of two is built from its bits) whose result is normal or zero, so
    // flush-to-zero/denormals-are-zero modes cannot change it. Unlike a count-leading-zeros, it vectorizes.
    const float unit = bits_as_float(static_cast<uint32_t>(128 - F::kBias - F::kManBits) << 23);
    sub = float_as_bits(static_cast<float>(static_cast<int32_t>(m)) * unit);
  }

  // Blend with all-ones/all-zeros masks rather than ?: so that compilers keep the loop branch-free (vectorizable).
  const uint32_t is_sub = 0u - static_cast<uint32_t>(e == 0u);
  const uint32_t is_special = 0u - static_cast<uint32_t>(e == F::kExpReserved);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(m != 0u);
  const uint32_t finite = sign | (normal & ~is_sub) | (sub & is_sub);
  const uint32_t special = (0x7FC00000u & is_nan) | ((sign | 0x7F800000u) & ~is_nan);
  return (special & is_special) | (finite & ~is_special);
}

// Convenience wrappers on values.
template <class F>
FP169_HD uint16_t encode(float x, bool saturate) {
  return static_cast<uint16_t>(encode_bits<F>(float_as_bits(x), saturate));
}

template <class F>
FP169_HD float decode(uint16_t c) {
  return bits_as_float(decode_bits<F>(c));
}

// True when the code is neither Inf nor NaN.
template <class F>
FP169_HD bool code_is_finite(uint16_t c) {
  return ((static_cast<uint32_t>(c) & F::kMagMask) >> F::kManBits) != F::kExpReserved;
}

// fp32 bit-pattern test used by the fused ops' "is the input finite" check.
FP169_HD bool float_bits_finite(uint32_t u) { return (u & 0x7F800000u) != 0x7F800000u; }

// Widening loads and rounding stores for the value types the ops accept, over raw 16-bit storage (so this header
// needs neither torch nor cuda_fp16.h). fp16 -> fp32 and bf16 -> fp32 are exact; fp32 -> fp16/bf16 round to nearest
// even, as torch's .to() does (NaN payloads aside: NaN becomes the canonical NaN).
struct F32Value {
  using Storage = float;
  FP169_HD static float load(float v) { return v; }
  FP169_HD static float store(float v) { return v; }
};
struct F16Value {
  using Storage = uint16_t;
  FP169_HD static float load(uint16_t v) { return bits_as_float(decode_bits<Half>(v)); }
  FP169_HD static uint16_t store(float v) { return static_cast<uint16_t>(encode_bits<Half>(float_as_bits(v), false)); }
};
struct BF16Value {
  using Storage = uint16_t;
  FP169_HD static float load(uint16_t v) { return bits_as_float(static_cast<uint32_t>(v) << 16); }
  FP169_HD static uint16_t store(float v) {
    return static_cast<uint16_t>(encode_bits<BFloat16>(float_as_bits(v), false));
  }
};

}  // namespace fp169
}  // namespace dalle_ds
