// Raw CUDA launcher of the per-example affine gradients of a normalisation layer (no torch
// headers; the torch side is norm_layer_binding.cpp). xhat, g: [B, T, C] with any strides:
//   gw[b, c] = sum_t xhat g,  gb[b, c] = sum_t g,  sq_norms[b] = ||gw_b||^2 + ||gb_b||^2.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/types.h"  // DType, Operand3d, OutMat

namespace bk {
namespace cuda {

// Element (b, t, c) of a [B, T, C] operand is ptr[b * stride_b + t * stride_t + c * stride_c].
struct Strided3d {
  const void* ptr;
  int64_t stride_b;
  int64_t stride_t;
  int64_t stride_c;
};

// gw, gb: contiguous [B, C]; sq_norms: [B]; all double* for f64 inputs, float* otherwise.
// gb may be null (no bias: gb is neither written nor counted in sq_norms).
cudaError_t norm_layer_grads(DType dtype, Strided3d xhat, Strided3d g, void* gw, void* gb,
                             void* sq_norms, int64_t B, int64_t T, int64_t C,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace bk
