// CPU kernels of the per-example norm ops (see norms_kernels.h).
//
// Both kernels work one example at a time: the example's rows are packed once into a
// per-thread buffer in the accumulation type (this converts bf16/fp16, absorbs any strides
// and zero-pads to whole tiles), then register-blocked micro-kernels sweep the tiles.
// Examples are spread over threads; with fewer examples than threads, the tiles of one
// example are spread instead, so B=1 still uses every core.
#include "cpu/norms_kernels.h"
#include "cpu/clipped_sum_kernels.h"  // direct_norm_gemm
#include "cpu/simd.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace bk {
namespace cpu {


namespace {

using namespace simd;

template <typename scalar_t>
using acc_t = out_t<scalar_t>;

// Gram tiles are kLanes x kLanes (kLanes: the values of a 64-byte unit); direct-norm
// micro-tiles are kRowsD columns of a times kVecsD 64-byte units of columns of g.
template <typename A>
constexpr int64_t kGram = kLanes<A>;
constexpr int64_t kRowsD = 8;
constexpr int64_t kVecsD = 2;
template <typename A>
constexpr int64_t kColsD = kVecsD * kLanes<A>;

// dst[k * ld + t] = x[t, k] (transposed), zero for t in [T, ld). Done in 16 x 16 blocks so
// that both the reads and the writes stay within a few cache lines at a time.
template <typename scalar_t>
void pack_transposed_scalar(const scalar_t* x, int64_t stride_t, int64_t T, int64_t n, int64_t ld,
                            acc_t<scalar_t>* dst) {
  constexpr int64_t blk = 16;
  for (int64_t k = 0; k < n; ++k) std::fill(dst + k * ld + T, dst + (k + 1) * ld, acc_t<scalar_t>(0));
  for (int64_t t0 = 0; t0 < T; t0 += blk) {
    const int64_t t1 = std::min(T, t0 + blk);
    for (int64_t k0 = 0; k0 < n; k0 += blk) {
      const int64_t k1 = std::min(n, k0 + blk);
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = x + t * stride_t;
        for (int64_t k = k0; k < k1; ++k) dst[k * ld + t] = load(row[k]);
      }
    }
  }
}

// The float32 pack with AVX2 or AVX-512: whole 8 x 8 blocks go through registers (8 row loads,
// 24 shuffles, 8 column stores), the rest element by element. Measured on a 2-core AMD EPYC,
// one thread, ghost_norm of [32, 65, 192 + 768]: the scalar pack alone (tiles skipped) took
// 1.8 ms of 4.6 (~0.9 ns an element), this one 0.6 ms; with the 6-row tile passes below the
// op is 1.05-1.22x faster on the shapes of bench/ (old and new timed in turns in one process).
template <int W>
BK_ALWAYS_INLINE void pack_transposed_f32_impl(const float* x, int64_t stride_t, int64_t T, int64_t n,
                                               int64_t ld, float* dst) {
  if constexpr (W < 32) {
    pack_transposed_scalar(x, stride_t, T, n, ld, dst);
  } else {
    typedef float V8 __attribute__((vector_size(32)));
    typedef int32_t I8 __attribute__((vector_size(32)));
    for (int64_t k = 0; k < n; ++k) std::fill(dst + k * ld + T, dst + (k + 1) * ld, 0.0f);
    const int64_t T8 = T / 8 * 8, n8 = n / 8 * 8;
    for (int64_t t0 = 0; t0 < T8; t0 += 8) {
      for (int64_t k0 = 0; k0 < n8; k0 += 8) {
        V8 r[8], u[8];
        for (int i = 0; i < 8; ++i) std::memcpy(&r[i], x + (t0 + i) * stride_t + k0, sizeof(V8));
        // pairs of rows interleaved, then quads, then the 128-bit halves swapped into place
        for (int i = 0; i < 8; i += 2) {
          u[i] = __builtin_shuffle(r[i], r[i + 1], I8{0, 8, 1, 9, 4, 12, 5, 13});
          u[i + 1] = __builtin_shuffle(r[i], r[i + 1], I8{2, 10, 3, 11, 6, 14, 7, 15});
        }
        for (int i = 0; i < 8; i += 4)
          for (int h = 0; h < 2; ++h) {
            r[i + 2 * h] = __builtin_shuffle(u[i + h], u[i + h + 2], I8{0, 1, 8, 9, 4, 5, 12, 13});
            r[i + 2 * h + 1] = __builtin_shuffle(u[i + h], u[i + h + 2], I8{2, 3, 10, 11, 6, 7, 14, 15});
          }
        // r[0..3]: columns (0, 4), (1, 5), (2, 6), (3, 7) of rows 0-3 in their halves; r[4..7] of rows 4-7
        for (int j = 0; j < 4; ++j) {
          const V8 lo = __builtin_shuffle(r[j], r[j + 4], I8{0, 1, 2, 3, 8, 9, 10, 11});
          const V8 hi = __builtin_shuffle(r[j], r[j + 4], I8{4, 5, 6, 7, 12, 13, 14, 15});
          std::memcpy(dst + (k0 + j) * ld + t0, &lo, sizeof(V8));
          std::memcpy(dst + (k0 + j + 4) * ld + t0, &hi, sizeof(V8));
        }
      }
      for (int64_t t = t0; t < t0 + 8; ++t)  // the columns past the last whole block
        for (int64_t k = n8; k < n; ++k) dst[k * ld + t] = x[t * stride_t + k];
    }
    for (int64_t t = T8; t < T; ++t)  // the rows past the last whole block
      for (int64_t k = 0; k < n; ++k) dst[k * ld + t] = x[t * stride_t + k];
  }
}

BK_SIMD_VERSIONS(void, pack_transposed_f32,
                 (const float* x, int64_t stride_t, int64_t T, int64_t n, int64_t ld, float* dst),
                 pack_transposed_f32_impl, (x, stride_t, T, n, ld, dst))

template <typename scalar_t>
void pack_transposed(const scalar_t* x, int64_t stride_t, int64_t T, int64_t n, int64_t ld,
                     acc_t<scalar_t>* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return pack_transposed_f32(x, stride_t, T, n, ld, dst);
  }
  pack_transposed_scalar(x, stride_t, T, n, ld, dst);
}

