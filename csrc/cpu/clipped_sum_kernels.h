// Raw CPU kernel of the clipped weighted sum (no torch headers; torch wrapper: clipped_sum.cpp).
#pragma once
#include <cstdint>

#include "cpu/norms_kernels.h"

namespace bk {
namespace cpu {

// grad_weight[m][n] += sum_{b,t} c[b] * g[b,t,m] * a[b,t,n]   ([p][d], row-major, ld = d)
// grad_bias[m]      += sum_{b,t} c[b] * g[b,t,m]               (skipped when nullptr)
// for a:[B,T,d], g:[B,T,p]: one GEMM over the B*T rows with c[b] applied while packing a
// (no scaled copy of a or g), the bias sum taken while packing g. Accumulates in out_t.
template <typename scalar_t>
void clipped_sum(Operand3d<scalar_t> a, Operand3d<scalar_t> g, const out_t<scalar_t>* c,
                 out_t<scalar_t>* grad_weight, out_t<scalar_t>* grad_bias, int64_t B, int64_t T,
                 int64_t d, int64_t p);

// out[b] = ||g_b^T a_b||_F^2, each example's [p][d] gradient formed one MC x NC tile at a time
// by the same GEMM (never whole), squared and summed: the direct norm for long layers whose
// gradients are too wide for cache (GPT-2's lm_head).
template <typename scalar_t>
void direct_norm_gemm(Operand3d<scalar_t> a, Operand3d<scalar_t> g, out_t<scalar_t>* out, int64_t B,
                      int64_t T, int64_t d, int64_t p);

}  // namespace cpu
}  // namespace bk
