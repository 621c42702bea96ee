// ctest: the CPU noise kernel. Philox4x32-10 against Random123's known-answer vectors (scalar)
// and the scalar against the vector code; the float32 log / sqrt / sin / cos approximations
// against double-precision std:: functions over their whole input ranges (dense samples plus
// every value near the branch points); the kernel against a scalar double Box-Muller for every
// dtype, size, offset and seed shape; bit-for-bit independence of the thread count and of
// where a call starts; the 16-bit roundings against the scalar converters of norms_kernels.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu/noise_kernels.h"
#include "test_util.h"

using namespace bk::cpu;

namespace {

int failures = 0;

void fail(const char* what) {
  std::printf("FAIL %s\n", what);
  ++failures;
}

// Units in the last place of float at |x| (x's binade), with |x| floored at `floor`.
double ulp_of(double x, double floor = std::numeric_limits<float>::min()) {
  const double a = std::max(std::fabs(x), floor);
  return std::ldexp(1.0, std::ilogb(a) - 23);
}

// --- Philox ---------------------------------------------------------------------------------

void test_philox_known_answers() {
  for (const bk::test::PhiloxKat& k : bk::test::kPhiloxKats) {
    uint32_t out[4];
    philox4x32_10(k.ctr, k.key, out);
    if (std::memcmp(out, k.want, sizeof(out)) != 0) {
      std::printf("FAIL philox known answer: got %08x %08x %08x %08x want %08x %08x %08x %08x\n",
                  out[0], out[1], out[2], out[3], k.want[0], k.want[1], k.want[2], k.want[3]);
      ++failures;
    }
  }
}

// The vector Philox equals the scalar one, bit for bit, including the carry from the
// counter's low word into its high word and partial lane groups.
void test_philox_vector(Isa isa) {
  const uint32_t keys[][2] = {{0, 0}, {0xffffffff, 0xffffffff}, {0xa4093822, 0x299f31d0}};
  const uint64_t starts[] = {0, 1, 0xfffffff5ull, 0x1fffffffaull, 0x3fffffffffffffe0ull};
  for (const auto& key : keys)
    for (uint64_t q0 : starts)
      for (int64_t nblocks : {1, 15, 16, 17, 53}) {
        std::vector<uint32_t> got(4 * nblocks);
        philox_blocks(isa, q0, nblocks, key, got.data());
        for (int64_t b = 0; b < nblocks; ++b) {
          const uint64_t q = q0 + b;
          const uint32_t ctr[4] = {uint32_t(q), uint32_t(q >> 32), 0, 0};
          uint32_t want[4];
          philox4x32_10(ctr, key, want);
          if (std::memcmp(&got[4 * b], want, sizeof(want)) != 0) {
            std::printf("FAIL %s philox block %llu key %08x %08x\n", isa_name(isa),
                        (unsigned long long)q, key[0], key[1]);
            ++failures;
            return;
          }
        }
      }
}

// --- the float32 approximations ---------------------------------------------------------------

// Every w in the windows [c - 2^16, c + 2^16) around the branch points of log_u1 and sincos,
// plus a dense stride through all 2^32 words.
std::vector<uint32_t> word_sample() {
  std::vector<uint32_t> w;
  const uint64_t centres[] = {0, 1ull << 29, 1ull << 30, 3ull << 29, 1ull << 31, 0xB504F333ull,
                              5ull << 29, 3ull << 30, 7ull << 29, 1ull << 32};
  for (uint64_t c : centres)
    for (int64_t d = -(1 << 16); d < (1 << 16); ++d) {
      const int64_t v = int64_t(c) + d;
      if (v >= 0 && v < (int64_t(1) << 32)) w.push_back(uint32_t(v));
    }
  for (uint64_t v = 7; v < (1ull << 32); v += 251) w.push_back(uint32_t(v));
  return w;
}

void test_log(Isa isa, const std::vector<uint32_t>& w) {
  std::vector<float> got(w.size());
  noise_log_u1(isa, w.data(), int64_t(w.size()), got.data());
  double worst = 0;
  uint32_t worst_w = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    const double want = std::log((double(w[i]) + 1.0) * 0x1p-32);
    if (want == 0) {
      if (got[i] != 0) fail("log_u1(2^32 - 1) is not 0");
      continue;
    }
    const double err = std::fabs(got[i] - want) / ulp_of(want);
    if (!(err <= worst)) worst = err, worst_w = w[i];
  }
  std::printf("%s log_u1: max error %.2f ulp (w = 0x%08x) over %zu words\n", isa_name(isa), worst,
              worst_w, w.size());
  if (!(worst <= 2.0)) fail("log_u1 error above 2 ulp");
}

