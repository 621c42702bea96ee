// ctest: the raw CUDA launchers of clipped_sum, embedding_norm / embedding_clipped_sum,
// norm_layer_grads and add_noise against naive host loops in double, over odd shapes, B = 0 / 1,
// padded (non-contiguous) strides, every input dtype and several output dtypes.
// Skipped (exit 77) without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "cpu/common.h"  // bf16, fp16, Operand3d, out_t
#include "cuda/clipped_sum_cuda.h"
#include "cuda/embedding_cuda.h"
#include "cuda/noise_cuda.h"
#include "cuda/norm_layer_cuda.h"
#include "cuda_check.h"
#include "test_util.h"

namespace {

using bk::cpu::bf16;
using bk::cpu::fp16;
namespace kc = bk::cuda;

int failures = 0;

// Counts a failure; prints the first few of each test case.
struct Case {
  char name[256];
  int errors = 0;
  explicit Case(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(name, sizeof(name), fmt, args);
    va_end(args);
  }
  void expect(bool ok, const char* fmt, ...) {
    if (ok) return;
    ++failures;
    if (++errors > 5) return;
    va_list args;
    va_start(args, fmt);
    std::printf("FAIL %s: ", name);
    std::vprintf(fmt, args);
    std::printf("\n");
    va_end(args);
  }
};

// Host values of each dtype.
double as_double(float x) { return x; }
double as_double(double x) { return x; }
double as_double(bf16 x) { return bk::cpu::to_float(x); }
double as_double(fp16 x) { return bk::cpu::to_float(x); }

template <typename S> S from_double(double x);
template <> float from_double<float>(double x) { return float(x); }
template <> double from_double<double>(double x) { return x; }
template <> bf16 from_double<bf16>(double x) { return bk::cpu::to_bf16(float(x)); }
template <> fp16 from_double<fp16>(double x) { return bk::cpu::to_fp16(float(x)); }

template <typename S> constexpr kc::DType dtype_of = kc::DType::f32;
template <> constexpr kc::DType dtype_of<double> = kc::DType::f64;
template <> constexpr kc::DType dtype_of<fp16> = kc::DType::f16;
template <> constexpr kc::DType dtype_of<bf16> = kc::DType::bf16;

template <typename S> const char* name_of() { return "float32"; }
template <> const char* name_of<double>() { return "float64"; }
template <> const char* name_of<fp16>() { return "float16"; }
template <> const char* name_of<bf16>() { return "bfloat16"; }

// Accumulation type of the kernels: double for double inputs, float otherwise.
template <typename S> using acc_t = bk::cpu::out_t<S>;  // the one dtype rule (cpu/common.h)

// Unit roundoff of a storage dtype.
template <typename S> constexpr double roundoff = 0x1p-24;
template <> constexpr double roundoff<double> = 0x1p-53;
template <> constexpr double roundoff<bf16> = 0x1p-8;
template <> constexpr double roundoff<fp16> = 0x1p-11;

// Relative error allowed on sums of products, relative to the sum of their magnitudes:
// float32 / float64 accumulation (generous for K ~ 10^3 terms), and for the 16-bit inputs the
// rounding of c_b g to the input dtype before the tensor cores (at most one roundoff a term).
template <typename S> constexpr double sum_tol = 1e-5;
template <> constexpr double sum_tol<double> = 1e-12;
template <> constexpr double sum_tol<bf16> = 0x1p-8;
template <> constexpr double sum_tol<fp16> = 0x1p-11;

template <typename T>
struct DevBuf {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(n, 1) * sizeof(T)));
  }
  explicit DevBuf(const std::vector<T>& host) : DevBuf(host.size()) { upload(host); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() { cudaFree(ptr); }
  void upload(const std::vector<T>& host) {
    if (!host.empty())
      CHECK_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n);
    if (n > 0) CHECK_CUDA(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
};

struct Bytes {
  void* ptr = nullptr;
  size_t n;
  explicit Bytes(size_t count) : n(count) { CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(n, 1))); }
  ~Bytes() { cudaFree(ptr); }
};

template <typename S>
std::vector<S> random_vector(std::mt19937_64& rng, size_t n, double lo = -1, double hi = 1) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<S> v(n);
  for (auto& x : v) x = from_double<S>(u(rng));
  return v;
}

