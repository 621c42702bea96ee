// CUDA kernels for per-example squared gradient norms of a linear layer:
//   out[b] = || a_b^T g_b ||_F^2,   a:[B,T,d], g:[B,T,p].
//
// Two algorithms (the caller picks the cheaper one):
//   ghost  : out[b] = sum_{s,t} (a_s . a_t)(g_s . g_t)      cost ~ T^2 (d + p)
//   direct : out[b] = sum_{j,k} (sum_t a[t,j] g[t,k])^2     cost ~ T d p
// Neither materialises the [T,T] Gram matrices or the [d,p] gradient: each thread block
// owns one 64x64 output tile and reduces it to a scalar: its share of out[b]. Given a shares
// buffer (what the torch binding always passes), each share is stored in its own slot and the
// shares are summed per example in a fixed order afterwards, so the result is bitwise
// reproducible run to run; without one, the shares are added atomically into out[b].
//
// Precision: f64 accumulates in double; f32, f16 and bf16 accumulate in float.
// f32 uses plain FP32 FMAs (never TF32). f16/bf16 use tensor cores (wmma 16x16x16,
// fp32 accumulators) on sm_80+, with a SIMT fallback (inputs converted to float on load)
// that can be forced by setting the environment variable BK_NORMS_DISABLE_WMMA=1 (so the
// fallback can be tested on hardware that would otherwise take the tensor-core path).
//
// Memory access: the last dimension is contiguous, but rows may be arbitrarily strided and
// pointers only element-aligned, so all global loads are scalar (coalesced along the
// contiguous dimension); no vector loads.
//
// No torch headers here on purpose (see norms_cuda.h). Half types are converted with
// explicit intrinsics so the file builds with -D__CUDA_NO_HALF_CONVERSIONS__ and friends.

#include "cuda/norms_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "cuda/common.cuh"  // widen, zero, block_sum

namespace bk {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------
// Shared configuration
// ---------------------------------------------------------------------------------------

constexpr int kThreads = 256;  // 8 warps per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;      // output tile edge: Gram tile (ghost) or [d,p] tile (direct)

// SIMT register tiling: 256 threads as 16x16, each thread owns a 4x4 sub-tile of the
// 64x64 output, at rows ty + 16*i and columns tx + 16*j (strided so that a warp's shared
// memory reads are broadcasts or consecutive words: no bank conflicts).
constexpr int kThreadGrid = 16;
constexpr int kRegTile = kTile / kThreadGrid;  // 4
static_assert(kThreadGrid * kThreadGrid == kThreads, "thread grid must match block size");

// WMMA: 64x64 output tile = 4x4 fragments of 16x16; warp w owns fragment row w/2 and
// fragment columns 2*(w%2), 2*(w%2)+1.
constexpr int kFrag = 16;
constexpr int kFragsPerWarp = 2;
static_assert((kTile / kFrag) * (kTile / kFrag) == kWarps * kFragsPerWarp,
              "warps must cover the output tile");

// Grid limits: x <= 2^31-1, y <= 65535. Kernels grid-stride over both, so any size works.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

template <typename scalar_t>
struct Traits;
// kChunk: length of the reduction chunk staged through shared memory per step by the SIMT
// kernels (128 contiguous bytes per row for float and double). kWmma: the type has a
// tensor-core (wmma) kernel.
template <>
struct Traits<float> {
  using acc_t = float;
  static constexpr int kChunk = 32;
  static constexpr bool kWmma = false;
};
template <>
struct Traits<double> {
  using acc_t = double;
  static constexpr int kChunk = 16;
  static constexpr bool kWmma = false;
};
template <>
struct Traits<__half> {
  using acc_t = float;
  static constexpr int kChunk = 32;
  static constexpr bool kWmma = true;
};
template <>
struct Traits<__nv_bfloat16> {
  using acc_t = float;
  static constexpr int kChunk = 32;
  static constexpr bool kWmma = true;
};

// WMMA chunk: 64 half elements = 128 contiguous bytes per row; row pitch padded by 8
// elements (16 bytes) to spread banks while keeping every fragment pointer 32-byte aligned
// (row offsets are multiples of 16 rows * 72 * 2 B = 2304 B, column offsets 16 * 2 B).
constexpr int kWmmaChunk = 64;
constexpr int kWmmaLd = kWmmaChunk + 8;
static_assert(kWmmaLd % 8 == 0, "wmma ldm must be a multiple of 8 for 16-bit types");
static_assert(kTile + 8 == kWmmaLd, "direct kernel reuses kWmmaLd for its 64-wide tiles");

// One [B, rows, n] operand with a typed pointer.
template <typename scalar_t>
struct Mat {
  const scalar_t* ptr;
  int64_t stride_b;
  int64_t stride_t;
};

using dev::block_sum;

// Linear index q over the upper triangle (I <= J) of an n x n block grid, enumerated
// column by column: q = J*(J+1)/2 + I.
__device__ __forceinline__ void decode_pair(int64_t q, int64_t& I, int64_t& J) {
  int64_t j = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(q) + 1.0) - 1.0) * 0.5);
  while (j > 0 && j * (j + 1) / 2 > q) --j;  // fix floating-point rounding either way
  while ((j + 1) * (j + 2) / 2 <= q) ++j;
  J = j;
  I = q - j * (j + 1) / 2;
}

