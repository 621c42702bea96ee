// Inline loads and stores of the kernels' element types in their accumulation type.
// norms_kernels.h's to_float lives in another translation unit (one call per element); these
// inline versions let the compiler vectorise the loops over bf16 / fp16 rows. The C++ test
// checks them against to_float on all 65536 bit patterns.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/norms_kernels.h"

namespace bk {
namespace cpu {
namespace lowp {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
// Branch-free and exact for every half, subnormals, infinities and NaNs included
// (the FP16 library's fp16_ieee_to_fp32_value, M. Dukhan).
inline float load(fp16 x) {
  const uint32_t w = uint32_t(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers: shift the exponent and mantissa into place, then rebias by 2^-112.
  const float normalized = bits_to_float((two_w >> 4) + (uint32_t(0xE0) << 23)) * 0x1.0p-112f;
  // Subnormals: mantissa as the low bits of 0.5's float, minus 0.5.
  const float denormalized = bits_to_float((two_w >> 17) | (uint32_t(126) << 23)) - 0.5f;
  const uint32_t bits = two_w < (uint32_t(1) << 27) ? float_to_bits(denormalized)
                                                   : float_to_bits(normalized);
  return bits_to_float(sign | bits);
}

// Rounds an accumulated value into *p (nearest even).
inline void store(float* p, float x) { *p = x; }
inline void store(float* p, double x) { *p = float(x); }
inline void store(double* p, double x) { *p = x; }
inline void store(double* p, float x) { *p = x; }
inline void store(bf16* p, float x) { *p = to_bf16(x); }
inline void store(bf16* p, double x) { *p = to_bf16(float(x)); }
inline void store(fp16* p, float x) { *p = to_fp16(x); }
inline void store(fp16* p, double x) { *p = to_fp16(float(x)); }

}  // namespace lowp
}  // namespace cpu
}  // namespace bk