// ---------------------------------------------------------------------------------------
// clipped_sum
// ---------------------------------------------------------------------------------------

// grad_weight [p, d] of O (row-major, or column-major when `transposed`) and grad_bias [p] of O
// (stride 2) start from random values; the launcher adds the clipped sums of S inputs.
template <typename S, typename O>
void test_clipped_sum(int64_t B, int64_t T, int64_t d, int64_t p, int64_t pad, bool bias,
                      bool transposed) {
  using A = acc_t<S>;
  Case cs("clipped_sum %s->%s B=%lld T=%lld d=%lld p=%lld pad=%lld bias=%d transposed=%d",
          name_of<S>(), name_of<O>(), (long long)B, (long long)T, (long long)d, (long long)p,
          (long long)pad, int(bias), int(transposed));
  std::mt19937_64 rng(B * 7919 + T * 131 + d * 17 + p * 3 + pad + bias);
  const int64_t a_st = d + pad, a_sb = T * a_st + 3, g_st = p + pad, g_sb = T * g_st + 3;
  const auto a = random_vector<S>(rng, std::max<int64_t>(B * a_sb, 1));
  const auto g = random_vector<S>(rng, std::max<int64_t>(B * g_sb, 1));
  const auto c = random_vector<A>(rng, B, 0.1, 1.5);
  const auto w0 = random_vector<O>(rng, p * d), b0 = random_vector<O>(rng, 2 * p);
  const int64_t s0 = transposed ? 1 : d, s1 = transposed ? p : 1;

  DevBuf<S> a_dev(a), g_dev(g);
  DevBuf<A> c_dev(c);
  DevBuf<O> w_dev(w0), b_dev(b0);
  const kc::DType out_dtype = dtype_of<O>;
  const size_t ws_bytes = kc::clipped_sum_workspace_bytes(dtype_of<S>, B, T, d, p);
  Bytes ws(ws_bytes);
  const kc::OutMat wo{w_dev.ptr, out_dtype, s0, s1};
  const kc::OutMat bo{bias ? b_dev.ptr : nullptr, out_dtype, 0, 2};
  CHECK_CUDA(kc::clipped_sum(dtype_of<S>, {a_dev.ptr, a_sb, a_st}, {g_dev.ptr, g_sb, g_st},
                             c_dev.ptr, wo, bo, B, T, d, p, ws.ptr, ws_bytes, nullptr));
  const auto w = w_dev.download(), bb = b_dev.download();

  for (int64_t i = 0; i < p; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      const int64_t at = i * s0 + j * s1;
      double want = as_double(w0[at]), mag = std::fabs(want);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const double term = double(c[b]) * as_double(g[b * g_sb + t * g_st + i]) *
                              as_double(a[b * a_sb + t * a_st + j]);
          want += term;
          mag += std::fabs(term);
        }
      const double got = as_double(w[at]);
      const double tol = sum_tol<S> * mag + 2 * roundoff<O> * std::fabs(want) + 1e-300;
      cs.expect(std::fabs(got - want) <= tol, "grad_weight[%lld,%lld] = %.9g, want %.9g (tol %.3g)",
                (long long)i, (long long)j, got, want, tol);
    }
  }
  for (int64_t i = 0; i < 2 * p; ++i) {
    double want = as_double(b0[i]), mag = std::fabs(want);
    if (bias && i % 2 == 0) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const double term = double(c[b]) * as_double(g[b * g_sb + t * g_st + i / 2]);
          want += term;
          mag += std::fabs(term);
        }
    }
    const double got = as_double(bb[i]);
    // The bias sums the unrounded fp32 products: float accuracy even for 16-bit inputs.
    const double tol = (std::is_same_v<S, double> ? 1e-12 : 1e-5) * mag +
                       2 * roundoff<O> * std::fabs(want) + 1e-300;
    cs.expect(std::fabs(got - want) <= tol, "grad_bias buffer[%lld] = %.9g, want %.9g", (long long)i,
              got, want);
  }

  // Deterministic: the same call again adds exactly the same values.
  if (B * T > 0 && p > 0) {
    w_dev.upload(w0);
    b_dev.upload(b0);
    CHECK_CUDA(kc::clipped_sum(dtype_of<S>, {a_dev.ptr, a_sb, a_st}, {g_dev.ptr, g_sb, g_st},
                               c_dev.ptr, wo, bo, B, T, d, p, ws.ptr, ws_bytes, nullptr));
    const auto w2 = w_dev.download(), bb2 = b_dev.download();
    cs.expect(std::memcmp(w.data(), w2.data(), w.size() * sizeof(O)) == 0 &&
                  std::memcmp(bb.data(), bb2.data(), bb.size() * sizeof(O)) == 0,
              "a second run gave different bits");
  }
}

