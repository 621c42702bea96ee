// CPU kernels of the embedding ops (see embedding_kernels.h).
//
// Work is split into (group of positions, block of kBlock columns) items. The blocks are
// fixed (columns [k0, k0 + kBlock)), and each item sums its positions in a fixed order, so
// the results are bit-identical whatever the number of threads: parallelism only decides
// which thread computes an item, never how. The column blocks also let B = 1, or a single
// repeated id, use every core.
#include "cpu/embedding_kernels.h"

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/lowp.h"

namespace bk {
namespace cpu {
namespace {

using lowp::load;

template <typename scalar_t>
using acc_t = out_t<scalar_t>;

// Columns per work item: a multiple of the widest vector, a few rows of g per cache line run.
constexpr int64_t kBlock = 128;
// Below this many elements of g, threads cost more than they save: one thread does it all.
constexpr int64_t kParallelMin = int64_t(1) << 15;
// Lanes of the partial sums of squares (so that the compiler keeps them in vector registers).
constexpr int64_t kLanes = 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// sum_k x[k]^2 over n elements, in kLanes partial sums.
template <typename A>
inline double sum_squares(const A* x, int64_t n) {
  A part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) part[j] += x[k + j] * x[k + j];
  for (int64_t j = 0; k + j < n; ++j) part[j] += x[k + j] * x[k + j];
  double total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += part[j];
  return total;
}

template <typename A, typename scalar_t>
inline double sum_squares_of_row(const scalar_t* row, int64_t n) {
  A part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const A x = load(row[k + j]);
      part[j] += x * x;
    }
  for (int64_t j = 0; k + j < n; ++j) {
    const A x = load(row[k + j]);
    part[j] += x * x;
  }
  double total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += part[j];
  return total;
}

}  // namespace

template <typename id_t, typename scalar_t>
void embedding_norm(Ids2d<id_t> ids, Operand3d<scalar_t> g, out_t<scalar_t>* out, int64_t B,
                    int64_t T, int64_t d, Padding padding) {
  using A = acc_t<scalar_t>;
  if (B == 0) return;
  // 1. Per example, the non-padding positions sorted by (id, t): order[b*T .. b*T + kept[b]),
  //    with new_run marking where a new id starts.
  std::vector<int64_t> order(static_cast<size_t>(B * T));
  std::vector<uint8_t> new_run(static_cast<size_t>(B * T));
  std::vector<int64_t> kept(static_cast<size_t>(B));
#pragma omp parallel if (B * T * d >= kParallelMin)
  {
    std::vector<std::pair<int64_t, int64_t>> keys;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      keys.clear();
      for (int64_t t = 0; t < T; ++t) {
        const int64_t id = int64_t(ids.ptr[b * ids.stride_b + t * ids.stride_t]);
        if (!padding.skips(id)) keys.emplace_back(id, t);
      }
      std::sort(keys.begin(), keys.end());
      kept[b] = int64_t(keys.size());
      for (size_t i = 0; i < keys.size(); ++i) {
        order[b * T + i] = keys[i].second;
        new_run[b * T + i] = i == 0 || keys[i].first != keys[i - 1].first;
      }
    }
  }
  // 2. Per (example, column block): the square-summed run sums of its columns.
  const int64_t n_blocks = std::max<int64_t>(1, ceil_div(d, kBlock));
  std::vector<double> partial(size_t(B * n_blocks), 0.0);
#pragma omp parallel if (B * T * d >= kParallelMin)
  {
    std::vector<A> run_sum(kBlock);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * n_blocks; ++item) {
      const int64_t b = item / n_blocks, k0 = (item % n_blocks) * kBlock;
      const int64_t n = std::min(kBlock, d - k0);
      const scalar_t* base = g.ptr + b * g.stride_b + k0;
      const int64_t* ord = order.data() + b * T;
      const uint8_t* starts = new_run.data() + b * T;
      double total = 0;
      for (int64_t i = 0; i < kept[b];) {
        int64_t j = i + 1;  // positions ord[i .. j) share one id
        while (j < kept[b] && !starts[j]) ++j;
        const scalar_t* first = base + ord[i] * g.stride_t;
        if (j == i + 1) {  // an id seen once (the common case): its row's own square norm
          total += sum_squares_of_row<A>(first, n);
        } else {
          for (int64_t k = 0; k < n; ++k) run_sum[k] = load(first[k]);
          for (int64_t r = i + 1; r < j; ++r) {
            const scalar_t* row = base + ord[r] * g.stride_t;
            for (int64_t k = 0; k < n; ++k) run_sum[k] += load(row[k]);
          }
          total += sum_squares(run_sum.data(), n);
        }
        i = j;
      }
      partial[item] = total;
    }
  }
  // 3. Blocks summed in column order.
  for (int64_t b = 0; b < B; ++b) {
    double total = 0;
    for (int64_t blk = 0; blk < n_blocks; ++blk) total += partial[b * n_blocks + blk];
    out[b] = out_t<scalar_t>(total);
  }
}

