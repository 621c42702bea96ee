// Raw CPU kernels of the per-example norm ops: no torch headers, so the standalone
// CMake build and its C++ tests use them directly. Torch wrappers: norms.cpp.
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

// Norms come out in double for double inputs, float for float/bf16/fp16 inputs.
template <typename scalar_t>
using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// out[b] = ||a_b^T g_b||_F^2 for a:[B,T,d], g:[B,T,p].
// ghost_norm forms the Gram tiles <a_s, a_t> <g_s, g_t> (upper triangle only, by symmetry);
// direct_norm forms a_b^T g_b tile by tile. Extra memory: O(T*(d+p)) per thread, never
// O(B*T*T) or O(B*d*p).
template <typename scalar_t>
void ghost_norm(Operand3d<scalar_t> a, Operand3d<scalar_t> g, out_t<scalar_t>* out, int64_t B,
                int64_t T, int64_t d, int64_t p);
template <typename scalar_t>
void direct_norm(Operand3d<scalar_t> a, Operand3d<scalar_t> g, out_t<scalar_t>* out, int64_t B,
                 int64_t T, int64_t d, int64_t p);

// Threads the OpenMP runtime would use (1 without OpenMP).
int max_threads();

}  // namespace cpu
}  // namespace bk
