// Raw CUDA launchers of the embedding-layer ops (no torch headers; the torch side is
// embedding_binding.cpp). ids:[B,T] (int32 or int64, contiguous), g:[B,T,d].
//   embedding_norm:        out[b] = sum_{s,t} [x_s = x_t != pad] <g_s, g_t>
//   embedding_clipped_sum: grad_weight[v] += sum_{b,t: x_bt = v != pad} c_b g_b,t
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/types.h"  // DType, Operand3d, OutMat

namespace bk {
namespace cuda {

struct Ids {
  const void* ptr;  // [B, T] contiguous
  bool is_int64;    // int64 ids, else int32
};

// Checks that every id other than padding_idx lies in [0, V). flags: two int64 in device
// memory, zeroed by the caller; an id out of range sets flags[0] = 1 and flags[1] to one
// such id (the caller reads them back and reports).
cudaError_t embedding_check_ids(Ids ids, int64_t N, int64_t V, bool has_pad, int64_t pad,
                                int64_t* flags, cudaStream_t stream);

// Device workspace for the N = B*T rows of either op (the sort of (id, row) pairs), in bytes.
size_t embedding_workspace_bytes(int64_t N);
// embedding_norm's workspace that also holds each group's share of its example's norm: with
// it the norm is bitwise reproducible run to run (shares summed in a fixed order); with only
// embedding_workspace_bytes(N) the shares are added with atomics.
size_t embedding_norm_workspace_bytes(int64_t N, int64_t d);

// Whether embedding_clipped_sum takes the sorted path (and needs the workspace): when asked to
// be deterministic, or when the output is narrower than the accumulation (atomics would round
// at every addition). Otherwise it adds with atomics, directly into grad_weight.
bool embedding_clipped_sum_sorts(DType dtype, DType out_dtype, bool deterministic);

// out: [B], double* for f64 g, float* otherwise; zeroed by the launcher. Rows are grouped by
// sorting (id, row) pairs; each group's g rows are summed and the squared norm of the sum is
// added to its example. Needs N = B*T < 2^32 - 1.
cudaError_t embedding_norm(DType dtype, Ids ids, Operand3d g, bool has_pad, int64_t pad,
                           void* out, int64_t B, int64_t T, int64_t d, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream);

// grad_weight: [V, d] of any DType (OutMat strides). c: [B], double* for f64 g, float*
// otherwise. The ids must have been checked (rows with an id out of range are skipped).
// Sorted path: every output row is written by one thread per column, summing its rows in
// increasing (b, t) order: deterministic, rounding once.
cudaError_t embedding_clipped_sum(DType dtype, Ids ids, Operand3d g, const void* c, bool has_pad,
                                  int64_t pad, OutMat grad_weight, int64_t V, bool deterministic,
                                  int64_t B, int64_t T, int64_t d, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace bk
