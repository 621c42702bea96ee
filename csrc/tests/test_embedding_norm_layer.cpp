// ctest: the CPU embedding and norm-layer kernels against naive loops in double, over odd
// shapes, B=0/1, T=0/1, repeated ids, padding, V=1, strided layouts and every dtype; the
// clipped sum bit-identical for 1..4 threads; out-of-range ids reported; the inline 16-bit
// loads equal to_float on every bit pattern.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "tests/test_util.h"
#include "cpu/embedding_kernels.h"
#include "cpu/lowp.h"
#include "cpu/norm_layer_kernels.h"

using namespace bk::cpu;
using bk::test::as_double;
using bk::test::from_double;

namespace {

int failures = 0;



void set_threads(int n) {
#ifdef _OPENMP
  omp_set_num_threads(n);
#else
  (void)n;
#endif
}

bool close(double got, double want, double tol, double scale) {
  return std::fabs(got - want) <= tol * std::max(scale, 1e-300);
}

// ---------------------------------------------------------------------------------------
// Embeddings
// ---------------------------------------------------------------------------------------

struct EmbCase {
  int64_t B, T, d, V;
  int64_t padding;  // -1: none
  int64_t pad;      // extra elements per row of g and per example of ids (non-contiguous)
};

template <typename I, typename S>
struct EmbInputs {
  std::vector<I> ids_buf;
  std::vector<S> g_buf;
  std::vector<float> c_f;
  std::vector<double> c_d;
  Ids2d<I> ids;
  Operand3d<S> g;
};

template <typename I, typename S>
EmbInputs<I, S> make_emb(const EmbCase& e, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  // Few distinct ids so that every example repeats some, and the padding id shows up.
  std::uniform_int_distribution<int64_t> pick(0, e.V - 1);
  EmbInputs<I, S> in;
  const int64_t ids_sb = e.T + e.pad, g_st = e.d + e.pad, g_sb = e.T * g_st + 3;
  in.ids_buf.resize(std::max<int64_t>(e.B * ids_sb, 1));
  for (auto& x : in.ids_buf) x = I(pick(rng));
  in.g_buf.resize(std::max<int64_t>(e.B * g_sb, 1));
  for (auto& x : in.g_buf) x = from_double<S>(normal(rng));
  for (int64_t b = 0; b < e.B; ++b) {
    const double c = 0.25 + 0.5 * (b % 3);  // exactly representable
    in.c_f.push_back(float(c));
    in.c_d.push_back(c);
  }
  in.ids = {in.ids_buf.data(), ids_sb, 1};
  in.g = {in.g_buf.data(), g_sb, g_st};
  return in;
}

template <typename I, typename S>
double naive_embedding_norm(const EmbInputs<I, S>& in, const EmbCase& e, int64_t b) {
  double total = 0;
  for (int64_t s = 0; s < e.T; ++s)
    for (int64_t t = 0; t < e.T; ++t) {
      const int64_t xs = in.ids.ptr[b * in.ids.stride_b + s], xt = in.ids.ptr[b * in.ids.stride_b + t];
      if (xs != xt || xs == e.padding) continue;
      for (int64_t k = 0; k < e.d; ++k)
        total += as_double(in.g.ptr[b * in.g.stride_b + s * in.g.stride_t + k]) *
                 as_double(in.g.ptr[b * in.g.stride_b + t * in.g.stride_t + k]);
    }
  return total;
}

template <typename I, typename S, typename W>
void check_clipped_sum(const char* name, const EmbInputs<I, S>& in, const EmbCase& e,
                       double tol) {
  // A float32 weight holds the sum to its own precision only.
  if (std::is_same_v<W, float>) tol = std::max(tol, 1.2e-7);
  const Padding padding{e.padding >= 0, e.padding};
  const int64_t N = e.B * e.T, ld = e.d + 2;  // grad_weight rows padded too
  std::vector<int64_t> positions(N), ids_of(N), starts(N + 1);
  EmbeddingSegments segs{positions.data(), starts.data(), ids_of.data(), 0};
  if (embedding_segments(in.ids, e.B, e.T, e.V, padding, &segs) != -1) {
    std::printf("FAIL %s: in-range ids reported out of range\n", name);
    ++failures;
    return;
  }
  // Start from a nonzero weight: the op accumulates.
  std::vector<W> start(std::max<int64_t>(e.V * ld, 1));
  for (size_t i = 0; i < start.size(); ++i) start[i] = from_double<W>(0.5 * double(i % 7) - 1.0);
  std::vector<double> want(e.V * e.d);
  for (int64_t v = 0; v < e.V; ++v)
    for (int64_t k = 0; k < e.d; ++k) want[v * e.d + k] = as_double(start[v * ld + k]);
  std::vector<double> scale(e.V * e.d);
  for (int64_t i = 0; i < e.V * e.d; ++i) scale[i] = std::fabs(want[i]);
  for (int64_t b = 0; b < e.B; ++b)
    for (int64_t t = 0; t < e.T; ++t) {
      const int64_t v = in.ids.ptr[b * in.ids.stride_b + t];
      if (v == e.padding) continue;
      for (int64_t k = 0; k < e.d; ++k) {
        const double x = in.c_d[b] * as_double(in.g.ptr[b * in.g.stride_b + t * in.g.stride_t + k]);
        want[v * e.d + k] += x;
        scale[v * e.d + k] += std::fabs(x);
      }
    }
  std::vector<W> first;
  for (int threads : {1, 2, 3, 4}) {
    set_threads(threads);
    std::vector<W> w = start;
    if constexpr (std::is_same_v<S, double>)
      embedding_clipped_sum<S, W>(segs, in.g, in.c_d.data(), w.data(), ld, e.T, e.d);
    else
      embedding_clipped_sum<S, W>(segs, in.g, in.c_f.data(), w.data(), ld, e.T, e.d);
    if (threads == 1) {
      first = w;
      for (int64_t v = 0; v < e.V; ++v)
        for (int64_t k = 0; k < ld; ++k) {
          const double got = as_double(w[v * ld + k]);
          if (k >= e.d) {  // the row padding is untouched
            if (got != as_double(start[v * ld + k])) {
              std::printf("FAIL %s: wrote into row padding\n", name);
              ++failures;
              return;
            }
            continue;
          }
          if (!close(got, want[v * e.d + k], tol, scale[v * e.d + k])) {
            std::printf("FAIL %s B=%lld T=%lld d=%lld V=%lld pad_idx=%lld: w[%lld,%lld] = %.17g, "
                        "want %.17g\n",
                        name, (long long)e.B, (long long)e.T, (long long)e.d, (long long)e.V,
                        (long long)e.padding, (long long)v, (long long)k, got, want[v * e.d + k]);
            ++failures;
            return;
          }
        }
    } else if (std::memcmp(w.data(), first.data(), w.size() * sizeof(W)) != 0) {
      std::printf("FAIL %s: %d threads not bit-identical to 1 thread\n", name, threads);
      ++failures;
      return;
    }
  }
  set_threads(4);
}

template <typename I, typename S>
void check_embedding(const char* name, const EmbCase& e, double tol) {
  const auto in = make_emb<I, S>(e, uint64_t(e.B * 7919 + e.T * 131 + e.d * 17 + e.V + e.pad));
  const Padding padding{e.padding >= 0, e.padding};
  using O = out_t<S>;
  std::vector<O> out(e.B + 1, O(-1));
  std::vector<std::vector<O>> per_threads;
  for (int threads : {1, 3}) {
    set_threads(threads);
    std::fill(out.begin(), out.end(), O(-1));
    embedding_norm<I, S>(in.ids, in.g, out.data(), e.B, e.T, e.d, padding);
    per_threads.push_back(out);
  }
  set_threads(4);
  if (per_threads[0] != per_threads[1]) {
    std::printf("FAIL %s embedding_norm: 3 threads differ from 1\n", name);
    ++failures;
  }
  for (int64_t b = 0; b < e.B; ++b) {
    const double want = naive_embedding_norm(in, e, b);
    if (!close(out[b], want, tol, want)) {
      std::printf("FAIL %s embedding_norm B=%lld T=%lld d=%lld V=%lld pad_idx=%lld b=%lld: got "
                  "%.17g want %.17g\n",
                  name, (long long)e.B, (long long)e.T, (long long)e.d, (long long)e.V,
                  (long long)e.padding, (long long)b, double(out[b]), want);
      ++failures;
    }
  }
  if (out[e.B] != O(-1)) {
    std::printf("FAIL %s embedding_norm wrote past the end\n", name);
    ++failures;
  }
  check_clipped_sum<I, S, float>(name, in, e, tol);
  check_clipped_sum<I, S, double>(name, in, e, tol);
  // 16-bit weights: one rounding of the sum, at most half an ulp (2^-8 / 2^-11 relative).
  check_clipped_sum<I, S, bf16>(name, in, e, tol + 1.0 / 256);
  check_clipped_sum<I, S, fp16>(name, in, e, tol + 1.0 / 2048);
}

template <typename I, typename S>
void check_embedding_all(const char* name, double tol) {
  const EmbCase cases[] = {
      {0, 5, 3, 4, -1, 0},    {1, 1, 1, 1, -1, 0},   {1, 1, 1, 1, 0, 0},   {2, 0, 5, 3, -1, 0},
      {3, 37, 123, 5, 2, 1},  {3, 37, 123, 5, -1, 0}, {2, 9, 300, 1, -1, 2}, {4, 17, 130, 50, 7, 0},
      {1, 64, 8, 3, 0, 3},    {5, 3, 0, 4, -1, 0},
      // V far above 8 * B * T: the comparison-sort path of embedding_segments
      {2, 7, 19, 100000, 5, 1},
      // large enough for the kernels to use threads (the thread-count checks mean something)
      {8, 64, 300, 3, 1, 0},
  };
  for (const auto& e : cases) check_embedding<I, S>(name, e, tol);
}

void check_out_of_range() {
  std::vector<int64_t> ids = {0, 1, 2, 3, 4, 1};  // [2, 3]; V = 4: id 4 at flat position 4
  std::vector<int64_t> positions(6), ids_of(6), starts(7);
  EmbeddingSegments segs{positions.data(), starts.data(), ids_of.data(), 0};
  const Ids2d<int64_t> view{ids.data(), 3, 1};
  for (int64_t V : {4, 1000000}) {  // both sort paths
    if (embedding_segments(view, 2, 3, V, Padding{false, 0}, &segs) != (V == 4 ? 4 : -1)) {
      std::printf("FAIL out-of-range id not reported (V=%lld)\n", (long long)V);
      ++failures;
    }
  }
  // A padding id is skipped even where it would be out of range, and negative ids are caught.
  if (embedding_segments(view, 2, 3, 4, Padding{true, 4}, &segs) != -1) {
    std::printf("FAIL padding id reported out of range\n");
    ++failures;
  }
  ids[1] = -1;
  if (embedding_segments(view, 2, 3, 5, Padding{false, 0}, &segs) != 1) {
    std::printf("FAIL negative id not reported\n");
    ++failures;
  }
}

// ---------------------------------------------------------------------------------------
// Norm layers
// ---------------------------------------------------------------------------------------

// Layouts of a [B, T, C] operand inside a buffer: 0 rows (C contiguous, padded rows),
// 1 channel-major ([B, C, T] transposed), 2 strided channels (every other element).
template <typename S>
Strided3d<S> layout_view(std::vector<S>& buf, int layout, int64_t B, int64_t T, int64_t C,
                         std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  Strided3d<S> v{};
  size_t size = 0;
  if (layout == 0) {
    v = {nullptr, T * (C + 3) + 1, C + 3, 1};
  } else if (layout == 1) {
    v = {nullptr, C * (T + 2), 1, T + 2};
  } else {
    v = {nullptr, T * 2 * C + 5, 2 * C, 2};
  }
  size = size_t(std::max<int64_t>(B * v.stride_b, 1));
  buf.resize(size);
  for (auto& x : buf) x = from_double<S>(normal(rng));
  v.ptr = buf.data();
  return v;
}

template <typename S>
void check_norm_layer(const char* name, double tol, int64_t B, int64_t T, int64_t C, int xl,
                      int gl, bool bias) {
  std::mt19937_64 rng(B * 1000 + T * 100 + C * 10 + xl * 3 + gl + bias);
  std::vector<S> xbuf, gbuf;
  const auto x = layout_view(xbuf, xl, B, T, C, rng);
  const auto g = layout_view(gbuf, gl, B, T, C, rng);
  using O = out_t<S>;
  std::vector<std::vector<O>> runs;
  for (int threads : {1, 3}) {
    set_threads(threads);
    std::vector<O> gw(B * C + 1, O(-1)), gb(B * C + 1, O(-1)), sq(B + 1, O(-1));
    norm_layer_grads<S>(x, g, gw.data(), bias ? gb.data() : nullptr, sq.data(), B, T, C);
    std::vector<O> all = gw;
    all.insert(all.end(), gb.begin(), gb.end());
    all.insert(all.end(), sq.begin(), sq.end());
    runs.push_back(all);
  }
  set_threads(4);
  if (runs[0] != runs[1]) {
    std::printf("FAIL %s norm_layer_grads: 3 threads differ from 1\n", name);
    ++failures;
  }
  const O* gw = runs[0].data();
  const O* gb = gw + B * C + 1;
  const O* sq = gb + B * C + 1;
  if (gw[B * C] != O(-1) || gb[B * C] != O(-1) || sq[B] != O(-1) || (!bias && gb[0] != O(-1))) {
    std::printf("FAIL %s norm_layer_grads wrote out of bounds\n", name);
    ++failures;
  }
  bool ok = true;
  for (int64_t b = 0; b < B && ok; ++b) {
    double want_sq = 0;
    for (int64_t c = 0; c < C && ok; ++c) {
      double w = 0, s = 0, w_abs = 0, s_abs = 0;
      for (int64_t t = 0; t < T; ++t) {
        const double xv = as_double(x.ptr[b * x.stride_b + t * x.stride_t + c * x.stride_c]);
        const double gv = as_double(g.ptr[b * g.stride_b + t * g.stride_t + c * g.stride_c]);
        w += xv * gv;
        s += gv;
        w_abs += std::fabs(xv * gv);
        s_abs += std::fabs(gv);
      }
      want_sq += w * w + (bias ? s * s : 0);
      ok = close(gw[b * C + c], w, tol, w_abs) && (!bias || close(gb[b * C + c], s, tol, s_abs));
    }
    ok = ok && close(sq[b], want_sq, 10 * tol, want_sq);
    if (!ok)
      std::printf("FAIL %s norm_layer_grads B=%lld T=%lld C=%lld layouts %d/%d bias=%d b=%lld\n",
                  name, (long long)B, (long long)T, (long long)C, xl, gl, int(bias), (long long)b);
  }
  if (!ok) ++failures;
}

template <typename S>
void check_norm_layer_all(const char* name, double tol) {
  const int64_t shapes[][3] = {{0, 4, 3}, {1, 1, 1},    {2, 0, 5},    {3, 37, 123},
                               {2, 1, 300}, {1, 2000, 5}, {4, 130, 17}, {2, 5, 0},
                               {4, 300, 77},   // large enough for threads
                               {5, 15, 40},    // channel-major with fewer positions than lanes
                               {32, 4, 300}};  // ... in items of many channels, threaded
  for (const auto& s : shapes)
    for (int xl = 0; xl < 3; ++xl)
      for (int gl = 0; gl < 3; ++gl)
        for (bool bias : {true, false}) check_norm_layer<S>(name, tol, s[0], s[1], s[2], xl, gl, bias);
}

void check_lowp_loads() {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const fp16 h{uint16_t(bits)};
    const bf16 b{uint16_t(bits)};
    const float want_h = to_float(h), got_h = lowp::load(h);
    const float want_b = to_float(b), got_b = lowp::load(b);
    // NaNs may come out quieted.
    const bool same_h = std::memcmp(&want_h, &got_h, 4) == 0 ||
                        (std::isnan(want_h) && std::isnan(got_h));
    const bool same_b = std::memcmp(&want_b, &got_b, 4) == 0;
    if (!same_h || !same_b) {
      std::printf("FAIL inline 16-bit load of 0x%04x: fp16 %g vs %g, bf16 %g vs %g\n", bits,
                  got_h, want_h, got_b, want_b);
      ++failures;
      return;
    }
  }
}

}  // namespace

int main() {
  check_lowp_loads();
  check_out_of_range();
  // Inputs are exactly representable in each dtype; the tolerance covers accumulation only.
  check_embedding_all<int64_t, double>("int64/float64", 1e-12);
  check_embedding_all<int32_t, double>("int32/float64", 1e-12);
  check_embedding_all<int64_t, float>("int64/float32", 1e-5);
  check_embedding_all<int32_t, bf16>("int32/bfloat16", 1e-5);
  check_embedding_all<int64_t, fp16>("int64/float16", 1e-5);
  check_norm_layer_all<double>("float64", 1e-12);
  check_norm_layer_all<float>("float32", 1e-5);
  check_norm_layer_all<bf16>("bfloat16", 1e-5);
  check_norm_layer_all<fp16>("float16", 1e-5);
  std::printf("%s: %d failures (OpenMP threads: %d)\n", failures ? "FAILED" : "OK", failures,
              max_threads());
  return failures ? 1 : 0;
}
