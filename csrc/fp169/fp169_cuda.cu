// fp169_cuda.cu: CUDA kernels of the 1-6-9 / 0-6-10 ops. The bit logic is fp169.h (shared with the CPU build); this
// file only moves data. Semantics: see fp169_kernels.h.
//
// Design: memory-bound elementwise kernels. Each thread handles 8 elements per step, so every access to the 16-bit
// side is one 16-byte load or store (uint4) and every fp32 access two 16-byte float4 accesses; a grid-stride loop
// covers any length with a grid of a few blocks per SM. Decode, reduce_rows and encode from fp16/bf16 stage 4 such
// loads per thread in shared memory (cp.async) before using them: see the note above kStage. Buffers whose pointers
// (or, for reduce_rows, row stride) are not 16-byte aligned take the scalar tail loop for every element: correct,
// just slower. No fast-math: the fp32 multiply/divide/add must round like the torch reference (nvcc's default
// -prec-div=true -ftz=false; the kernels have no a*b+c pattern that --fmad could contract).
//
// Supports: fp32/fp16/bf16 values, any n (int64), any CUDA arch (no arch-specific instructions; sm_90 is the target
// tuned for; cp.async needs sm_80 and is emulated by plain copies below). Tested: bit-exact against the torch
// reference by tests/test_fp169_ops.py (marked gpu) on an H200 (2026-12-04, before the staging of 2026-12-05).
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "adamw16.h"
#include "fp169_dispatch.h"

namespace dalle_ds {
namespace fp169 {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per thread per step: 8 codes = 16 bytes

// ---- 8-wide vector access ----------------------------------------------------------------------------------------
__device__ __forceinline__ void unpack8_codes(const uint4 w, uint32_t (&c)[kVec]) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    c[2 * k] = ws[k] & 0xFFFFu;
    c[2 * k + 1] = ws[k] >> 16;
  }
}

__device__ __forceinline__ void load8_codes(const uint16_t* p, uint32_t (&c)[kVec]) {
  unpack8_codes(*reinterpret_cast<const uint4*>(p), c);
}

__device__ __forceinline__ void store8_codes(uint16_t* p, const uint32_t (&c)[kVec]) {
  uint4 w;
  w.x = (c[0] & 0xFFFFu) | (c[1] << 16);
  w.y = (c[2] & 0xFFFFu) | (c[3] << 16);
  w.z = (c[4] & 0xFFFFu) | (c[5] << 16);
  w.w = (c[6] & 0xFFFFu) | (c[7] << 16);
  *reinterpret_cast<uint4*>(p) = w;
}

template <class V>
__device__ __forceinline__ void load8_values(const typename V::Storage* p, float (&v)[kVec]) {
  if constexpr (sizeof(typename V::Storage) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    uint32_t h[kVec];
    load8_codes(reinterpret_cast<const uint16_t*>(p), h);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = V::load(static_cast<uint16_t>(h[k]));
  }
}