template <typename S>
void clipped_sum_suite() {
  using A = acc_t<S>;
  const int64_t shapes[][4] = {{0, 5, 3, 2},    {3, 0, 4, 5},    {1, 1, 1, 1},
                               {1, 37, 123, 5}, {3, 37, 70, 130}, {2, 300, 129, 65},
                               {5, 1, 200, 150}, {2, 3, 0, 7},   {4, 700, 16, 33}};
  for (const auto& s : shapes)
    for (int64_t pad : {0, 3})
      for (bool bias : {false, true}) test_clipped_sum<S, A>(s[0], s[1], s[2], s[3], pad, bias, false);
  // Other output buffers: transposed, and 16-bit / other-width ones.
  test_clipped_sum<S, A>(3, 37, 70, 130, 1, true, true);
  test_clipped_sum<S, bf16>(2, 45, 33, 20, 0, true, false);
  test_clipped_sum<S, std::conditional_t<std::is_same_v<A, double>, float, double>>(2, 45, 33, 20, 0,
                                                                                   true, true);
}

// ---------------------------------------------------------------------------------------
// embedding_norm / embedding_clipped_sum
// ---------------------------------------------------------------------------------------

template <typename I>
std::vector<I> random_ids(std::mt19937_64& rng, size_t n, int64_t lo, int64_t count) {
  std::uniform_int_distribution<int64_t> u(lo, lo + count - 1);
  std::vector<I> ids(n);
  for (auto& x : ids) x = static_cast<I>(u(rng));
  return ids;
}

template <typename S, typename I>
void test_embedding_norm(int64_t B, int64_t T, int64_t d, int64_t id_lo, int64_t id_count,
                         bool has_pad, int64_t pad) {
  using A = acc_t<S>;
  Case cs("embedding_norm %s ids=%s B=%lld T=%lld d=%lld ids in [%lld,+%lld) pad=%lld/%d",
          name_of<S>(), sizeof(I) == 8 ? "int64" : "int32", (long long)B, (long long)T,
          (long long)d, (long long)id_lo, (long long)id_count, (long long)pad, int(has_pad));
  std::mt19937_64 rng(B * 31 + T * 7 + d + id_count);
  const int64_t g_st = d + 2, g_sb = T * g_st + 1;
  const auto ids = random_ids<I>(rng, B * T, id_lo, id_count);
  const auto g = random_vector<S>(rng, std::max<int64_t>(B * g_sb, 1));
  DevBuf<I> ids_dev(ids);
  DevBuf<S> g_dev(g);
  DevBuf<A> out_dev(B);
  // The full workspace (shares summed in a fixed order: run twice, bitwise equal), then the
  // sort's alone (atomics).
  const size_t full_bytes = kc::embedding_norm_workspace_bytes(B * T, d);
  Bytes ws(full_bytes);
  CHECK_CUDA(kc::embedding_norm(dtype_of<S>, {ids_dev.ptr, sizeof(I) == 8}, {g_dev.ptr, g_sb, g_st},
                                has_pad, pad, out_dev.ptr, B, T, d, ws.ptr, full_bytes, nullptr));
  const auto shared = out_dev.download();
  CHECK_CUDA(kc::embedding_norm(dtype_of<S>, {ids_dev.ptr, sizeof(I) == 8}, {g_dev.ptr, g_sb, g_st},
                                has_pad, pad, out_dev.ptr, B, T, d, ws.ptr, full_bytes, nullptr));
  const auto again = out_dev.download();
  for (int64_t b = 0; b < B; ++b)
    cs.expect(std::memcmp(&shared[b], &again[b], sizeof(A)) == 0, "two runs differ at b=%lld", (long long)b);
  CHECK_CUDA(kc::embedding_norm(dtype_of<S>, {ids_dev.ptr, sizeof(I) == 8}, {g_dev.ptr, g_sb, g_st},
                                has_pad, pad, out_dev.ptr, B, T, d, ws.ptr, kc::embedding_workspace_bytes(B * T),
                                nullptr));
  const auto atomics = out_dev.download();
  for (int run = 0; run < 2; ++run)
  for (int64_t b = 0; b < B; ++b) {
    const auto& out = run == 0 ? shared : atomics;
    double want = 0, mag = 0;
    for (int64_t s = 0; s < T; ++s)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t xs = ids[b * T + s], xt = ids[b * T + t];
        if (xs != xt || (has_pad && xs == pad)) continue;
        double dot = 0, ns = 0, nt = 0;
        for (int64_t k = 0; k < d; ++k) {
          const double u = as_double(g[b * g_sb + s * g_st + k]), v = as_double(g[b * g_sb + t * g_st + k]);
          dot += u * v;
          ns += u * u;
          nt += v * v;
        }
        want += dot;
        mag += std::sqrt(ns * nt);
      }
    const double tol = (std::is_same_v<S, double> ? 1e-12 : 1e-5) * mag + 1e-300;
    cs.expect(std::fabs(double(out[b]) - want) <= tol, "out[%lld] = %.10g, want %.10g", (long long)b,
              double(out[b]), want);
  }
}