// ---------------------------------------------------------------------------------------
// ghost_norm, SIMT (all dtypes)
// ---------------------------------------------------------------------------------------

// acc[i][j] = X[rowS + ty + 16i, :] . X[rowT + tx + 16j, :] for one example's rows
// (X already offset to the example). Features go through shared memory kChunk at a time,
// stored transposed ([feature][row]) so the inner loop reads rows as consecutive words;
// the +1 pitch makes the transposing stores conflict-free. Out-of-range rows/features
// are zero-filled and so contribute nothing.
template <typename scalar_t, typename acc_t, int kChunk>
__device__ __forceinline__ void gram_tile_simt(const scalar_t* __restrict__ X, int64_t stride_t,
                                               int64_t rows, int64_t n, int64_t rowS,
                                               int64_t rowT, acc_t (*sS)[kTile + 1],
                                               acc_t (*sT)[kTile + 1],
                                               acc_t (&acc)[kRegTile][kRegTile]) {
  const int tx = threadIdx.x % kThreadGrid;
  const int ty = threadIdx.x / kThreadGrid;
#pragma unroll
  for (int i = 0; i < kRegTile; ++i)
#pragma unroll
    for (int j = 0; j < kRegTile; ++j) acc[i][j] = acc_t(0);

  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
      const int r = idx / kChunk;
      const int kk = idx % kChunk;  // consecutive threads -> consecutive features
      const int64_t k = k0 + kk;
      acc_t vs = acc_t(0), vt = acc_t(0);
      if (k < n) {
        if (rowS + r < rows) vs = dev::widen(X[(rowS + r) * stride_t + k]);
        if (rowT + r < rows) vt = dev::widen(X[(rowT + r) * stride_t + k]);
      }
      sS[kk][r] = vs;
      sT[kk][r] = vt;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) {
      acc_t x[kRegTile], y[kRegTile];
#pragma unroll
      for (int i = 0; i < kRegTile; ++i) {
        x[i] = sS[kk][ty + kThreadGrid * i];
        y[i] = sT[kk][tx + kThreadGrid * i];
      }
#pragma unroll
      for (int i = 0; i < kRegTile; ++i)
#pragma unroll
        for (int j = 0; j < kRegTile; ++j) acc[i][j] += x[i] * y[j];
    }
    __syncthreads();
  }
}

// Grid: x over upper-triangular pairs (I <= J) of 64-row blocks of T, y over examples.
// Each block computes the 64x64 tiles Ga = A_I A_J^T and Gg = G_I G_J^T in registers
// (4x4 per thread), reduces sum(Ga .* Gg) and adds it to out[b], twice for off-diagonal
// pairs (the (J, I) tile is the transpose, with the same sum).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ghost_simt_kernel(Mat<scalar_t> a, Mat<scalar_t> g, typename Traits<scalar_t>::acc_t* out,
                      typename Traits<scalar_t>::acc_t* shares, int64_t B, int64_t rows, int64_t d,
                      int64_t p, int64_t npairs) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  constexpr int kChunk = Traits<scalar_t>::kChunk;
  __shared__ acc_t sS[kChunk][kTile + 1];
  __shared__ acc_t sT[kChunk][kTile + 1];
  __shared__ acc_t red[32];

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t q = blockIdx.x; q < npairs; q += gridDim.x) {
      int64_t I, J;
      decode_pair(q, I, J);
      acc_t ga[kRegTile][kRegTile], gg[kRegTile][kRegTile];
      gram_tile_simt<scalar_t, acc_t, kChunk>(a.ptr + b * a.stride_b, a.stride_t, rows, d,
                                              I * kTile, J * kTile, sS, sT, ga);
      gram_tile_simt<scalar_t, acc_t, kChunk>(g.ptr + b * g.stride_b, g.stride_t, rows, p,
                                              I * kTile, J * kTile, sS, sT, gg);
      acc_t v = acc_t(0);
#pragma unroll
      for (int i = 0; i < kRegTile; ++i)
#pragma unroll
        for (int j = 0; j < kRegTile; ++j) v += ga[i][j] * gg[i][j];
      v = block_sum(v, red);
      if (threadIdx.x == 0) dev::add_share(out, shares, b, q, npairs, I == J ? v : acc_t(2) * v);
    }
  }
}

