// Raw CPU kernel of bk::add_noise_: no torch headers, so the standalone CMake build and its
// C++ tests use it directly. Torch wrapper: noise.cpp. The counter layout: docs/OPS.md.
#pragma once
#include <cstdint>

#include "cpu/common.h"  // bf16, fp16, Operand3d, out_t

namespace bk {
namespace cpu {

// grad[i] = (grad[i] + std * z_i) * scale for i in [0, n), z_i ~ N(0, 1) the Philox4x32-10
// normal of counter offset + i under the key (seed & 0xffffffff, seed >> 32).
// The noise is float32 for every dtype (so a double buffer gets the same z_i as a float one);
// float/bf16/fp16 buffers compute in float32, double buffers in double, rounding once to the
// buffer's dtype. std == 0 draws nothing: grad *= scale. Uses up to num_threads OpenMP
// threads; the result does not depend on their number.
template <typename scalar_t>
void add_noise(scalar_t* grad, int64_t n, double std, double scale, uint64_t seed,
               uint64_t offset, int num_threads);

// The kernel is compiled for every instruction set level of cpu/common.h (Isa; elsewhere
// than x86-64 GCC only `base`). add_noise runs the best this CPU has; the tests run each one
// the CPU can.
template <typename scalar_t>
void add_noise_isa(Isa isa, scalar_t* grad, int64_t n, double std, double scale, uint64_t seed,
                   uint64_t offset, int num_threads);

// Philox4x32-10 of one block, scalar (the reference the vector code is tested against).
void philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

// The kernel's own vector code, exposed for the C++ tests:
// out[4 b + j] = word j of Philox4x32-10 at counter (q0 + b, 0, 0) (q0 + b as two 32-bit
// words), b < nblocks.
void philox_blocks(Isa isa, uint64_t q0, int64_t nblocks, const uint32_t key[2], uint32_t* out);
// out[i] = ln((w[i] + 1) 2^-32), the Box-Muller log, float32.
void noise_log_u1(Isa isa, const uint32_t* w, int64_t n, float* out);
// out[i] = sqrt(x[i]) for x[i] >= 0, float32.
void noise_sqrt(Isa isa, const float* x, int64_t n, float* out);
// c[i], s[i] = cos, sin(2 pi w[i] 2^-32), float32.
void noise_sincos(Isa isa, const uint32_t* w, int64_t n, float* c, float* s);

}  // namespace cpu
}  // namespace bk
