// fp169_dispatch.h: runtime ids -> compile-time types, shared by the CPU (fp169_cpu.cpp) and CUDA (fp169_cuda.cu)
// launchers, so that both map a FormatId / ValueType to the same format and value types (fp169.h). Host code only.
//
// The front end (bindings.cpp) rejects any other id before a launcher runs; here an unknown FormatId falls back to
// 1-6-9 and an unknown ValueType to fp32, so a switch without a default cannot leave `fn` uncalled.
#pragma once

#include "fp169.h"
#include "fp169_kernels.h"

namespace dalle_ds {
namespace fp169 {

// Calls fn(F{}) with the format type for `fmt`.
template <class Fn>
void with_format(FormatId fmt, Fn&& fn) {
  if (fmt == FormatId::kFp0610) {
    fn(Fp0610{});
  } else {
    fn(Fp169{});
  }
}

// Calls fn(V{}) with the value-type adaptor for `vtype`.
template <class Fn>
void with_value_type(ValueType vtype, Fn&& fn) {
  switch (vtype) {
    case ValueType::kFloat16: fn(F16Value{}); break;
    case ValueType::kBFloat16: fn(BF16Value{}); break;
    default: fn(F32Value{}); break;
  }
}

}  // namespace fp169
}  // namespace dalle_ds
