// Definitions of cpu/common.h: 16-bit float conversions, the thread count, the ISA level.
#include "cpu/common.h"

#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace bk {
namespace cpu {

float to_float(bf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float to_float(fp16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1f;
  uint32_t man = x.bits & 0x3ff;
  uint32_t u;
  if (exp == 0x1f) {  // inf / nan
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400) == 0);
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};  // quiet nan
  u += 0x7fff + ((u >> 16) & 1);
  return bf16{uint16_t(u >> 16)};
}

fp16 to_fp16(float f) {
  // Exact for every float: scale into fp16's grid and let float rounding do the work.
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return fp16{uint16_t(sign | 0x7e00)};
  if (abs >= 0x477ff000u) return fp16{uint16_t(sign | 0x7c00)};  // rounds to inf
  if (abs < 0x38800000u) {  // fp16 subnormal range: multiples of 2^-24
    float a;
    std::memcpy(&a, &abs, 4);
    const float scaled = a * 16777216.0f;  // exact
    const float r = __builtin_nearbyintf(scaled);
    return fp16{uint16_t(sign | uint16_t(r))};
  }
  uint32_t rounded = abs + 0xfff + ((abs >> 13) & 1);
  return fp16{uint16_t(sign | ((rounded - 0x38000000u) >> 13))};
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

Isa best_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const Isa best = [] {
    __builtin_cpu_init();
#if __GNUC__ >= 12  // the ISA levels the code is compiled for
    const bool v4 = __builtin_cpu_supports("x86-64-v4"), v3 = __builtin_cpu_supports("x86-64-v3");
#else
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("avx512cd");
#endif
    return v4 ? Isa::avx512 : v3 ? Isa::avx2 : Isa::base;
  }();
  return best;
#else
  return Isa::base;
#endif
}

bool isa_runs(Isa isa) { return int(isa) <= int(best_isa()); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "base";
  }
}

}  // namespace cpu
}  // namespace bk