// dst[t * ld + k] = x[t, k], zero for k in [n, ld).
template <typename scalar_t>
void pack_rows(const scalar_t* x, int64_t stride_t, int64_t T, int64_t n, int64_t ld,
               acc_t<scalar_t>* dst) {
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* row = x + t * stride_t;
    acc_t<scalar_t>* out = dst + t * ld;
    for (int64_t k = 0; k < n; ++k) out[k] = load(row[k]);
    std::fill(out + n, out + ld, acc_t<scalar_t>(0));
  }
}

// Column panels of width w: dst[q][t][0..w) = x[t, q*w .. q*w + w), zero past column n. One
// tile's operand is then one contiguous [T][w] block: rows of a [T][n] pack lie n apart, and
// n a multiple of 1024 floats put every row in the same L1 set (4 KiB aliasing).
template <typename scalar_t>
void pack_panels(const scalar_t* x, int64_t stride_t, int64_t T, int64_t n, int64_t w,
                 acc_t<scalar_t>* dst) {
  const int64_t panels = round_up(std::max<int64_t>(n, 1), w) / w;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* row = x + t * stride_t;
    for (int64_t q = 0; q < panels; ++q) {
      acc_t<scalar_t>* out = dst + (q * T + t) * w;
      const int64_t valid = std::min(w, n - q * w);
      for (int64_t k = 0; k < valid; ++k) out[k] = load(row[q * w + k]);
      std::fill(out + valid, out + w, acc_t<scalar_t>(0));
    }
  }
}

