// Raw CPU kernels of the per-example norm ops: no torch headers, so the standalone
// CMake build and its C++ tests use them directly. Torch wrappers: norms.cpp.
#pragma once
#include <cstdint>

#include "cpu/common.h"  // bf16, fp16, Operand3d, out_t

namespace bk {
namespace cpu {

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

}  // namespace cpu
}  // namespace bk
