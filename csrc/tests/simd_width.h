// The C++ tests of a kernel library built for one vector width only (BK_SIMD_WIDTH, see
// CMakeLists.txt): on a CPU without that width's instruction set they report themselves
// skipped (exit 77) instead of dying on an illegal instruction.
#pragma once
#include <cstdio>

#include "cpu/common.h"  // isa_runs

inline bool simd_width_runs() {
#if defined(BK_SIMD_WIDTH) && BK_SIMD_WIDTH > 16
  using bk::cpu::Isa;
  const bool runs = bk::cpu::isa_runs(BK_SIMD_WIDTH == 64 ? Isa::avx512 : Isa::avx2);
  if (!runs) std::printf("skipped: this CPU lacks the instruction set of the %d-byte bodies\n", BK_SIMD_WIDTH);
  return runs;
#else
  return true;
#endif
}