// acc[i][j] += <x_{s0+i}, x_{t0+j}> for the `rows` tile rows from i0, over the n features of
// the transposed pack xt: [n][ld], `vecs` registers of columns at a time.
template <int W, int rows, int vecs, typename A>
BK_ALWAYS_INLINE void gram_pass(const A* __restrict xt, int64_t n, int64_t ld, int64_t s0, int64_t t0,
                                int64_t i0, A* __restrict acc) {
  constexpr int64_t G = kGram<A>, L = kLanes<A, W>;
  static_assert(G % (vecs * L) == 0, "passes cover the tile's columns");
  for (int64_t c0 = 0; c0 < G; c0 += vecs * L) {
    Vec<A, W> r[rows][vecs];
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t v = 0; v < vecs; ++v) r[i][v] = load_vec<W>(acc + (i0 + i) * G + c0 + v * L);
    for (int64_t k = 0; k < n; ++k) {
      const A* row = xt + k * ld;
      Vec<A, W> cols[vecs];
      for (int64_t v = 0; v < vecs; ++v) cols[v] = load_vec<W>(row + t0 + c0 + v * L);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t v = 0; v < vecs; ++v) r[i][v] += row[s0 + i0 + i] * cols[v];
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t v = 0; v < vecs; ++v) store_vec(acc + (i0 + i) * G + c0 + v * L, r[i][v]);
  }
}

// acc[i][j] += <x_{s0+i}, x_{t0+j}> over the n features of the transposed pack xt: [n][ld],
// for one kGram x kGram Gram tile. With AVX-512 one register per row of the tile (16). With
// AVX2 a float tile goes in passes of 6, 6 and 4 rows by 2 registers (the 8-row tile of a
// double in passes of 4): 12 accumulators cover more of the FMA units' latency than passes of 4
// rows (8 accumulators, as before; T = 128: 1.14x, measured as the pack above). SSE2 takes
// passes of 4 rows by 2 registers. The pack's chunk of features stays in cache across passes,
// and no pass starts past `rows_used` (the pack's zero padding: those rows of acc stay zero).
template <int W, typename A>
BK_ALWAYS_INLINE void gram_tile_acc_impl(const A* __restrict xt, int64_t n, int64_t ld, int64_t s0,
                                         int64_t t0, int64_t rows_used, A* __restrict acc) {
  constexpr int64_t G = kGram<A>;
  if constexpr (W == 64) {
    gram_pass<W, G, 1>(xt, n, ld, s0, t0, 0, acc);
  } else if constexpr (W == 32 && G == 16) {
    // 6, 6, 4 rows; the padded block's used rows by the fewest (4 for up to 4: T = 65's last)
    for (int64_t i0 = 0; i0 < rows_used;) {
      if (rows_used - i0 <= 4 || i0 == 12) {
        gram_pass<W, 4, 2>(xt, n, ld, s0, t0, i0, acc);
        i0 += 4;
      } else {
        gram_pass<W, 6, 2>(xt, n, ld, s0, t0, i0, acc);
        i0 += 6;
      }
    }
  } else {
    static_assert(G % 4 == 0, "passes of 4 rows cover the tile");
    for (int64_t i0 = 0; i0 < std::min(G, rows_used); i0 += 4) gram_pass<W, 4, 2>(xt, n, ld, s0, t0, i0, acc);
  }
}

BK_SIMD_VERSIONS(void, gram_tile_acc,
                 (const float* xt, int64_t n, int64_t ld, int64_t s0, int64_t t0, int64_t rows_used, float* acc),
                 gram_tile_acc_impl, (xt, n, ld, s0, t0, rows_used, acc))
BK_SIMD_VERSIONS(void, gram_tile_acc,
                 (const double* xt, int64_t n, int64_t ld, int64_t s0, int64_t t0, int64_t rows_used,
                  double* acc),
                 gram_tile_acc_impl, (xt, n, ld, s0, t0, rows_used, acc))

// Row-major variant for wide layers, with no transposed pack: the Gram tile of kRowsG x kRowsG
// rows is formed as dot products vectorised along the features, then reduced across lanes.
// x rows s, t start at x + s * ldx (n features), and likewise for y.
constexpr int64_t kRowsG = 4;

