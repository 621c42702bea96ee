// Argument handling shared by the CPU and CUDA implementations of bk::clipped_sum(_).
#pragma once
#include "checks.h"

namespace bk {

struct ClippedSumInputs {
  at::Tensor a, g;  // [B,T,d], [B,T,p], last dim contiguous
  at::Tensor c;     // [B], contiguous, in the accumulation dtype
  int64_t d, p;
};

inline ClippedSumInputs prepare_clipped_sum(const at::Tensor& a, const at::Tensor& g,
                                            const at::Tensor& c, const char* op) {
  check_norm_inputs(a, g, op);
  TORCH_CHECK(c.dim() == 1 && c.size(0) == a.size(0), op, ": c must have shape [B] = [", a.size(0),
              "], got ", c.sizes());
  TORCH_CHECK(c.device() == a.device(), op, ": c must be on ", a.device(), ", got ", c.device());
  TORCH_CHECK(at::isFloatingType(c.scalar_type()), op, ": c must be floating point, got ",
              c.scalar_type());
  const auto acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {rows_contiguous(a), rows_contiguous(g), c.to(acc).contiguous(), a.size(2), g.size(2)};
}

inline void check_clipped_sum_outputs(const at::Tensor& w, const c10::optional<at::Tensor>& b,
                                      const ClippedSumInputs& in, const char* op) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == in.p && w.size(1) == in.d, op,
              ": grad_weight must have shape [p, d] = [", in.p, ", ", in.d, "], got ", w.sizes());
  TORCH_CHECK(w.device() == in.a.device(), op, ": grad_weight must be on ", in.a.device());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), op, ": grad_weight must be floating point");
  if (b) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == in.p, op, ": grad_bias must have shape [p] = [",
                in.p, "], got ", b->sizes());
    TORCH_CHECK(b->device() == in.a.device(), op, ": grad_bias must be on ", in.a.device());
    TORCH_CHECK(at::isFloatingType(b->scalar_type()), op, ": grad_bias must be floating point");
  }
}

}  // namespace bk