void test_sqrt(Isa isa) {
  // Box-Muller needs [0, -2 ln 2^-32 = 44.4]; test [2^-40, 2^7) densely, and 0.
  std::vector<float> x = {0.0f};
  for (uint32_t b = 0x2b800000u; b < 0x43000000u; b += 37) {
    float f;
    std::memcpy(&f, &b, 4);
    x.push_back(f);
  }
  std::vector<float> got(x.size());
  noise_sqrt(isa, x.data(), int64_t(x.size()), got.data());
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::sqrt(double(x[i]));
    if (want == 0) {
      if (got[i] != 0) fail("sqrt(0) is not 0");
      continue;
    }
    worst = std::max(worst, std::fabs(got[i] - want) / ulp_of(want));
    if (!std::isfinite(got[i])) worst = 1e30;
  }
  std::printf("%s sqrt: max error %.2f ulp over %zu floats\n", isa_name(isa), worst, x.size());
  if (!(worst <= 1.0)) fail("sqrt error above 1 ulp");
}

void test_sincos(Isa isa, const std::vector<uint32_t>& w) {
  std::vector<float> c(w.size()), s(w.size());
  noise_sincos(isa, w.data(), int64_t(w.size()), c.data(), s.data());
  // Error in ulps of the result, below 2^-20 in units of 2^-43 (where the exact value is
  // tiny, e.g. cos(pi/2), the float angle's own rounding dominates).
  double worst = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    const double angle = 2 * M_PI * std::ldexp(double(w[i]), -32);
    const double ec = std::fabs(c[i] - std::cos(angle)) / ulp_of(std::cos(angle), 0x1p-20);
    const double es = std::fabs(s[i] - std::sin(angle)) / ulp_of(std::sin(angle), 0x1p-20);
    worst = std::max(worst, std::max(ec, es));
    if (!(std::fabs(c[i]) <= 1 && std::fabs(s[i]) <= 1)) worst = 1e30;
  }
  std::printf("%s sincos: max error %.2f ulp over %zu words\n", isa_name(isa), worst, w.size());
  if (!(worst <= 2.0)) fail("sin/cos error above 2 ulp");
}

// --- the kernel -----------------------------------------------------------------------------

// The normal of counter n: scalar Philox and Box-Muller in double with std:: functions.
double reference_normal(uint64_t seed, uint64_t n) {
  const uint64_t q = n / 4;
  const uint32_t ctr[4] = {uint32_t(q), uint32_t(q >> 32), 0, 0};
  const uint32_t key[2] = {uint32_t(seed), uint32_t(seed >> 32)};
  uint32_t x[4];
  philox4x32_10(ctr, key, x);
  const int lane = int(n % 4);
  const uint32_t w0 = x[lane < 2 ? 0 : 2], w1 = x[lane < 2 ? 1 : 3];
  const double u1 = (double(w0) + 1.0) * 0x1p-32, u2 = double(w1) * 0x1p-32;
  const double r = std::sqrt(-2.0 * std::log(u1));
  return lane % 2 == 0 ? r * std::cos(2 * M_PI * u2) : r * std::sin(2 * M_PI * u2);
}

double as_double(float x) { return x; }
double as_double(double x) { return x; }
double as_double(bf16 x) { return to_float(x); }
double as_double(fp16 x) { return to_float(x); }
template <typename S> S from_double(double x);
template <> float from_double<float>(double x) { return float(x); }
template <> double from_double<double>(double x) { return x; }
template <> bf16 from_double<bf16>(double x) { return to_bf16(float(x)); }
template <> fp16 from_double<fp16>(double x) { return to_fp16(float(x)); }

// Unit roundoff of each buffer dtype (the final rounding's relative error).
template <typename S> constexpr double unit_roundoff = 0x1p-24;
template <> constexpr double unit_roundoff<double> = 0x1p-53;
template <> constexpr double unit_roundoff<bf16> = 0x1p-8;
template <> constexpr double unit_roundoff<fp16> = 0x1p-11;