// ---------------------------------------------------------------------------------------
// ghost_norm, tensor cores (f16 / bf16, sm_80+)
// ---------------------------------------------------------------------------------------

namespace wmma = nvcuda::wmma;
using AccFrag = wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float>;

// Same tile as gram_tile_simt, on tensor cores: rows staged row-major ([row][feature],
// pitch kWmmaLd) in their native 16-bit type. Ga = S * T^T, where S is matrix_a row_major
// and T^T is matrix_b col_major over the same [row][feature] storage.
template <typename scalar_t>
__device__ __forceinline__ void gram_tile_wmma(const scalar_t* __restrict__ X, int64_t stride_t,
                                               int64_t rows, int64_t n, int64_t rowS,
                                               int64_t rowT, scalar_t* sS, scalar_t* sT,
                                               AccFrag (&acc)[kFragsPerWarp]) {
  const int warp = threadIdx.x >> 5;
  const int fr = warp / 2;                    // fragment row of the 64x64 tile
  const int fc0 = (warp % 2) * kFragsPerWarp;  // first fragment column
  const scalar_t zero = dev::zero<scalar_t>();
#pragma unroll
  for (int c = 0; c < kFragsPerWarp; ++c) wmma::fill_fragment(acc[c], 0.0f);

  for (int64_t k0 = 0; k0 < n; k0 += kWmmaChunk) {
    for (int idx = threadIdx.x; idx < kTile * kWmmaChunk; idx += kThreads) {
      const int r = idx / kWmmaChunk;
      const int kk = idx % kWmmaChunk;
      const int64_t k = k0 + kk;
      scalar_t vs = zero, vt = zero;
      if (k < n) {
        if (rowS + r < rows) vs = X[(rowS + r) * stride_t + k];
        if (rowT + r < rows) vt = X[(rowT + r) * stride_t + k];
      }
      sS[r * kWmmaLd + kk] = vs;
      sT[r * kWmmaLd + kk] = vt;
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kWmmaChunk; ks += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, scalar_t, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, sS + fr * kFrag * kWmmaLd + ks, kWmmaLd);
#pragma unroll
      for (int c = 0; c < kFragsPerWarp; ++c) {
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, scalar_t, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, sT + (fc0 + c) * kFrag * kWmmaLd + ks, kWmmaLd);
        wmma::mma_sync(acc[c], fa, fb, acc[c]);
      }
    }
    __syncthreads();
  }
}

// Same grid and math as ghost_simt_kernel. Ga and Gg end up in accumulator fragments of
// identical type, so element i of both refers to the same (row, col) and the elementwise
// product can be summed without knowing the fragment layout.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ghost_wmma_kernel(Mat<scalar_t> a, Mat<scalar_t> g, float* out, float* shares, int64_t B,
                      int64_t rows, int64_t d, int64_t p, int64_t npairs) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: the host only picks this kernel on sm_80+
