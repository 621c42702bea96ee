// ctest: the CPU clipped-sum kernel against naive loops in double, over odd shapes, B=0/1,
// padded strides, every dtype, accumulation into non-zero buffers, and K split over threads.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "tests/test_util.h"
#include "cpu/clipped_sum_kernels.h"
#include "tests/simd_width.h"

using namespace bk::cpu;
using bk::test::as_double;
using bk::test::from_double;

namespace {

int failures = 0;


template <typename S>
void check(const char* dtype, double tol, int64_t B, int64_t T, int64_t d, int64_t p, int64_t pad,
           bool bias) {
  using O = out_t<S>;
  std::mt19937_64 rng(B * 131 + T * 17 + d * 5 + p + pad);
  std::normal_distribution<double> normal;
  const int64_t a_st = d + pad, a_sb = T * a_st + 2, g_st = p + pad, g_sb = T * g_st + 2;
  std::vector<S> a(std::max<int64_t>(B * a_sb, 1)), g(std::max<int64_t>(B * g_sb, 1));
  for (auto& x : a) x = from_double<S>(normal(rng));
  for (auto& x : g) x = from_double<S>(normal(rng));
  std::vector<O> c(B);
  for (auto& x : c) x = O(std::fabs(normal(rng)));
  // Start from non-zero buffers: the kernel accumulates.
  std::vector<O> w(p * d), wb(p);
  for (auto& x : w) x = O(normal(rng));
  for (auto& x : wb) x = O(normal(rng));
  const std::vector<O> initial_b = wb;
  std::vector<double> want_w(w.begin(), w.end()), want_b(wb.begin(), wb.end());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t m = 0; m < p; ++m) {
        const double gm = double(c[b]) * as_double(g[b * g_sb + t * g_st + m]);
        want_b[m] += gm;
        for (int64_t n = 0; n < d; ++n) want_w[m * d + n] += gm * as_double(a[b * a_sb + t * a_st + n]);
      }
  clipped_sum<S>({a.data(), a_sb, a_st}, {g.data(), g_sb, g_st}, c.data(), w.data(),
                 bias ? wb.data() : nullptr, B, T, d, p);
  // Error relative to the largest entry: the sums mix signs.
  double scale = 1e-300, err = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    scale = std::max(scale, std::fabs(want_w[i]));
    err = std::max(err, std::fabs(w[i] - want_w[i]));
  }
  for (int64_t m = 0; m < p; ++m) {
    const double want = bias ? want_b[m] : double(initial_b[m]);  // untouched without bias
    scale = std::max(scale, std::fabs(want));
    err = std::max(err, std::fabs(wb[m] - want));
  }
  if (!(err <= tol * scale)) {
    std::printf("FAIL %s B=%lld T=%lld d=%lld p=%lld pad=%lld bias=%d: max err %.3g of %.3g\n", dtype,
                (long long)B, (long long)T, (long long)d, (long long)p, (long long)pad, int(bias), err,
                scale);
    ++failures;
  }
}

template <typename S>
void check_all(const char* dtype, double tol) {
  const int64_t shapes[][4] = {{0, 5, 3, 2},    {1, 1, 1, 1},    {1, 37, 123, 1}, {3, 1, 123, 5},
                               {2, 37, 1, 70},  {4, 33, 7, 97},  {3, 50, 300, 40}, {2, 3, 0, 4},
                               {1, 2000, 5, 3}, {2, 700, 40, 33}};
  for (const auto& s : shapes)
    for (int64_t pad : {0, 3})
      for (bool bias : {false, true}) check<S>(dtype, tol, s[0], s[1], s[2], s[3], pad, bias);
}

}  // namespace

int main() {
  if (!simd_width_runs()) return 77;
  check_all<double>("float64", 1e-13);
  check_all<float>("float32", 1e-5);
  check_all<bf16>("bfloat16", 1e-5);
  check_all<fp16>("float16", 1e-5);
  std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
