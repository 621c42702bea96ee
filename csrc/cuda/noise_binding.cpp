// CUDA implementation of bk::add_noise_ for the torch dispatcher: checks and stream, then the
// raw launcher of noise.cu.
#include "cuda/binding_common.h"
#include "cuda/noise_cuda.h"
#include "checks.h"

namespace bk {
namespace {

using namespace cuda_binding;

// grad = (grad + std * z) * scale in place; z from Philox4x32-10 keyed by seed, element i at
// counter offset + i (docs/OPS.md).
void add_noise_cuda(const at::Tensor& grad, double std, double scale, int64_t seed,
                    int64_t offset) {
  const char* op = "bk::add_noise_";
  check_float(grad, op, "grad");
  check_add_noise_args(grad, std, scale, offset, op);  // the CPU op's checks (checks.h)
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  // Element i is the i-th in the tensor's logical (row-major) order, as on the CPU: a
  // non-contiguous grad (channels_last, a transposed view) is noised in a contiguous copy,
  // then copied back.
  const at::Tensor work = grad.is_contiguous() ? grad : grad.contiguous();
  check_launch(cuda::add_noise(kernel_dtype(work.scalar_type()), work.data_ptr(), work.numel(), std,
                               scale, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                               c10::cuda::getCurrentCUDAStream()),
               op);
  if (!work.is_same(grad)) grad.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CUDA, m) { m.impl("add_noise_", &add_noise_cuda); }

}  // namespace bk
