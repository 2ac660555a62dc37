// fp169_cpu.cpp: CPU loops of the 1-6-9 / 0-6-10 ops. The bit logic lives in fp169.h; this file only walks arrays,
// splitting them over torch's intra-op thread pool (at::parallel_for). Semantics: see fp169_kernels.h.
//
// Supported: fp32/fp16/bf16 values, any length, contiguous buffers. Not tuned: the loops rely on the compiler's
// auto-vectorization of the branch-free encode/decode (baseline x86-64 flags, no -march=native, so that one cached
// build works on every machine of a cluster).
#include <ATen/Parallel.h>

#include "adamw16.h"
#include "fp169_dispatch.h"

namespace dalle_ds {
namespace fp169 {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per task of the thread pool

template <class F, class V, bool kScaled>
void encode_range(const typename V::Storage* x, uint16_t* out, int64_t begin, int64_t end, float scale,
                  bool saturate) {
  for (int64_t i = begin; i < end; ++i) {
    float v = V::load(x[i]);
    if (kScaled) v = v * scale;
    out[i] = static_cast<uint16_t>(encode_bits<F>(float_as_bits(v), saturate));
  }
}

template <class F, class V, bool kScaled>
void decode_range(const uint16_t* codes, typename V::Storage* out, int64_t begin, int64_t end, float scale) {
  for (int64_t i = begin; i < end; ++i) {
    float v = bits_as_float(decode_bits<F>(codes[i]));
    if (kScaled) v = v / scale;
    out[i] = V::store(v);
  }
}

template <class V>
bool range_has_nonfinite(const typename V::Storage* g, int64_t begin, int64_t end) {
  uint32_t bad = 0;  // an integer OR-reduction vectorizes; a bool one does not
  for (int64_t i = begin; i < end; ++i) {
    bad |= static_cast<uint32_t>(!float_bits_finite(float_as_bits(V::load(g[i]))));
  }
  return bad != 0;
}

template <class F, class V, bool kScaled>
void error_add_range(uint16_t* err, const typename V::Storage* g, int64_t begin, int64_t end, float scale,
                     bool saturate) {
  for (int64_t i = begin; i < end; ++i) {
    float gi = V::load(g[i]);
    if (kScaled) gi = gi / scale;
    const float v = bits_as_float(decode_bits<F>(err[i])) + gi;
    err[i] = static_cast<uint16_t>(encode_bits<F>(float_as_bits(v), saturate));
  }
}

// Restrict pointers and a local copy of the scalars: without them GCC must assume a store to p could change s (or
// m, v) and leaves the loop scalar, 25 ns per element on a 2-core EPYC against ~2 vectorized. The loop is compute
// bound (square root and divide per element), so GCC also builds an AVX2 clone, picked at load time where the CPU
// has it (4M elements on one EPYC core: 20 ms SSE2, 9.2 ms AVX2). No FMA in either (-ffp-contract=off; AVX2 does
// not imply FMA), so both give the same bits.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ADAMW16_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ADAMW16_CLONES
#endif
template <class P, class G>
ADAMW16_CLONES void adamw16_range(typename P::Storage* __restrict__ p, const typename G::Storage* __restrict__ g,
                   uint16_t* __restrict__ m, uint16_t* __restrict__ v, int64_t begin, int64_t end,
                   const AdamW16Scalars& scalars) {
  const AdamW16Scalars s = scalars;
  for (int64_t i = begin; i < end; ++i) adamw16_element<P, G>(p, g, m, v, i, s);
}

}  // namespace

void adamw16_step(void* p, ValueType ptype, const void* g, ValueType gtype, uint16_t* m, uint16_t* v, int64_t n,
                  const AdamW16Scalars& s) {
  with_value_type(ptype, [&](auto pt) {
    with_value_type(gtype, [&](auto gt) {
      using P = decltype(pt);
      using G = decltype(gt);
      auto* ps = static_cast<typename P::Storage*>(p);
      const auto* gs = static_cast<const typename G::Storage*>(g);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { adamw16_range<P, G>(ps, gs, m, v, b, e, s); });
    });
  });
}

void encode(const void* x, ValueType vtype, uint16_t* out, int64_t n, float scale, bool saturate, FormatId fmt) {
  with_format(fmt, [&](auto f) {
    with_value_type(vtype, [&](auto v) {
      using F = decltype(f);
      using V = decltype(v);
      const auto* xs = static_cast<const typename V::Storage*>(x);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        if (scale == 1.0f) {
          encode_range<F, V, false>(xs, out, b, e, scale, saturate);
        } else {
          encode_range<F, V, true>(xs, out, b, e, scale, saturate);
        }
      });
    });
  });
}

void decode(const uint16_t* codes, void* out, ValueType vtype, int64_t n, float scale, FormatId fmt) {
  with_format(fmt, [&](auto f) {
    with_value_type(vtype, [&](auto v) {
      using F = decltype(f);
      using V = decltype(v);
      auto* os = static_cast<typename V::Storage*>(out);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        if (scale == 1.0f) {
          decode_range<F, V, false>(codes, os, b, e, scale);
        } else {
          decode_range<F, V, true>(codes, os, b, e, scale);
        }
      });
    });
  });
}

bool error_add(uint16_t* err, const void* grad, ValueType vtype, int64_t n, float scale, bool saturate,
               FormatId fmt) {
  bool nonfinite = false;
  with_value_type(vtype, [&](auto v) {
    using V = decltype(v);
    const auto* gs = static_cast<const typename V::Storage*>(grad);
    nonfinite = at::parallel_reduce(
        0, n, kGrain, false, [&](int64_t b, int64_t e, bool acc) { return acc || range_has_nonfinite<V>(gs, b, e); },
        [](bool a, bool b) { return a || b; });
  });
  if (nonfinite) return true;  // leave the buffer untouched
  with_format(fmt, [&](auto f) {
    with_value_type(vtype, [&](auto v) {
      using F = decltype(f);
      using V = decltype(v);
      const auto* gs = static_cast<const typename V::Storage*>(grad);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        if (scale == 1.0f) {
          error_add_range<F, V, false>(err, gs, b, e, scale, saturate);
        } else {
          error_add_range<F, V, true>(err, gs, b, e, scale, saturate);
        }
      });
    });
  });
  return false;
}

void reduce_rows(const uint16_t* codes, uint16_t* out, int64_t rows, int64_t n, float divisor, bool saturate,
                 FormatId fmt) {
  with_format(fmt, [&](auto f) {
    using F = decltype(f);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      // Column tiles keep the fp32 partial sums in cache while the rows stream through, row by row.
      constexpr int64_t kTile = 512;
      float acc[kTile];
      for (int64_t j0 = b; j0 < e; j0 += kTile) {
        const int64_t len = (e - j0) < kTile ? (e - j0) : kTile;
        for (int64_t j = 0; j < len; ++j) acc[j] = bits_as_float(decode_bits<F>(codes[j0 + j]));
        for (int64_t i = 1; i < rows; ++i) {
          const uint16_t* row = codes + i * n + j0;
          for (int64_t j = 0; j < len; ++j) acc[j] += bits_as_float(decode_bits<F>(row[j]));
        }
        for (int64_t j = 0; j < len; ++j) {
          const float v = divisor != 1.0f ? acc[j] / divisor : acc[j];
          out[j0 + j] = static_cast<uint16_t>(encode_bits<F>(float_as_bits(v), saturate));
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace fp169
}  // namespace dalle_ds
