// fp169_kernels.h: the raw-pointer entry points of the CPU (fp169_cpu.cpp) and CUDA (fp169_cuda.cu) kernels, called by
// the front end (bindings.cpp). No torch types here, so the kernel files compile without torch headers.
//
// Shared conventions of every entry point:
//   * codes are 16-bit patterns (stored by the caller as torch.int16), n elements, contiguous;
//   * `fmt` picks the format (FormatId), `vtype` the value type of the float-side tensor (ValueType);
//   * `scale` and `divisor` are fp32; a value of exactly 1 skips the multiply/divide (which would be exact anyway).
// Semantics (fl() is one fp32 rounding, Q() the rounding into the format, D() decoding):
//   encode:      out[i] = Q(fl(x[i] * scale))
//   decode:      out[i] = to_vtype(fl(D(codes[i]) / scale))
//   error_add:   if every grad[i] is finite: err[i] = Q(fl(D(err[i]) + fl(grad[i] / scale))); else err is untouched.
//                The CPU version returns "some grad was nonfinite"; the CUDA version writes it to *nonfinite (int32,
//                zeroed by the launcher) and never synchronizes.
//   reduce_rows: codes is [rows, n] row-major; out[j] = Q_saturate?(fl(fl(sum_i D(codes[i][j])) / divisor)), summing
//                in fp32 in row order i = 0, 1, ... (the all-reduce's local step).
//   adamw16_step: one AdamW step of n parameters (ptype) with gradients (gtype), the mean's codes m in 1-6-9 and the
//                variance's codes v in 0-6-10, all updated in place: the arithmetic of adamw16.h.
#pragma once

#include <stdint.h>

#if defined(DALLE_DS_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace dalle_ds {
namespace fp169 {

enum class FormatId : int { kFp169 = 0, kFp0610 = 1 };
enum class ValueType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The fp32 scalars of one AdamW16 step (adamw16.h), computed once per step and tensor by the caller.
struct AdamW16Scalars {
  float b1, c1;       // beta1, 1 - beta1
  float b2, c2;       // beta2, 1 - beta2
  float clip;         // the variance's clip by value (paper: 5)
  float decay;        // 1 - lr * weight_decay
  float inv_root_c2;  // 1 / sqrt(1 - beta2^t)
  float eps;
  float step_size;    // lr / (1 - beta1^t)
};

namespace cpu {
void encode(const void* x, ValueType vtype, uint16_t* out, int64_t n, float scale, bool saturate, FormatId fmt);
void decode(const uint16_t* codes, void* out, ValueType vtype, int64_t n, float scale, FormatId fmt);
bool error_add(uint16_t* err, const void* grad, ValueType vtype, int64_t n, float scale, bool saturate,
               FormatId fmt);
void reduce_rows(const uint16_t* codes, uint16_t* out, int64_t rows, int64_t n, float divisor, bool saturate,
                 FormatId fmt);
void adamw16_step(void* p, ValueType ptype, const void* g, ValueType gtype, uint16_t* m, uint16_t* v, int64_t n,
                  const AdamW16Scalars& s);
}  // namespace cpu

#if defined(DALLE_DS_WITH_CUDA) || defined(__CUDACC__)
namespace cuda {
// All launches are asynchronous on `stream`; errors from the launch are returned as cudaError_t.
cudaError_t encode(const void* x, ValueType vtype, uint16_t* out, int64_t n, float scale, bool saturate, FormatId fmt,
                   cudaStream_t stream);
cudaError_t decode(const uint16_t* codes, void* out, ValueType vtype, int64_t n, float scale, FormatId fmt,
                   cudaStream_t stream);
cudaError_t error_add(uint16_t* err, const void* grad, ValueType vtype, int64_t n, float scale, bool saturate,
                      FormatId fmt, int32_t* nonfinite, cudaStream_t stream);
cudaError_t reduce_rows(const uint16_t* codes, uint16_t* out, int64_t rows, int64_t n, float divisor, bool saturate,
                        FormatId fmt, cudaStream_t stream);
cudaError_t adamw16_step(void* p, ValueType ptype, const void* g, ValueType gtype, uint16_t* m, uint16_t* v,
                         int64_t n, const AdamW16Scalars& s, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace fp169
}  // namespace dalle_ds