template <class V>
__device__ __forceinline__ void store8_values(typename V::Storage* p, const float (&v)[kVec]) {
  if constexpr (sizeof(typename V::Storage) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t h[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) h[k] = V::store(v[k]);
    store8_codes(reinterpret_cast<uint16_t*>(p), h);
  }
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ---- kernels -----------------------------------------------------------------------------------------------------
// nvec: number of 8-element vectors handled by the vector loop (0 when a pointer is misaligned); the rest, elements
// [nvec * 8, n), go through the scalar loop.
// Kernels whose loads are 16-bit (decode, encode from fp16/bf16) or span several rows (reduce_rows) stage their loads
// in shared memory with cp.async: each thread issues kStage 16-byte copies (vectors i, i + S, ..., S = the grid's
// thread count, so every warp's access stays coalesced), waits for its own copies (no block barrier: a thread reads
// back only what it copied), then converts them one at a time. Why: with one 16-byte register load per thread and step,
// too few bytes are in flight to cover DRAM latency (Little's law: ~4.8 TB/s x ~0.7 us ~ 3.4 MB over 132 SMs, ~25 KB
// per SM; 6 blocks x 256 threads x 16 B = 24 KB, where encode, reading fp32, has twice that). Measured 2026-12-04 on an
// H200: encode from fp32 86% of copy bandwidth, from bf16 76%, decode 62% (torch's own fp16 -> fp32 cast: 51%).
// Unrolling the register loads instead does not help: nvcc interleaves the decode math of the unrolled vectors and the
// kernel's registers grow with the unroll (40 -> 105 at 4 vectors, from ptxas -v), so blocks per SM, and bytes in
// flight, fall back. Staging keeps 30-48 registers and 16 KB of shared memory per block, and puts 6 x 256 x 4 x 16 B =
// 96 KB per SM in flight (prediction: decode and 16-bit encode >= 85% of copy; to be measured, 2026-12-05).
constexpr int kStage = 4;

// Calls fn(v, c) for every 16-byte vector v < nvec of a 2-byte-element array, c its 8 elements as 16-bit words, each
// thread taking vectors i + u * stride (u < kStage) per step: their copies go out together into this thread's slots
// staged[u][threadIdx.x] and are waited for before the first fn call.
template <class T, class Fn>
__device__ __forceinline__ void for_each_staged_vector(const T* __restrict__ base, int64_t nvec, Fn&& fn) {
  static_assert(sizeof(T) == 2, "8 elements of 2 bytes per 16-byte vector");
  __shared__ uint4 staged[kStage][kThreads];
  const int64_t stride = grid_stride();
  for (int64_t i = global_thread(); i < nvec; i += kStage * stride) {
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      if (i + u * stride < nvec) __pipeline_memcpy_async(&staged[u][threadIdx.x], base + (i + u * stride) * kVec, 16);
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
#pragma unroll 1
    for (int u = 0; u < kStage && i + u * stride < nvec; ++u) {
      uint32_t c[kVec];
      unpack8_codes(staged[u][threadIdx.x], c);
      fn(i + u * stride, c);
    }
  }
}

template <class F, class V, bool kScaled>
__global__ void __launch_bounds__(kThreads)
    encode_kernel(const typename V::Storage* __restrict__ x, uint16_t* __restrict__ out, int64_t n, int64_t nvec,
                  float scale, bool saturate) {
  if constexpr (sizeof(typename V::Storage) == 2) {  // fp16 / bf16 in: 16-byte loads, staged (see above)
    for_each_staged_vector(x, nvec, [&](int64_t iv, uint32_t (&c)[kVec]) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float v = V::load(static_cast<uint16_t>(c[k]));
        c[k] = encode_bits<F>(float_as_bits(kScaled ? v * scale : v), saturate);
      }
      store8_codes(out + iv * kVec, c);
    });
  } else {  // fp32 in: two 16-byte loads per step already keep enough bytes in flight (86% of copy, H200)
    for (int64_t i = global_thread(); i < nvec; i += grid_stride()) {
      float v[kVec];
      load8_values<V>(x + i * kVec, v);
      uint32_t c[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) c[k] = encode_bits<F>(float_as_bits(kScaled ? v[k] * scale : v[k]), saturate);
      store8_codes(out + i * kVec, c);
    }
  }
  for (int64_t j = nvec * kVec + global_thread(); j < n; j += grid_stride()) {
    const float v = V::load(x[j]);
    out[j] = static_cast<uint16_t>(encode_bits<F>(float_as_bits(kScaled ? v * scale : v), saturate));
  }
}


template <class F, class V, bool kScaled>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const uint16_t* __restrict__ codes, typename V::Storage* __restrict__ out, int64_t n, int64_t nvec,
                  float scale) {
  for_each_staged_vector(codes, nvec, [&](int64_t iv, uint32_t (&c)[kVec]) {
    float v[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float d = bits_as_float(decode_bits<F>(c[k]));
      v[k] = kScaled ? d / scale : d;
    }
    store8_values<V>(out + iv * kVec, v);
  });
  for (int64_t j = nvec * kVec + global_thread(); j < n; j += grid_stride()) {
    const float d = bits_as_float(decode_bits<F>(codes[j]));
    out[j] = V::store(kScaled ? d / scale : d);
  }
}

template <class V>
__global__ void __launch_bounds__(kThreads)
    nonfinite_kernel(const typename V::Storage* __restrict__ g, int64_t n, int64_t nvec, int32_t* nonfinite) {
  bool bad = false;
  for (int64_t i = global_thread(); i < nvec; i += grid_stride()) {
    float v[kVec];
    load8_values<V>(g + i * kVec, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) bad |= !float_bits_finite(float_as_bits(v[k]));
  }
  for (int64_t j = nvec * kVec + global_thread(); j < n; j += grid_stride()) {
    bad |= !float_bits_finite(float_as_bits(V::load(g[j])));
  }
  if (bad) *nonfinite = 1;  // every writer stores the same value: a benign race, no atomic needed
}