template <typename S, typename I, typename O>
void test_embedding_sum(int64_t B, int64_t T, int64_t d, int64_t V, bool has_pad, int64_t pad,
                        bool deterministic) {
  using A = acc_t<S>;
  Case cs("embedding_clipped_sum %s->%s ids=%s B=%lld T=%lld d=%lld V=%lld pad=%lld/%d det=%d",
          name_of<S>(), name_of<O>(), sizeof(I) == 8 ? "int64" : "int32", (long long)B, (long long)T,
          (long long)d, (long long)V, (long long)pad, int(has_pad), int(deterministic));
  std::mt19937_64 rng(B * 13 + T * 5 + d + V + deterministic);
  const int64_t g_st = d + 1, g_sb = T * g_st + 2;
  const int64_t ld = d + 3;  // grad_weight rows padded
  const auto ids = random_ids<I>(rng, B * T, 0, V);
  const auto g = random_vector<S>(rng, std::max<int64_t>(B * g_sb, 1));
  const auto c = random_vector<A>(rng, B, 0.1, 1.5);
  const auto w0 = random_vector<O>(rng, V * ld);
  DevBuf<I> ids_dev(ids);
  DevBuf<S> g_dev(g);
  DevBuf<A> c_dev(c);
  DevBuf<O> w_dev(w0);
  DevBuf<int64_t> flags(2);
  flags.upload({0, 0});
  const kc::Ids idsk{ids_dev.ptr, sizeof(I) == 8};
  CHECK_CUDA(kc::embedding_check_ids(idsk, B * T, V, has_pad, pad, flags.ptr, nullptr));
  cs.expect(flags.download()[0] == 0, "valid ids flagged");

  const kc::OutMat wo{w_dev.ptr, dtype_of<O>, ld, 1};
  const size_t ws_bytes = kc::embedding_workspace_bytes(B * T);
  Bytes ws(ws_bytes);
  auto run = [&] {
    CHECK_CUDA(kc::embedding_clipped_sum(dtype_of<S>, idsk, {g_dev.ptr, g_sb, g_st}, c_dev.ptr,
                                         has_pad, pad, wo, V, deterministic, B, T, d, ws.ptr,
                                         ws_bytes, nullptr));
    return w_dev.download();
  };
  const auto w = run();
  for (int64_t v = 0; v < V; ++v)
    for (int64_t k = 0; k < ld; ++k) {
      double want = as_double(w0[v * ld + k]), mag = std::fabs(want);
      if (k < d && !(has_pad && v == pad))
        for (int64_t r = 0; r < B * T; ++r)
          if (int64_t(ids[r]) == v) {
            const int64_t b = r / T, t = r % T;
            const double term = double(c[b]) * as_double(g[b * g_sb + t * g_st + k]);
            want += term;
            mag += std::fabs(term);
          }
      const double got = as_double(w[v * ld + k]);
      const double tol = (std::is_same_v<S, double> ? 1e-12 : 1e-5) * mag +
                         2 * roundoff<O> * std::fabs(want) + 1e-300;
      cs.expect(std::fabs(got - want) <= tol, "grad_weight[%lld,%lld] = %.9g, want %.9g",
                (long long)v, (long long)k, got, want);
    }
  if (deterministic) {
    w_dev.upload(w0);
    const auto w2 = run();
    cs.expect(std::memcmp(w.data(), w2.data(), w.size() * sizeof(O)) == 0,
              "deterministic: a second run gave different bits");
  }
}