// The kernel's normals themselves (zero gradient, std = scale = 1): error in units of
// 2^-24 (|z| + 1), i.e. float32 ulps of z, absolute near z = 0 where the angle's own
// rounding (relative to 2 pi) shows up as r * 2^-24.
void test_normals_accuracy(Isa isa) {
  const int64_t n = 1 << 20;
  double worst = 0;
  for (uint64_t seed : {0ull, 0x9e3779b97f4a7c15ull})
    for (uint64_t offset : {0ull, 3ull, 1ull << 40}) {
      std::vector<float> z(n, 0.0f);
      add_noise_isa<float>(isa, z.data(), n, 1.0, 1.0, seed, offset, 2);
      for (int64_t i = 0; i < n; ++i) {
        const double want = reference_normal(seed, offset + i);
        worst = std::max(worst, std::fabs(z[i] - want) / (0x1p-24 * (std::fabs(want) + 1)));
        if (!std::isfinite(z[i])) worst = 1e30;
      }
    }
  std::printf("%s normals: max error %.2f x 2^-24 (|z| + 1) over %lld counters\n", isa_name(isa),
              worst, 6 * (long long)n);
  if (!(worst <= 4)) fail("normals error above 4 x 2^-24 (|z| + 1)");
}

// One call of add_noise on n elements against the scalar reference, guard elements around it
// untouched.
template <typename S>
void check_kernel(Isa isa, const char* dtype, int64_t n, uint64_t seed, uint64_t offset, double sd,
                  double scale, int threads) {
  std::mt19937_64 rng(n * 7919 + offset + seed);
  std::normal_distribution<double> normal;
  const int64_t guard = 5;
  std::vector<S> buf(n + 2 * guard);
  for (auto& x : buf) x = from_double<S>(normal(rng));
  std::vector<S> before = buf;
  add_noise_isa<S>(isa, buf.data() + guard, n, sd, scale, seed, offset, threads);
  for (int64_t i = 0; i < guard; ++i)
    if (std::memcmp(&buf[i], &before[i], sizeof(S)) != 0 ||
        std::memcmp(&buf[n + guard + i], &before[n + guard + i], sizeof(S)) != 0) {
      std::printf("FAIL %s %s n=%lld: wrote outside the buffer\n", isa_name(isa), dtype,
                  (long long)n);
      ++failures;
      return;
    }
  for (int64_t i = 0; i < n; ++i) {
    const double g = as_double(before[guard + i]), z = reference_normal(seed, offset + i);
    const double want = (g + sd * z) * scale;
    const double got = as_double(buf[guard + i]);
    // The noise's own error (4 float32 ulp of z, at least of 1), the float32 add and multiply
    // (double buffers: exact enough), and the one final rounding to the dtype.
    const double compute = std::is_same_v<S, double> ? 0x1p-50 : 0x1p-23;
    const double tol = std::fabs(scale) * (sd * 4 * 0x1p-24 * (std::fabs(z) + 1) +
                                           compute * (std::fabs(g) + sd * std::fabs(z))) +
                       unit_roundoff<S> * std::fabs(want) * (1 + 0x1p-20);
    if (!(std::fabs(got - want) <= tol)) {
      std::printf("FAIL %s %s n=%lld seed=%llx offset=%llu std=%g scale=%g i=%lld: got %.9g "
                  "want %.9g (z %.9g)\n",
                  isa_name(isa), dtype, (long long)n, (unsigned long long)seed,
                  (unsigned long long)offset, sd,
                  scale, (long long)i, got, want, z);
      ++failures;
      return;
    }
  }
}

template <typename S>
void check_kernel_all(Isa isa, const char* dtype) {
  const int64_t sizes[] = {0, 1, 3, 5, 63, 64, 65, 130, 1000, 100003};
  const uint64_t offsets[] = {0, 1, 2, 3, 4, 64, 4ull * 0xfffffff0ull + 2, (1ull << 61) + 3};
  const uint64_t seeds[] = {0, 1, 0xffffffffull, 0x123456789abcdefull, ~0ull};
  for (int64_t n : sizes)
    for (uint64_t offset : offsets)
      for (uint64_t seed : seeds) {
        if (n > 1000 && (seed != seeds[3] || offset > 64)) continue;  // keep the run short
        check_kernel<S>(isa, dtype, n, seed, offset, 1.0, 1.0, 2);
      }
  // Scaled noise on real gradients, several thread counts.
  for (int threads : {1, 3})
    for (int64_t n : {7, 1000, 100003}) {
      check_kernel<S>(isa, dtype, n, 42, 4, 0.7, 1.0 / 3, threads);
      check_kernel<S>(isa, dtype, n, 43, 1, 3.0, -0.25, threads);
    }
}

