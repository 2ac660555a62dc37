// adamw16.h: one AdamW step of one element whose Adam moments are stored in 16 bits (the mean in 1-6-9, the variance
// in 0-6-10 clipped by value; paper App. B.2), written once for the host (fp169_cpu.cpp) and the device
// (fp169_cuda.cu). The Python side (dalle_ds/precision/adam_moments.py) documents the optimizer and holds a torch
// version of the same arithmetic; tests compare them bit for bit.
//
// The arithmetic, every line one fp32 rounding (fl), the scalars fp32 values computed once per step on the host:
//     m' = fl(fl(m * b1) + fl(g * c1))                       c1 = 1 - b1
//     v' = min(fl(fl(v * b2) + fl(fl(g * g) * c2)), clip)   c2 = 1 - b2 (a NaN stays NaN)
//     m, v = Q_sat(m'), Q_sat(v')  and the step reads the stored values D(m), D(v)
//     x  = fl(p * decay)                                     decay = 1 - lr * weight_decay
//     p' = fl(x - fl(fl(D(m) / fl(fl(fl(sqrt(D(v))) * r) + eps)) * step_size))
//                                                            r = 1 / sqrt(1 - b2^t), step_size = lr / (1 - b1^t)
// then p' is rounded to the parameter's dtype (fp32, or fp16 / bf16 to nearest even). Each operation is rounded on
// its own, never contracted into a fused multiply-add: nvcc would otherwise fuse a*b + c, so the device code uses the
// _rn intrinsics, and the host build passes -ffp-contract=off. The divide and the square root are IEEE's (no fast
// math), so host, device and torch give the same bits.
#pragma once

#include "fp169.h"
#include "fp169_kernels.h"

#if !defined(__CUDA_ARCH__)
#include <math.h>
#endif

// The step function must be inlined into the host loop for it to vectorize (GCC 13 otherwise keeps it as a call:
// 107 ms against 19 ms for 4M elements on one EPYC core).
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
#define ADAMW16_INLINE FP169_HD
#else
#define ADAMW16_INLINE inline __attribute__((always_inline))
#endif

namespace dalle_ds {
namespace fp169 {

FP169_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FP169_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FP169_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FP169_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FP169_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return sqrtf(a);
#endif
}

// One element: x (the parameter, widened to fp32) and the two codes are updated in place; g is the gradient.
ADAMW16_INLINE void adamw16_update(float& x, float g, uint32_t& m_code, uint32_t& v_code, const AdamW16Scalars& s) {
  const float m = add_rn(mul_rn(bits_as_float(decode_bits<Fp169>(m_code)), s.b1), mul_rn(g, s.c1));
  float v = add_rn(mul_rn(bits_as_float(decode_bits<Fp0610>(v_code)), s.b2), mul_rn(mul_rn(g, g), s.c2));
  v = v > s.clip ? s.clip : v;
  m_code = encode_bits<Fp169>(float_as_bits(m), true);
  v_code = encode_bits<Fp0610>(float_as_bits(v), true);
  const float mq = bits_as_float(decode_bits<Fp169>(m_code));
  const float vq = bits_as_float(decode_bits<Fp0610>(v_code));
  x = mul_rn(x, s.decay);  // decay 1 (no weight decay) is exact: no branch, so the host loop vectorizes
  const float denom = add_rn(mul_rn(sqrt_rn(vq), s.inv_root_c2), s.eps);
  x = sub_rn(x, mul_rn(div_rn(mq, denom), s.step_size));
}

// Element i of the arrays: load (widening the parameter P and gradient G to fp32), update, store. The CPU loop and
// the CUDA kernel's scalar tail call this; the CUDA vector loop calls adamw16_update on 8 elements at a time.
template <class P, class G>
ADAMW16_INLINE void adamw16_element(typename P::Storage* p, const typename G::Storage* g, uint16_t* m, uint16_t* v,
                                    int64_t i, const AdamW16Scalars& s) {
  float x = P::load(p[i]);
  uint32_t mc = m[i], vc = v[i];
  adamw16_update(x, G::load(g[i]), mc, vc, s);
  p[i] = P::store(x);
  m[i] = static_cast<uint16_t>(mc);
  v[i] = static_cast<uint16_t>(vc);
}

}  // namespace fp169
}  // namespace dalle_ds
