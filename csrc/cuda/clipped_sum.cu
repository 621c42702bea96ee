// CUDA kernels of the clipped weighted sums of a linear layer (see clipped_sum_cuda.h):
//   W[m, n] = sum_r c_{b(r)} g[r, m] a[r, n],   bias[m] = sum_r c_{b(r)} g[r, m]
// over the K = B*T rows r = (b, t). This is a GEMM C = (c.*G)^T A with a long reduction
// dimension K (B*T, often 10^4..10^6) and a small output (p x d, ~64..4096 each).
//
// Work split: thread block (tile, split) computes one BM x BN output tile over one chunk of
// rows_per_split rows (split-K, so that a small p*d still fills the GPU) and writes its
// partial tile to its own slice of a workspace; a second kernel adds the slices in a fixed
// order into the output buffer (any dtype and strides), rounding once. No atomics: the result
// is deterministic. The blocks of the first column tile (tn == 0) also sum the scaled g rows
// into a per-split bias partial, from the same loaded values.
//
// Inner loop: rows are staged through shared memory BK at a time, as they lie in memory
// ([row][column], coalesced loads along the contiguous dimension); the row offsets
// b*stride_b + t*stride_t and the scale c_b of the BK rows are computed once per step by BK
// threads. c_b multiplies g as it is loaded (no scaled copy of g in memory). The next step's
// global loads are issued into registers before the current step's math (register double
// buffering), so their latency is hidden behind it.
//  - f32, f64 (and f16/bf16 without tensor cores): SIMT, 16x16 threads, each accumulating a
//    TM x TN register tile at rows ty + 16i, columns tx + 16j (conflict-free shared reads):
//    f32 128 x 128 tiles (8 x 8 per thread) when p, d >= 128, else 64 x 64; f64 64 x 64.
//    Plain FP32/FP64 FMAs, never TF32.
//  - f16/bf16 on sm_80+: wmma 16x16x16 with fp32 accumulators; 8 warps as 2 (rows) x 4
//    (columns), each holding WM x WN fragments: 64 x 128 tiles (64 x 64 when d < 128).
//    The scaled g is rounded to the input dtype for the tensor cores (as an eager
//    `(c*g)^T a` in that dtype would); the bias sums the unrounded fp32 values.
// Every kernel fits in 128 registers, so two 256-thread blocks share a multiprocessor.
// Loads are scalar (rows may be arbitrarily strided and pointers only element-aligned).
#include "cuda/clipped_sum_cuda.h"

#include <mma.h>

#include "cuda/common.cuh"

namespace bk {
namespace cuda {
namespace {

using dev::acc_of;

constexpr int kThreads = 256;
// Fewest rows per split: below this, writing and re-reading the partial tile costs about as
// much as the GEMM work of the split.
constexpr int64_t kMinRowsPerSplit = 256;

template <typename scalar_t>
struct Mat {
  const scalar_t* ptr;
  int64_t stride_b;
  int64_t stride_t;
};

// SIMT core: 256 threads as 16 x 16, thread (ty, tx) owns outputs (ty + 16i, tx + 16j).
template <typename scalar_t, int TM, int TN>
struct SimtCore {
  using acc_t = acc_of<scalar_t>;
  using smem_t = acc_t;  // operands are widened on load
  static constexpr bool kTensorCores = false;
  static constexpr int BM = 16 * TM, BN = 16 * TN, BK = 16;
  static constexpr int LDG = BM, LDA = BN;  // shared pitches (stores by consecutive columns)

  acc_t acc[TM][TN];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);
  }

  // acc += sG^T sA over the BK staged rows.
  __device__ __forceinline__ void compute(const smem_t* sG, const smem_t* sA) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t x[TM], y[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) x[i] = sG[kk * LDG + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) y[j] = sA[kk * LDA + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += x[i] * y[j];
    }
  }

  // The BM x BN tile to out (row pitch ld; the workspace is padded to whole tiles).
  __device__ __forceinline__ void write(acc_t* out, int64_t ld) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) out[(ty + 16 * i) * ld + tx + 16 * j] = acc[i][j];
  }
};

namespace wmma = nvcuda::wmma;

