// Argument checks and conversions shared by the torch bindings of the CUDA kernels
// (clipped_sum_binding.cpp, embedding_binding.cpp, norm_layer_binding.cpp, noise_binding.cpp).
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/types.h"  // DType, Operand3d, OutMat

namespace bk {
namespace cuda_binding {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::f32;
    case at::kDouble: return cuda::DType::f64;
    case at::kHalf: return cuda::DType::f16;
    case at::kBFloat16: return cuda::DType::bf16;
    default: TORCH_CHECK(false, "bk: unsupported dtype ", t);
  }
}

// Sums and norms accumulate (and come out) in float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name, " has unsupported dtype ",
              t.scalar_type(), " (float32, float64, float16, bfloat16 are)");
}

inline void check_device(const at::Tensor& t, const at::Device& device, const char* op,
                         const char* name) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the inputs, got ",
              t.device());
}

// An output the op writes into: no two elements may share memory.
inline void check_writable(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " has elements that share memory (e.g. an expanded tensor); it cannot be written");
}

// The clip factors c:[B] as a contiguous tensor of the accumulation dtype.
inline at::Tensor clip_factors_arg(const at::Tensor& c, int64_t B, at::ScalarType acc,
                                   const at::Device& device, const char* op) {
  TORCH_CHECK(c.dim() == 1 && c.size(0) == B, op, ": c must have shape [B] = [", B,
              "] (one clip factor per example), got ", c.sizes());
  check_float(c, op, "c");
  check_device(c, device, op, "c");
  return c.to(acc).contiguous();
}

// A [rows, cols] (or [n], seen as [1, n]) output buffer.
inline cuda::OutMat out_mat(const at::Tensor& t) {
  const cuda::DType dtype = kernel_dtype(t.scalar_type());
  if (t.dim() == 1) return cuda::OutMat{t.data_ptr(), dtype, 0, t.stride(0)};
  return cuda::OutMat{t.data_ptr(), dtype, t.stride(0), t.stride(1)};
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

// A byte workspace from torch's caching allocator (suitably aligned for any kernel).
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

}  // namespace cuda_binding
}  // namespace bk