#else
  __shared__ __align__(128) scalar_t sS[kTile * kWmmaLd];
  __shared__ __align__(128) scalar_t sT[kTile * kWmmaLd];
  __shared__ float red[32];

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t q = blockIdx.x; q < npairs; q += gridDim.x) {
      int64_t I, J;
      decode_pair(q, I, J);
      AccFrag ga[kFragsPerWarp], gg[kFragsPerWarp];
      gram_tile_wmma<scalar_t>(a.ptr + b * a.stride_b, a.stride_t, rows, d, I * kTile,
                               J * kTile, sS, sT, ga);
      gram_tile_wmma<scalar_t>(g.ptr + b * g.stride_b, g.stride_t, rows, p, I * kTile,
                               J * kTile, sS, sT, gg);
      float v = 0.0f;
#pragma unroll
      for (int c = 0; c < kFragsPerWarp; ++c)
#pragma unroll
        for (int i = 0; i < ga[c].num_elements; ++i) v += ga[c].x[i] * gg[c].x[i];
      v = block_sum(v, red);
      if (threadIdx.x == 0) dev::add_share(out, shares, b, q, npairs, I == J ? v : 2.0f * v);
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------
// direct_norm, SIMT (all dtypes)
// ---------------------------------------------------------------------------------------

// Grid: x over (64-column block of d) x (64-column block of p) tiles, y over examples.
// Each block forms C = A[:, j-block]^T G[:, k-block] (64x64, 4x4 per thread in registers)
// by streaming T through shared memory kChunk rows at a time (rows are staged as they lie
// in memory, [t][column], so loads are coalesced along the contiguous dimension), then
// adds sum(C.^2) to out[b]. Every block reads all T rows of its columns: the T reduction
// cannot be split across blocks because the square is taken after it.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    direct_simt_kernel(Mat<scalar_t> a, Mat<scalar_t> g, typename Traits<scalar_t>::acc_t* out,
                       typename Traits<scalar_t>::acc_t* shares, int64_t B, int64_t rows, int64_t d,
                       int64_t p, int64_t nblk_p, int64_t ntiles) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  constexpr int kChunk = Traits<scalar_t>::kChunk;
  __shared__ acc_t sA[kChunk][kTile];
  __shared__ acc_t sG[kChunk][kTile];
  __shared__ acc_t red[32];
  const int tx = threadIdx.x % kThreadGrid;
  const int ty = threadIdx.x / kThreadGrid;

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const scalar_t* __restrict__ A = a.ptr + b * a.stride_b;
    const scalar_t* __restrict__ G = g.ptr + b * g.stride_b;
    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
      const int64_t j0 = (tile / nblk_p) * kTile;
      const int64_t k0 = (tile % nblk_p) * kTile;
      acc_t acc[kRegTile][kRegTile];
#pragma unroll
      for (int i = 0; i < kRegTile; ++i)
#pragma unroll
        for (int j = 0; j < kRegTile; ++j) acc[i][j] = acc_t(0);

      for (int64_t t0 = 0; t0 < rows; t0 += kChunk) {
        for (int idx = threadIdx.x; idx < kChunk * kTile; idx += kThreads) {
          const int tt = idx / kTile;
          const int cc = idx % kTile;  // consecutive threads -> consecutive columns
          const int64_t t = t0 + tt;
          acc_t va = acc_t(0), vg = acc_t(0);
          if (t < rows) {
            if (j0 + cc < d) va = dev::widen(A[t * a.stride_t + j0 + cc]);
            if (k0 + cc < p) vg = dev::widen(G[t * g.stride_t + k0 + cc]);
          }
          sA[tt][cc] = va;
          sG[tt][cc] = vg;
        }
        __syncthreads();
#pragma unroll
        for (int tt = 0; tt < kChunk; ++tt) {
          acc_t x[kRegTile], y[kRegTile];
#pragma unroll
          for (int i = 0; i < kRegTile; ++i) {
            x[i] = sA[tt][ty + kThreadGrid * i];
            y[i] = sG[tt][tx + kThreadGrid * i];
          }
#pragma unroll
          for (int i = 0; i < kRegTile; ++i)
#pragma unroll
            for (int j = 0; j < kRegTile; ++j) acc[i][j] += x[i] * y[j];
        }
        __syncthreads();
      }

      acc_t v = acc_t(0);
#pragma unroll
      for (int i = 0; i < kRegTile; ++i)
#pragma unroll
        for (int j = 0; j < kRegTile; ++j) v += acc[i][j] * acc[i][j];
      v = block_sum(v, red);
      if (threadIdx.x == 0) dev::add_share(out, shares, b, tile, ntiles, v);
    }
  }
}

// ---------------------------------------------------------------------------------------
// direct_norm, tensor cores (f16 / bf16, sm_80+)
// ---------------------------------------------------------------------------------------

// Same grid and math as direct_simt_kernel. Rows are staged [t][column] (pitch kWmmaLd):
// C = A^T G where A^T is matrix_a col_major over the [t][j] storage and G is matrix_b
// row_major over the [t][k] storage. The sum of squares of the accumulator elements does
// not depend on the fragment layout.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    direct_wmma_kernel(Mat<scalar_t> a, Mat<scalar_t> g, float* out, float* shares, int64_t B,
                       int64_t rows, int64_t d, int64_t p, int64_t nblk_p, int64_t ntiles) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: the host only picks this kernel on sm_80+
