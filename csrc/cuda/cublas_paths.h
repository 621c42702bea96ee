// bf16/fp16 ghost norms and clipped sums on cuBLAS's tensor-core GEMMs, with float32
// accumulation and float32 output (at::mm / at::bmm with out_dtype), one bounded chunk of
// examples at a time: never a B*T*T or B*T*max(d, p) buffer.
//
// Why: on an H200 (bench/results/gpu_check_h200, GPT-2 124M at B = 8, T = 512, bf16) the
// hand-written WMMA kernels ran at 0.02-0.04 of the bf16 roofline and took 49 of the private
// step's 82 ms of GPU time. float32/float64 keep the kernels: at::mm would follow torch's TF32
// setting, and our float32 sums are IEEE.
//
// BK_CUDA_GEMM=kernel forces the hand-written kernels (for comparisons).
#pragma once
#include <algorithm>
#include <cstdlib>
#include <string>

#include <ATen/ATen.h>
#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define BK_HAVE_MM_OUT_DTYPE 1  // aten::mm.dtype / bmm.dtype: fp16/bf16 in, float32 out
#endif

namespace bk {
namespace cublas_paths {

// Each chunk's Gram matrices or scaled copy stay within this many elements (64 MiB in fp32).
constexpr int64_t kChunkElems = int64_t(1) << 24;

inline bool applies(const at::Tensor& a) {
#ifdef BK_HAVE_MM_OUT_DTYPE
  static const bool enabled = [] {
    const char* env = std::getenv("BK_CUDA_GEMM");
    return env == nullptr || std::string(env) != "kernel";
  }();
  return enabled && (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf);
#else
  (void)a;
  return false;
#endif
}

// out[b] = sum over (s, t) of <a_s, a_t> <g_s, g_t>: the two Gram matrices of a chunk, in float32.
inline void ghost_norm(const at::Tensor& a, const at::Tensor& g, at::Tensor& out) {
#ifdef BK_HAVE_MM_OUT_DTYPE
  const int64_t B = a.size(0), T = a.size(1);
  const int64_t chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(T * T, 1));
  for (int64_t lo = 0; lo < B; lo += chunk) {
    const int64_t n = std::min(chunk, B - lo);
    const at::Tensor an = a.narrow(0, lo, n), gn = g.narrow(0, lo, n);
    at::Tensor gram = at::bmm(an, an.transpose(1, 2), at::kFloat);
    gram.mul_(at::bmm(gn, gn.transpose(1, 2), at::kFloat));
    at::Tensor out_n = out.narrow(0, lo, n);
    at::sum_out(out_n, gram, {1, 2});
  }
#else
  TORCH_CHECK(false, "bk: the cuBLAS ghost norm needs torch >= 2.8");
#endif
}

// w [p, d] (float32, contiguous) += sum_b c_b g_b^T a_b; b [p] += sum_b c_b sum_t g_b,t.
// c (float32) scales the operand with fewer columns, rounded once to the input dtype (as the
// Triton kernel rounds c*g before its dot); the bias sums the unscaled g in float32.
inline void clipped_sum(const at::Tensor& a, const at::Tensor& g, const at::Tensor& c, at::Tensor& w,
                        at::Tensor* b) {
#ifdef BK_HAVE_MM_OUT_DTYPE
  const int64_t B = a.size(0), T = a.size(1), d = a.size(2), p = g.size(2);
  const bool scale_a = d <= p;
  const int64_t chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(T * std::min(d, p), 1));
  for (int64_t lo = 0; lo < B; lo += chunk) {
    const int64_t n = std::min(chunk, B - lo);
    const at::Tensor an = a.narrow(0, lo, n), gn = g.narrow(0, lo, n), cn = c.narrow(0, lo, n);
    const at::Tensor cv = cn.view({n, 1, 1});
    const at::Tensor rows_a = (scale_a ? (an * cv).to(a.scalar_type()) : an).reshape({n * T, d});
    const at::Tensor rows_g = (scale_a ? gn : (gn * cv).to(g.scalar_type())).reshape({n * T, p});
    w.add_(at::mm(rows_g.t(), rows_a, at::kFloat));
    if (b != nullptr) b->add_(at::mv(at::sum(gn, {1}, false, at::kFloat).t(), cn));
  }
#else
  TORCH_CHECK(false, "bk: the cuBLAS clipped sum needs torch >= 2.8");
#endif
}

}  // namespace cublas_paths
}  // namespace bk
