// CUDA implementation of bk::add_noise_ for the torch dispatcher: checks and stream, then the
// raw launcher of noise.cu.
#include "cuda/binding_common.h"
#include "cuda/noise_cuda.h"

namespace bk {
namespace {

using namespace cuda_binding;

// grad = (grad + std * z) * scale in place; z from Philox4x32-10 keyed by seed, element i at
// counter offset + i (docs/OPS.md).
void add_noise_cuda(const at::Tensor& grad, double std, double scale, int64_t seed,
                    int64_t offset) {
  const char* op = "bk::add_noise_";
  check_float(grad, op, "grad");
  TORCH_CHECK(grad.is_contiguous(), op,
              ": grad must be contiguous (element i uses counter offset + i in memory order), got "
              "strides ", grad.strides());
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  TORCH_CHECK(std >= 0, op, ": std must be >= 0, got ", std);
  const c10::cuda::CUDAGuard guard(grad.device());
  check_launch(cuda::add_noise(kernel_dtype(grad.scalar_type()), grad.data_ptr(), grad.numel(), std,
                               scale, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                               c10::cuda::getCurrentCUDAStream()),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CUDA, m) { m.impl("add_noise_", &add_noise_cuda); }

}  // namespace bk
