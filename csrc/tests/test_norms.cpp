// ctest: the CPU norm kernels against naive loops in double, over odd shapes, B=0/1,
// padded (non-contiguous) strides and every input dtype.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "tests/test_util.h"
#include "cpu/clipped_sum_kernels.h"  // direct_norm_gemm
#include "cpu/norms_kernels.h"
#include "tests/simd_width.h"

using namespace bk::cpu;
using bk::test::as_double;
using bk::test::from_double;

namespace {

int failures = 0;



// ||a_b^T g_b||_F^2 by the definition: form the d x p matrix, square-sum it.
template <typename S>
double naive_norm(const Operand3d<S>& a, const Operand3d<S>& g, int64_t b, int64_t T, int64_t d,
                  int64_t p) {
  double total = 0;
  for (int64_t j = 0; j < d; ++j)
    for (int64_t k = 0; k < p; ++k) {
      double w = 0;
      for (int64_t t = 0; t < T; ++t)
        w += as_double(a.ptr[b * a.stride_b + t * a.stride_t + j]) *
             as_double(g.ptr[b * g.stride_b + t * g.stride_t + k]);
      total += w * w;
    }
  return total;
}

template <typename S>
void check(const char* dtype, double tol, int64_t B, int64_t T, int64_t d, int64_t p, int64_t pad) {
  std::mt19937_64 rng(B * 1000003 + T * 1009 + d * 31 + p + pad);
  std::normal_distribution<double> normal;
  // Rows padded by `pad` elements and examples by 3 more: a non-contiguous layout.
  const int64_t a_st = d + pad, a_sb = T * a_st + 3;
  const int64_t g_st = p + pad, g_sb = T * g_st + 3;
  std::vector<S> a_buf(std::max<int64_t>(B * a_sb, 1)), g_buf(std::max<int64_t>(B * g_sb, 1));
  for (auto& x : a_buf) x = from_double<S>(normal(rng));
  for (auto& x : g_buf) x = from_double<S>(normal(rng));
  Operand3d<S> a{a_buf.data(), a_sb, a_st}, g{g_buf.data(), g_sb, g_st};
  using O = out_t<S>;
  std::vector<O> ghost(B + 1, O(-1)), direct(B + 1, O(-1)), gemm(B + 1, O(-1));
  ghost_norm<S>(a, g, ghost.data(), B, T, d, p);
  direct_norm<S>(a, g, direct.data(), B, T, d, p);
  direct_norm_gemm<S>(a, g, gemm.data(), B, T, d, p);  // direct_norm's path for long, wide layers
  for (int64_t b = 0; b < B; ++b) {
    const double want = naive_norm(a, g, b, T, d, p);
    const double scale = std::max(want, 1e-300);
    const double e_ghost = std::fabs(ghost[b] - want) / scale;
    const double e_direct = std::fabs(direct[b] - want) / scale;
    const double e_gemm = std::fabs(gemm[b] - want) / scale;
    if (!(e_ghost <= tol) || !(e_direct <= tol) || !(e_gemm <= tol)) {
      std::printf("FAIL %s B=%lld T=%lld d=%lld p=%lld pad=%lld b=%lld: want %.17g ghost %.17g "
                  "direct %.17g direct by gemm %.17g\n",
                  dtype, (long long)B, (long long)T, (long long)d, (long long)p, (long long)pad,
                  (long long)b, want, double(ghost[b]), double(direct[b]), double(gemm[b]));
      ++failures;
    }
  }
  // Nothing past out[B-1] is written.
  if (ghost[B] != O(-1) || direct[B] != O(-1) || gemm[B] != O(-1)) {
    std::printf("FAIL %s wrote past the end of out (B=%lld)\n", dtype, (long long)B);
    ++failures;
  }
}

template <typename S>
void check_all(const char* dtype, double tol) {
  const int64_t shapes[][4] = {{0, 5, 3, 2},   {1, 1, 1, 1},   {1, 37, 123, 1}, {3, 1, 123, 5},
                               {2, 37, 1, 70}, {5, 16, 16, 32}, {4, 33, 7, 33}, {1, 70, 40, 9},
                               {3, 0, 4, 4},   {2, 3, 0, 4},
                               {2, 300, 270, 200},   // several KC, MC and NC blocks of the GEMM
                               {2, 256, 20, 1030},   // Gram packs of 1 KiB rows (padded), partial panels
                               {1, 128, 9, 64},      // the same in float64
                               {2, 41, 19, 23},      // a last Gram block of 9 rows (passes 6 + 4)
                               {2, 46, 11, 30}};     // ... of 14 rows (6 + 6 + 4, 2 of them padding)
  for (const auto& s : shapes)
    for (int64_t pad : {0, 5}) check<S>(dtype, tol, s[0], s[1], s[2], s[3], pad);
}

}  // namespace

int main() {
  if (!simd_width_runs()) return 77;
  // Inputs are exactly representable in each dtype, so the only error is accumulation.
  check_all<double>("float64", 1e-12);
  check_all<float>("float32", 1e-5);
  check_all<bf16>("bfloat16", 1e-5);
  check_all<fp16>("float16", 1e-5);
  // The 16-bit conversions round to nearest even and keep special values.
  if (to_float(to_fp16(65504.f)) != 65504.f || !std::isinf(to_float(to_fp16(65520.f))) ||
      to_float(to_fp16(5.960464477539063e-08f)) != 5.960464477539063e-08f ||
      to_float(to_bf16(1.00390625f)) != 1.0f || to_float(to_bf16(1.01171875f)) != 1.015625f) {
    std::printf("FAIL 16-bit conversions\n");
    ++failures;
  }
  std::printf("%s: %d failures (OpenMP threads: %d)\n", failures ? "FAILED" : "OK", failures,
              max_threads());
  return failures ? 1 : 0;
}
