// CUDA kernels of norm_layer_grads (see norm_layer_cuda.h): per example and channel, sums over
// the T positions of xhat*g and g, then the per-example squared norms.
//
// The reduction over t is laid out by the operands' memory order, so that the loads of a warp
// are coalesced either way:
//  - channels inner (LayerNorm, [B,T,C] channel-last): a block is 32 channels x 8 position
//    lanes; lanes stride over t, then add up through shared memory;
//  - positions inner (GroupNorm's [B,C,S] seen as [B,S,C]): one warp per (b, c), its lanes
//    stride over t, then a warp shuffle sum.
// A last small kernel forms sq_norms[b] from gw and gb. Fixed summation orders: deterministic.
#include "cuda/norm_layer_cuda.h"

#include "cuda/common.cuh"

namespace bk {
namespace cuda {
namespace {

using dev::acc_of;

constexpr int kThreads = 256;
constexpr int kLanesT = kThreads / 32;  // position lanes of the channels-inner kernel

template <typename scalar_t>
struct Op {
  const scalar_t* ptr;
  int64_t sb, st, sc;
};

// Grid: x over blocks of 32 channels, y over examples (grid-stride).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    channels_inner_kernel(Op<scalar_t> x, Op<scalar_t> g, acc_of<scalar_t>* gw,
                          acc_of<scalar_t>* gb, int64_t B, int64_t T, int64_t C) {
  using acc_t = acc_of<scalar_t>;
  __shared__ acc_t sw[kLanesT][33];
  __shared__ acc_t sb[kLanesT][33];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    acc_t w = acc_t(0), s = acc_t(0);
    if (c < C) {
      const scalar_t* xb = x.ptr + b * x.sb + c * x.sc;
      const scalar_t* gbp = g.ptr + b * g.sb + c * g.sc;
      for (int64_t t = ty; t < T; t += kLanesT) {
        const acc_t gv = dev::widen(gbp[t * g.st]);
        w += dev::widen(xb[t * x.st]) * gv;
        s += gv;
      }
    }
    sw[ty][tx] = w;
    sb[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < C) {
      for (int q = 1; q < kLanesT; ++q) {
        w += sw[q][tx];
        s += sb[q][tx];
      }
      gw[b * C + c] = w;
      if (gb != nullptr) gb[b * C + c] = s;
    }
    __syncthreads();
  }
}

// Grid: x over groups of 8 (b, c) pairs (grid-stride), one warp each.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    positions_inner_kernel(Op<scalar_t> x, Op<scalar_t> g, acc_of<scalar_t>* gw,
                           acc_of<scalar_t>* gb, int64_t B, int64_t T, int64_t C) {
  using acc_t = acc_of<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t bc = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
       bc < B * C; bc += warps) {
    const int64_t b = bc / C, c = bc - b * C;
    const scalar_t* xb = x.ptr + b * x.sb + c * x.sc;
    const scalar_t* gbp = g.ptr + b * g.sb + c * g.sc;
    acc_t w = acc_t(0), s = acc_t(0);
    for (int64_t t = lane; t < T; t += 32) {
      const acc_t gv = dev::widen(gbp[t * g.st]);
      w += dev::widen(xb[t * x.st]) * gv;
      s += gv;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      w += __shfl_down_sync(0xffffffffu, w, o);
      s += __shfl_down_sync(0xffffffffu, s, o);
    }
    if (lane == 0) {
      gw[bc] = w;
      if (gb != nullptr) gb[bc] = s;
    }
  }
}

// sq[b] = sum_c gw[b,c]^2 (+ gb[b,c]^2). Grid: x over examples (grid-stride).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sq_norms_kernel(const acc_t* gw, const acc_t* gb, acc_t* sq, int64_t B, int64_t C) {
  __shared__ acc_t red[32];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    acc_t v = acc_t(0);
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const acc_t w = gw[b * C + c];
      v += w * w;
      if (gb != nullptr) {
        const acc_t s = gb[b * C + c];
        v += s * s;
      }
    }
    v = dev::block_sum(v, red);
    if (threadIdx.x == 0) sq[b] = v;
  }
}

template <typename scalar_t>
cudaError_t run(const Strided3d& xs, const Strided3d& gs, void* gw_, void* gb_, void* sq_,
                int64_t B, int64_t T, int64_t C, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  acc_t* gw = static_cast<acc_t*>(gw_);
  acc_t* gb = static_cast<acc_t*>(gb_);
  acc_t* sq = static_cast<acc_t*>(sq_);
  const Op<scalar_t> x{static_cast<const scalar_t*>(xs.ptr), xs.stride_b, xs.stride_t, xs.stride_c};
  const Op<scalar_t> g{static_cast<const scalar_t*>(gs.ptr), gs.stride_b, gs.stride_t, gs.stride_c};
  if (C > 0) {
    // Channels inner when stepping a channel moves less than stepping a position.
    const bool channels_inner = (xs.stride_c < 0 ? -xs.stride_c : xs.stride_c) <=
                                (xs.stride_t < 0 ? -xs.stride_t : xs.stride_t);
    if (channels_inner || T == 1) {
      const dim3 grid(grid_x(ceil_div(C, 32)), grid_yz(B));
      channels_inner_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(x, g, gw, gb, B, T, C);
    } else {
      const int64_t blocks = ceil_div(B * C, kThreads / 32);
      positions_inner_kernel<scalar_t><<<grid_x(std::min<int64_t>(blocks, 1 << 20)), kThreads, 0,
                                         stream>>>(x, g, gw, gb, B, T, C);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  sq_norms_kernel<acc_t><<<grid_x(std::min<int64_t>(B, 1 << 20)), kThreads, 0, stream>>>(
      gw, gb, sq, B, C);
  return cudaGetLastError();
}

}  // namespace

cudaError_t norm_layer_grads(DType dtype, Strided3d xhat, Strided3d g, void* gw, void* gb,
                             void* sq_norms, int64_t B, int64_t T, int64_t C,
                             cudaStream_t stream) {
  if (B < 0 || T < 0 || C < 0) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  switch (dtype) {
    case DType::f32: return run<float>(xhat, g, gw, gb, sq_norms, B, T, C, stream);
    case DType::f64: return run<double>(xhat, g, gw, gb, sq_norms, B, T, C, stream);
    case DType::f16: return run<__half>(xhat, g, gw, gb, sq_norms, B, T, C, stream);
    case DType::bf16: return run<__nv_bfloat16>(xhat, g, gw, gb, sq_norms, B, T, C, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bk
