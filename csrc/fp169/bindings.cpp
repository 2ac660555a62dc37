// bindings.cpp: the thin front end of the fp169 ops. It declares the torch operator schemas (namespace
// `dalle_ds_fp169`), checks arguments with actionable messages and calls the raw-pointer kernels of fp169_cpu.cpp and,
// when compiled with -DDALLE_DS_WITH_CUDA, fp169_cuda.cu. No format math here.
//
// The ops write into caller-allocated outputs (the Python wrapper in dalle_ds/ops/fp169/__init__.py allocates them),
// so tests can poison outputs and the all-reduce can reuse its buffers. Codes are stored as torch.int16 (bit patterns;
// torch.uint16 lacks most kernels in torch 2.x).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "fp169_kernels.h"

#if defined(DALLE_DS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dalle_ds {
namespace fp169 {
namespace {

#define FP169_CHECK_CODES(t)                                                                                     \
  TORCH_CHECK((t).scalar_type() == at::kShort, #t " must hold 16-bit codes as torch.int16, got ", (t).scalar_type()); \
  TORCH_CHECK((t).is_contiguous(), #t " must be contiguous (call .contiguous() first)")
#define FP169_CHECK_VALUES(t)                                                                                    \
  TORCH_CHECK((t).is_contiguous(), #t " must be contiguous (call .contiguous() first)");                          \
  (void)value_type_of((t), #t)
#define FP169_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " is on ", (a).device(), " but " #b " is on ", (b).device())
#define FP169_CHECK_SAME_NUMEL(a, b) \
  TORCH_CHECK((a).numel() == (b).numel(), #a " has ", (a).numel(), " elements but " #b " has ", (b).numel())

ValueType value_type_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ValueType::kFloat32;
    case at::kHalf: return ValueType::kFloat16;
    case at::kBFloat16: return ValueType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return ValueType::kFloat32;  // not reached
}

FormatId format_of(int64_t fmt) {
  TORCH_CHECK(fmt == 0 || fmt == 1, "fmt must be 0 (1-6-9) or 1 (0-6-10), got ", fmt);
  return static_cast<FormatId>(fmt);
}

float checked_scale(double scale, const char* name) {
  const float s = static_cast<float>(scale);
  TORCH_CHECK(s != 0.0f && s == s && s - s == 0.0f, name, " must be finite and nonzero in fp32, got ", scale);
  return s;
}

// ---- CPU --------------------------------------------------------------------------------------------------------
void encode_out_cpu(const at::Tensor& x, at::Tensor& out, double scale, bool saturate, int64_t fmt) {
  FP169_CHECK_VALUES(x);
  FP169_CHECK_CODES(out);
  FP169_CHECK_SAME_DEVICE(x, out);
  FP169_CHECK_SAME_NUMEL(x, out);
  cpu::encode(x.data_ptr(), value_type_of(x, "x"), static_cast<uint16_t*>(out.data_ptr()), x.numel(),
              checked_scale(scale, "scale"), saturate, format_of(fmt));
}

void decode_out_cpu(const at::Tensor& codes, at::Tensor& out, double scale, int64_t fmt) {
  FP169_CHECK_CODES(codes);
  FP169_CHECK_VALUES(out);
  FP169_CHECK_SAME_DEVICE(codes, out);
  FP169_CHECK_SAME_NUMEL(codes, out);
  cpu::decode(static_cast<const uint16_t*>(codes.data_ptr()), out.data_ptr(), value_type_of(out, "out"),
              codes.numel(), checked_scale(scale, "scale"), format_of(fmt));
}

void error_add_cpu(at::Tensor& err, const at::Tensor& grad, at::Tensor& nonfinite, double scale, bool saturate,
                   int64_t fmt) {
  FP169_CHECK_CODES(err);
  FP169_CHECK_VALUES(grad);
  FP169_CHECK_SAME_DEVICE(err, grad);
  FP169_CHECK_SAME_DEVICE(err, nonfinite);
  FP169_CHECK_SAME_NUMEL(err, grad);
  TORCH_CHECK(nonfinite.scalar_type() == at::kInt && nonfinite.numel() == 1,
              "nonfinite must be a one-element torch.int32 tensor");
  const bool bad = cpu::error_add(static_cast<uint16_t*>(err.data_ptr()), grad.data_ptr(), value_type_of(grad, "grad"),
                                  err.numel(), checked_scale(scale, "scale"), saturate, format_of(fmt));
  *static_cast<int32_t*>(nonfinite.data_ptr()) = bad ? 1 : 0;
}

void reduce_rows_out_cpu(const at::Tensor& codes, at::Tensor& out, double divisor, bool saturate, int64_t fmt) {
  FP169_CHECK_CODES(codes);
  FP169_CHECK_CODES(out);
  FP169_CHECK_SAME_DEVICE(codes, out);
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) >= 1, "codes must be [rows >= 1, n], got ", codes.sizes());
  TORCH_CHECK(out.numel() == codes.size(1), "out must have n = ", codes.size(1), " elements, got ", out.numel());
  cpu::reduce_rows(static_cast<const uint16_t*>(codes.data_ptr()), static_cast<uint16_t*>(out.data_ptr()),
                   codes.size(0), codes.size(1), checked_scale(divisor, "divisor"), saturate, format_of(fmt));
}

// The AdamW16 step's arguments, checked once for both devices; returns the fp32 scalars (adamw16.h).
AdamW16Scalars checked_adamw16(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& m, const at::Tensor& v,
                               c10::ArrayRef<double> scalars) {
  FP169_CHECK_VALUES(p);
  FP169_CHECK_VALUES(grad);
  FP169_CHECK_CODES(m);
  FP169_CHECK_CODES(v);
  FP169_CHECK_SAME_DEVICE(p, grad);
  FP169_CHECK_SAME_DEVICE(p, m);
  FP169_CHECK_SAME_DEVICE(p, v);
  FP169_CHECK_SAME_NUMEL(p, grad);
  FP169_CHECK_SAME_NUMEL(p, m);
  FP169_CHECK_SAME_NUMEL(p, v);
  TORCH_CHECK(scalars.size() == 9, "scalars must be [b1, 1-b1, b2, 1-b2, clip, decay, 1/sqrt(1-b2^t), eps, "
              "step_size], got ", scalars.size(), " values");
  AdamW16Scalars s;
  float* fields[9] = {&s.b1, &s.c1, &s.b2, &s.c2, &s.clip, &s.decay, &s.inv_root_c2, &s.eps, &s.step_size};
  for (size_t k = 0; k < 9; ++k) *fields[k] = static_cast<float>(scalars[k]);
  return s;
}

void adamw16_step_cpu(at::Tensor& p, const at::Tensor& grad, at::Tensor& m, at::Tensor& v,
                      c10::ArrayRef<double> scalars) {
  const AdamW16Scalars s = checked_adamw16(p, grad, m, v, scalars);
  cpu::adamw16_step(p.data_ptr(), value_type_of(p, "p"), grad.data_ptr(), value_type_of(grad, "grad"),
                    static_cast<uint16_t*>(m.data_ptr()), static_cast<uint16_t*>(v.data_ptr()), p.numel(), s);
}

// ---- CUDA -------------------------------------------------------------------------------------------------------
#if defined(DALLE_DS_WITH_CUDA)
#define FP169_CUDA_CHECK(expr)                                                                       \
  do {                                                                                               \
    const cudaError_t err_ = (expr);                                                                 \
    TORCH_CHECK(err_ == cudaSuccess, "fp169 CUDA launch failed: ", cudaGetErrorString(err_)); \
  } while (0)

void encode_out_cuda(const at::Tensor& x, at::Tensor& out, double scale, bool saturate, int64_t fmt) {
  FP169_CHECK_VALUES(x);
  FP169_CHECK_CODES(out);
  FP169_CHECK_SAME_DEVICE(x, out);
  FP169_CHECK_SAME_NUMEL(x, out);
  const c10::cuda::CUDAGuard guard(x.device());
  FP169_CUDA_CHECK(cuda::encode(x.data_ptr(), value_type_of(x, "x"), static_cast<uint16_t*>(out.data_ptr()),
                                x.numel(), checked_scale(scale, "scale"), saturate, format_of(fmt),
                                c10::cuda::getCurrentCUDAStream().stream()));
}

void decode_out_cuda(const at::Tensor& codes, at::Tensor& out, double scale, int64_t fmt) {
  FP169_CHECK_CODES(codes);
  FP169_CHECK_VALUES(out);
  FP169_CHECK_SAME_DEVICE(codes, out);
  FP169_CHECK_SAME_NUMEL(codes, out);
  const c10::cuda::CUDAGuard guard(codes.device());
  FP169_CUDA_CHECK(cuda::decode(static_cast<const uint16_t*>(codes.data_ptr()), out.data_ptr(),
                                value_type_of(out, "out"), codes.numel(), checked_scale(scale, "scale"),
                                format_of(fmt), c10::cuda::getCurrentCUDAStream().stream()));
}

void error_add_cuda(at::Tensor& err, const at::Tensor& grad, at::Tensor& nonfinite, double scale, bool saturate,
                    int64_t fmt) {
  FP169_CHECK_CODES(err);
  FP169_CHECK_VALUES(grad);
  FP169_CHECK_SAME_DEVICE(err, grad);
  FP169_CHECK_SAME_DEVICE(err, nonfinite);
  FP169_CHECK_SAME_NUMEL(err, grad);
  TORCH_CHECK(nonfinite.scalar_type() == at::kInt && nonfinite.numel() == 1,
              "nonfinite must be a one-element torch.int32 tensor");
  const c10::cuda::CUDAGuard guard(err.device());
  FP169_CUDA_CHECK(cuda::error_add(static_cast<uint16_t*>(err.data_ptr()), grad.data_ptr(),
                                   value_type_of(grad, "grad"), err.numel(), checked_scale(scale, "scale"), saturate,
                                   format_of(fmt), static_cast<int32_t*>(nonfinite.data_ptr()),
                                   c10::cuda::getCurrentCUDAStream().stream()));
}

void reduce_rows_out_cuda(const at::Tensor& codes, at::Tensor& out, double divisor, bool saturate, int64_t fmt) {
  FP169_CHECK_CODES(codes);
  FP169_CHECK_CODES(out);
  FP169_CHECK_SAME_DEVICE(codes, out);
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) >= 1, "codes must be [rows >= 1, n], got ", codes.sizes());
  TORCH_CHECK(out.numel() == codes.size(1), "out must have n = ", codes.size(1), " elements, got ", out.numel());
  const c10::cuda::CUDAGuard guard(codes.device());
  FP169_CUDA_CHECK(cuda::reduce_rows(static_cast<const uint16_t*>(codes.data_ptr()),
                                     static_cast<uint16_t*>(out.data_ptr()), codes.size(0), codes.size(1),
                                     checked_scale(divisor, "divisor"), saturate, format_of(fmt),
                                     c10::cuda::getCurrentCUDAStream().stream()));
}

void adamw16_step_cuda(at::Tensor& p, const at::Tensor& grad, at::Tensor& m, at::Tensor& v,
                       c10::ArrayRef<double> scalars) {
  const AdamW16Scalars s = checked_adamw16(p, grad, m, v, scalars);
  const c10::cuda::CUDAGuard guard(p.device());
  FP169_CUDA_CHECK(cuda::adamw16_step(p.data_ptr(), value_type_of(p, "p"), grad.data_ptr(),
                                      value_type_of(grad, "grad"), static_cast<uint16_t*>(m.data_ptr()),
                                      static_cast<uint16_t*>(v.data_ptr()), p.numel(), s,
                                      c10::cuda::getCurrentCUDAStream().stream()));
}
#endif

// Which variant this library is: lets the loader reject a stale or mismatched prebuilt library.
std::string build_info() {
#if defined(DALLE_DS_WITH_CUDA)
  return "fp169 abi=2 cuda=1";
#else
  return "fp169 abi=2 cuda=0";
#endif
}

}  // namespace
}  // namespace fp169
}  // namespace dalle_ds

