// CPU kernel of the norm-layer op (see norm_layer_kernels.h).
//
// Work items are (example, block of channels); each owns its outputs gw/gb[b, block] and one
// partial of sq_norms[b], summed afterwards in block order. The blocks are fixed, so the
// summation order (and the result) is the same for any number of threads.
#include "cpu/norm_layer_kernels.h"

#include <algorithm>
#include <vector>

#include "cpu/lowp.h"

namespace bk {
namespace cpu {
namespace {

using lowp::load;

// Row path: channels per item, and positions per inner partial sum.
constexpr int64_t kRowChannels = 128;
constexpr int64_t kRowPositions = 64;
// Channel path: channels per item; positions are summed in kLanes partial sums, each over
// kColPositions / kLanes positions before being added to the running total.
constexpr int64_t kColChannels = 8;
constexpr int64_t kLanes = 16;
constexpr int64_t kColPositions = 64 * kLanes;

// Below this many elements, threads cost more than they save: one thread does it all.
constexpr int64_t kParallelMin = int64_t(1) << 15;
// Channel path: at least this many elements per item. With few positions (GroupNorm on ResNet's
// 2x2 maps at CIFAR's 32 x 32: T = 4) items of kColChannels channels held 32 elements each, and
// scheduling 1024 of them cost 12x the sums (0.31 ms against 0.025 ms for the same [32, 4, 256]
// laid out channels last, 2-core AMD EPYC).
constexpr int64_t kColItemElements = 4096;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channels [c0, c0 + n) of example b, position by position. Contig: stride_c == 1 for both.
template <bool Contig, bool Bias, typename scalar_t, typename A>
double rows_block(const Strided3d<scalar_t>& x, const Strided3d<scalar_t>& g, int64_t b,
                  int64_t c0, int64_t n, int64_t T, A* gw, A* gb) {
  A w_out[kRowChannels] = {}, b_out[kRowChannels] = {};
  A w_in[kRowChannels], b_in[kRowChannels];
  const int64_t xsc = Contig ? 1 : x.stride_c, gsc = Contig ? 1 : g.stride_c;
  const scalar_t* xb = x.ptr + b * x.stride_b + c0 * x.stride_c;
  const scalar_t* gbase = g.ptr + b * g.stride_b + c0 * g.stride_c;
  for (int64_t t0 = 0; t0 < T; t0 += kRowPositions) {
    std::fill(w_in, w_in + n, A(0));
    if (Bias) std::fill(b_in, b_in + n, A(0));
    for (int64_t t = t0; t < std::min(T, t0 + kRowPositions); ++t) {
      const scalar_t* xr = xb + t * x.stride_t;
      const scalar_t* gr = gbase + t * g.stride_t;
      for (int64_t k = 0; k < n; ++k) {
        const A gv = load(gr[k * gsc]);
        w_in[k] += load(xr[k * xsc]) * gv;
        if (Bias) b_in[k] += gv;
      }
    }
    for (int64_t k = 0; k < n; ++k) w_out[k] += w_in[k];
    if (Bias)
      for (int64_t k = 0; k < n; ++k) b_out[k] += b_in[k];
  }
  double sq = 0;
  for (int64_t k = 0; k < n; ++k) {
    gw[k] = w_out[k];
    sq += double(w_out[k]) * w_out[k];
    if (Bias) {
      gb[k] = b_out[k];
      sq += double(b_out[k]) * b_out[k];
    }
  }
  return sq;
}

// Channels [c0, c0 + n) of example b, each summed along its contiguous positions
// (stride_t == 1 for both operands).
template <bool Bias, typename scalar_t, typename A>
double columns_block(const Strided3d<scalar_t>& x, const Strided3d<scalar_t>& g, int64_t b,
                     int64_t c0, int64_t n, int64_t T, A* gw, A* gb) {
  double sq = 0;
  for (int64_t k = 0; k < n; ++k) {
    const scalar_t* xc = x.ptr + b * x.stride_b + (c0 + k) * x.stride_c;
    const scalar_t* gc = g.ptr + b * g.stride_b + (c0 + k) * g.stride_c;
    if (T < kLanes) {  // few positions (a small map): one running sum, no lanes to set up and fold
      A w = 0, s = 0;
      for (int64_t t = 0; t < T; ++t) {
        const A gv = load(gc[t]);
        w += load(xc[t]) * gv;
        if (Bias) s += gv;
      }
      gw[k] = w;
      sq += double(w) * w;
      if (Bias) {
        gb[k] = s;
        sq += double(s) * s;
      }
      continue;
    }
    A w_out[kLanes] = {}, b_out[kLanes] = {};
    for (int64_t t0 = 0; t0 < T; t0 += kColPositions) {
      const int64_t t1 = std::min(T, t0 + kColPositions);
      A w_in[kLanes] = {}, b_in[kLanes] = {};
      int64_t t = t0;
      for (; t + kLanes <= t1; t += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) {
          const A gv = load(gc[t + j]);
          w_in[j] += load(xc[t + j]) * gv;
          if (Bias) b_in[j] += gv;
        }
      for (int64_t j = 0; t + j < t1; ++j) {
        const A gv = load(gc[t + j]);
        w_in[j] += load(xc[t + j]) * gv;
        if (Bias) b_in[j] += gv;
      }
      for (int64_t j = 0; j < kLanes; ++j) {
        w_out[j] += w_in[j];
        if (Bias) b_out[j] += b_in[j];
      }
    }
    double w = 0, s = 0;
    for (int64_t j = 0; j < kLanes; ++j) {
      w += w_out[j];
      if (Bias) s += b_out[j];
    }
    gw[k] = A(w);
    sq += double(A(w)) * A(w);
    if (Bias) {
      gb[k] = A(s);
      sq += double(A(s)) * A(s);
    }
  }
  return sq;
}

template <bool Bias, typename scalar_t>
void run(Strided3d<scalar_t> x, Strided3d<scalar_t> g, out_t<scalar_t>* gw, out_t<scalar_t>* gb,
         out_t<scalar_t>* sq_norms, int64_t B, int64_t T, int64_t C) {
  const bool channel_major = T > 1 && x.stride_t == 1 && g.stride_t == 1;
  const bool rows_contiguous = x.stride_c == 1 && g.stride_c == 1;
  const int64_t block = channel_major
                            ? std::max(kColChannels, std::min(C, ceil_div(kColItemElements, T)))
                            : kRowChannels;
  const int64_t n_blocks = std::max<int64_t>(1, ceil_div(C, block));
  std::vector<double> partial(size_t(B * n_blocks), 0.0);
#pragma omp parallel for schedule(dynamic, 1) if (B * T * C >= kParallelMin)
  for (int64_t item = 0; item < B * n_blocks; ++item) {
    const int64_t b = item / n_blocks, c0 = (item % n_blocks) * block;
    const int64_t n = std::min(block, C - c0);
    if (n <= 0) continue;
    auto* w_out = gw + b * C + c0;
    auto* b_out = Bias ? gb + b * C + c0 : nullptr;
    if (channel_major)
      partial[item] = columns_block<Bias>(x, g, b, c0, n, T, w_out, b_out);
    else if (rows_contiguous)
      partial[item] = rows_block<true, Bias>(x, g, b, c0, n, T, w_out, b_out);
    else
      partial[item] = rows_block<false, Bias>(x, g, b, c0, n, T, w_out, b_out);
  }
  for (int64_t b = 0; b < B; ++b) {
    double total = 0;
    for (int64_t blk = 0; blk < n_blocks; ++blk) total += partial[b * n_blocks + blk];
    sq_norms[b] = out_t<scalar_t>(total);
  }
}

}  // namespace

template <typename scalar_t>
void norm_layer_grads(Strided3d<scalar_t> xhat, Strided3d<scalar_t> g, out_t<scalar_t>* gw,
                      out_t<scalar_t>* gb, out_t<scalar_t>* sq_norms, int64_t B, int64_t T,
                      int64_t C) {
  if (gb)
    run<true>(xhat, g, gw, gb, sq_norms, B, T, C);
  else
    run<false>(xhat, g, gw, gb, sq_norms, B, T, C);
}

#define BK_INSTANTIATE(S)                                                                   \
  template void norm_layer_grads<S>(Strided3d<S>, Strided3d<S>, out_t<S>*, out_t<S>*,       \
                                    out_t<S>*, int64_t, int64_t, int64_t);
BK_INSTANTIATE(float)
BK_INSTANTIATE(double)
BK_INSTANTIATE(bf16)
BK_INSTANTIATE(fp16)
#undef BK_INSTANTIATE

}  // namespace cpu
}  // namespace bk