// Tensor-core core: 8 warps as 2 x 4, warp (wm, wn) owns fragments (wm*WM + i, wn*WN + j).
// Shared tiles are [row][column] with pitch +8 elements (16 bytes: spreads banks, keeps every
// fragment pointer 32-byte aligned). C = G^T A: G^T is matrix_a col_major over sG, A is
// matrix_b row_major over sA.
template <typename scalar_t, int WM, int WN>
struct WmmaCore {
  using acc_t = float;
  using smem_t = scalar_t;
  static constexpr bool kTensorCores = true;
  static constexpr int BM = 2 * 16 * WM, BN = 4 * 16 * WN, BK = 32;
  static constexpr int LDG = BM + 8, LDA = BN + 8;
  static_assert(LDG % 8 == 0 && LDA % 8 == 0, "wmma ldm must be a multiple of 8 for 16-bit types");

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[WM][WN];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < WM; ++i)
#pragma unroll
      for (int j = 0; j < WN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ __forceinline__ void compute(const smem_t* sG, const smem_t* sA) {
    const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, scalar_t, wmma::col_major> fa[WM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, scalar_t, wmma::row_major> fb[WN];
#pragma unroll
      for (int i = 0; i < WM; ++i)
        wmma::load_matrix_sync(fa[i], sG + ks * LDG + (wm * WM + i) * 16, LDG);
#pragma unroll
      for (int j = 0; j < WN; ++j)
        wmma::load_matrix_sync(fb[j], sA + ks * LDA + (wn * WN + j) * 16, LDA);
#pragma unroll
      for (int i = 0; i < WM; ++i)
#pragma unroll
        for (int j = 0; j < WN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  // out: 32-byte aligned, ld a multiple of 4 (the workspace pitch is a multiple of BN).
  __device__ __forceinline__ void write(float* out, int64_t ld) const {
    const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
#pragma unroll
    for (int i = 0; i < WM; ++i)
#pragma unroll
      for (int j = 0; j < WN; ++j)
        wmma::store_matrix_sync(out + (wm * WM + i) * 16 * ld + (wn * WN + j) * 16, acc[i][j],
                                static_cast<unsigned>(ld), wmma::mem_row_major);
  }
};

// Grid: x = tile (tm * ntn + tn), y = split s (rows [s*rows_per_split, ...) of the K rows).
// ws_w: [nsplit][mtiles*BM][ldw] partial weight tiles; ws_b: [nsplit][ldb] partial bias
// sums (null without bias).
template <typename scalar_t, typename Core>
__global__ void __launch_bounds__(kThreads, 2)
    clipped_sum_kernel(Mat<scalar_t> a, Mat<scalar_t> g, const acc_of<scalar_t>* __restrict__ c,
                       acc_of<scalar_t>* __restrict__ ws_w, acc_of<scalar_t>* __restrict__ ws_b,
                       int64_t K, int64_t T, int64_t d, int64_t p, int64_t rows_per_split,
                       int64_t ntn, int64_t ldw, int64_t split_stride, int64_t ldb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  if constexpr (Core::kTensorCores) {
    __trap();  // tensor-core kernels are only launched on sm_80+
    return;
  } else
#endif
  {
    using acc_t = acc_of<scalar_t>;
    using smem_t = typename Core::smem_t;
    static_assert(Core::kTensorCores == !std::is_same_v<smem_t, acc_t>,
                  "tensor cores take the 16-bit inputs, SIMT the widened values");
    constexpr int BM = Core::BM, BN = Core::BN, BK = Core::BK;
    constexpr int LDG = Core::LDG, LDA = Core::LDA;
    static_assert(kThreads % BM == 0 && kThreads % BN == 0, "a thread loads one fixed column");
    static_assert((BK * BM) % kThreads == 0 && (BK * BN) % kThreads == 0, "whole loads");
    static_assert(BK <= kThreads, "BK threads set up the row offsets");
    constexpr int EG = BK * BM / kThreads, EA = BK * BN / kThreads;  // loads per thread
    constexpr int RSG = kThreads / BM, RSA = kThreads / BN;          // their row step

    __shared__ __align__(128) smem_t sG[BK * LDG];
    __shared__ __align__(128) smem_t sA[BK * LDA];
    __shared__ int64_t offG[BK], offA[BK];  // element offsets of the step's rows
    __shared__ acc_t scale[BK];             // and their c_b
    __shared__ acc_t bred[kThreads];

    const int tid = threadIdx.x;
    const int64_t tm = blockIdx.x / ntn, tn = blockIdx.x % ntn;
    const int64_t m0 = tm * BM, n0 = tn * BN;
    const int64_t s = blockIdx.y;
    const int64_t r_begin = s * rows_per_split;
    const int64_t r_end = r_begin + rows_per_split < K ? r_begin + rows_per_split : K;
    const bool do_bias = ws_b != nullptr && tn == 0;  // uniform over the block

    // This thread always loads column cg of the g tile and column ca of the a tile.
    const int cg = tid % BM, rg = tid / BM;
    const int ca = tid % BN, ra = tid / BN;
    const bool g_col_ok = m0 + cg < p;
    const bool a_col_ok = n0 + ca < d;

    acc_t vg[EG];  // next step's scaled g values
    smem_t va[EA];  // next step's a values
    acc_t bsum = acc_t(0);

    auto set_rows = [&](int64_t k0) {
      if (tid < BK) {
        const int64_t r = k0 + tid;
        if (r < r_end) {
          const int64_t b = r / T, t = r - b * T;
          offG[tid] = b * g.stride_b + t * g.stride_t + m0;
          offA[tid] = b * a.stride_b + t * a.stride_t + n0;
          scale[tid] = c[b];
        }
      }
    };
    auto load = [&](int64_t k0) {
#pragma unroll
      for (int e = 0; e < EG; ++e) {
        const int kk = rg + e * RSG;
        acc_t v = acc_t(0);
        if (g_col_ok && k0 + kk < r_end) v = dev::widen(g.ptr[offG[kk] + cg]) * scale[kk];
        vg[e] = v;
      }
#pragma unroll
      for (int e = 0; e < EA; ++e) {
        const int kk = ra + e * RSA;
        smem_t v = dev::zero<smem_t>();
        if (a_col_ok && k0 + kk < r_end) v = dev::load_as<smem_t>(a.ptr[offA[kk] + ca]);
        va[e] = v;
      }
    };
    auto store = [&]() {
#pragma unroll
      for (int e = 0; e < EG; ++e) {
        sG[(rg + e * RSG) * LDG + cg] = dev::narrow<smem_t>(vg[e]);
        if (do_bias) bsum += vg[e];
      }
#pragma unroll
      for (int e = 0; e < EA; ++e) sA[(ra + e * RSA) * LDA + ca] = va[e];
    };

    Core core;
    core.init();
    set_rows(r_begin);
    __syncthreads();
    load(r_begin);
    for (int64_t k0 = r_begin; k0 < r_end; k0 += BK) {
      const bool more = k0 + BK < r_end;
      __syncthreads();  // previous step's shared reads (math, row offsets) are done
      store();
      if (more) set_rows(k0 + BK);
      __syncthreads();
      if (more) load(k0 + BK);  // in flight during the math below
      core.compute(sG, sA);
    }

    core.write(ws_w + s * split_stride + m0 * ldw + n0, ldw);

    if (do_bias) {
      // Threads q*BM + m (q = 0 .. kThreads/BM - 1) hold partial sums of column m.
      bred[tid] = bsum;
      __syncthreads();
      if (tid < BM) {
        acc_t v = acc_t(0);
#pragma unroll
        for (int q = 0; q < kThreads / BM; ++q) v += bred[q * BM + tid];
        ws_b[s * ldb + m0 + tid] = v;
      }
    }
  }
}

// out[i, j] += sum_s ws[s * split_stride + i * ld + j] (s in order), rounded once.
// Grid: x over column blocks, y over rows (grid-stride).
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const acc_t* __restrict__ ws, int64_t nsplit, int64_t split_stride, int64_t ld,
                    out_t* out, int64_t rows, int64_t cols, int64_t s0, int64_t s1) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    acc_t v = acc_t(0);
    for (int64_t s = 0; s < nsplit; ++s) v += ws[s * split_stride + i * ld + j];
    dev::add_into(out + i * s0 + j * s1, v);
  }
}

