// What the C++ kernel tests share: conversions between double and each kernel dtype.
#pragma once
#include "cpu/norms_kernels.h"

namespace bk {
namespace test {

inline double as_double(float x) { return x; }
inline double as_double(double x) { return x; }
inline double as_double(cpu::bf16 x) { return cpu::to_float(x); }
inline double as_double(cpu::fp16 x) { return cpu::to_float(x); }

// Rounds to the kernel dtype (16-bit floats: to nearest even).
template <typename S> S from_double(double x);
template <> inline float from_double<float>(double x) { return float(x); }
template <> inline double from_double<double>(double x) { return x; }
template <> inline cpu::bf16 from_double<cpu::bf16>(double x) { return cpu::to_bf16(float(x)); }
template <> inline cpu::fp16 from_double<cpu::fp16>(double x) { return cpu::to_fp16(float(x)); }

}  // namespace test
}  // namespace bk
