// Raw CUDA launcher of add_noise_ (no torch headers; the torch side is noise_binding.cpp):
//   grad[i] = (grad[i] + std * z_i) * scale,  z_i ~ N(0, 1) from Philox4x32-10,
// with the counter layout of docs/OPS.md: element i uses counter n = offset + i, i.e. lane
// n % 4 of Philox block n / 4 under key (seed_lo, seed_hi).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/types.h"  // DType, Operand3d, OutMat

namespace bk {
namespace cuda {

// grad: numel contiguous elements of dtype. The noise and the update are computed in double
// for f64 and in float otherwise, rounded once into grad.
cudaError_t add_noise(DType dtype, void* grad, int64_t numel, double std, double scale,
                      uint64_t seed, uint64_t offset, cudaStream_t stream);

}  // namespace cuda
}  // namespace bk
