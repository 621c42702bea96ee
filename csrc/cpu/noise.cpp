// CPU implementation of bk::add_noise_ for the torch dispatcher (kernel: noise_kernels.cpp).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "cpu/noise_kernels.h"

namespace bk {
namespace {

template <typename scalar_t, typename kernel_scalar_t>
void run(const at::Tensor& t, double std, double scale, int64_t seed, int64_t offset) {
  // at::Half / at::BFloat16 have the same 16-bit layout as the kernel's fp16 / bf16.
  static_assert(sizeof(scalar_t) == sizeof(kernel_scalar_t));
  auto* ptr = reinterpret_cast<kernel_scalar_t*>(t.mutable_data_ptr<scalar_t>());
  // torch's intra-op thread count (torch.set_num_threads) decides, whatever OpenMP runtime
  // this module is linked with.
  cpu::add_noise<kernel_scalar_t>(ptr, t.numel(), std, scale, uint64_t(seed), uint64_t(offset),
                                  at::get_num_threads());
}

// grad = (grad + std * z) * scale in place; docs/OPS.md has the counter layout.
void add_noise_cpu(const at::Tensor& grad, double std, double scale, int64_t seed, int64_t offset) {
  constexpr const char* op = "bk::add_noise_";
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
  if (grad.numel() == 0) return;
  // Element i is the i-th in the tensor's logical (row-major) order: a non-contiguous grad is
  // noised in a contiguous copy, then copied back.
  const at::Tensor work = grad.is_contiguous() ? grad : grad.contiguous();
  switch (dtype) {
    case at::kFloat: run<float, float>(work, std, scale, seed, offset); break;
    case at::kDouble: run<double, double>(work, std, scale, seed, offset); break;
    case at::kHalf: run<at::Half, cpu::fp16>(work, std, scale, seed, offset); break;
    case at::kBFloat16: run<at::BFloat16, cpu::bf16>(work, std, scale, seed, offset); break;
    default: break;  // checked above
  }
  if (!work.is_same(grad)) grad.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CPU, m) { m.impl("add_noise_", &add_noise_cpu); }

}  // namespace bk
