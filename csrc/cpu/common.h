// What every CPU kernel file shares (no torch headers): 16-bit floats as raw bits and their
// conversions, the strided [B, T, n] operand, the accumulation-type rule, the thread count,
// the CPU's instruction set level.
#pragma once
#include <cstdint>
#include <type_traits>

namespace bk {
namespace cpu {

// 16-bit floats as raw bits (same layout as at::BFloat16 / at::Half).
struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

float to_float(bf16 x);
float to_float(fp16 x);
bf16 to_bf16(float x);  // round to nearest even (for tests)
fp16 to_fp16(float x);  // round to nearest even (for tests)

// Element (b, t, k) of a [B, T, n] operand is ptr[b * stride_b + t * stride_t + k].
template <typename scalar_t>
struct Operand3d {
  const scalar_t* ptr;
  int64_t stride_b;
  int64_t stride_t;
};

// The dtype rule, written once for C++: sums and norms are double for double inputs, float for
// float/bf16/fp16 inputs.
template <typename scalar_t>
using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Threads the OpenMP runtime would use (1 without OpenMP).
int max_threads();

// The x86-64 instruction set levels the vector kernels are compiled for: baseline (SSE2, and
// every non-x86 or non-GCC build), AVX2+FMA (x86-64-v3) and AVX-512 (x86-64-v4), with 16-,
// 32- and 64-byte vectors. best_isa() is this CPU's, detected once.
enum class Isa { base = 0, avx2 = 1, avx512 = 2 };
Isa best_isa();
bool isa_runs(Isa isa);
const char* isa_name(Isa isa);

}  // namespace cpu
}  // namespace bk
