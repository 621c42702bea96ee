// CUDA implementations of bk::embedding_norm, bk::embedding_clipped_sum and
// bk::embedding_clipped_sum_ for the torch dispatcher: checks (ids in range, verified on the
// device), dtypes, workspace and stream, then the raw launchers of embedding.cu.
#include "cuda/binding_common.h"
#include "cuda/embedding_cuda.h"
#include "checks.h"

namespace bk {
namespace {

using namespace cuda_binding;

// ids:[B,T] int32/int64 and g:[B,T,d] floating, on one device. Returns ids contiguous and g
// with a contiguous last dimension.
std::pair<at::Tensor, at::Tensor> embedding_inputs(const at::Tensor& ids, const at::Tensor& g,
                                                   const char* op) {
  TORCH_CHECK(ids.dim() == 2 && g.dim() == 3, op, ": expected ids:[B,T] and g:[B,T,d], got ids of shape ",
              ids.sizes(), " and g of shape ", g.sizes());
  TORCH_CHECK(ids.size(0) == g.size(0) && ids.size(1) == g.size(1), op,
              ": ids and g must agree in batch and position dims, got ids ", ids.sizes(), " and g ",
              g.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
              ": ids must be int32 or int64, got ", ids.scalar_type());
  check_float(g, op, "g");
  TORCH_CHECK(ids.device() == g.device(), op, ": ids and g must be on one device, got ", ids.device(),
              " and ", g.device());
  TORCH_CHECK(ids.numel() < int64_t{0xffffffff}, op, ": at most 2^32 - 2 positions B*T, got ",
              ids.numel());
  return {ids.contiguous(), rows_contiguous(g)};
}

cuda::Ids ids_arg(const at::Tensor& ids) {
  return cuda::Ids{ids.const_data_ptr(), ids.scalar_type() == at::kLong};
}

cuda::Operand3d operand(const at::Tensor& g) {
  return cuda::Operand3d{g.const_data_ptr(), g.stride(0), g.stride(1)};
}

at::Tensor embedding_norm_cuda(const at::Tensor& ids_in, const at::Tensor& g_in,
                               c10::optional<int64_t> padding_idx) {
  const char* op = "bk::embedding_norm";
  const auto [ids, g] = embedding_inputs(ids_in, g_in, op);
  const int64_t B = g.size(0), T = g.size(1), d = g.size(2);
  const c10::cuda::CUDAGuard guard(g.device());
  at::Tensor out = at::empty({B}, g.options().dtype(acc_dtype(g.scalar_type())));
  const at::Tensor ws = workspace(cuda::embedding_norm_workspace_bytes(B * T, d), g);  // reproducible
  check_launch(cuda::embedding_norm(kernel_dtype(g.scalar_type()), ids_arg(ids), operand(g),
                                    padding_idx.has_value(), padding_idx.value_or(0),
                                    out.data_ptr(), B, T, d, ws.data_ptr(),
                                    static_cast<size_t>(ws.numel()),
                                    c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

void embedding_clipped_sum_into(const at::Tensor& grad_weight, const at::Tensor& ids_in,
                                const at::Tensor& g_in, const at::Tensor& c_in,
                                c10::optional<int64_t> padding_idx, bool deterministic,
                                const char* op) {
  const auto [ids, g] = embedding_inputs(ids_in, g_in, op);
  const int64_t B = g.size(0), T = g.size(1), d = g.size(2);
  const at::Device device = g.device();
  const c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(grad_weight.dim() == 2 && grad_weight.size(1) == d, op,
              ": grad_weight must have shape [num_embeddings, d] with d = ", d,
              " (g is [B,T,d]), got ", grad_weight.sizes());
  check_float(grad_weight, op, "grad_weight");
  check_device(grad_weight, device, op, "grad_weight");
  check_writable(grad_weight, op, "grad_weight");
  const int64_t V = grad_weight.size(0);
  const at::Tensor c = clip_factors_arg(c_in, B, acc_dtype(g.scalar_type()), device, op);
  const bool has_pad = padding_idx.has_value();
  const int64_t pad = padding_idx.value_or(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (B * T == 0) return;

  // Every id (padding_idx excepted) must index a row: checked on the device, read back once.
  const at::Tensor flags = at::zeros({2}, g.options().dtype(at::kLong));
  check_launch(cuda::embedding_check_ids(ids_arg(ids), B * T, V, has_pad, pad,
                                         flags.data_ptr<int64_t>(), stream),
               op);
  const at::Tensor flags_host = flags.cpu();
  TORCH_CHECK(flags_host[0].item<int64_t>() == 0, op, ": ids must lie in [0, num_embeddings) = [0, ", V,
              ") (padding_idx excepted), found ", flags_host[1].item<int64_t>());

  const cuda::DType dtype = kernel_dtype(g.scalar_type());
  const cuda::OutMat out = out_mat(grad_weight);
  const bool sorts = cuda::embedding_clipped_sum_sorts(dtype, out.dtype, deterministic);
  const at::Tensor ws = workspace(sorts ? cuda::embedding_workspace_bytes(B * T) : 0, g);
  check_launch(cuda::embedding_clipped_sum(dtype, ids_arg(ids), operand(g), c.const_data_ptr(),
                                           has_pad, pad, out, V, deterministic, B, T, d,
                                           ws.data_ptr(), static_cast<size_t>(ws.numel()), stream),
               op);
}

at::Tensor embedding_clipped_sum_cuda(const at::Tensor& ids, const at::Tensor& g,
                                      const at::Tensor& c, int64_t num_embeddings,
                                      c10::optional<int64_t> padding_idx, bool deterministic) {
  const char* op = "bk::embedding_clipped_sum";
  TORCH_CHECK(num_embeddings >= 0, op, ": num_embeddings must be >= 0, got ", num_embeddings);
  TORCH_CHECK(g.dim() == 3, op, ": expected g:[B,T,d], got g of shape ", g.sizes());
  check_float(g, op, "g");
  at::Tensor out = at::zeros({num_embeddings, g.size(2)}, g.options().dtype(acc_dtype(g.scalar_type())));
  embedding_clipped_sum_into(out, ids, g, c, padding_idx, deterministic, op);
  return out;
}

void embedding_clipped_sum_inplace_cuda(const at::Tensor& grad_weight, const at::Tensor& ids,
                                        const at::Tensor& g, const at::Tensor& c,
                                        c10::optional<int64_t> padding_idx, bool deterministic) {
  embedding_clipped_sum_into(grad_weight, ids, g, c, padding_idx, deterministic,
                             "bk::embedding_clipped_sum_");
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CUDA, m) {
  m.impl("embedding_norm", &embedding_norm_cuda);
  m.impl("embedding_clipped_sum", &embedding_clipped_sum_cuda);
  m.impl("embedding_clipped_sum_", &embedding_clipped_sum_inplace_cuda);
}

}  // namespace bk
