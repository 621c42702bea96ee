// CUDA implementation of bk::norm_layer_grads for the torch dispatcher: checks, dtypes and
// stream, then the raw launcher of norm_layer.cu.
#include "cuda/binding_common.h"
#include "cuda/norm_layer_cuda.h"

namespace bk {
namespace {

using namespace cuda_binding;

// xhat, g: [B, T, C] with any strides -> (gw [B, C], gb [B, C] or [B, 0], sq_norms [B]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_layer_grads_cuda(const at::Tensor& xhat,
                                                                     const at::Tensor& g,
                                                                     bool bias) {
  const char* op = "bk::norm_layer_grads";
  TORCH_CHECK(xhat.dim() == 3 && g.dim() == 3, op,
              ": expected xhat:[B,T,C] and g:[B,T,C], got xhat of shape ", xhat.sizes(),
              " and g of shape ", g.sizes());
  TORCH_CHECK(xhat.sizes() == g.sizes(), op, ": xhat and g must have one shape, got ", xhat.sizes(),
              " and ", g.sizes());
  TORCH_CHECK(xhat.scalar_type() == g.scalar_type(), op, ": xhat and g must have one dtype, got ",
              xhat.scalar_type(), " and ", g.scalar_type());
  check_float(xhat, op, "xhat");
  TORCH_CHECK(xhat.device() == g.device(), op, ": xhat and g must be on one device, got ",
              xhat.device(), " and ", g.device());
  const int64_t B = xhat.size(0), T = xhat.size(1), C = xhat.size(2);
  const c10::cuda::CUDAGuard guard(xhat.device());
  const auto options = xhat.options().dtype(acc_dtype(xhat.scalar_type()));
  at::Tensor gw = at::empty({B, C}, options);
  at::Tensor gb = at::empty({B, bias ? C : 0}, options);
  at::Tensor sq = at::empty({B}, options);
  const cuda::Strided3d xo{xhat.const_data_ptr(), xhat.stride(0), xhat.stride(1), xhat.stride(2)};
  const cuda::Strided3d go{g.const_data_ptr(), g.stride(0), g.stride(1), g.stride(2)};
  check_launch(cuda::norm_layer_grads(kernel_dtype(xhat.scalar_type()), xo, go, gw.data_ptr(),
                                      bias ? gb.data_ptr() : nullptr, sq.data_ptr(), B, T, C,
                                      c10::cuda::getCurrentCUDAStream()),
               op);
  return {gw, gb, sq};
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CUDA, m) { m.impl("norm_layer_grads", &norm_layer_grads_cuda); }

}  // namespace bk
