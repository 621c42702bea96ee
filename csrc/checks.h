// Input checks and output allocation shared by the CPU and CUDA wrappers of the ops (torch side).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <limits>

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

// add_noise_'s arguments, the same on every device: a floating grad of distinct elements, a
// finite std >= 0 and scale, counters offset .. offset + numel - 1 within int64.
inline void check_add_noise_args(const at::Tensor& grad, double std, double scale, int64_t offset,
                                 const char* op) {
  const auto dtype = grad.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": grad must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(std::isfinite(std) && std >= 0, op, ": std must be finite and >= 0, got ", std);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(offset >= 0, op, ": offset (the first Philox counter) must be >= 0, got ", offset);
  TORCH_CHECK(offset <= std::numeric_limits<int64_t>::max() - grad.numel(), op, ": offset ",
              offset, " + numel ", grad.numel(), " overflows int64");
  TORCH_CHECK(at::has_internal_overlap(grad) != at::MemOverlap::Yes, op,
              ": grad has elements sharing memory (e.g. an expanded tensor); in-place noise needs "
              "distinct elements");
}

}  // namespace bk
