// CUDA implementations of bk::ghost_norm and bk::direct_norm for the torch dispatcher:
// checks, dtype mapping and stream, then the raw launchers of norms.cu.
#include <algorithm>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/binding_common.h"  // kernel_dtype
#include "cuda/cublas_paths.h"
#include "cuda/norms_cuda.h"
#include "checks.h"

namespace bk {
namespace {

using cuda_binding::kernel_dtype;

using Launcher = cudaError_t (*)(cuda::DType, cuda::Operand3d, cuda::Operand3d, void*, int64_t,
                                 int64_t, int64_t, int64_t, cudaStream_t, void*);

// Each launch's tile shares stay within this many elements (256 MiB in fp32); more examples go
// in further launches. The shares make the norms bitwise reproducible (norms.cu).
constexpr int64_t kMaxShares = int64_t(1) << 26;

using SharesPerExample = int64_t (*)(const at::Tensor& a, const at::Tensor& g);

at::Tensor norm_cuda(const at::Tensor& a_in, const at::Tensor& g_in, Launcher launch,
                     SharesPerExample shares_per_example, const char* op) {
  check_norm_inputs(a_in, g_in, op);
  const at::Tensor a = rows_contiguous(a_in), g = rows_contiguous(g_in);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = norm_output(a);
  const int64_t B = a.size(0);
  if (B == 0) return out;
  const int64_t per_example = std::max<int64_t>(shares_per_example(a, g), 1);
  const int64_t chunk = std::max<int64_t>(1, kMaxShares / per_example);
  const at::Tensor shares = at::empty({std::min(B, chunk) * per_example}, out.options());
  for (int64_t lo = 0; lo < B; lo += chunk) {
    const int64_t n = std::min(chunk, B - lo);
    const cuda::Operand3d ao{a.narrow(0, lo, n).const_data_ptr(), a.stride(0), a.stride(1)};
    const cuda::Operand3d go{g.narrow(0, lo, n).const_data_ptr(), g.stride(0), g.stride(1)};
    const cudaError_t err = launch(kernel_dtype(a.scalar_type()), ao, go, out.narrow(0, lo, n).mutable_data_ptr(),
                                   n, a.size(1), a.size(2), g.size(2), c10::cuda::getCurrentCUDAStream(),
                                   shares.mutable_data_ptr());
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
  }
  return out;
}

int64_t ghost_shares(const at::Tensor& a, const at::Tensor&) { return cuda::ghost_norm_shares(1, a.size(1)); }
int64_t direct_shares(const at::Tensor& a, const at::Tensor& g) {
  return cuda::direct_norm_shares(1, a.size(2), g.size(2));
}

at::Tensor ghost_norm_cuda(const at::Tensor& a, const at::Tensor& g) {
  if (cublas_paths::applies(a)) {  // bf16/fp16: the Gram matrices on cuBLAS (cublas_paths.h)
    check_norm_inputs(a, g, "bk::ghost_norm");
    const c10::cuda::CUDAGuard guard(a.device());
    at::Tensor out = norm_output(a);
    cublas_paths::ghost_norm(a, g, out);
    return out;
  }
  return norm_cuda(a, g, &cuda::ghost_norm, &ghost_shares, "bk::ghost_norm");
}
at::Tensor direct_norm_cuda(const at::Tensor& a, const at::Tensor& g) {
  return norm_cuda(a, g, &cuda::direct_norm, &direct_shares, "bk::direct_norm");
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CUDA, m) {
  m.impl("ghost_norm", &ghost_norm_cuda);
  m.impl("direct_norm", &direct_norm_cuda);
}

}  // namespace bk
