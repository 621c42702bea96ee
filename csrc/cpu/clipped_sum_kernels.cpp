// CPU kernel of the clipped weighted sum: C[p][d] += G^T diag(c) A over the B*T rows.
//
// A GEMM in the BLIS style, M = p, N = d, K = rows. C is cut into MC x NC tiles spread over
// threads (and, when there are fewer tiles than threads, K is split too). For each tile, K
// goes in KC-row blocks: the g rows are packed into MR-wide micro-panels (while their bias
// sum is taken), the a rows into NR-wide micro-panels scaled by their example's c (so no
// scaled copy of a exists), and an MR x NR register-blocked micro-kernel sweeps them.
#include "cpu/clipped_sum_kernels.h"

#include <algorithm>
#include <vector>

#include "cpu/simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace bk {
namespace cpu {
namespace {

using namespace simd;

template <typename A>
struct Blocking {
  static constexpr int64_t MR = 6;                 // rows of C per micro-tile (broadcasts)
  static constexpr int64_t NR = 2 * kLanes<A>;     // columns of C per micro-tile (two 64-byte units)
  static constexpr int64_t KC = 256;               // rows of a/g per packed block
  static constexpr int64_t MC = 16 * MR;           // rows of C per tile
  static constexpr int64_t NC = 256 * 4 / sizeof(A) / NR * NR;  // columns of C per tile
};

// c_tile[MR][ldc] += sum_k ap[k][0..MR) (x) bp[k][0..NR), with W-byte registers: MR x 2 of
// them at a time (12 accumulators: within AVX2's 16 registers as within AVX-512's 32), so the
// NR columns take one pass with AVX-512, two with AVX2, four with SSE2.
template <int W, typename A>
BK_ALWAYS_INLINE void micro_kernel_impl(const A* __restrict ap, const A* __restrict bp, int64_t kc,
                                        A* __restrict c_tile, int64_t ldc) {
  using Bk = Blocking<A>;
  constexpr int64_t L = kLanes<A, W>, NV = 2;
  static_assert(Bk::NR % (NV * L) == 0, "a pass covers whole registers of the micro-tile");
  for (int64_t n0 = 0; n0 < Bk::NR; n0 += NV * L) {
    Vec<A, W> acc[Bk::MR][NV];
    for (int64_t i = 0; i < Bk::MR; ++i)
      for (int64_t v = 0; v < NV; ++v) acc[i][v] = load_vec<W>(c_tile + i * ldc + n0 + v * L);
    for (int64_t k = 0; k < kc; ++k) {
      Vec<A, W> b[NV];
      for (int64_t v = 0; v < NV; ++v) b[v] = load_vec<W>(bp + k * Bk::NR + n0 + v * L);
      for (int64_t i = 0; i < Bk::MR; ++i) {
        const A x = ap[k * Bk::MR + i];
        for (int64_t v = 0; v < NV; ++v) acc[i][v] += x * b[v];
      }
    }
    for (int64_t i = 0; i < Bk::MR; ++i)
      for (int64_t v = 0; v < NV; ++v) store_vec(c_tile + i * ldc + n0 + v * L, acc[i][v]);
  }
}

BK_SIMD_VERSIONS(void, micro_kernel,
                 (const float* ap, const float* bp, int64_t kc, float* c_tile, int64_t ldc),
                 micro_kernel_impl, (ap, bp, kc, c_tile, ldc))
BK_SIMD_VERSIONS(void, micro_kernel,
                 (const double* ap, const double* bp, int64_t kc, double* c_tile, int64_t ldc),
                 micro_kernel_impl, (ap, bp, kc, c_tile, ldc))

// Where row r of the flattened [B*T] rows lives.
struct RowCursor {
  int64_t T;
  int64_t b(int64_t r) const { return r / T; }
  int64_t t(int64_t r) const { return r % T; }
};

// One work item: C rows [m0, m1) (up to kGroup blocks of MC), columns [n0, n1), K rows
// [k0, k1). Each KC-row block of diag(c) a is packed once and serves every MC block of rows.
template <typename scalar_t>
void tile(Operand3d<scalar_t> a, Operand3d<scalar_t> g, const out_t<scalar_t>* c, int64_t T,
          int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t k0, int64_t k1, bool with_bias,
          out_t<scalar_t>* c_buf, out_t<scalar_t>* ap, out_t<scalar_t>* bp, out_t<scalar_t>* bias_buf) {
  using A = out_t<scalar_t>;
  using Bk = Blocking<A>;
  const int64_t mt = round_up(m1 - m0, Bk::MR), nt = round_up(n1 - n0, Bk::NR);
  const RowCursor rows{T};
  std::fill(c_buf, c_buf + mt * nt, A(0));
  if (with_bias) std::fill(bias_buf, bias_buf + mt, A(0));
  for (int64_t kb = k0; kb < k1; kb += Bk::KC) {
    const int64_t kc = std::min(Bk::KC, k1 - kb);
    // Pack diag(c) a: micro-panel j holds bp[j][k][0..NR) = c[b] * a[row k][n0 + j*NR + ..].
    for (int64_t k = 0; k < kc; ++k) {
      const int64_t r = kb + k, b = rows.b(r);
      const scalar_t* arow = a.ptr + b * a.stride_b + rows.t(r) * a.stride_t + n0;
      const A cb = c[b];
      for (int64_t j = 0; j < nt; j += Bk::NR) {
        A* dst = bp + j * kc + k * Bk::NR;
        const int64_t valid = std::min<int64_t>(Bk::NR, n1 - n0 - j);
        for (int64_t q = 0; q < valid; ++q) dst[q] = cb * load(arow[j + q]);
        for (int64_t q = valid; q < Bk::NR; ++q) dst[q] = A(0);
      }
    }
    for (int64_t mb = 0; mb < mt; mb += Bk::MC) {  // one MC block of rows of C at a time
      const int64_t mbt = std::min(Bk::MC, mt - mb);
      // Pack g^T: micro-panel i holds ap[i][k][0..MR) = g[row k][m0 + mb + i*MR + ..].
      for (int64_t k = 0; k < kc; ++k) {
        const int64_t r = kb + k, b = rows.b(r);
        const scalar_t* grow = g.ptr + b * g.stride_b + rows.t(r) * g.stride_t + m0 + mb;
        const int64_t valid = std::min(mbt, m1 - m0 - mb);
        for (int64_t i = 0; i < mbt; i += Bk::MR) {
          A* dst = ap + i * kc + k * Bk::MR;
          for (int64_t j = 0; j < Bk::MR; ++j) dst[j] = i + j < valid ? load(grow[i + j]) : A(0);
        }
        if (with_bias) {
          const A cb = c[b];
          for (int64_t m = 0; m < valid; ++m) bias_buf[mb + m] += cb * load(grow[m]);
        }
      }
      for (int64_t j = 0; j < nt; j += Bk::NR)
        for (int64_t i = 0; i < mbt; i += Bk::MR)
          micro_kernel(ap + i * kc, bp + j * kc, kc, c_buf + (mb + i) * nt + j, nt);
    }
  }
}

}  // namespace

template <typename scalar_t>
void clipped_sum(Operand3d<scalar_t> a, Operand3d<scalar_t> g, const out_t<scalar_t>* c,
                 out_t<scalar_t>* grad_weight, out_t<scalar_t>* grad_bias, int64_t B, int64_t T,
                 int64_t d, int64_t p) {
  using A = out_t<scalar_t>;
  using Bk = Blocking<A>;
  const int64_t K = B * T;
  if (K == 0 || p == 0) return;
  // Work items span up to kMaxGroup blocks of MC rows, so that a packed block of a serves
  // several; fewer when that would leave threads idle. With fewer than two items per
  // thread, K is split too (partial sums added under a lock), keeping splits >= 2 KC rows.
  constexpr int64_t kMaxGroup = 4;
  const int64_t threads = max_threads();
  const int64_t m_blocks = (p + Bk::MC - 1) / Bk::MC;
  const int64_t n_tiles = std::max<int64_t>(1, (d + Bk::NC - 1) / Bk::NC);  // d=0: bias only
  const int64_t kGroup = std::clamp<int64_t>(m_blocks * n_tiles / (2 * threads), 1, kMaxGroup);
  const int64_t m_tiles = (m_blocks + kGroup - 1) / kGroup;
  const int64_t tiles = m_tiles * n_tiles;
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>((2 * threads + tiles - 1) / tiles, K / (2 * Bk::KC)));
  const int64_t k_step = round_up((K + splits - 1) / splits, Bk::KC);
#pragma omp parallel
  {
    A* const c_buf = scratch<A, 0>(kGroup * Bk::MC * Bk::NC);
    A* const ap = scratch<A, 1>(Bk::MC * Bk::KC);
    A* const bp = scratch<A, 2>(Bk::KC * Bk::NC);
    A* const bias_buf = scratch<A, 3>(kGroup * Bk::MC);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < tiles * splits; ++item) {
      const int64_t tile_id = item / splits, split = item % splits;
      const int64_t m0 = (tile_id / n_tiles) * kGroup * Bk::MC, m1 = std::min(p, m0 + kGroup * Bk::MC);
      const int64_t n0 = (tile_id % n_tiles) * Bk::NC, n1 = std::min(d, n0 + Bk::NC);
      const int64_t k0 = split * k_step, k1 = std::min(K, k0 + k_step);
      if (k0 >= k1) continue;
      // The bias rows belong to the tiles of the first column block.
      const bool with_bias = grad_bias != nullptr && n0 == 0;
      tile(a, g, c, T, m0, m1, n0, n1, k0, k1, with_bias, c_buf, ap, bp, bias_buf);
      const int64_t nt = round_up(n1 - n0, Bk::NR);
      auto add_result = [&] {
        for (int64_t m = m0; m < m1; ++m) {
          A* out = grad_weight + m * d;
          const A* src = c_buf + (m - m0) * nt;
          for (int64_t n = n0; n < n1; ++n) out[n] += src[n - n0];
        }
        if (with_bias)
          for (int64_t m = m0; m < m1; ++m) grad_bias[m] += bias_buf[m - m0];
      };
      if (splits == 1) {
        add_result();  // tiles are disjoint
      } else {
#pragma omp critical(bk_clipped_sum_add)
        add_result();
      }
    }
  }
}

