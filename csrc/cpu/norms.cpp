// CPU implementations of bk::ghost_norm and bk::direct_norm for the torch dispatcher.
#include "cpu/norms_kernels.h"
#include "checks.h"

namespace bk {
namespace {

template <typename scalar_t, typename kernel_scalar_t, typename Kernel>
void run(const at::Tensor& a, const at::Tensor& g, at::Tensor& out, Kernel kernel) {
  // at::Half / at::BFloat16 have the same 16-bit layout as the kernels' fp16 / bf16.
  static_assert(sizeof(scalar_t) == sizeof(kernel_scalar_t));
  const auto* a_ptr = reinterpret_cast<const kernel_scalar_t*>(a.const_data_ptr<scalar_t>());
  const auto* g_ptr = reinterpret_cast<const kernel_scalar_t*>(g.const_data_ptr<scalar_t>());
  cpu::Operand3d<kernel_scalar_t> ao{a_ptr, a.stride(0), a.stride(1)};
  cpu::Operand3d<kernel_scalar_t> go{g_ptr, g.stride(0), g.stride(1)};
  kernel(ao, go, out.mutable_data_ptr<cpu::out_t<kernel_scalar_t>>(), a.size(0), a.size(1),
         a.size(2), g.size(2));
}

template <template <typename> class Fn>
at::Tensor norm_cpu(const at::Tensor& a_in, const at::Tensor& g_in, const char* op) {
  check_norm_inputs(a_in, g_in, op);
  const at::Tensor a = rows_contiguous(a_in), g = rows_contiguous(g_in);
  at::Tensor out = norm_output(a);
  switch (a.scalar_type()) {
    case at::kDouble: run<double, double>(a, g, out, Fn<double>::call); break;
    case at::kFloat: run<float, float>(a, g, out, Fn<float>::call); break;
    case at::kHalf: run<at::Half, cpu::fp16>(a, g, out, Fn<cpu::fp16>::call); break;
    case at::kBFloat16: run<at::BFloat16, cpu::bf16>(a, g, out, Fn<cpu::bf16>::call); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", a.scalar_type());
  }
  return out;
}

template <typename S>
struct Ghost {
  static constexpr auto call = &cpu::ghost_norm<S>;
};
template <typename S>
struct Direct {
  static constexpr auto call = &cpu::direct_norm<S>;
};

at::Tensor ghost_norm_cpu(const at::Tensor& a, const at::Tensor& g) {
  return norm_cpu<Ghost>(a, g, "bk::ghost_norm");
}
at::Tensor direct_norm_cpu(const at::Tensor& a, const at::Tensor& g) {
  return norm_cpu<Direct>(a, g, "bk::direct_norm");
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CPU, m) {
  m.impl("ghost_norm", &ghost_norm_cpu);
  m.impl("direct_norm", &direct_norm_cpu);
}

}  // namespace bk