#else
  __shared__ __align__(128) scalar_t sA[kWmmaChunk * kWmmaLd];
  __shared__ __align__(128) scalar_t sG[kWmmaChunk * kWmmaLd];
  __shared__ float red[32];
  const int warp = threadIdx.x >> 5;
  const int fr = warp / 2;                    // fragment row (j direction)
  const int fc0 = (warp % 2) * kFragsPerWarp;  // first fragment column (k direction)
  const scalar_t zero = dev::zero<scalar_t>();

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const scalar_t* __restrict__ A = a.ptr + b * a.stride_b;
    const scalar_t* __restrict__ G = g.ptr + b * g.stride_b;
    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
      const int64_t j0 = (tile / nblk_p) * kTile;
      const int64_t k0 = (tile % nblk_p) * kTile;
      AccFrag acc[kFragsPerWarp];
#pragma unroll
      for (int c = 0; c < kFragsPerWarp; ++c) wmma::fill_fragment(acc[c], 0.0f);

      for (int64_t t0 = 0; t0 < rows; t0 += kWmmaChunk) {
        for (int idx = threadIdx.x; idx < kWmmaChunk * kTile; idx += kThreads) {
          const int tt = idx / kTile;
          const int cc = idx % kTile;
          const int64_t t = t0 + tt;
          scalar_t va = zero, vg = zero;
          if (t < rows) {
            if (j0 + cc < d) va = A[t * a.stride_t + j0 + cc];
            if (k0 + cc < p) vg = G[t * g.stride_t + k0 + cc];
          }
          sA[tt * kWmmaLd + cc] = va;
          sG[tt * kWmmaLd + cc] = vg;
        }
        __syncthreads();
#pragma unroll
        for (int ts = 0; ts < kWmmaChunk; ts += kFrag) {
          wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, scalar_t, wmma::col_major> fa;
          wmma::load_matrix_sync(fa, sA + ts * kWmmaLd + fr * kFrag, kWmmaLd);
#pragma unroll
          for (int c = 0; c < kFragsPerWarp; ++c) {
            wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, scalar_t, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, sG + ts * kWmmaLd + (fc0 + c) * kFrag, kWmmaLd);
            wmma::mma_sync(acc[c], fa, fb, acc[c]);
          }
        }
        __syncthreads();
      }

      float v = 0.0f;
#pragma unroll
      for (int c = 0; c < kFragsPerWarp; ++c)
#pragma unroll
        for (int i = 0; i < acc[c].num_elements; ++i) v += acc[c].x[i] * acc[c].x[i];
      v = block_sum(v, red);
      if (threadIdx.x == 0) dev::add_share(out, shares, b, tile, ntiles, v);
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

// Tensor cores for f16/bf16 need sm_80 (bf16 wmma) and can be disabled for testing.
bool use_wmma() { return tensor_cores_enabled(); }

dim3 make_grid(int64_t nx, int64_t B) {
  return dim3(static_cast<unsigned>(std::min(nx, kMaxGridX)),
              static_cast<unsigned>(std::min(B, kMaxGridY)), 1u);
}

template <typename scalar_t>
Mat<scalar_t> typed(const Operand3d& x) {
  return Mat<scalar_t>{static_cast<const scalar_t*>(x.ptr), x.stride_b, x.stride_t};
}

int64_t ghost_tiles(int64_t T) {
  const int64_t nblk = (T + kTile - 1) / kTile;
  return nblk * (nblk + 1) / 2;
}

int64_t direct_tiles(int64_t d, int64_t p) { return ((d + kTile - 1) / kTile) * ((p + kTile - 1) / kTile); }

template <typename scalar_t>
void launch_ghost(const Operand3d& a, const Operand3d& g, void* out, void* shares, int64_t B,
                  int64_t T, int64_t d, int64_t p, cudaStream_t stream, bool wmma_ok) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const int64_t npairs = ghost_tiles(T);
  const dim3 grid = make_grid(npairs, B);
  bool launched = false;
  if constexpr (Traits<scalar_t>::kWmma) {
    if (wmma_ok) {
      ghost_wmma_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          typed<scalar_t>(a), typed<scalar_t>(g), static_cast<float*>(out), static_cast<float*>(shares), B, T,
          d, p, npairs);
      launched = true;
    }
  }
  if (!launched)
    ghost_simt_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        typed<scalar_t>(a), typed<scalar_t>(g), static_cast<acc_t*>(out), static_cast<acc_t*>(shares), B, T, d,
        p, npairs);
  launch_sum_shares<acc_t>(shares, npairs, out, B, stream);
}