// With AVX-512 the whole 4 x 4 block at once (16 accumulators, 8 loads); with 16 registers
// two rows of it at a time.
template <int W, typename A>
BK_ALWAYS_INLINE void gram_rows(const A* __restrict x, int64_t ldx, int64_t n, int64_t s0, int64_t t0,
                                double (&G)[kRowsG][kRowsG]) {
  constexpr int64_t L = kLanes<A, W>, rows = W == 64 ? kRowsG : 2;
  const int64_t full = n / L * L;
  for (int64_t i0 = 0; i0 < kRowsG; i0 += rows) {
    Vec<A, W> acc[rows][kRowsG] = {};
    for (int64_t k = 0; k < full; k += L) {
      Vec<A, W> xs[rows], xt[kRowsG];
      for (int64_t i = 0; i < rows; ++i) xs[i] = load_vec<W>(x + (s0 + i0 + i) * ldx + k);
      for (int64_t j = 0; j < kRowsG; ++j) xt[j] = load_vec<W>(x + (t0 + j) * ldx + k);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < kRowsG; ++j) acc[i][j] += xs[i] * xt[j];
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < kRowsG; ++j) {
        A tail = 0;  // the features past the last whole register
        for (int64_t k = full; k < n; ++k) tail += x[(s0 + i0 + i) * ldx + k] * x[(t0 + j) * ldx + k];
        G[i0 + i][j] = horizontal_sum(acc[i][j]) + double(tail);
      }
  }
}

template <int W, typename A>
BK_ALWAYS_INLINE double gram_product_rows_impl(const A* x, int64_t ldx, int64_t nx, const A* y,
                                               int64_t ldy, int64_t ny, int64_t s0, int64_t t0) {
  double gx[kRowsG][kRowsG], gy[kRowsG][kRowsG];
  gram_rows<W>(x, ldx, nx, s0, t0, gx);
  gram_rows<W>(y, ldy, ny, s0, t0, gy);
  double total = 0;
  for (int64_t i = 0; i < kRowsG; ++i)
    for (int64_t j = 0; j < kRowsG; ++j) total += gx[i][j] * gy[i][j];
  return total;
}

BK_SIMD_VERSIONS(double, gram_product_rows,
                 (const float* x, int64_t ldx, int64_t nx, const float* y, int64_t ldy, int64_t ny,
                  int64_t s0, int64_t t0),
                 gram_product_rows_impl, (x, ldx, nx, y, ldy, ny, s0, t0))
BK_SIMD_VERSIONS(double, gram_product_rows,
                 (const double* x, int64_t ldx, int64_t nx, const double* y, int64_t ldy, int64_t ny,
                  int64_t s0, int64_t t0),
                 gram_product_rows_impl, (x, ldx, nx, y, ldy, ny, s0, t0))

// Sum of squares of the kRowsD x kColsD block x^T y of two column panels, x: [T][kRowsD],
// y: [T][kColsD] (pack_panels). With AVX-512 the block at once (8 x 2 registers); with 16
// registers 4 rows x 2 registers at a time, one pass over the positions each.
template <int W, typename A>
BK_ALWAYS_INLINE double outer_square_tile_impl(const A* __restrict x, const A* __restrict y,
                                               int64_t T) {
  constexpr int64_t L = kLanes<A, W>, rows = W == 64 ? kRowsD : 4, vecs = 2;
  static_assert(kRowsD % rows == 0 && kColsD<A> % (vecs * L) == 0, "passes cover the block");
  Vec<A, W> squares = {};
  for (int64_t i0 = 0; i0 < kRowsD; i0 += rows)
    for (int64_t c0 = 0; c0 < kColsD<A>; c0 += vecs * L) {
      Vec<A, W> w[rows][vecs] = {};
      for (int64_t t = 0; t < T; ++t) {
        const A* xr = x + t * kRowsD + i0;
        const A* yr = y + t * kColsD<A> + c0;
        Vec<A, W> cols[vecs];
        for (int64_t v = 0; v < vecs; ++v) cols[v] = load_vec<W>(yr + v * L);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t v = 0; v < vecs; ++v) w[i][v] += xr[i] * cols[v];
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t v = 0; v < vecs; ++v) squares += w[i][v] * w[i][v];
    }
  return horizontal_sum(squares);
}

