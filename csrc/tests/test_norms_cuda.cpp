// ctest: the CUDA norm kernels against the CPU kernels (themselves checked against naive
// loops by test_norms), over odd shapes and padded strides. Skipped (exit 77) without a GPU.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/norms_kernels.h"
#include "cuda/norms_cuda.h"
#include "cuda_check.h"

namespace {

int failures = 0;

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
  std::vector<O> want(B);
  bk::cpu::direct_norm<S>({a.data(), a_sb, a_st}, {g.data(), g_sb, g_st}, want.data(), B, T, d, p);

  S *a_dev, *g_dev;
  O* out_dev;
  CHECK_CUDA(cudaMalloc(&a_dev, a.size() * sizeof(S)));
  CHECK_CUDA(cudaMalloc(&g_dev, g.size() * sizeof(S)));
  CHECK_CUDA(cudaMalloc(&out_dev, std::max<int64_t>(B, 1) * sizeof(O)));
  CHECK_CUDA(cudaMemcpy(a_dev, a.data(), a.size() * sizeof(S), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(g_dev, g.data(), g.size() * sizeof(S), cudaMemcpyHostToDevice));
  for (int which = 0; which < 2; ++which) {
    const auto launch = which == 0 ? bk::cuda::ghost_norm : bk::cuda::direct_norm;
    CHECK_CUDA(launch(dtype, {a_dev, a_sb, a_st}, {g_dev, g_sb, g_st}, out_dev, B, T, d, p, nullptr));
    std::vector<O> got(B);
    CHECK_CUDA(cudaMemcpy(got.data(), out_dev, B * sizeof(O), cudaMemcpyDeviceToHost));
    for (int64_t b = 0; b < B; ++b) {
      const double rel = std::fabs(double(got[b]) - double(want[b])) / std::max(double(want[b]), 1e-300);
      if (!(rel <= tol)) {
        std::printf("FAIL %s %s B=%lld T=%lld d=%lld p=%lld pad=%lld b=%lld: %.10g vs %.10g\n",
                    which == 0 ? "ghost" : "direct", name, (long long)B, (long long)T, (long long)d,
                    (long long)p, (long long)pad, (long long)b, double(got[b]), double(want[b]));
        ++failures;
      }
    }
  }
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
  check_all<float>(bk::cuda::DType::f32, "float32", 2e-5);
  check_all<bk::cpu::bf16>(bk::cuda::DType::bf16, "bfloat16", 2e-5);
  check_all<bk::cpu::fp16>(bk::cuda::DType::f16, "float16", 2e-5);
  std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
