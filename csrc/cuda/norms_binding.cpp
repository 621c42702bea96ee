// CUDA implementations of bk::ghost_norm and bk::direct_norm for the torch dispatcher:
// checks, dtype mapping and stream, then the raw launchers of norms.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/binding_common.h"  // kernel_dtype
#include "cuda/norms_cuda.h"
#include "checks.h"

namespace bk {
namespace {

using cuda_binding::kernel_dtype;

using Launcher = cudaError_t (*)(cuda::DType, cuda::Operand3d, cuda::Operand3d, void*, int64_t,
                                 int64_t, int64_t, int64_t, cudaStream_t);

at::Tensor norm_cuda(const at::Tensor& a_in, const at::Tensor& g_in, Launcher launch,
                     const char* op) {
  check_norm_inputs(a_in, g_in, op);
  const at::Tensor a = rows_contiguous(a_in), g = rows_contiguous(g_in);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = norm_output(a);
  const cuda::Operand3d ao{a.const_data_ptr(), a.stride(0), a.stride(1)};
  const cuda::Operand3d go{g.const_data_ptr(), g.stride(0), g.stride(1)};
  const cudaError_t err = launch(kernel_dtype(a.scalar_type()), ao, go, out.mutable_data_ptr(),
                                 a.size(0), a.size(1), a.size(2), g.size(2),
                                 c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor ghost_norm_cuda(const at::Tensor& a, const at::Tensor& g) {
  return norm_cuda(a, g, &cuda::ghost_norm, "bk::ghost_norm");
}
at::Tensor direct_norm_cuda(const at::Tensor& a, const at::Tensor& g) {
  return norm_cuda(a, g, &cuda::direct_norm, "bk::direct_norm");
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CUDA, m) {
  m.impl("ghost_norm", &ghost_norm_cuda);
  m.impl("direct_norm", &direct_norm_cuda);
}

}  // namespace bk