template <typename acc_t>
cudaError_t launch_finalize(const acc_t* ws, int64_t nsplit, int64_t split_stride, int64_t ld,
                            const OutMat& out, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const dim3 grid(grid_x(ceil_div(cols, kThreads)), grid_yz(rows));
  switch (out.dtype) {
    case DType::f32:
      finalize_kernel<acc_t, float><<<grid, kThreads, 0, stream>>>(
          ws, nsplit, split_stride, ld, static_cast<float*>(out.ptr), rows, cols, out.stride0,
          out.stride1);
      break;
    case DType::f64:
      finalize_kernel<acc_t, double><<<grid, kThreads, 0, stream>>>(
          ws, nsplit, split_stride, ld, static_cast<double*>(out.ptr), rows, cols, out.stride0,
          out.stride1);
      break;
    case DType::f16:
      finalize_kernel<acc_t, __half><<<grid, kThreads, 0, stream>>>(
          ws, nsplit, split_stride, ld, static_cast<__half*>(out.ptr), rows, cols, out.stride0,
          out.stride1);
      break;
    case DType::bf16:
      finalize_kernel<acc_t, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          ws, nsplit, split_stride, ld, static_cast<__nv_bfloat16*>(out.ptr), rows, cols,
          out.stride0, out.stride1);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// How the K rows and the output tiles are spread over blocks, and the workspace layout.
struct Plan {
  int64_t K, mtiles, ntn, nsplit, rows_per_split, ldw, split_stride, ldb;
  size_t bytes_w, bytes_b;
};

template <typename scalar_t, typename Core>
cudaError_t make_plan(int64_t B, int64_t T, int64_t d, int64_t p, Plan& pl) {
  using acc_t = acc_of<scalar_t>;
  pl = Plan{};
  pl.K = B * T;
  if (pl.K == 0 || p == 0) return cudaSuccess;  // nothing to add
  pl.mtiles = ceil_div(p, Core::BM);
  pl.ntn = std::max<int64_t>(ceil_div(d, Core::BN), 1);  // d == 0: one tile for the bias
  const int64_t ntiles = pl.mtiles * pl.ntn;
  if (ntiles > kMaxGridX) return cudaErrorInvalidValue;
  // Enough blocks for one full wave at the kernel's occupancy, in splits of at least
  // kMinRowsPerSplit rows.
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, clipped_sum_kernel<scalar_t, Core>,
                                                    kThreads, 0) != cudaSuccess)
    per_sm = 1;
  const int64_t target = static_cast<int64_t>(sm_count()) * std::max(per_sm, 1);
  int64_t nsplit = ceil_div(target, ntiles);
  nsplit = std::min(nsplit, std::max<int64_t>(pl.K / kMinRowsPerSplit, 1));
  nsplit = std::min(nsplit, kMaxGridYZ);
  pl.rows_per_split = ceil_div(ceil_div(pl.K, nsplit), Core::BK) * Core::BK;
  pl.nsplit = ceil_div(pl.K, pl.rows_per_split);  // every split has at least one row
  pl.ldw = pl.ntn * Core::BN;
  pl.split_stride = pl.mtiles * Core::BM * pl.ldw;
  pl.ldb = pl.mtiles * Core::BM;
  pl.bytes_w = static_cast<size_t>(pl.nsplit * pl.split_stride) * sizeof(acc_t);
  pl.bytes_b = static_cast<size_t>(pl.nsplit * pl.ldb) * sizeof(acc_t);
  return cudaSuccess;
}

