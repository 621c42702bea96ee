// CUDA kernel of add_noise_ (see noise_cuda.h; counter layout in docs/OPS.md).
//
// One thread per Philox block q (counters 4q .. 4q+3, elements 4q + j - offset): Philox4x32-10
// gives four words, Box-Muller turns (w0, w1) into the normals of lanes 0, 1 and (w2, w3) into
// those of lanes 2, 3. As in the CPU kernel (csrc/cpu/noise_kernels.cpp), the normals are
// float32 for every dtype, computed so that they keep float32 accuracy everywhere:
//  - ln u1, u1 = (w + 1) 2^-32: for u1 > 1/2 as log1p(-(~w) 2^-32) (1 - u1 is exact in the
//    integers, so u1 near 1 keeps full relative precision), else as log of the rounded u1;
//  - cos, sin of 2 pi w1 2^-32: the turn splits exactly in integers into a quadrant and a
//    remainder in [-1/8, 1/8) of a turn, given to sincospif;
// so the two backends agree up to the last bits of their log / sin / cos. The update
// (grad + std z) * scale is computed in float (double for f64 buffers) and rounded once.
#include "cuda/noise_cuda.h"

#include "cuda/common.cuh"

namespace bk {
namespace cuda {
namespace {

using dev::acc_of;

constexpr int kThreads = 256;

__device__ __forceinline__ void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                              uint32_t k0, uint32_t k1, uint32_t (&out)[4]) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key increments
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(kMul0, c0), lo0 = kMul0 * c0;
    const uint32_t hi1 = __umulhi(kMul1, c2), lo1 = kMul1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// ln((w + 1) 2^-32), in (-22.2, 0].
__device__ __forceinline__ float log_u1(uint32_t w) {
  if (w >= 0x80000000u) return log1pf(static_cast<float>(~w) * -0x1p-32f);
  return logf(static_cast<float>(w + 1u) * 0x1p-32f);
}

// cos and sin of 2 pi w 2^-32.
__device__ __forceinline__ void sincos_turn(uint32_t w, float& c, float& s) {
  const uint32_t t = w + 0x20000000u;  // an eighth of a turn ahead: quadrants centred on 0
  const uint32_t quadrant = t >> 30;
  const int32_t r = static_cast<int32_t>(t & 0x3fffffffu) - 0x20000000;  // [-2^29, 2^29)
  float sin_x, cos_x;
  sincospif(static_cast<float>(r) * 0x1p-31f, &sin_x, &cos_x);  // x = 2 pi r 2^-32
  const bool odd = quadrant & 1u;
  c = odd ? sin_x : cos_x;
  s = odd ? cos_x : sin_x;
  if (quadrant == 1u || quadrant == 2u) c = -c;
  if (quadrant >= 2u) s = -s;
}

__device__ __forceinline__ void box_muller(uint32_t w0, uint32_t w1, float& z0, float& z1) {
  const float radius = sqrtf(-2.0f * log_u1(w0));
  float c, s;
  sincos_turn(w1, c, s);
  z0 = radius * c;
  z1 = radius * s;
}

// Thread k handles Philox block q_first + k: elements 4k - head + j, j < 4, within [0, n).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    add_noise_kernel(scalar_t* grad, int64_t n, int64_t head, uint64_t q_first, int64_t nblocks,
                     uint32_t key0, uint32_t key1, acc_of<scalar_t> sd, acc_of<scalar_t> scale) {
  using acc_t = acc_of<scalar_t>;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; k < nblocks;
       k += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint64_t q = q_first + static_cast<uint64_t>(k);
    uint32_t w[4];
    philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), 0u, 0u, key0, key1, w);
    float z[4];
    box_muller(w[0], w[1], z[0], z[1]);
    box_muller(w[2], w[3], z[2], z[3]);
    const int64_t base = 4 * k - head;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = base + j;
      if (i >= 0 && i < n) {
        const acc_t v = (dev::load_as<acc_t>(grad[i]) + sd * static_cast<acc_t>(z[j])) * scale;
        grad[i] = dev::narrow<scalar_t>(v);
      }
    }
  }
}

// std == 0: grad *= scale (no draws), as the CPU kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(scalar_t* grad, int64_t n, acc_of<scalar_t> scale) {
  using acc_t = acc_of<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    grad[i] = dev::narrow<scalar_t>(dev::load_as<acc_t>(grad[i]) * scale);
}

template <typename scalar_t>
cudaError_t run(void* grad_, int64_t n, double sd, double scale, uint64_t seed, uint64_t offset,
                cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  scalar_t* grad = static_cast<scalar_t*>(grad_);
  // Enough threads to fill the GPU several times; they grid-stride over the rest.
  const int64_t max_blocks = 32LL * sm_count();
  if (sd == 0) {
    const unsigned grid = grid_x(std::min(ceil_div(n, kThreads), max_blocks));
    scale_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(grad, n, static_cast<acc_t>(scale));
    return cudaGetLastError();
  }
  const int64_t head = static_cast<int64_t>(offset % 4);
  const uint64_t q_first = offset / 4;
  const int64_t nblocks = ceil_div(head + n, 4);
  const unsigned grid = grid_x(std::min(ceil_div(nblocks, kThreads), max_blocks));
  add_noise_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      grad, n, head, q_first, nblocks, static_cast<uint32_t>(seed),
      static_cast<uint32_t>(seed >> 32), static_cast<acc_t>(sd), static_cast<acc_t>(scale));
  return cudaGetLastError();
}

}  // namespace

cudaError_t add_noise(DType dtype, void* grad, int64_t numel, double std, double scale,
                      uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (numel < 0) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  switch (dtype) {
    case DType::f32: return run<float>(grad, numel, std, scale, seed, offset, stream);
    case DType::f64: return run<double>(grad, numel, std, scale, seed, offset, stream);
    case DType::f16: return run<__half>(grad, numel, std, scale, seed, offset, stream);
    case DType::bf16: return run<__nv_bfloat16>(grad, numel, std, scale, seed, offset, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bk
