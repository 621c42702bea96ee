// Input checks and output allocation shared by the CPU and CUDA wrappers of the ops (torch side).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

namespace bk {

// a:[B,T,d], g:[B,T,p] of one floating dtype on one device; the last dimension must be
// contiguous (the caller fixes that with .contiguous() where it is not).
inline void check_norm_inputs(const at::Tensor& a, const at::Tensor& g, const char* op) {
  TORCH_CHECK(a.dim() == 3 && g.dim() == 3, op, ": expected a:[B,T,d] and g:[B,T,p], got a of shape ",
              a.sizes(), " and g of shape ", g.sizes());
  TORCH_CHECK(a.size(0) == g.size(0) && a.size(1) == g.size(1), op,
              ": a and g must agree in batch and position dims, got a ", a.sizes(), " and g ",
              g.sizes());
  TORCH_CHECK(a.scalar_type() == g.scalar_type(), op, ": a and g must have one dtype, got ",
              a.scalar_type(), " and ", g.scalar_type());
  const auto t = a.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": unsupported dtype ", t, " (float32, float64, float16, bfloat16 are)");
  TORCH_CHECK(a.device() == g.device(), op, ": a and g must be on one device, got ", a.device(),
              " and ", g.device());
}

// Last dimension contiguous, any other strides kept (no copy when already so).
inline at::Tensor rows_contiguous(const at::Tensor& x) {
  return (x.size(-1) <= 1 || x.stride(-1) == 1) ? x : x.contiguous();
}

// Norms are float64 for float64 inputs, float32 otherwise.
inline at::Tensor norm_output(const at::Tensor& a) {
  const auto dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({a.size(0)}, a.options().dtype(dtype));
}

}  // namespace bk
