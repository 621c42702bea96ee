// CPU implementation of bk::norm_layer_grads for the dispatcher.
#include <tuple>

#include "cpu/norm_layer_kernels.h"
#include "checks.h"

namespace bk {
namespace {

template <typename scalar_t, typename kernel_scalar_t>
void run(const at::Tensor& xhat, const at::Tensor& g, at::Tensor& gw, at::Tensor* gb,
         at::Tensor& sq) {
  static_assert(sizeof(scalar_t) == sizeof(kernel_scalar_t));
  using O = cpu::out_t<kernel_scalar_t>;
  const auto* x_ptr = reinterpret_cast<const kernel_scalar_t*>(xhat.const_data_ptr<scalar_t>());
  const auto* g_ptr = reinterpret_cast<const kernel_scalar_t*>(g.const_data_ptr<scalar_t>());
  // Strides as they are: the kernel reads any layout without a copy.
  cpu::Strided3d<kernel_scalar_t> xv{x_ptr, xhat.stride(0), xhat.stride(1), xhat.stride(2)};
  cpu::Strided3d<kernel_scalar_t> gv{g_ptr, g.stride(0), g.stride(1), g.stride(2)};
  cpu::norm_layer_grads<kernel_scalar_t>(xv, gv, gw.mutable_data_ptr<O>(),
                                         gb ? gb->mutable_data_ptr<O>() : nullptr,
                                         sq.mutable_data_ptr<O>(), xhat.size(0), xhat.size(1),
                                         xhat.size(2));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_layer_grads_cpu(const at::Tensor& xhat,
                                                                    const at::Tensor& g,
                                                                    bool bias) {
  constexpr const char* op = "bk::norm_layer_grads";
  TORCH_CHECK(xhat.dim() == 3 && g.dim() == 3, op, ": expected xhat:[B,T,C] and g:[B,T,C], got xhat of shape ",
              xhat.sizes(), " and g of shape ", g.sizes());
  TORCH_CHECK(xhat.sizes() == g.sizes(), op, ": xhat and g must have one shape, got ", xhat.sizes(),
              " and ", g.sizes());
  TORCH_CHECK(xhat.scalar_type() == g.scalar_type(), op, ": xhat and g must have one dtype, got ",
              xhat.scalar_type(), " and ", g.scalar_type());
  const auto t = xhat.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": unsupported dtype ", t, " (float32, float64, float16, bfloat16 are)");
  TORCH_CHECK(xhat.device().is_cpu() && g.device().is_cpu(), op,
              ": expected CPU tensors, got xhat on ", xhat.device(), " and g on ", g.device());
  const int64_t B = xhat.size(0), C = xhat.size(2);
  const auto opts = xhat.options().dtype(t == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor gw = at::empty({B, C}, opts);
  at::Tensor gb = at::empty({B, bias ? C : 0}, opts);
  at::Tensor sq = at::empty({B}, opts);
  at::Tensor* gb_ptr = bias ? &gb : nullptr;
  switch (t) {
    case at::kDouble: run<double, double>(xhat, g, gw, gb_ptr, sq); break;
    case at::kFloat: run<float, float>(xhat, g, gw, gb_ptr, sq); break;
    case at::kHalf: run<at::Half, cpu::fp16>(xhat, g, gw, gb_ptr, sq); break;
    default: run<at::BFloat16, cpu::bf16>(xhat, g, gw, gb_ptr, sq); break;
  }
  return {gw, gb, sq};
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CPU, m) {
  m.impl("norm_layer_grads", &norm_layer_grads_cpu);
}

}  // namespace bk