void test_check_ids() {
  Case cs("embedding_check_ids");
  const std::vector<int64_t> ids = {0, 4, 9, 3, 12, 7};
  DevBuf<int64_t> ids_dev(ids), flags(2);
  const kc::Ids idsk{ids_dev.ptr, true};
  flags.upload({0, 0});
  CHECK_CUDA(kc::embedding_check_ids(idsk, 6, 10, false, 0, flags.ptr, nullptr));
  auto f = flags.download();
  cs.expect(f[0] == 1 && f[1] == 12, "id 12 >= V=10 not reported (flags %lld %lld)", (long long)f[0],
            (long long)f[1]);
  flags.upload({0, 0});
  CHECK_CUDA(kc::embedding_check_ids(idsk, 6, 10, true, 12, flags.ptr, nullptr));
  cs.expect(flags.download()[0] == 0, "the padding id 12 must not be flagged");
  const std::vector<int32_t> ids32 = {1, -2, 3};
  DevBuf<int32_t> ids32_dev(ids32);
  flags.upload({0, 0});
  CHECK_CUDA(kc::embedding_check_ids({ids32_dev.ptr, false}, 3, 10, false, 0, flags.ptr, nullptr));
  f = flags.download();
  cs.expect(f[0] == 1 && f[1] == -2, "id -2 not reported (flags %lld %lld)", (long long)f[0],
            (long long)f[1]);
}

template <typename S>
void embedding_suite() {
  using A = acc_t<S>;
  test_embedding_norm<S, int64_t>(0, 4, 3, 0, 5, false, 0);
  test_embedding_norm<S, int64_t>(1, 1, 1, 0, 5, false, 0);
  test_embedding_norm<S, int32_t>(3, 37, 123, 0, 9, true, 2);
  test_embedding_norm<S, int64_t>(2, 300, 5, 0, 40, true, 0);
  test_embedding_norm<S, int64_t>(2, 1500, 3, 0, 300, false, 0);   // two sort blocks and more
  test_embedding_norm<S, int64_t>(3, 1700, 2, -3000000000000LL, 7, true, -3000000000000LL + 1);
  test_embedding_norm<S, int32_t>(2, 50, 200, -5, 4, true, -1);    // 2 column blocks
  test_embedding_sum<S, int64_t, A>(0, 3, 4, 5, false, 0, true);
  for (bool det : {false, true}) {
    test_embedding_sum<S, int64_t, A>(1, 1, 1, 3, false, 0, det);
    test_embedding_sum<S, int32_t, A>(3, 37, 123, 20, true, 3, det);
    test_embedding_sum<S, int64_t, A>(2, 1500, 7, 50, true, 0, det);
    test_embedding_sum<S, int64_t, A>(2, 40, 130, 9, false, 0, det);
  }
  test_embedding_sum<S, int64_t, bf16>(3, 37, 19, 20, true, 3, false);  // sorted path anyway
  test_embedding_sum<S, int64_t, fp16>(3, 37, 19, 20, false, 0, false);
  test_embedding_sum<S, int32_t, double>(3, 37, 19, 20, true, 5, false);
}

// ---------------------------------------------------------------------------------------
// norm_layer_grads
// ---------------------------------------------------------------------------------------