template <typename scalar_t>
void launch_direct(const Operand3d& a, const Operand3d& g, void* out, void* shares, int64_t B,
                   int64_t T, int64_t d, int64_t p, cudaStream_t stream, bool wmma_ok) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const int64_t nblk_p = (p + kTile - 1) / kTile;
  const int64_t ntiles = direct_tiles(d, p);
  const dim3 grid = make_grid(ntiles, B);
  bool launched = false;
  if constexpr (Traits<scalar_t>::kWmma) {
    if (wmma_ok) {
      direct_wmma_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          typed<scalar_t>(a), typed<scalar_t>(g), static_cast<float*>(out), static_cast<float*>(shares), B, T,
          d, p, nblk_p, ntiles);
      launched = true;
    }
  }
  if (!launched)
    direct_simt_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        typed<scalar_t>(a), typed<scalar_t>(g), static_cast<acc_t*>(out), static_cast<acc_t*>(shares), B, T, d,
        p, nblk_p, ntiles);
  launch_sum_shares<acc_t>(shares, ntiles, out, B, stream);
}

enum class Algo { ghost, direct };

cudaError_t run(Algo algo, DType dtype, const Operand3d& a, const Operand3d& g, void* out,
                int64_t B, int64_t T, int64_t d, int64_t p, cudaStream_t stream, void* shares) {
  if (B < 0 || T < 0 || d < 0 || p < 0) return cudaErrorInvalidValue;
  if (dtype != DType::f32 && dtype != DType::f64 && dtype != DType::f16 &&
      dtype != DType::bf16)
    return cudaErrorInvalidValue;
  const size_t out_elem = dtype == DType::f64 ? sizeof(double) : sizeof(float);
  if (B > 0) {
    const cudaError_t err =
        cudaMemsetAsync(out, 0, static_cast<size_t>(B) * out_elem, stream);
    if (err != cudaSuccess) return err;
  }
  if (B == 0 || T == 0 || d == 0 || p == 0) return cudaGetLastError();

  const bool half_type = dtype == DType::f16 || dtype == DType::bf16;
  const bool wmma_ok = half_type && use_wmma();
  switch (dtype) {
    case DType::f32:
      if (algo == Algo::ghost) launch_ghost<float>(a, g, out, shares, B, T, d, p, stream, false);
      else launch_direct<float>(a, g, out, shares, B, T, d, p, stream, false);
      break;
    case DType::f64:
      if (algo == Algo::ghost) launch_ghost<double>(a, g, out, shares, B, T, d, p, stream, false);
      else launch_direct<double>(a, g, out, shares, B, T, d, p, stream, false);
      break;
    case DType::f16:
      if (algo == Algo::ghost) launch_ghost<__half>(a, g, out, shares, B, T, d, p, stream, wmma_ok);
      else launch_direct<__half>(a, g, out, shares, B, T, d, p, stream, wmma_ok);
      break;
    case DType::bf16:
      if (algo == Algo::ghost)
        launch_ghost<__nv_bfloat16>(a, g, out, shares, B, T, d, p, stream, wmma_ok);
      else
        launch_direct<__nv_bfloat16>(a, g, out, shares, B, T, d, p, stream, wmma_ok);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t ghost_norm(DType dtype, Operand3d a, Operand3d g, void* out, int64_t B, int64_t T,
                       int64_t d, int64_t p, cudaStream_t stream, void* shares) {
  return run(Algo::ghost, dtype, a, g, out, B, T, d, p, stream, shares);
}

cudaError_t direct_norm(DType dtype, Operand3d a, Operand3d g, void* out, int64_t B,
                        int64_t T, int64_t d, int64_t p, cudaStream_t stream, void* shares) {
  return run(Algo::direct, dtype, a, g, out, B, T, d, p, stream, shares);
}

int64_t ghost_norm_shares(int64_t B, int64_t T) { return B * ghost_tiles(T); }
int64_t direct_norm_shares(int64_t B, int64_t d, int64_t p) { return B * direct_tiles(d, p); }

}  // namespace cuda
}  // namespace bk