template <typename id_t>
int64_t embedding_segments(Ids2d<id_t> ids, int64_t B, int64_t T, int64_t V, Padding padding,
                           EmbeddingSegments* segs) {
  const int64_t N = B * T;
  segs->count = 0;
  segs->starts[0] = 0;
  if (V <= 8 * N + 4096) {
    // Counting sort, O(N + V): counts per id, their prefix sums, then a stable scatter.
    std::vector<int64_t> offset(size_t(V) + 1, 0);
    for (int64_t p = 0; p < N; ++p) {
      const int64_t id = int64_t(ids.ptr[(p / T) * ids.stride_b + (p % T) * ids.stride_t]);
      if (padding.skips(id)) continue;
      if (id < 0 || id >= V) return p;
      ++offset[id + 1];
    }
    for (int64_t v = 0; v < V; ++v) {
      if (offset[v + 1] > 0) {
        segs->ids_of[segs->count] = v;
        segs->starts[segs->count + 1] = segs->starts[segs->count] + offset[v + 1];
        ++segs->count;
      }
      offset[v + 1] += offset[v];
    }
    for (int64_t p = 0; p < N; ++p) {
      const int64_t id = int64_t(ids.ptr[(p / T) * ids.stride_b + (p % T) * ids.stride_t]);
      if (!padding.skips(id)) segs->positions[offset[id]++] = p;
    }
    return -1;
  }
  // A vocabulary much larger than the batch: sort (id, position) pairs, O(N log N).
  std::vector<std::pair<int64_t, int64_t>> keys;
  keys.reserve(size_t(N));
  for (int64_t p = 0; p < N; ++p) {
    const int64_t id = int64_t(ids.ptr[(p / T) * ids.stride_b + (p % T) * ids.stride_t]);
    if (padding.skips(id)) continue;
    if (id < 0 || id >= V) return p;
    keys.emplace_back(id, p);
  }
  std::sort(keys.begin(), keys.end());
  for (size_t i = 0; i < keys.size(); ++i) {
    segs->positions[i] = keys[i].second;
    if (i == 0 || keys[i].first != keys[i - 1].first) {
      segs->ids_of[segs->count] = keys[i].first;
      ++segs->count;
    }
    segs->starts[segs->count] = int64_t(i) + 1;
  }
  return -1;
}

template <typename scalar_t, typename weight_t>
void embedding_clipped_sum(const EmbeddingSegments& segs, Operand3d<scalar_t> g,
                           const out_t<scalar_t>* c, weight_t* grad_weight, int64_t ld, int64_t T,
                           int64_t d) {
  using A = acc_t<scalar_t>;
  // The sum of a weight and an accumulated value: double if either is double.
  using S = std::conditional_t<std::is_same_v<weight_t, double>, double, A>;
  const int64_t n_blocks = ceil_div(d, kBlock);
  const int64_t n_items = segs.count * n_blocks;
#pragma omp parallel if (segs.starts[segs.count] * d >= kParallelMin)
  {
    std::vector<A> acc(kBlock);
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t s = item / n_blocks, k0 = (item % n_blocks) * kBlock;
      const int64_t n = std::min(kBlock, d - k0);
      std::fill(acc.begin(), acc.begin() + n, A(0));
      for (int64_t i = segs.starts[s]; i < segs.starts[s + 1]; ++i) {
        const int64_t p = segs.positions[i], b = p / T, t = p % T;
        const scalar_t* row = g.ptr + b * g.stride_b + t * g.stride_t + k0;
        const A cb = c[b];
        for (int64_t k = 0; k < n; ++k) acc[k] += cb * load(row[k]);
      }
      weight_t* w = grad_weight + segs.ids_of[s] * ld + k0;
      for (int64_t k = 0; k < n; ++k) lowp::store(w + k, S(load(w[k])) + S(acc[k]));
    }
  }
}

#define BK_INSTANTIATE_NORM(I, S)                                                         \
  template void embedding_norm<I, S>(Ids2d<I>, Operand3d<S>, out_t<S>*, int64_t, int64_t, \
                                     int64_t, Padding);
#define BK_INSTANTIATE_SUM(S, W)                                                             \
  template void embedding_clipped_sum<S, W>(const EmbeddingSegments&, Operand3d<S>,          \
                                            const out_t<S>*, W*, int64_t, int64_t, int64_t);
#define BK_INSTANTIATE_FOR(S)  \
  BK_INSTANTIATE_NORM(int32_t, S) \
  BK_INSTANTIATE_NORM(int64_t, S) \
  BK_INSTANTIATE_SUM(S, float)    \
  BK_INSTANTIATE_SUM(S, double)   \
  BK_INSTANTIATE_SUM(S, bf16)     \
  BK_INSTANTIATE_SUM(S, fp16)
BK_INSTANTIATE_FOR(float)
BK_INSTANTIATE_FOR(double)
BK_INSTANTIATE_FOR(bf16)
BK_INSTANTIATE_FOR(fp16)
template int64_t embedding_segments<int32_t>(Ids2d<int32_t>, int64_t, int64_t, int64_t, Padding,
                                             EmbeddingSegments*);
template int64_t embedding_segments<int64_t>(Ids2d<int64_t>, int64_t, int64_t, int64_t, Padding,
                                             EmbeddingSegments*);
#undef BK_INSTANTIATE_FOR
#undef BK_INSTANTIATE_SUM
#undef BK_INSTANTIATE_NORM

}  // namespace cpu
}  // namespace bk