// The bits do not depend on the number of threads, nor on where a call starts: element i of
// a call at offset o equals element i - s of a call at offset o + s.
void test_bitwise_invariance(Isa isa) {
  const int64_t n = 1000003;
  std::vector<float> one(n, 0.0f);
  add_noise_isa<float>(isa, one.data(), n, 1.0, 1.0, 7, 12, 1);
  for (int threads : {2, 3, 8}) {
    std::vector<float> many(n, 0.0f);
    add_noise_isa<float>(isa, many.data(), n, 1.0, 1.0, 7, 12, threads);
    if (std::memcmp(one.data(), many.data(), n * sizeof(float)) != 0)
      fail("thread count changes the noise");
  }
  for (int64_t shift : {1, 2, 3, 4, 17, 61, 64, 1001}) {
    std::vector<float> later(n - shift, 0.0f);
    add_noise_isa<float>(isa, later.data(), n - shift, 1.0, 1.0, 7, 12 + shift, 2);
    if (std::memcmp(one.data() + shift, later.data(), (n - shift) * sizeof(float)) != 0)
      fail("noise depends on where a call starts");
  }
  // std == 0: exactly grad * scale.
  std::vector<float> g(1000);
  for (size_t i = 0; i < g.size(); ++i) g[i] = float(i) * 0.37f - 100.0f;
  std::vector<float> h = g;
  add_noise_isa<float>(isa, h.data(), int64_t(h.size()), 0.0, 0.3, 7, 0, 2);
  for (size_t i = 0; i < g.size(); ++i)
    if (h[i] != g[i] * 0.3f) {
      fail("std = 0 is not grad * scale");
      break;
    }
}

// AVX2 and AVX-512 run the same operations (both contracting to FMA in the same places) on
// other vector widths: the same bits, so the noise is the same on any machine with AVX2.
// (Baseline SSE2 has no FMA: its results differ in the last bits.)
void test_avx2_equals_avx512() {
  if (!isa_runs(Isa::avx512)) return;
  const int64_t n = 1000003;
  std::vector<float> a(n), b;
  for (int64_t i = 0; i < n; ++i) a[i] = float(i % 1000) * 0.01f - 5.0f;
  b = a;
  add_noise_isa<float>(Isa::avx2, a.data(), n, 0.7, 0.3, 5, 3, 2);
  add_noise_isa<float>(Isa::avx512, b.data(), n, 0.7, 0.3, 5, 3, 2);
  if (std::memcmp(a.data(), b.data(), n * sizeof(float)) != 0) fail("avx2 and avx512 noise differ");
}

// The vectorized 16-bit loads and roundings against the scalar converters, on every bit
// pattern (std = 0, so the op is one multiply in float and one rounding).
template <typename S>
void check_16bit(const char* dtype) {
  for (double scale : {1.0, 1.0 / 3, 0.7, 1e-3, 3.3, -1.0, 1e-6, 1e4}) {
    std::vector<S> buf(1 << 16);
    for (uint32_t b = 0; b < (1u << 16); ++b) buf[b].bits = uint16_t(b);
    add_noise<S>(buf.data(), int64_t(buf.size()), 0.0, scale, 0, 0, 2);
    for (uint32_t b = 0; b < (1u << 16); ++b) {
      const float x = to_float(S{uint16_t(b)}) * float(scale);
      const S want = std::is_same_v<S, bf16> ? S{to_bf16(x).bits} : S{to_fp16(x).bits};
      const bool both_nan = std::isnan(x) && std::isnan(to_float(buf[b]));
      if (buf[b].bits != want.bits && !both_nan) {
        std::printf("FAIL %s: %04x * %g gave %04x, want %04x\n", dtype, b, scale, buf[b].bits,
                    want.bits);
        ++failures;
        break;
      }
    }
  }
}

}  // namespace

int main() {
  test_philox_known_answers();
  const std::vector<uint32_t> w = word_sample();
  for (Isa isa : {Isa::base, Isa::avx2, Isa::avx512}) {
    if (!isa_runs(isa)) {
      std::printf("%s: not run (this CPU lacks it)\n", isa_name(isa));
      continue;
    }
    test_philox_vector(isa);
    test_log(isa, w);
    test_sqrt(isa);
    test_sincos(isa, w);
    check_kernel_all<float>(isa, "float32");
    check_kernel_all<double>(isa, "float64");
    check_kernel_all<bf16>(isa, "bfloat16");
    check_kernel_all<fp16>(isa, "float16");
    test_normals_accuracy(isa);
    test_bitwise_invariance(isa);
  }
  test_avx2_equals_avx512();
  check_16bit<bf16>("bfloat16");
  check_16bit<fp16>("float16");
  std::printf("%s: %d failures (best instruction set: %s, OpenMP threads: %d)\n",
              failures ? "FAILED" : "OK", failures, isa_name(best_isa()), max_threads());
  return failures ? 1 : 0;
}
