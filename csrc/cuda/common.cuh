// Device helpers shared by the CUDA kernels of clipped_sum.cu, embedding.cu, norm_layer.cu and
// noise.cu: dtype conversions written with explicit intrinsics (so everything builds under
// torch's -D__CUDA_NO_HALF_CONVERSIONS__ and friends), a block sum and launch helpers.
// No torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cuda/types.h"  // DType, Operand3d, OutMat

namespace bk {
namespace cuda {
namespace dev {

// Accumulation type: double for double, float for float / half / bfloat16.
template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Exact widening of a stored value to float (16/32-bit types) or double.
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// A stored value as type To (float or double; or unchanged when To is its own type).
template <typename To, typename From>
__device__ __forceinline__ To load_as(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else {
    return static_cast<To>(widen(v));
  }
}

// Round a float or double to the storage type T, once (round to nearest even).
template <typename T>
__device__ __forceinline__ T narrow(float v);
template <typename T>
__device__ __forceinline__ T narrow(double v);
template <>
__device__ __forceinline__ float narrow<float>(float v) { return v; }
template <>
__device__ __forceinline__ float narrow<float>(double v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ double narrow<double>(float v) { return v; }
template <>
__device__ __forceinline__ double narrow<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __half narrow<__half>(double v) { return __double2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(double v) {
  return __double2bfloat16(v);
}

template <typename T>
__device__ __forceinline__ T zero() {
  if constexpr (std::is_same_v<T, __half>) {
    return __ushort_as_half(static_cast<unsigned short>(0));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __ushort_as_bfloat16(static_cast<unsigned short>(0));
  } else {
    return T(0);
  }
}

// out = round(out + v): an in-place accumulation into a buffer of any dtype, computed in
// double when either side is double, in float otherwise, and rounded once.
template <typename out_t, typename acc_t>
__device__ __forceinline__ void add_into(out_t* out, acc_t v) {
  using mix_t = std::conditional_t<std::is_same_v<out_t, double> || std::is_same_v<acc_t, double>,
                                   double, float>;
  *out = narrow<out_t>(static_cast<mix_t>(widen(*out)) + static_cast<mix_t>(v));
}

// Sum of v over a block of nthreads (a multiple of 32, at most 1024); the result is valid in
// thread 0. red: shared buffer of >= 32 entries. Called by every thread of the block; ends
// with a barrier so that red can be reused at once.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* red) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x * blockDim.y) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? red[lane] : acc_t(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  __syncthreads();
  return v;
}

// One block's share of out[b] (a per-example sum reduced across blocks): into its own slot
// shares[b * per_example + slot] when a shares buffer is given, summed per example in a fixed
// order by sum_shares_kernel afterwards (bitwise reproducible run to run); atomically into
// out[b] when shares is null.
template <typename acc_t>
__device__ __forceinline__ void add_share(acc_t* out, acc_t* shares, int64_t b, int64_t slot,
                                          int64_t per_example, acc_t v) {
  if (shares != nullptr) shares[b * per_example + slot] = v;
  else atomicAdd(out + b, v);
}

// out[b] = sum of shares[b, 0 .. per_example), each thread over a fixed stride, then a fixed
// tree (block_sum): the same order on every run. One block per example (grid-stride).
template <typename acc_t>
__global__ void sum_shares_kernel(const acc_t* __restrict__ shares, int64_t per_example,
                                  acc_t* __restrict__ out, int64_t B) {
  __shared__ acc_t red[32];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    acc_t v = acc_t(0);
    for (int64_t i = threadIdx.x; i < per_example; i += blockDim.x) v += shares[b * per_example + i];
    v = block_sum(v, red);
    if (threadIdx.x == 0) out[b] = v;
  }
}

}  // namespace dev

// Host helpers.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned grid_x(int64_t n) { return static_cast<unsigned>(std::min(std::max<int64_t>(n, 1), kMaxGridX)); }
inline unsigned grid_yz(int64_t n) { return static_cast<unsigned>(std::min(std::max<int64_t>(n, 1), kMaxGridYZ)); }

// out[b] = the sum, in a fixed order, of shares[b, 0 .. per_example) (dev::add_share); nothing
// without shares (the shares were added atomically).
template <typename acc_t>
void launch_sum_shares(const void* shares, int64_t per_example, void* out, int64_t B, cudaStream_t stream) {
  if (shares == nullptr) return;
  dev::sum_shares_kernel<acc_t><<<grid_x(std::min<int64_t>(B, kMaxGridYZ)), 256, 0, stream>>>(
      static_cast<const acc_t*>(shares), per_example, static_cast<acc_t*>(out), B);
}

// Multiprocessors of the current device (1 if the query fails: launches then stay correct,
// only smaller).
inline int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return std::max(n, 1);
}

// Tensor cores (wmma) for f16/bf16 need sm_80 (bf16 wmma); BK_NORMS_DISABLE_WMMA=1 forces
// the SIMT kernels everywhere (as for the norm kernels), so they can be tested on any GPU.
inline bool tensor_cores_enabled() {
  const char* env = std::getenv("BK_NORMS_DISABLE_WMMA");
  if (env != nullptr && env[0] != '\0' && env[0] != '0') return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return false;
  return major >= 8;
}

}  // namespace cuda
}  // namespace bk
