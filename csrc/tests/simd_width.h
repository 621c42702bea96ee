// The C++ tests of a kernel library built for one vector width only (BK_SIMD_WIDTH, see
// CMakeLists.txt): on a CPU without that width's instruction set they report themselves
// skipped (exit 77) instead of dying on an illegal instruction.
#pragma once
#include <cstdio>

inline bool simd_width_runs() {
#if defined(BK_SIMD_WIDTH) && BK_SIMD_WIDTH > 16 && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
#if __GNUC__ >= 12  // the ISA levels simd.h compiles the bodies for
  const bool runs = BK_SIMD_WIDTH == 64 ? __builtin_cpu_supports("x86-64-v4") : __builtin_cpu_supports("x86-64-v3");
#else
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool runs = BK_SIMD_WIDTH == 64 ? v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                              __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
                                        : v3;
#endif
  if (!runs) std::printf("skipped: this CPU lacks the instruction set of the %d-byte bodies\n", BK_SIMD_WIDTH);
  return runs;
#else
  return true;
#endif
}