template <typename scalar_t, typename Core>
cudaError_t run(const Operand3d& a, const Operand3d& g, const void* c, const OutMat& gw,
                const OutMat& gb, int64_t B, int64_t T, int64_t d, int64_t p, void* workspace,
                size_t workspace_bytes, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  Plan pl;
  cudaError_t err = make_plan<scalar_t, Core>(B, T, d, p, pl);
  if (err != cudaSuccess) return err;
  const bool bias = gb.ptr != nullptr;
  if (pl.K == 0 || p == 0 || (d == 0 && !bias)) return cudaSuccess;
  if (workspace_bytes < pl.bytes_w + pl.bytes_b) return cudaErrorInvalidValue;
  acc_t* ws_w = static_cast<acc_t*>(workspace);
  acc_t* ws_b = bias ? reinterpret_cast<acc_t*>(static_cast<char*>(workspace) + pl.bytes_w)
                     : nullptr;
  const Mat<scalar_t> am{static_cast<const scalar_t*>(a.ptr), a.stride_b, a.stride_t};
  const Mat<scalar_t> gm{static_cast<const scalar_t*>(g.ptr), g.stride_b, g.stride_t};
  const dim3 grid(static_cast<unsigned>(pl.mtiles * pl.ntn), static_cast<unsigned>(pl.nsplit));
  clipped_sum_kernel<scalar_t, Core><<<grid, kThreads, 0, stream>>>(
      am, gm, static_cast<const acc_t*>(c), ws_w, ws_b, pl.K, T, d, p, pl.rows_per_split, pl.ntn,
      pl.ldw, pl.split_stride, pl.ldb);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = launch_finalize<acc_t>(ws_w, pl.nsplit, pl.split_stride, pl.ldw, gw, p, d, stream);
  if (err != cudaSuccess) return err;
  if (bias) err = launch_finalize<acc_t>(ws_b, pl.nsplit, pl.ldb, 0, gb, 1, p, stream);
  return err;
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<scalar_t>, Tag<Core>) with the kernel configuration for this dtype and shape:
// the larger tiles (more reuse of each loaded row) unless an output dim is small.
template <typename F>
cudaError_t dispatch(DType dtype, int64_t d, int64_t p, F&& f) {
  using h = __half;
  using bf = __nv_bfloat16;
  switch (dtype) {
    case DType::f32:
      return p >= 128 && d >= 128 ? f(Tag<float>{}, Tag<SimtCore<float, 8, 8>>{})
                                  : f(Tag<float>{}, Tag<SimtCore<float, 4, 4>>{});
    case DType::f64:
      return f(Tag<double>{}, Tag<SimtCore<double, 4, 4>>{});
    case DType::f16:
      if (!tensor_cores_enabled()) return f(Tag<h>{}, Tag<SimtCore<h, 4, 4>>{});
      return d >= 128 ? f(Tag<h>{}, Tag<WmmaCore<h, 2, 2>>{}) : f(Tag<h>{}, Tag<WmmaCore<h, 2, 1>>{});
    case DType::bf16:
      if (!tensor_cores_enabled()) return f(Tag<bf>{}, Tag<SimtCore<bf, 4, 4>>{});
      return d >= 128 ? f(Tag<bf>{}, Tag<WmmaCore<bf, 2, 2>>{})
                      : f(Tag<bf>{}, Tag<WmmaCore<bf, 2, 1>>{});
  }
  return cudaErrorInvalidValue;
}