template <typename S>
void test_norm_layer(int64_t B, int64_t T, int64_t C, bool channel_major, bool bias) {
  using A = acc_t<S>;
  Case cs("norm_layer_grads %s B=%lld T=%lld C=%lld channel_major=%d bias=%d", name_of<S>(),
          (long long)B, (long long)T, (long long)C, int(channel_major), int(bias));
  std::mt19937_64 rng(B * 101 + T * 11 + C + channel_major);
  // channel-last: (b, t, c) at b*(T*(C+1)+2) + t*(C+1) + c; channel-major: b*(C*(T+1)+2) + c*(T+1) + t.
  const int64_t sb = channel_major ? C * (T + 1) + 2 : T * (C + 1) + 2;
  const int64_t st = channel_major ? 1 : C + 1, sc = channel_major ? T + 1 : 1;
  const auto x = random_vector<S>(rng, std::max<int64_t>(B * sb, 1));
  const auto g = random_vector<S>(rng, std::max<int64_t>(B * sb, 1));
  DevBuf<S> x_dev(x), g_dev(g);
  DevBuf<A> gw_dev(B * C), gb_dev(B * C), sq_dev(B);
  CHECK_CUDA(kc::norm_layer_grads(dtype_of<S>, {x_dev.ptr, sb, st, sc}, {g_dev.ptr, sb, st, sc},
                                  gw_dev.ptr, bias ? gb_dev.ptr : nullptr, sq_dev.ptr, B, T, C,
                                  nullptr));
  const auto gw = gw_dev.download(), gb = gb_dev.download(), sq = sq_dev.download();
  const double tol = std::is_same_v<S, double> ? 1e-12 : 1e-5;
  for (int64_t b = 0; b < B; ++b) {
    double sq_want = 0, sq_mag = 0;
    for (int64_t c = 0; c < C; ++c) {
      double w = 0, s = 0, wmag = 0, smag = 0;
      for (int64_t t = 0; t < T; ++t) {
        const double xv = as_double(x[b * sb + t * st + c * sc]), gv = as_double(g[b * sb + t * st + c * sc]);
        w += xv * gv;
        s += gv;
        wmag += std::fabs(xv * gv);
        smag += std::fabs(gv);
      }
      cs.expect(std::fabs(double(gw[b * C + c]) - w) <= tol * wmag + 1e-300, "gw[%lld,%lld] = %.9g, want %.9g",
                (long long)b, (long long)c, double(gw[b * C + c]), w);
      if (bias)
        cs.expect(std::fabs(double(gb[b * C + c]) - s) <= tol * smag + 1e-300,
                  "gb[%lld,%lld] = %.9g, want %.9g", (long long)b, (long long)c, double(gb[b * C + c]), s);
      sq_want += w * w + (bias ? s * s : 0);
      sq_mag += wmag * wmag + (bias ? smag * smag : 0);
    }
    cs.expect(std::fabs(double(sq[b]) - sq_want) <= 3 * tol * sq_mag + 1e-300, "sq[%lld] = %.9g, want %.9g",
              (long long)b, double(sq[b]), sq_want);
  }
}

template <typename S>
void norm_layer_suite() {
  const int64_t shapes[][3] = {{0, 3, 4}, {1, 1, 1}, {3, 37, 123}, {2, 130, 7}, {2, 0, 5}, {2, 5, 0}, {1, 3000, 40}};
  for (const auto& s : shapes)
    for (bool cm : {false, true})
      for (bool bias : {false, true}) test_norm_layer<S>(s[0], s[1], s[2], cm, bias);
}

// ---------------------------------------------------------------------------------------
// add_noise
// ---------------------------------------------------------------------------------------

