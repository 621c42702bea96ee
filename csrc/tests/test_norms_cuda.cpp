// ctest: the CUDA norm kernels over odd shapes and padded strides, against float64 norms of
// the same inputs. The bound is the Python tests' rule (python_tests/tolerances.py): float64
// within 1e-12; float32/bf16/fp16 within RATIO times the error of the CPU kernel's own float32
// accumulation of the same inputs, plus FLOOR (float32 accumulation's own error), so tensor-core
// (WMMA) and CUDA-core accumulation orders are both judged by what float32 can do on that input.
// The GPU check runs it with and without BK_NORMS_DISABLE_WMMA=1. Skipped (exit 77) without a GPU.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/norms_kernels.h"
#include "cuda/norms_cuda.h"
#include "cuda_check.h"

namespace {

int failures = 0;
constexpr double RATIO = 2.0, FLOOR = 1e-5;

double to_double(double x) { return x; }
double to_double(float x) { return x; }
double to_double(bk::cpu::bf16 x) { return bk::cpu::to_float(x); }
double to_double(bk::cpu::fp16 x) { return bk::cpu::to_float(x); }

template <typename S>
void check(bk::cuda::DType dtype, const char* name, double tol, int64_t B, int64_t T, int64_t d,
           int64_t p, int64_t pad) {
  using O = bk::cpu::out_t<S>;
  std::mt19937_64 rng(B * 7919 + T * 31 + d * 7 + p + pad);
  std::normal_distribution<float> normal;
  const int64_t a_st = d + pad, a_sb = T * a_st + 1, g_st = p + pad, g_sb = T * g_st + 1;
  std::vector<S> a(std::max<int64_t>(B * a_sb, 1)), g(std::max<int64_t>(B * g_sb, 1));
  auto fill = [&](std::vector<S>& v) {
    for (auto& x : v) {
      const float f = normal(rng);
      if constexpr (std::is_same_v<S, bk::cpu::bf16>) x = bk::cpu::to_bf16(f);
      else if constexpr (std::is_same_v<S, bk::cpu::fp16>) x = bk::cpu::to_fp16(f);
      else x = S(f);
    }
  };
  fill(a);
  fill(g);
  std::vector<O> cpu(B);  // the CPU kernel in the dtype's accumulation type
  bk::cpu::direct_norm<S>({a.data(), a_sb, a_st}, {g.data(), g_sb, g_st}, cpu.data(), B, T, d, p);
  std::vector<double> a64(a.size()), g64(g.size()), want(B);
  for (size_t i = 0; i < a.size(); ++i) a64[i] = to_double(a[i]);
  for (size_t i = 0; i < g.size(); ++i) g64[i] = to_double(g[i]);
  bk::cpu::direct_norm<double>({a64.data(), a_sb, a_st}, {g64.data(), g_sb, g_st}, want.data(), B, T, d, p);

  S *a_dev, *g_dev;
  O* out_dev;
  CHECK_CUDA(cudaMalloc(&a_dev, a.size() * sizeof(S)));
  CHECK_CUDA(cudaMalloc(&g_dev, g.size() * sizeof(S)));
  CHECK_CUDA(cudaMalloc(&out_dev, std::max<int64_t>(B, 1) * sizeof(O)));
  CHECK_CUDA(cudaMemcpy(a_dev, a.data(), a.size() * sizeof(S), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(g_dev, g.data(), g.size() * sizeof(S), cudaMemcpyHostToDevice));
  const int64_t n_shares = std::max(bk::cuda::ghost_norm_shares(B, T), bk::cuda::direct_norm_shares(B, d, p));
  O* shares_dev;
  CHECK_CUDA(cudaMalloc(&shares_dev, std::max<int64_t>(n_shares, 1) * sizeof(O)));
  // which: ghost or direct; shared: tile shares summed in a fixed order (what the torch binding
  // runs; then twice, and the two results must be bitwise equal) or atomics.
  for (int run = 0; run < 4; ++run) {
    const int which = run / 2;
    const bool shared = run % 2 == 0;
    const auto launch = which == 0 ? bk::cuda::ghost_norm : bk::cuda::direct_norm;
    std::vector<O> got(B), again(B);
    CHECK_CUDA(launch(dtype, {a_dev, a_sb, a_st}, {g_dev, g_sb, g_st}, out_dev, B, T, d, p, nullptr,
                      shared ? shares_dev : nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaMemcpy(got.data(), out_dev, B * sizeof(O), cudaMemcpyDeviceToHost));
    if (shared) {
      CHECK_CUDA(launch(dtype, {a_dev, a_sb, a_st}, {g_dev, g_sb, g_st}, out_dev, B, T, d, p, nullptr, shares_dev));
      CHECK_CUDA(cudaMemcpy(again.data(), out_dev, B * sizeof(O), cudaMemcpyDeviceToHost));
      for (int64_t b = 0; b < B; ++b)
        if (std::memcmp(&got[b], &again[b], sizeof(O)) != 0) {
          std::printf("FAIL %s %s B=%lld T=%lld d=%lld p=%lld: two runs differ at b=%lld (%.10g, %.10g)\n",
                      which == 0 ? (shared ? "ghost" : "ghost(atomics)") : (shared ? "direct" : "direct(atomics)"), name, (long long)B, (long long)T, (long long)d, (long long)p,
                      (long long)b, double(got[b]), double(again[b]));
          ++failures;
        }
    }
    for (int64_t b = 0; b < B; ++b) {
      const double scale = std::max(want[b], 1e-300);
      const double rel = std::fabs(double(got[b]) - want[b]) / scale;
      const double bound = tol > 0 ? tol : RATIO * std::fabs(double(cpu[b]) - want[b]) / scale + FLOOR;
      if (!(rel <= bound)) {
        std::printf("FAIL %s %s B=%lld T=%lld d=%lld p=%lld pad=%lld b=%lld: %.10g vs float64 %.10g "
                    "(relative error %.3g, bound %.3g)\n",
                    which == 0 ? (shared ? "ghost" : "ghost(atomics)") : (shared ? "direct" : "direct(atomics)"), name, (long long)B, (long long)T, (long long)d,
                    (long long)p, (long long)pad, (long long)b, double(got[b]), want[b], rel, bound);
        ++failures;
      }
    }
  }
  cudaFree(shares_dev);
  cudaFree(a_dev);
  cudaFree(g_dev);
  cudaFree(out_dev);
}

template <typename S>
void check_all(bk::cuda::DType dtype, const char* name, double tol) {
  const int64_t shapes[][4] = {{0, 5, 3, 2},   {1, 1, 1, 1},    {1, 37, 123, 1}, {3, 1, 123, 5},
                               {2, 37, 1, 70}, {4, 130, 65, 33}, {2, 257, 200, 300}};
  for (const auto& s : shapes)
    for (int64_t pad : {0, 3}) check<S>(dtype, name, tol, s[0], s[1], s[2], s[3], pad);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 77;
  }
  check_all<double>(bk::cuda::DType::f64, "float64", 1e-12);
  // tol 0: the bound derived from the CPU kernel's float32 error on the same inputs.
  check_all<float>(bk::cuda::DType::f32, "float32", 0);
  check_all<bk::cpu::bf16>(bk::cuda::DType::bf16, "bfloat16", 0);
  check_all<bk::cpu::fp16>(bk::cuda::DType::f16, "float16", 0);
  std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
