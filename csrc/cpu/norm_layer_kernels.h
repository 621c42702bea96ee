// Raw CPU kernel of the norm-layer op (no torch headers; torch wrapper: norm_layer.cpp).
//
// A norm layer (LayerNorm, GroupNorm, InstanceNorm, ...) with affine weight w [C] and bias
// [C] computes y = xhat * w + bias from its normalised input xhat. With g = dL/dy, example
// b's gradients are gw_b = sum_t xhat_b,t * g_b,t and gb_b = sum_t g_b,t over its positions t.
#pragma once
#include <cstdint>

#include "cpu/common.h"  // bf16, fp16, Operand3d, out_t

namespace bk {
namespace cpu {

// Element (b, t, c) of a [B, T, C] operand is ptr[b * stride_b + t * stride_t + c * stride_c].
template <typename scalar_t>
struct Strided3d {
  const scalar_t* ptr;
  int64_t stride_b;
  int64_t stride_t;
  int64_t stride_c;
};

// gw [B, C] = sum_t xhat * g, gb [B, C] = sum_t g (skipped when gb is null), sq_norms [B] =
// ||gw_b||^2 + ||gb_b||^2, all contiguous and in the accumulation type. Any strides: rows
// with contiguous channels (LayerNorm) are summed row by row, channel-major operands
// (GroupNorm / InstanceNorm's [B, C, S] seen as [B, S, C]) channel by channel along their
// contiguous positions, anything else by the row path with strided loads. Sums over t are
// blocked (partial sums of 64 positions) to keep float32 error low for long sequences; the
// result does not depend on the number of threads.
template <typename scalar_t>
void norm_layer_grads(Strided3d<scalar_t> xhat, Strided3d<scalar_t> g, out_t<scalar_t>* gw,
                      out_t<scalar_t>* gb, out_t<scalar_t>* sq_norms, int64_t B, int64_t T,
                      int64_t C);

}  // namespace cpu
}  // namespace bk
