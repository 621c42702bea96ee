// CUDA implementations of bk::clipped_sum and bk::clipped_sum_ for the torch dispatcher:
// checks, dtypes, workspace and stream, then the raw launcher of clipped_sum.cu.
#include "cuda/binding_common.h"
#include "cuda/clipped_sum_cuda.h"
#include "cuda/cublas_paths.h"
#include "checks.h"

namespace bk {
namespace {

using namespace cuda_binding;

// grad_weight [p, d] (+)= sum_b c_b g_b^T a_b, grad_bias [p] (+)= sum_b c_b sum_t g_b,t.
void clipped_sum_into(const at::Tensor& grad_weight, const c10::optional<at::Tensor>& grad_bias,
                      const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& c_in,
                      const char* op) {
  check_norm_inputs(a_in, g_in, op);
  const at::Tensor a = rows_contiguous(a_in), g = rows_contiguous(g_in);
  const int64_t B = a.size(0), T = a.size(1), d = a.size(2), p = g.size(2);
  const at::Device device = a.device();
  const c10::cuda::CUDAGuard guard(device);

  TORCH_CHECK(grad_weight.dim() == 2 && grad_weight.size(0) == p && grad_weight.size(1) == d, op,
              ": grad_weight must have shape [p, d] = [", p, ", ", d, "] (g is [B,T,p], a is [B,T,d]), got ",
              grad_weight.sizes());
  check_float(grad_weight, op, "grad_weight");
  check_device(grad_weight, device, op, "grad_weight");
  check_writable(grad_weight, op, "grad_weight");
  const bool bias = grad_bias.has_value() && grad_bias->defined();
  if (bias) {
    TORCH_CHECK(grad_bias->dim() == 1 && grad_bias->size(0) == p, op,
                ": grad_bias must have shape [p] = [", p, "], got ", grad_bias->sizes());
    check_float(*grad_bias, op, "grad_bias");
    check_device(*grad_bias, device, op, "grad_bias");
    check_writable(*grad_bias, op, "grad_bias");
  }
  const at::Tensor c = clip_factors_arg(c_in, B, acc_dtype(a.scalar_type()), device, op);
  if (cublas_paths::applies(a)) {
    // Sums in float32 buffers: the caller's when they are float32, else rounded into theirs once.
    at::Tensor w = grad_weight.scalar_type() == at::kFloat ? grad_weight : at::zeros({p, d}, c.options());
    at::Tensor b;
    if (bias) b = grad_bias->scalar_type() == at::kFloat ? *grad_bias : at::zeros({p}, c.options());
    cublas_paths::clipped_sum(a, g, c, w, bias ? &b : nullptr);
    if (!w.is_same(grad_weight)) grad_weight.add_(w);
    if (bias && !b.is_same(*grad_bias)) grad_bias->add_(b);
    return;
  }

  const cuda::DType dtype = kernel_dtype(a.scalar_type());
  const at::Tensor ws = workspace(cuda::clipped_sum_workspace_bytes(dtype, B, T, d, p), a);
  const cuda::Operand3d ao{a.const_data_ptr(), a.stride(0), a.stride(1)};
  const cuda::Operand3d go{g.const_data_ptr(), g.stride(0), g.stride(1)};
  const cuda::OutMat gw = out_mat(grad_weight);
  const cuda::OutMat gb = bias ? out_mat(*grad_bias) : cuda::OutMat{nullptr, gw.dtype, 0, 0};
  check_launch(cuda::clipped_sum(dtype, ao, go, c.const_data_ptr(), gw, gb, B, T, d, p,
                                 ws.data_ptr(), static_cast<size_t>(ws.numel()),
                                 c10::cuda::getCurrentCUDAStream()),
               op);
}

std::tuple<at::Tensor, at::Tensor> clipped_sum_cuda(const at::Tensor& a, const at::Tensor& g,
                                                    const at::Tensor& c, bool bias) {
  const char* op = "bk::clipped_sum";
  check_norm_inputs(a, g, op);
  const auto options = a.options().dtype(acc_dtype(a.scalar_type()));
  const int64_t d = a.size(2), p = g.size(2);
  at::Tensor grad_weight = at::zeros({p, d}, options);
  at::Tensor grad_bias = at::zeros({bias ? p : 0}, options);
  clipped_sum_into(grad_weight, bias ? c10::optional<at::Tensor>(grad_bias) : c10::nullopt, a, g,
                   c, op);
  return {grad_weight, grad_bias};
}

void clipped_sum_inplace_cuda(const at::Tensor& grad_weight,
                              const c10::optional<at::Tensor>& grad_bias, const at::Tensor& a,
                              const at::Tensor& g, const at::Tensor& c) {
  clipped_sum_into(grad_weight, grad_bias, a, g, c, "bk::clipped_sum_");
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CUDA, m) {
  m.impl("clipped_sum", &clipped_sum_cuda);
  m.impl("clipped_sum_", &clipped_sum_inplace_cuda);
}

}  // namespace bk