BK_SIMD_VERSIONS(double, outer_square_tile, (const float* x, const float* y, int64_t T),
                 outer_square_tile_impl, (x, y, T))
BK_SIMD_VERSIONS(double, outer_square_tile, (const double* x, const double* y, int64_t T),
                 outer_square_tile_impl, (x, y, T))

// Runs `pack(b, workspace)` then `tile(workspace, item)` for every item in [0, n_items) and
// every example b, writing out[b] = sum over items, added in item order either way: threads go
// over examples when there are enough of them, otherwise over the items of one example (sharing
// its packed workspace), whose values are then summed in order. An OpenMP reduction there made
// the sum's rounding depend on which thread took which item: two runs of a one-example batch
// differed in the last bits (session 25, once the row-major kernel took T < 16).
template <typename Acc, typename Out, typename Pack, typename Tile>
void for_each_example(int64_t B, int64_t n_items, size_t workspace_elems, Out* out, Pack pack,
                      Tile tile) {
  if (B >= max_threads()) {
#pragma omp parallel
    {
      Acc* const ws = scratch<Acc>(workspace_elems);
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b) {
        pack(b, ws);
        double total = 0;
        for (int64_t item = 0; item < n_items; ++item) total += tile(ws, item);
        out[b] = Out(total);
      }
    }
  } else {
    Acc* const ws = scratch<Acc>(workspace_elems);
    std::vector<double> values(static_cast<size_t>(n_items));
    for (int64_t b = 0; b < B; ++b) {
      pack(b, ws);
      const Acc* packed = ws;
#pragma omp parallel for schedule(dynamic, 1)
      for (int64_t item = 0; item < n_items; ++item) values[size_t(item)] = tile(packed, item);
      double total = 0;
      for (const double v : values) total += v;
      out[b] = Out(total);
    }
  }
}

}  // namespace

// Layers much wider than long take the row-major Gram kernel (fed by a plain row copy); the
// others the transposed pack, whose micro-kernel needs no reductions across lanes but whose
// pack costs about as much as the Gram work when T is small. The split was measured with
// bench/run.py on this project's 2-core AVX-512 machine (README). Fewer positions than a Gram
// tile's side (`tile`) take the row-major kernel whatever the widths: the transposed one pads
// them to a whole tile and packs and sums it per example. Grouped convolutions' rows (RegNet:
// [B * groups, 4, 72] with [B * groups, 4, 8]) took 1.13 ms that way and 0.17 ms by rows; T = 2
// to 12 with one of d, p at most 16 times T, 0.2-0.8x (2-core AVX2 EPYC, session 25); at T = 16,
// 1.4x the transposed kernel's time.
inline bool ghost_rows_kernel(int64_t T, int64_t d, int64_t p, int64_t tile) {
  static const int64_t ratio = [] {
    const char* env = std::getenv("BK_GHOST_ROWS_RATIO");  // for benchmarking the split
    return env ? std::atoll(env) : int64_t(8);
  }();
  return std::min(d, p) >= ratio * T || T < tile;
}

// The transposed path keeps every Gram tile of an example (about T*T values per thread: a
// T x T Gram per thread, never per example of the batch) so that it can sweep the features
// in cache-sized chunks; past this many values it takes the row-major path instead.
constexpr int64_t kMaxGramValues = int64_t(1) << 23;
// Features per chunk of the transposed pack.
constexpr int64_t kFeatureChunk = 128;
// direct_norm: the columns of a that one block of row tiles covers, in bytes (L2-sized with a
// tile of g beside it).
constexpr int64_t kDirectBlockBytes = int64_t(128) << 10;

// Upper-triangular block pairs (s <= t) of nb blocks, row by row.
inline std::vector<std::pair<int64_t, int64_t>> block_pairs(int64_t nb) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t s = 0; s < nb; ++s)
    for (int64_t t = s; t < nb; ++t) pairs.emplace_back(s, t);
  return pairs;
}