template <typename scalar_t>
void direct_norm_gemm(Operand3d<scalar_t> a, Operand3d<scalar_t> g, out_t<scalar_t>* out, int64_t B,
                      int64_t T, int64_t d, int64_t p) {
  using A = out_t<scalar_t>;
  using Bk = Blocking<A>;
  const int64_t m_tiles = std::max<int64_t>(1, (p + Bk::MC - 1) / Bk::MC);
  const int64_t n_tiles = std::max<int64_t>(1, (d + Bk::NC - 1) / Bk::NC);
  const int64_t per_example = m_tiles * n_tiles;
  std::vector<double> partial(size_t(B * per_example), 0.0);  // summed in order: deterministic
  const std::vector<A> ones(size_t(B), A(1));
#pragma omp parallel
  {
    A* const c_buf = scratch<A, 0>(Bk::MC * Bk::NC);
    A* const ap = scratch<A, 1>(Bk::MC * Bk::KC);
    A* const bp = scratch<A, 2>(Bk::KC * Bk::NC);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * per_example; ++item) {
      const int64_t b = item / per_example, t_id = item % per_example;
      const int64_t m0 = (t_id / n_tiles) * Bk::MC, m1 = std::min(p, m0 + Bk::MC);
      const int64_t n0 = (t_id % n_tiles) * Bk::NC, n1 = std::min(d, n0 + Bk::NC);
      if (m0 >= m1 || n0 >= n1 || T == 0) continue;
      tile(a, g, ones.data(), T, m0, m1, n0, n1, b * T, (b + 1) * T, false, c_buf, ap, bp, nullptr);
      // The padding of the tile is zero (zero-filled packs), so the whole buffer can be summed.
      const int64_t n = round_up(m1 - m0, Bk::MR) * round_up(n1 - n0, Bk::NR);
      double total = 0;
      for (int64_t e = 0; e < n; ++e) total += double(c_buf[e]) * double(c_buf[e]);
      partial[size_t(item)] = total;
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    double total = 0;
    for (int64_t i = 0; i < per_example; ++i) total += partial[size_t(b * per_example + i)];
    out[b] = out_t<scalar_t>(total);
  }
}

#define BK_INSTANTIATE(S)                                                                       \
  template void clipped_sum<S>(Operand3d<S>, Operand3d<S>, const out_t<S>*, out_t<S>*, out_t<S>*, \
                               int64_t, int64_t, int64_t, int64_t);                         \
  template void direct_norm_gemm<S>(Operand3d<S>, Operand3d<S>, out_t<S>*, int64_t, int64_t,    \
                                    int64_t, int64_t);
BK_INSTANTIATE(float)
BK_INSTANTIATE(double)
BK_INSTANTIATE(bf16)
BK_INSTANTIATE(fp16)
#undef BK_INSTANTIATE

}  // namespace cpu
}  // namespace bk