bool valid_sizes(DType dtype, int64_t B, int64_t T, int64_t d, int64_t p) {
  return B >= 0 && T >= 0 && d >= 0 && p >= 0 &&
         (dtype == DType::f32 || dtype == DType::f64 || dtype == DType::f16 ||
          dtype == DType::bf16);
}

}  // namespace

size_t clipped_sum_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t d, int64_t p) {
  if (!valid_sizes(dtype, B, T, d, p)) return 0;
  size_t bytes = 0;
  dispatch(dtype, d, p, [&](auto s, auto core) {
    Plan pl;
    const cudaError_t err =
        make_plan<typename decltype(s)::type, typename decltype(core)::type>(B, T, d, p, pl);
    if (err == cudaSuccess) bytes = pl.bytes_w + pl.bytes_b;
    return err;
  });
  return bytes;
}

cudaError_t clipped_sum(DType dtype, Operand3d a, Operand3d g, const void* c, OutMat grad_weight,
                        OutMat grad_bias, int64_t B, int64_t T, int64_t d, int64_t p,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_sizes(dtype, B, T, d, p)) return cudaErrorInvalidValue;
  return dispatch(dtype, d, p, [&](auto s, auto core) {
    return run<typename decltype(s)::type, typename decltype(core)::type>(
        a, g, c, grad_weight, grad_bias, B, T, d, p, workspace, workspace_bytes, stream);
  });
}

}  // namespace cuda
}  // namespace bk