template <typename scalar_t>
void ghost_norm_rows(Operand3d<scalar_t> a, Operand3d<scalar_t> g, out_t<scalar_t>* out, int64_t B,
                     int64_t T, int64_t d, int64_t p) {
  using A = acc_t<scalar_t>;
  const int64_t nb = round_up(std::max<int64_t>(T, 1), kRowsG) / kRowsG;
  const int64_t ld = nb * kRowsG;  // positions, zero-padded to whole tiles
  const auto pairs = block_pairs(nb);
  const size_t ws = size_t(ld) * size_t(d + p);
  for_each_example<A>(
      B, int64_t(pairs.size()), ws, out,
      [&](int64_t b, A* w) {  // [ld][d] then [ld][p], rows past T zero
        pack_rows(a.ptr + b * a.stride_b, a.stride_t, T, d, d, w);
        std::fill(w + T * d, w + ld * d, A(0));
        A* wg = w + ld * d;
        pack_rows(g.ptr + b * g.stride_b, g.stride_t, T, p, p, wg);
        std::fill(wg + T * p, wg + ld * p, A(0));
      },
      [&](const A* w, int64_t item) {
        const auto [s, t] = pairs[item];
        const double v = gram_product_rows(w, d, d, w + ld * d, p, p, s * kRowsG, t * kRowsG);
        return s == t ? v : 2 * v;  // off-diagonal blocks stand for their mirror image too
      });
}

// Transposed path: for each example, the features of a (then g) are packed kFeatureChunk at a
// time as [chunk][positions] and every Gram tile accumulates over the chunk while it is in
// cache; then the two sets of tiles are multiplied and summed.
template <typename scalar_t>
void ghost_norm_transposed(Operand3d<scalar_t> a, Operand3d<scalar_t> g, out_t<scalar_t>* out,
                           int64_t B, int64_t T, int64_t d, int64_t p) {
  using A = acc_t<scalar_t>;
  constexpr int64_t tile = kGram<A>, tile2 = tile * tile;
  const int64_t nb = round_up(std::max<int64_t>(T, 1), tile) / tile;
  // The pack's row length, one 64-byte unit longer when a multiple of 1 KiB: the tiles read it
  // down its rows, and rows a power of two apart share a few L1 sets (the narrower-register
  // bodies read them once per pass).
  const int64_t ld = nb * tile + ((nb * tile * int64_t(sizeof(A))) % 1024 == 0 ? tile : 0);
  const auto pairs = block_pairs(nb);
  const int64_t n_pairs = int64_t(pairs.size());
  // A pair with the last block, whose rows past T are padding, takes it as its row block:
  // the kernel then skips the padded rows' passes (T = 65, ViT's 64 patches and a class
  // token, pads to 80: a quarter of the work). Its tile is then the transposed one, in a's
  // Gram and in g's alike, so their elementwise product sums to the same value.
  const int64_t last_rows = T - (nb - 1) * tile;
  auto tile_rows = [&](int64_t item) {  // (row block, column block, rows used) of a pair
    const auto [s, t] = pairs[item];
    return t == nb - 1 ? std::make_tuple(t, s, last_rows) : std::make_tuple(s, t, tile);
  };
  // One example: Gram tiles of a into ga, of g into gg, then sum_pairs w * <ga, gg>.
  auto example = [&](int64_t b, A* pack, A* ga, A* gg, bool parallel_tiles) {
    std::fill(ga, ga + n_pairs * tile2, A(0));
    std::fill(gg, gg + n_pairs * tile2, A(0));
    const Operand3d<scalar_t> operands[2] = {a, g};
    const int64_t widths[2] = {d, p};
    A* grams[2] = {ga, gg};
    for (int which = 0; which < 2; ++which) {
      const Operand3d<scalar_t>& x = operands[which];
      for (int64_t k0 = 0; k0 < widths[which]; k0 += kFeatureChunk) {
        const int64_t kc = std::min(kFeatureChunk, widths[which] - k0);
        pack_transposed(x.ptr + b * x.stride_b + k0, x.stride_t, T, kc, ld, pack);
        A* gram = grams[which];
#pragma omp parallel for schedule(static) if (parallel_tiles)
        for (int64_t item = 0; item < n_pairs; ++item) {
          const auto [rs, cs, rows_used] = tile_rows(item);
          gram_tile_acc(pack, kc, ld, rs * tile, cs * tile, rows_used, gram + item * tile2);
        }
      }
    }
    double total = 0;
    for (int64_t item = 0; item < n_pairs; ++item) {
      A r = 0;
      const A* x = ga + item * tile2;
      const A* y = gg + item * tile2;
      for (int64_t e = 0; e < tile2; ++e) r += x[e] * y[e];
      total += pairs[item].first == pairs[item].second ? double(r) : 2 * double(r);
    }
    return total;
  };
  const size_t pack_size = size_t(kFeatureChunk) * size_t(ld), gram_size = size_t(n_pairs * tile2);
  if (B >= max_threads()) {
#pragma omp parallel
    {
      A *const pack = scratch<A, 0>(pack_size), *const ga = scratch<A, 1>(gram_size),
              *const gg = scratch<A, 2>(gram_size);
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < B; ++b) out[b] = out_t<scalar_t>(example(b, pack, ga, gg, false));
    }
  } else {
    A *const pack = scratch<A, 0>(pack_size), *const ga = scratch<A, 1>(gram_size),
            *const gg = scratch<A, 2>(gram_size);
    for (int64_t b = 0; b < B; ++b) out[b] = out_t<scalar_t>(example(b, pack, ga, gg, true));
  }
}