void philox_ref(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t x0 = ctr[0], x1 = ctr[1], x2 = ctr[2], x3 = ctr[3], k0 = key[0], k1 = key[1];
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * x0, p1 = uint64_t(0xCD9E8D57u) * x2;
    const uint32_t y0 = uint32_t(p1 >> 32) ^ x1 ^ k0, y2 = uint32_t(p0 >> 32) ^ x3 ^ k1;
    x0 = y0;
    x1 = uint32_t(p1);
    x2 = y2;
    x3 = uint32_t(p0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = x0;
  out[1] = x1;
  out[2] = x2;
  out[3] = x3;
}

// The reference itself against Random123's known-answer vectors (philox4x32, 10 rounds).
void test_philox_reference() {
  Case cs("philox4x32_10 known answers");
  for (const bk::test::PhiloxKat& k : bk::test::kPhiloxKats) {
    uint32_t out[4];
    philox_ref(k.ctr, k.key, out);
    cs.expect(std::memcmp(out, k.want, sizeof(out)) == 0, "got %08x %08x %08x %08x", out[0], out[1],
              out[2], out[3]);
  }
}

// The normal of counter n (docs/OPS.md), Box-Muller in double.
double reference_normal(uint64_t seed, uint64_t n) {
  const uint64_t q = n / 4;
  const uint32_t ctr[4] = {uint32_t(q), uint32_t(q >> 32), 0, 0};
  const uint32_t key[2] = {uint32_t(seed), uint32_t(seed >> 32)};
  uint32_t x[4];
  philox_ref(ctr, key, x);
  const int lane = int(n % 4);
  const uint32_t w0 = x[lane < 2 ? 0 : 2], w1 = x[lane < 2 ? 1 : 3];
  const double u1 = (double(w0) + 1.0) * 0x1p-32, u2 = double(w1) * 0x1p-32;
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double angle = 2 * 3.14159265358979323846 * u2;
  return lane % 2 == 0 ? r * std::cos(angle) : r * std::sin(angle);
}

template <typename S>
void test_noise(int64_t n, uint64_t seed, uint64_t offset, double sd, double scale) {
  using A = acc_t<S>;
  Case cs("add_noise %s n=%lld seed=%llx offset=%llu std=%g scale=%g", name_of<S>(), (long long)n,
          (unsigned long long)seed, (unsigned long long)offset, sd, scale);
  std::mt19937_64 rng(n + seed + offset);
  const auto g0 = random_vector<S>(rng, n, -2, 2);
  DevBuf<S> g_dev(g0);
  CHECK_CUDA(kc::add_noise(dtype_of<S>, g_dev.ptr, n, sd, scale, seed, offset, nullptr));
  const auto g = g_dev.download();
  for (int64_t i = 0; i < n; ++i) {
    const double got = as_double(g[i]);
    if (sd == 0) {  // exactly grad * scale in the compute type
      const double want = as_double(from_double<S>(double(A(as_double(g0[i])) * A(scale))));
      cs.expect(got == want, "[%lld] = %.9g, want exactly %.9g", (long long)i, got, want);
      continue;
    }
    const double z = reference_normal(seed, offset + i);
    const double want = (as_double(g0[i]) + sd * z) * scale;
    // float32 normals to a few ulps of (|z| + 1); the update in A; the final rounding.
    const double tol = std::fabs(sd * scale) * 0x1p-19 * (std::fabs(z) + 1) +
                       4 * roundoff<A> * (std::fabs(as_double(g0[i])) + std::fabs(sd * z)) * std::fabs(scale) +
                       roundoff<S> * std::fabs(want);
    cs.expect(std::fabs(got - want) <= tol, "[%lld] = %.9g, want %.9g (z %.9g)", (long long)i, got,
              want, z);
  }
}

template <typename S>
void noise_suite() {
  for (uint64_t offset : {0ull, 1ull, 2ull, 3ull, 4ull, 4294967295ull * 4 + 2})
    test_noise<S>(1001, 0x9e3779b97f4a7c15ull, offset, 0.7, 0.5);
  test_noise<S>(1, 3, 5, 1.0, 1.0);
  test_noise<S>(0, 3, 5, 1.0, 1.0);
  test_noise<S>(200003, 42, 8, 2.0, 0.25);
  test_noise<S>(77, 42, 9, 0.0, 0.125);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 77;
  }
  const char* only = std::getenv("BK_TEST_ONLY");  // e.g. "noise": run one suite
  auto want = [&](const char* suite) { return only == nullptr || std::strcmp(only, suite) == 0; };
  if (want("clipped_sum")) {
    clipped_sum_suite<double>();
    clipped_sum_suite<float>();
    clipped_sum_suite<bf16>();
    clipped_sum_suite<fp16>();
  }
  if (want("embedding")) {
    test_check_ids();
    embedding_suite<double>();
    embedding_suite<float>();
    embedding_suite<bf16>();
    embedding_suite<fp16>();
  }
  if (want("norm_layer")) {
    norm_layer_suite<double>();
    norm_layer_suite<float>();
    norm_layer_suite<bf16>();
    norm_layer_suite<fp16>();
  }
  if (want("noise")) {
    test_philox_reference();
    noise_suite<double>();
    noise_suite<float>();
    noise_suite<bf16>();
    noise_suite<fp16>();
  }
  std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