TORCH_LIBRARY(dalle_ds_fp169, m) {
  m.def("encode_out(Tensor x, Tensor(a!) out, float scale, bool saturate, int fmt) -> ()");
  m.def("decode_out(Tensor codes, Tensor(a!) out, float scale, int fmt) -> ()");
  m.def("error_add_(Tensor(a!) err, Tensor grad, Tensor(b!) nonfinite, float scale, bool saturate, int fmt) -> ()");
  m.def("reduce_rows_out(Tensor codes, Tensor(a!) out, float divisor, bool saturate, int fmt) -> ()");
  m.def("adamw16_step_(Tensor(a!) p, Tensor grad, Tensor(b!) m, Tensor(c!) v, float[] scalars) -> ()");
  m.def("build_info() -> str", &dalle_ds::fp169::build_info);
}

TORCH_LIBRARY_IMPL(dalle_ds_fp169, CPU, m) {
  m.impl("encode_out", &dalle_ds::fp169::encode_out_cpu);
  m.impl("decode_out", &dalle_ds::fp169::decode_out_cpu);
  m.impl("error_add_", &dalle_ds::fp169::error_add_cpu);
  m.impl("reduce_rows_out", &dalle_ds::fp169::reduce_rows_out_cpu);
  m.impl("adamw16_step_", &dalle_ds::fp169::adamw16_step_cpu);
}

#if defined(DALLE_DS_WITH_CUDA)
TORCH_LIBRARY_IMPL(dalle_ds_fp169, CUDA, m) {
  m.impl("encode_out", &dalle_ds::fp169::encode_out_cuda);
  m.impl("decode_out", &dalle_ds::fp169::decode_out_cuda);
  m.impl("error_add_", &dalle_ds::fp169::error_add_cuda);
  m.impl("reduce_rows_out", &dalle_ds::fp169::reduce_rows_out_cuda);
  m.impl("adamw16_step_", &dalle_ds::fp169::adamw16_step_cuda);
}
#endif