// sum_k x_k^2 of one contiguous row, in four vector accumulators: a single scalar accumulator
// is one dependent add per element (measured 2.5x slower on [64, 784 + 512]).
template <int W, typename A>
BK_ALWAYS_INLINE double row_square_sum_impl(const A* __restrict x, int64_t n) {
  constexpr int64_t L = kLanes<A, W>;
  Vec<A, W> s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t k = 0;
  for (; k + 4 * L <= n; k += 4 * L) {
    const Vec<A, W> v0 = load_vec<W>(x + k), v1 = load_vec<W>(x + k + L),
                    v2 = load_vec<W>(x + k + 2 * L), v3 = load_vec<W>(x + k + 3 * L);
    s0 += v0 * v0;
    s1 += v1 * v1;
    s2 += v2 * v2;
    s3 += v3 * v3;
  }
  for (; k + L <= n; k += L) {
    const Vec<A, W> v = load_vec<W>(x + k);
    s0 += v * v;
  }
  A tail = 0;
  for (; k < n; ++k) tail += x[k] * x[k];
  return horizontal_sum((s0 + s1) + (s2 + s3)) + double(tail);
}
BK_SIMD_VERSIONS(double, row_square_sum, (const float* x, int64_t n), row_square_sum_impl, (x, n))
BK_SIMD_VERSIONS(double, row_square_sum, (const double* x, int64_t n), row_square_sum_impl, (x, n))
template <typename scalar_t>
double row_square_sum(const scalar_t* x, int64_t n) {  // bf16 / fp16: converted element by element
  acc_t<scalar_t> total = 0;
  for (int64_t k = 0; k < n; ++k) total += load(x[k]) * load(x[k]);
  return double(total);
}

// T = 1 (a linear layer on [B, d] inputs): ||a_b g_b^T||^2 = ||a_b||^2 ||g_b||^2, no tiles.
template <typename scalar_t>
void one_position_norm(Operand3d<scalar_t> a, Operand3d<scalar_t> g, out_t<scalar_t>* out, int64_t B,
                       int64_t d, int64_t p) {
#pragma omp parallel for schedule(static) if (B * (d + p) > (1 << 15))
  for (int64_t b = 0; b < B; ++b)
    out[b] = out_t<scalar_t>(row_square_sum(a.ptr + b * a.stride_b, d) * row_square_sum(g.ptr + b * g.stride_b, p));
}

