// CPU implementation of bk::add_noise_ for the torch dispatcher (kernel: noise_kernels.cpp).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "checks.h"
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
  check_add_noise_args(grad, std, scale, offset, op);
  const auto dtype = grad.scalar_type();
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
