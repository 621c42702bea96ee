// The types every CUDA launcher and binding shares (no torch headers, no kernels): the dtype
// tag of a kernel's inputs, a strided [B, T, n] input operand, a strided output matrix.
#pragma once
#include <cstdint>

namespace bk {
namespace cuda {

enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// Layout of one [B, T, n] operand: element (b, t, k) lives at
// ptr[b * stride_b + t * stride_t + k]  (last dimension contiguous).
struct Operand3d {
  const void* ptr;
  int64_t stride_b;
  int64_t stride_t;
};

// An output matrix (or vector: rows = 1) of any DType: element (i, j) is
// ptr[i * stride0 + j * stride1].
struct OutMat {
  void* ptr;
  DType dtype;
  int64_t stride0;
  int64_t stride1;
};

}  // namespace cuda
}  // namespace bk
