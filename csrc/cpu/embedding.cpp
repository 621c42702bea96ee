// CPU implementations of bk::embedding_norm, bk::embedding_clipped_sum(_) for the dispatcher.
#include <optional>
#include <string>
#include <vector>

#include "cpu/embedding_kernels.h"
#include "checks.h"

namespace bk {
namespace {

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ids [B, T] int32/int64 and g [B, T, d] floating, on the CPU.
void check_ids_g(const at::Tensor& ids, const at::Tensor& g, const char* op) {
  TORCH_CHECK(ids.dim() == 2 && g.dim() == 3, op, ": expected ids:[B,T] and g:[B,T,d], got ids of shape ",
              ids.sizes(), " and g of shape ", g.sizes());
  TORCH_CHECK(ids.size(0) == g.size(0) && ids.size(1) == g.size(1), op,
              ": ids and g must agree in batch and position dims, got ids ", ids.sizes(), " and g ",
              g.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
              ": ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(is_float(g.scalar_type()), op, ": unsupported dtype ", g.scalar_type(),
              " of g (float32, float64, float16, bfloat16 are)");
  TORCH_CHECK(ids.device().is_cpu() && g.device().is_cpu(), op,
              ": expected CPU tensors, got ids on ", ids.device(), " and g on ", g.device());
}

cpu::Padding padding_of(std::optional<int64_t> padding_idx, const char* op) {
  if (!padding_idx) return {false, 0};
  TORCH_CHECK(*padding_idx >= 0, op, ": padding_idx must be non-negative (nn.Embedding.padding_idx "
              "is), got ", *padding_idx);
  return {true, *padding_idx};
}

// Calls f(kernel id pointer type tag, kernel scalar type tag) for the tensors' dtypes; at::Half
// and at::BFloat16 have the kernels' fp16 / bf16 layout.
template <typename F>
void dispatch_g(at::ScalarType t, F f) {
  switch (t) {
    case at::kDouble: f(double{}); break;
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(cpu::fp16{}); break;
    case at::kBFloat16: f(cpu::bf16{}); break;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

template <typename F>
void dispatch_ids(at::ScalarType t, F f) {
  if (t == at::kLong)
    f(int64_t{});
  else
    f(int32_t{});
}

at::Tensor embedding_norm_cpu(const at::Tensor& ids, const at::Tensor& g_in,
                              std::optional<int64_t> padding_idx) {
  constexpr const char* op = "bk::embedding_norm";
  check_ids_g(ids, g_in, op);
  const cpu::Padding padding = padding_of(padding_idx, op);
  const at::Tensor g = rows_contiguous(g_in);
  at::Tensor out = at::empty({g.size(0)}, g.options().dtype(acc_dtype(g.scalar_type())));
  dispatch_ids(ids.scalar_type(), [&](auto id_tag) {
    using I = decltype(id_tag);
    dispatch_g(g.scalar_type(), [&](auto g_tag) {
      using S = decltype(g_tag);
      const cpu::Ids2d<I> iv{ids.const_data_ptr<I>(), ids.stride(0), ids.stride(1)};
      const cpu::Operand3d<S> gv{static_cast<const S*>(g.const_data_ptr()), g.stride(0), g.stride(1)};
      cpu::embedding_norm<I, S>(iv, gv, out.mutable_data_ptr<cpu::out_t<S>>(), g.size(0), g.size(1),
                                g.size(2), padding);
    });
  });
  return out;
}

void embedding_clipped_sum_cpu_(const at::Tensor& grad_weight, const at::Tensor& ids,
                                const at::Tensor& g_in, const at::Tensor& c_in,
                                std::optional<int64_t> padding_idx, bool deterministic) {
  // The kernel is deterministic whatever `deterministic` says: every (id, column block) is
  // summed by one thread in position order (see embedding_kernels.h).
  (void)deterministic;
  constexpr const char* op = "bk::embedding_clipped_sum_";
  check_ids_g(ids, g_in, op);
  TORCH_CHECK(grad_weight.dim() == 2 && grad_weight.size(1) == g_in.size(2), op,
              ": grad_weight must be [V, d] with d = g.size(2) = ", g_in.size(2), ", got ",
              grad_weight.sizes());
  TORCH_CHECK(is_float(grad_weight.scalar_type()), op, ": unsupported grad_weight dtype ",
              grad_weight.scalar_type(), " (float32, float64, float16, bfloat16 are)");
  TORCH_CHECK(grad_weight.device().is_cpu(), op, ": grad_weight must be on the CPU, got ",
              grad_weight.device());
  TORCH_CHECK(c_in.dim() == 1 && c_in.size(0) == g_in.size(0), op,
              ": c must have shape [B] = [", g_in.size(0), "], got ", c_in.sizes());
  TORCH_CHECK(is_float(c_in.scalar_type()), op, ": c must be floating point, got ", c_in.scalar_type());
  TORCH_CHECK(c_in.device().is_cpu(), op, ": c must be on the CPU, got ", c_in.device());
  const int64_t V = grad_weight.size(0);
  const cpu::Padding padding = padding_of(padding_idx, op);
  TORCH_CHECK(!padding.has_padding || padding.padding_idx < V, op, ": padding_idx ",
              padding.padding_idx, " is out of range for ", V, " embeddings");
  const int64_t B = g_in.size(0), T = g_in.size(1), d = g_in.size(2);

  // Plan: the positions sorted into runs of equal ids (checks every id against V).
  const int64_t N = B * T;
  std::vector<int64_t> positions(N), starts(N + 1), ids_of(N);
  cpu::EmbeddingSegments segs{positions.data(), starts.data(), ids_of.data(), 0};
  int64_t bad = -1;
  dispatch_ids(ids.scalar_type(), [&](auto id_tag) {
    using I = decltype(id_tag);
    const cpu::Ids2d<I> iv{ids.const_data_ptr<I>(), ids.stride(0), ids.stride(1)};
    bad = cpu::embedding_segments<I>(iv, B, T, V, padding, &segs);
  });
  if (bad >= 0) {
    const int64_t b = bad / T, t = bad % T;
    TORCH_CHECK(false, op, ": ids[", b, ", ", t, "] = ", ids[b][t].item<int64_t>(),
                " is out of range for ", V, " embeddings (expected 0 <= id < ", V, ")");
  }
  if (segs.count == 0 || d == 0) return;

  const at::Tensor g = rows_contiguous(g_in);
  const at::Tensor c = c_in.to(acc_dtype(g.scalar_type())).contiguous();
  // The kernel writes rows with contiguous columns; any other layout goes through a copy.
  at::Tensor target = grad_weight.stride(1) == 1 ? grad_weight : grad_weight.contiguous();
  dispatch_g(g.scalar_type(), [&](auto g_tag) {
    using S = decltype(g_tag);
    dispatch_g(target.scalar_type(), [&](auto w_tag) {
      using W = decltype(w_tag);
      const cpu::Operand3d<S> gv{static_cast<const S*>(g.const_data_ptr()), g.stride(0), g.stride(1)};
      cpu::embedding_clipped_sum<S, W>(segs, gv, c.const_data_ptr<cpu::out_t<S>>(),
                                       static_cast<W*>(target.mutable_data_ptr()), target.stride(0),
                                       T, d);
    });
  });
  if (!target.is_same(grad_weight)) grad_weight.copy_(target);
}

at::Tensor embedding_clipped_sum_cpu(const at::Tensor& ids, const at::Tensor& g,
                                     const at::Tensor& c, int64_t num_embeddings,
                                     std::optional<int64_t> padding_idx, bool deterministic) {
  TORCH_CHECK(num_embeddings >= 0, "bk::embedding_clipped_sum: num_embeddings must be non-negative, got ",
              num_embeddings);
  TORCH_CHECK(g.dim() == 3, "bk::embedding_clipped_sum: expected g:[B,T,d], got g of shape ", g.sizes());
  TORCH_CHECK(is_float(g.scalar_type()), "bk::embedding_clipped_sum: unsupported dtype ",
              g.scalar_type(), " of g (float32, float64, float16, bfloat16 are)");
  at::Tensor out = at::zeros({num_embeddings, g.size(2)}, g.options().dtype(acc_dtype(g.scalar_type())));
  embedding_clipped_sum_cpu_(out, ids, g, c, padding_idx, deterministic);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bk, CPU, m) {
  m.impl("embedding_norm", &embedding_norm_cpu);
  m.impl("embedding_clipped_sum_", &embedding_clipped_sum_cpu_);
  m.impl("embedding_clipped_sum", &embedding_clipped_sum_cpu);
}

}  // namespace bk
