// Raw CPU kernels of the embedding ops (no torch headers; torch wrappers: embedding.cpp).
//
// An embedding layer with weight [V, d] looks up ids [B, T]; with g [B, T, d] the gradient of
// its output, example b's weight gradient has row v = sum_{t: ids[b,t] = v} g[b,t]. Both ops
// group positions by id instead of forming that [V, d] gradient (or a one-hot [B, T, V]).
#pragma once
#include <cstdint>

#include "cpu/common.h"  // bf16, fp16, Operand3d, out_t

namespace bk {
namespace cpu {

// Element (b, t) of an ids [B, T] tensor is ptr[b * stride_b + t * stride_t].
template <typename id_t>
struct Ids2d {
  const id_t* ptr;
  int64_t stride_b;
  int64_t stride_t;
};

// Positions whose id equals padding_idx are skipped (torch's embedding gives them no
// gradient); has_padding = false skips nothing.
struct Padding {
  bool has_padding;
  int64_t padding_idx;
  bool skips(int64_t id) const { return has_padding && id == padding_idx; }
};

// out[b] = sum_{s,t} [ids_s = ids_t, not padding] <g_s, g_t> = ||example b's weight grad||^2.
// g: [B, T, d] with its last dimension contiguous. Per example: sort (id, t) pairs, sum g over
// each run of equal ids, square-sum the run sums: O(T log T + T d); extra memory O(B T).
// The summation order is fixed, so the result does not depend on the thread count.
template <typename id_t, typename scalar_t>
void embedding_norm(Ids2d<id_t> ids, Operand3d<scalar_t> g, out_t<scalar_t>* out, int64_t B,
                    int64_t T, int64_t d, Padding padding);

// Positions (b, t) of the non-padding ids, ordered by (id, b, t), with the runs of equal ids
// ("segments"): the plan of a clipped sum.
struct EmbeddingSegments {
  // flat positions b * T + t, sorted by id, then position
  int64_t* positions;
  // segment s holds positions[starts[s] .. starts[s + 1]) and has id ids_of[s]
  int64_t* starts;
  int64_t* ids_of;
  int64_t count;  // number of segments
};

// Sorts the non-padding positions by id. Returns -1, or the first flat position (b * T + t)
// whose id is outside [0, V) (then nothing else is meaningful). positions and ids_of need
// B * T elements, starts B * T + 1.
template <typename id_t>
int64_t embedding_segments(Ids2d<id_t> ids, int64_t B, int64_t T, int64_t V, Padding padding,
                           EmbeddingSegments* segs);

// grad_weight[v] += sum_{b,t: ids[b,t] = v, not padding} c[b] g[b,t], summed in the
// accumulation type (double for double g, float otherwise) and rounded into weight_t once.
// grad_weight: [V, d] with row stride ld (columns contiguous). Each (segment, column block)
// is one work item owned by one thread and summed in position order, so the result is
// bit-identical for any thread count: the op is always deterministic.
template <typename scalar_t, typename weight_t>
void embedding_clipped_sum(const EmbeddingSegments& segs, Operand3d<scalar_t> g,
                           const out_t<scalar_t>* c, weight_t* grad_weight, int64_t ld, int64_t T,
                           int64_t d);

}  // namespace cpu
}  // namespace bk
