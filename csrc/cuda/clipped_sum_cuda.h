// Raw CUDA launchers of the clipped weighted sums of a linear layer (no torch headers; the
// torch side is clipped_sum_binding.cpp):
//   grad_weight[p, d] += sum_b c_b g_b^T a_b,   grad_bias[p] += sum_b c_b sum_t g_b,t
// for a:[B,T,d], g:[B,T,p], c:[B].
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/types.h"  // DType, Operand3d, OutMat

namespace bk {
namespace cuda {

// Bytes of device workspace clipped_sum needs for these sizes on the current device (the
// split of the B*T rows over thread blocks depends on the device's multiprocessor count).
size_t clipped_sum_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t d, int64_t p);

// Adds the clipped sums into grad_weight [p, d] and, when grad_bias.ptr is not null, into
// grad_bias [p] (a 1 x p OutMat), rounding once per element. dtype is that of a and g;
// c is double* for f64, float* otherwise (contiguous [B]). workspace: at least
// clipped_sum_workspace_bytes(...) bytes, 256-byte aligned (cudaMalloc / torch allocations
// are). Deterministic: the same inputs give bitwise the same result.
cudaError_t clipped_sum(DType dtype, Operand3d a, Operand3d g, const void* c, OutMat grad_weight,
                        OutMat grad_bias, int64_t B, int64_t T, int64_t d, int64_t p,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace bk