template <class F, class V, bool kScaled>
__global__ void __launch_bounds__(kThreads)
    error_add_kernel(uint16_t* __restrict__ err, const typename V::Storage* __restrict__ g, int64_t n, int64_t nvec,
                     float scale, bool saturate, const int32_t* __restrict__ nonfinite) {
  if (*nonfinite != 0) return;  // written by nonfinite_kernel, earlier on the same stream
  for (int64_t i = global_thread(); i < nvec; i += grid_stride()) {
    uint32_t c[kVec];
    load8_codes(err + i * kVec, c);
    float v[kVec];
    load8_values<V>(g + i * kVec, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float gi = kScaled ? v[k] / scale : v[k];
      c[k] = encode_bits<F>(float_as_bits(bits_as_float(decode_bits<F>(c[k])) + gi), saturate);
    }
    store8_codes(err + i * kVec, c);
  }
  for (int64_t j = nvec * kVec + global_thread(); j < n; j += grid_stride()) {
    const float gj = V::load(g[j]);
    const float gi = kScaled ? gj / scale : gj;
    err[j] = static_cast<uint16_t>(encode_bits<F>(float_as_bits(bits_as_float(decode_bits<F>(err[j])) + gi), saturate));
  }
}

template <class F>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(const uint16_t* __restrict__ codes, uint16_t* __restrict__ out, int64_t rows, int64_t n,
                       int64_t nvec, float divisor, bool saturate) {
  __shared__ uint4 staged[kStage][kThreads];
  for (int64_t i = global_thread(); i < nvec; i += grid_stride()) {
    float acc[kVec];
    uint32_t c[kVec];
    // rows r0 .. r0 + kStage - 1 staged together (see decode_kernel); summed in row order 0, 1, 2, ... as the
    // reference does, so the result is bit-identical
    for (int64_t r0 = 0; r0 < rows; r0 += kStage) {
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        if (r0 + u < rows) __pipeline_memcpy_async(&staged[u][threadIdx.x], codes + (r0 + u) * n + i * kVec, 16);
      }
      __pipeline_commit();
      __pipeline_wait_prior(0);
#pragma unroll 1
      for (int u = 0; u < kStage && r0 + u < rows; ++u) {
        unpack8_codes(staged[u][threadIdx.x], c);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float d = bits_as_float(decode_bits<F>(c[k]));
          acc[k] = (r0 + u == 0) ? d : acc[k] + d;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float v = divisor != 1.0f ? acc[k] / divisor : acc[k];
      c[k] = encode_bits<F>(float_as_bits(v), saturate);
    }
    store8_codes(out + i * kVec, c);
  }
  for (int64_t j = nvec * kVec + global_thread(); j < n; j += grid_stride()) {
    float acc = bits_as_float(decode_bits<F>(codes[j]));
    for (int64_t r = 1; r < rows; ++r) acc += bits_as_float(decode_bits<F>(codes[r * n + j]));
    const float v = divisor != 1.0f ? acc / divisor : acc;
    out[j] = static_cast<uint16_t>(encode_bits<F>(float_as_bits(v), saturate));
  }
}

// ---- launch helpers ----------------------------------------------------------------------------------------------
// One AdamW16 step (adamw16.h): per element 20 bytes of traffic with fp32 parameters and gradients (read p, g, m, v:
// 4 + 4 + 2 + 2; write p, m, v: 4 + 2 + 2), all as 16-byte accesses (two per fp32 side) in the vector loop. Five
// independent 16-byte loads per thread and step keep more bytes in flight than encode's two (86% of copy on an H200),
// so no staging; not yet measured on a GPU.
template <class P, class G>
__global__ void __launch_bounds__(kThreads)
    adamw16_kernel(typename P::Storage* __restrict__ p, const typename G::Storage* __restrict__ g,
                   uint16_t* __restrict__ m, uint16_t* __restrict__ v, int64_t n, int64_t nvec, AdamW16Scalars s) {
  for (int64_t i = global_thread(); i < nvec; i += grid_stride()) {
    float x[kVec], gv[kVec];
    uint32_t mc[kVec], vc[kVec];
    load8_values<P>(p + i * kVec, x);
    load8_values<G>(g + i * kVec, gv);
    load8_codes(m + i * kVec, mc);
    load8_codes(v + i * kVec, vc);
#pragma unroll
    for (int k = 0; k < kVec; ++k) adamw16_update(x[k], gv[k], mc[k], vc[k], s);
    store8_values<P>(p + i * kVec, x);
    store8_codes(m + i * kVec, mc);
    store8_codes(v + i * kVec, vc);
  }
  for (int64_t j = nvec * kVec + global_thread(); j < n; j += grid_stride()) adamw16_element<P, G>(p, g, m, v, j, s);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Enough blocks to fill every SM a few times over; the grid-stride loops take the rest.
int grid_for(int64_t work_items) {
  static int sm_count[64] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  int& sms = sm_count[dev & 63];
  if (sms == 0) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (sms <= 0) sms = 1;
  }
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * (2048 / kThreads);
  return static_cast<int>(want < 1 ? 1 : (want < cap ? want : cap));
}

}  // namespace