template <typename scalar_t>
void ghost_norm(Operand3d<scalar_t> a, Operand3d<scalar_t> g, out_t<scalar_t>* out, int64_t B,
                int64_t T, int64_t d, int64_t p) {
  using A = acc_t<scalar_t>;
  if (T == 1) return one_position_norm(a, g, out, B, d, p);
  const int64_t nb = round_up(std::max<int64_t>(T, 1), kGram<A>) / kGram<A>;
  const int64_t gram_values = nb * (nb + 1) / 2 * kGram<A> * kGram<A>;
  if (ghost_rows_kernel(T, d, p, kGram<A>) || gram_values > kMaxGramValues)
    ghost_norm_rows(a, g, out, B, T, d, p);
  else
    ghost_norm_transposed(a, g, out, B, T, d, p);
}

// Long layers whose g (one example) overflows the caches: the blocked kernel below streams g
// from memory once per block of a (about d*T/8192 times); the GEMM's KC blocking streams it
// once. Measured on this project's 2-core machine (commit message): (B,T,d,p) = (8,512,256,
// 50257) 1.89 s -> 1.35 s, (4,1024,1024,4096) 1.16 s -> 0.44 s; (8,256,1024,4096) a tie;
// shorter or narrower layers 20-30% faster in the kernel.
inline bool direct_by_gemm(int64_t T, int64_t p, size_t elem_bytes) {
  return T >= 256 && T * p * int64_t(elem_bytes) > (int64_t(8) << 20);
}

template <typename scalar_t>
void direct_norm(Operand3d<scalar_t> a, Operand3d<scalar_t> g, out_t<scalar_t>* out, int64_t B,
                 int64_t T, int64_t d, int64_t p) {
  using A = acc_t<scalar_t>;
  if (T == 1) return one_position_norm(a, g, out, B, d, p);
  if (direct_by_gemm(T, p, sizeof(A))) return direct_norm_gemm(a, g, out, B, T, d, p);
  const int64_t ldx = round_up(std::max<int64_t>(d, 1), kRowsD);
  const int64_t ldy = round_up(std::max<int64_t>(p, 1), kColsD<A>);
  const int64_t n_j = ldx / kRowsD, n_k = ldy / kColsD<A>;
  // Items go block of columns of a (at most kDirectBlockBytes of it), then column tile of g,
  // then the row tiles of the block: one tile of g (T x kColsD) stays in L2 while the block of
  // a sweeps it, so g streams from memory once per block, not once per row tile (wide layers:
  // p = 50257 made that 64 sweeps of 100 MB per example).
  const int64_t column_bytes = std::max<int64_t>(T, 1) * kRowsD * int64_t(sizeof(A));
  const int64_t per_block = std::clamp<int64_t>(kDirectBlockBytes / column_bytes, 1, n_j);
  const int64_t n_blocks = (n_j + per_block - 1) / per_block;
  const size_t ws = size_t(T) * size_t(ldx + ldy);
  for_each_example<A>(
      B, n_blocks * n_k * per_block, ws, out,
      [&](int64_t b, A* w) {  // panels of kRowsD columns of a, then of kColsD columns of g
        pack_panels(a.ptr + b * a.stride_b, a.stride_t, T, d, kRowsD, w);
        pack_panels(g.ptr + b * g.stride_b, g.stride_t, T, p, kColsD<A>, w + T * ldx);
      },
      [&](const A* w, int64_t item) {
        const int64_t block = item / (n_k * per_block), rest = item % (n_k * per_block);
        const int64_t j = block * per_block + rest % per_block, k = rest / per_block;
        if (j >= n_j) return 0.0;  // past the last (partial) block
        return outer_square_tile(w + j * T * kRowsD, w + T * ldx + k * T * kColsD<A>, T);
      });
}

#define BK_INSTANTIATE(S)                                                                  \
  template void ghost_norm<S>(Operand3d<S>, Operand3d<S>, out_t<S>*, int64_t, int64_t,     \
                              int64_t, int64_t);                                           \
  template void direct_norm<S>(Operand3d<S>, Operand3d<S>, out_t<S>*, int64_t, int64_t,    \
                               int64_t, int64_t);
BK_INSTANTIATE(float)
BK_INSTANTIATE(double)
BK_INSTANTIATE(bf16)
BK_INSTANTIATE(fp16)
#undef BK_INSTANTIATE

}  // namespace cpu
}  // namespace bk
