// Raw CUDA launchers of the per-example norm kernels. No torch headers here, so nvcc
// compiles the .cu files quickly and the standalone CMake build can use them too.
// The torch-facing wrappers live in norms_binding.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/types.h"  // DType, Operand3d

namespace bk {
namespace cuda {

// out[b] = || a_b^T g_b ||_F^2 for a:[B,T,d], g:[B,T,p].
// `out` is double* when dtype == f64, float* otherwise; the launcher zeroes it first.
// ghost_norm: via <a_b a_b^T, g_b g_b^T>, tile by tile (never B*T*T in memory).
// direct_norm: via forming a_b^T g_b tile by tile (never B*d*p in memory).
// shares: null (each tile adds its share of out[b] atomically: the last bits of float
// results vary run to run), or a buffer of ghost_norm_shares / direct_norm_shares elements of
// out's dtype (each tile stores its share, summed per example in a fixed order afterwards:
// bitwise reproducible).
cudaError_t ghost_norm(DType dtype, Operand3d a, Operand3d g, void* out, int64_t B,
                       int64_t T, int64_t d, int64_t p, cudaStream_t stream, void* shares = nullptr);
cudaError_t direct_norm(DType dtype, Operand3d a, Operand3d g, void* out, int64_t B,
                        int64_t T, int64_t d, int64_t p, cudaStream_t stream, void* shares = nullptr);
int64_t ghost_norm_shares(int64_t B, int64_t T);
int64_t direct_norm_shares(int64_t B, int64_t d, int64_t p);

}  // namespace cuda
}  // namespace bk