cudaError_t encode(const void* x, ValueType vtype, uint16_t* out, int64_t n, float scale, bool saturate, FormatId fmt,
                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t nvec = (aligned16(x) && aligned16(out)) ? n / kVec : 0;
  with_format(fmt, [&](auto f) {
    with_value_type(vtype, [&](auto v) {
      using F = decltype(f);
      using V = decltype(v);
      const int64_t per_thread = sizeof(typename V::Storage) == 2 ? kStage : 1;  // vectors per thread and step
      const int grid = grid_for(nvec > 0 ? (nvec + per_thread - 1) / per_thread : n);
      const auto* xs = static_cast<const typename V::Storage*>(x);
      if (scale == 1.0f) {
        encode_kernel<F, V, false><<<grid, kThreads, 0, stream>>>(xs, out, n, nvec, scale, saturate);
      } else {
        encode_kernel<F, V, true><<<grid, kThreads, 0, stream>>>(xs, out, n, nvec, scale, saturate);
      }
    });
  });
  return cudaGetLastError();
}

cudaError_t decode(const uint16_t* codes, void* out, ValueType vtype, int64_t n, float scale, FormatId fmt,
                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t nvec = (aligned16(codes) && aligned16(out)) ? n / kVec : 0;
  const int grid = grid_for(nvec > 0 ? (nvec + kStage - 1) / kStage : n);
  with_format(fmt, [&](auto f) {
    with_value_type(vtype, [&](auto v) {
      using F = decltype(f);
      using V = decltype(v);
      auto* os = static_cast<typename V::Storage*>(out);
      if (scale == 1.0f) {
        decode_kernel<F, V, false><<<grid, kThreads, 0, stream>>>(codes, os, n, nvec, scale);
      } else {
        decode_kernel<F, V, true><<<grid, kThreads, 0, stream>>>(codes, os, n, nvec, scale);
      }
    });
  });
  return cudaGetLastError();
}

cudaError_t error_add(uint16_t* err, const void* grad, ValueType vtype, int64_t n, float scale, bool saturate,
                      FormatId fmt, int32_t* nonfinite, cudaStream_t stream) {
  cudaError_t status = cudaMemsetAsync(nonfinite, 0, sizeof(int32_t), stream);
  if (status != cudaSuccess || n == 0) return status;
  const int64_t nvec = (aligned16(err) && aligned16(grad)) ? n / kVec : 0;
  const int grid = grid_for(nvec > 0 ? nvec : n);
  with_format(fmt, [&](auto f) {
    with_value_type(vtype, [&](auto v) {
      using F = decltype(f);
      using V = decltype(v);
      const auto* gs = static_cast<const typename V::Storage*>(grad);
      nonfinite_kernel<V><<<grid, kThreads, 0, stream>>>(gs, n, nvec, nonfinite);
      if (scale == 1.0f) {
        error_add_kernel<F, V, false><<<grid, kThreads, 0, stream>>>(err, gs, n, nvec, scale, saturate, nonfinite);
      } else {
        error_add_kernel<F, V, true><<<grid, kThreads, 0, stream>>>(err, gs, n, nvec, scale, saturate, nonfinite);
      }
    });
  });
  return cudaGetLastError();
}

cudaError_t reduce_rows(const uint16_t* codes, uint16_t* out, int64_t rows, int64_t n, float divisor, bool saturate,
                        FormatId fmt, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t nvec = (aligned16(codes) && aligned16(out) && n % kVec == 0) ? n / kVec : 0;
  const int grid = grid_for(nvec > 0 ? nvec : n);
  with_format(fmt, [&](auto f) {
    using F = decltype(f);
    reduce_rows_kernel<F><<<grid, kThreads, 0, stream>>>(codes, out, rows, n, nvec, divisor, saturate);
  });
  return cudaGetLastError();
}

cudaError_t adamw16_step(void* p, ValueType ptype, const void* g, ValueType gtype, uint16_t* m, uint16_t* v,
                         int64_t n, const AdamW16Scalars& s, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t nvec = (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) ? n / kVec : 0;
  const int grid = grid_for(nvec > 0 ? nvec : n);
  with_value_type(ptype, [&](auto pt) {
    with_value_type(gtype, [&](auto gt) {
      using P = decltype(pt);
      using G = decltype(gt);
      adamw16_kernel<P, G><<<grid, kThreads, 0, stream>>>(static_cast<typename P::Storage*>(p),
                                                          static_cast<const typename G::Storage*>(g), m, v, n, nvec,
                                                          s);
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fp169
}  // namespace dalle_ds
