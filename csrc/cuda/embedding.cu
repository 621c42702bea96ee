// CUDA kernels of the embedding-layer ops (see embedding_cuda.h).
//
// Both ops group the N = B*T rows by id. The grouping is a sort of (id, row) pairs, row =
// b*T + t, by (id, row): a bitonic sort (blocks of 2048 pairs in shared memory, then global
// merge steps), simple and deterministic. In sorted order, the rows of one id are contiguous
// and increasing, so the rows of one (id, example) are contiguous too. A pass then lists the
// first position of every group, and one thread block per (group, 128 columns) sums the
// group's rows in order:
//   embedding_norm:        groups (id, b): out[b] += ||sum of the group's g rows||^2
//                          (= sum over its pairs s, t of <g_s, g_t>), cost O(N d), never T*T;
//   embedding_clipped_sum: groups id: grad_weight[id] += sum of c_b g rows, one writer per
//                          element, rounding once: deterministic.
// embedding_clipped_sum without `deterministic` (and with an fp32/fp64 buffer at least as wide
// as the accumulation) skips the sort and adds c_b g_bt into grad_weight[id] with atomics.
#include "cuda/embedding_cuda.h"

#include "cuda/common.cuh"

namespace bk {
namespace cuda {
namespace {

using dev::acc_of;

constexpr int kSortThreads = 1024;
constexpr int kSortBlock = 2 * kSortThreads;  // pairs sorted in shared memory per block
constexpr int kColThreads = 128;              // columns per block in the row-summing kernels
constexpr int kThreads = 256;                 // simple elementwise kernels

template <typename scalar_t>
struct Mat {
  const scalar_t* ptr;
  int64_t stride_b;
  int64_t stride_t;
};

// One (id, row) pair; key is the id mapped to an unsigned of the same order. 16-byte aligned:
// one vector load or store.
struct alignas(16) Item {
  unsigned long long key;
  unsigned int row;
  unsigned int unused;
};
static_assert(sizeof(Item) == 16, "Item is 16 bytes");

constexpr unsigned long long kSignBit = 1ull << 63;
constexpr unsigned long long kSentinelKey = ~0ull;  // with row ~0u, after every real pair
constexpr unsigned int kSentinelRow = ~0u;

__device__ __forceinline__ unsigned long long id_key(int64_t id) {
  return static_cast<unsigned long long>(id) ^ kSignBit;
}
__device__ __forceinline__ int64_t key_id(unsigned long long key) {
  return static_cast<int64_t>(key ^ kSignBit);
}

__device__ __forceinline__ int64_t load_id(const Ids& ids, int64_t i) {
  return ids.is_int64 ? static_cast<const int64_t*>(ids.ptr)[i]
                      : static_cast<int64_t>(static_cast<const int32_t*>(ids.ptr)[i]);
}

__device__ __forceinline__ bool item_less(const Item& x, const Item& y) {
  return x.key < y.key || (x.key == y.key && x.row < y.row);
}

// ---------------------------------------------------------------------------------------
// Checks and sort
// ---------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    check_ids_kernel(Ids ids, int64_t N, int64_t V, bool has_pad, int64_t pad,
                     unsigned long long* flags) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; r < N;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t id = load_id(ids, r);
    if (has_pad && id == pad) continue;
    if (id < 0 || id >= V) {
      atomicExch(flags, 1ull);
      atomicExch(flags + 1, static_cast<unsigned long long>(id));
    }
  }
}

// items[0, N) = (id, row) pairs, items[N, M) = sentinels.
__global__ void __launch_bounds__(kThreads)
    make_items_kernel(Ids ids, int64_t N, int64_t M, Item* items) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < M;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    Item it;
    it.unused = 0;
    if (i < N) {
      it.key = id_key(load_id(ids, i));
      it.row = static_cast<unsigned int>(i);
    } else {
      it.key = kSentinelKey;
      it.row = kSentinelRow;
    }
    items[i] = it;
  }
}

// One compare-exchange of the bitonic network: positions i and i + j (j a power of two,
// i & j == 0), ascending where (i & k) == 0 (k: size of the sequences being merged).
__device__ __forceinline__ void compare_exchange(Item& x, Item& y, bool ascending) {
  if (ascending ? item_less(y, x) : item_less(x, y)) {
    const Item tmp = x;
    x = y;
    y = tmp;
  }
}

// The pair index of thread t for partner distance j: t with a zero bit inserted at j.
__device__ __forceinline__ int64_t pair_index(int64_t t, int64_t j) { return 2 * t - (t & (j - 1)); }

// Block of kSortBlock pairs in shared memory. k_merge == 0: runs every step with k <= kSortBlock
// (sorts each block, in the direction the global network wants). k_merge > kSortBlock: the
// steps j < kSortBlock of merge stage k_merge.
__global__ void __launch_bounds__(kSortThreads) bitonic_block_kernel(Item* items, int64_t k_merge) {
  __shared__ Item s[kSortBlock];
  const int tid = threadIdx.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kSortBlock;
  s[tid] = items[base + tid];
  s[tid + kSortThreads] = items[base + tid + kSortThreads];
  auto step = [&](int64_t k, int j) {
    __syncthreads();
    const int i = static_cast<int>(pair_index(tid, j));
    compare_exchange(s[i], s[i + j], ((base + i) & k) == 0);
  };
  if (k_merge == 0) {
    for (int k = 2; k <= kSortBlock; k <<= 1)
      for (int j = k >> 1; j > 0; j >>= 1) step(k, j);
  } else {
    for (int j = kSortBlock >> 1; j > 0; j >>= 1) step(k_merge, j);
  }
  __syncthreads();
  items[base + tid] = s[tid];
  items[base + tid + kSortThreads] = s[tid + kSortThreads];
}

// Step j >= kSortBlock of merge stage k, over all M/2 pairs.
__global__ void __launch_bounds__(kThreads) bitonic_global_kernel(Item* items, int64_t M, int64_t k,
                                                                 int64_t j) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; t < M / 2;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = pair_index(t, j);
    Item x = items[i], y = items[i + j];
    const Item x0 = x;
    compare_exchange(x, y, (i & k) == 0);
    if (x.row != x0.row) {  // swapped (rows are unique)
      items[i] = x;
      items[i + j] = y;
    }
  }
}

int64_t padded_size(int64_t N) {
  int64_t M = kSortBlock;
  while (M < N) M <<= 1;
  return M;
}

// Sorts the N (id, row) pairs into items[0, N) by (id, row).
cudaError_t sort_items(Ids ids, int64_t N, Item* items, cudaStream_t stream) {
  const int64_t M = padded_size(N);
  const unsigned elem_grid = grid_x(std::min<int64_t>(ceil_div(M, kThreads), 65536));
  make_items_kernel<<<elem_grid, kThreads, 0, stream>>>(ids, N, M, items);
  const unsigned blocks = static_cast<unsigned>(M / kSortBlock);
  bitonic_block_kernel<<<blocks, kSortThreads, 0, stream>>>(items, 0);
  for (int64_t k = 2 * kSortBlock; k <= M; k <<= 1) {
    for (int64_t j = k / 2; j >= kSortBlock; j >>= 1) {
      const unsigned grid = grid_x(std::min<int64_t>(ceil_div(M / 2, kThreads), 65536));
      bitonic_global_kernel<<<grid, kThreads, 0, stream>>>(items, M, k, j);
    }
    bitonic_block_kernel<<<blocks, kSortThreads, 0, stream>>>(items, k);
  }
  return cudaGetLastError();
}

// Whether sorted position i starts a group: a new id, or (per_example) a new example.
__device__ __forceinline__ bool starts_group(const Item* items, int64_t i, bool per_example,
                                             unsigned int T) {
  if (i == 0) return true;
  const Item x = items[i], y = items[i - 1];
  return x.key != y.key || (per_example && x.row / T != y.row / T);
}

// Appends the first position of every group (groups of the padding id excepted) to starts;
// *count (zeroed before) ends as their number. The order of the list does not matter: every
// group is handled on its own.
__global__ void __launch_bounds__(kThreads)
    group_starts_kernel(const Item* items, int64_t N, bool per_example, unsigned int T,
                        bool has_pad, unsigned long long pad_key, unsigned int* starts,
                        unsigned int* count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    if (!starts_group(items, i, per_example, T)) continue;
    if (has_pad && items[i].key == pad_key) continue;
    starts[atomicAdd(count, 1u)] = static_cast<unsigned int>(i);
  }
}

// ---------------------------------------------------------------------------------------
// Per-group sums
// ---------------------------------------------------------------------------------------

// Grid: x over groups (grid-stride), y over blocks of kColThreads columns. Group (id, b):
// s = sum of its g rows (column by column), out[b] += sum over columns of s^2.
template <typename scalar_t>
__global__ void __launch_bounds__(kColThreads)
    norm_groups_kernel(const Item* __restrict__ items, const unsigned int* __restrict__ starts,
                       const unsigned int* __restrict__ count, int64_t N, unsigned int T,
                       Mat<scalar_t> g, int64_t d, acc_of<scalar_t>* out, acc_of<scalar_t>* shares,
                       int64_t ncb) {
  using acc_t = acc_of<scalar_t>;
  __shared__ acc_t red[32];
  const unsigned int ngroups = *count;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kColThreads + threadIdx.x;
  for (unsigned int q = blockIdx.x; q < ngroups; q += gridDim.x) {
    const int64_t i0 = starts[q];
    const Item first = items[i0];
    const unsigned int b = first.row / T;
    acc_t s = acc_t(0);
    if (col < d) {
      const scalar_t* gb = g.ptr + b * g.stride_b + col;
      for (int64_t i = i0; i < N; ++i) {
        const Item it = items[i];
        if (it.key != first.key || it.row / T != b) break;
        s += dev::widen(gb[(it.row - b * T) * g.stride_t]);
      }
    }
    const acc_t v = dev::block_sum(s * s, red);
    // The group's share of out[b], in the slot of its first row (unique: groups are runs of
    // rows sorted by (id, row)) and column block, or atomically without shares.
    if (threadIdx.x == 0) {
      if (shares != nullptr) shares[int64_t(first.row) * ncb + blockIdx.y] = v;
      else atomicAdd(out + b, v);
    }
  }
}

// Group id: grad_weight[id, col] += sum over its rows, in increasing row order, of c_b g.
template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kColThreads)
    scatter_groups_kernel(const Item* __restrict__ items, const unsigned int* __restrict__ starts,
                          const unsigned int* __restrict__ count, int64_t N, unsigned int T,
                          Mat<scalar_t> g, const acc_of<scalar_t>* __restrict__ c, int64_t d,
                          out_t* out, int64_t s0, int64_t s1, int64_t V) {
  using acc_t = acc_of<scalar_t>;
  const unsigned int ngroups = *count;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kColThreads + threadIdx.x;
  if (col >= d) return;
  for (unsigned int q = blockIdx.x; q < ngroups; q += gridDim.x) {
    const int64_t i0 = starts[q];
    const unsigned long long key = items[i0].key;
    const int64_t id = key_id(key);
    if (id < 0 || id >= V) continue;  // checked before the launch; never write out of bounds
    acc_t s = acc_t(0);
    for (int64_t i = i0; i < N; ++i) {
      const Item it = items[i];
      if (it.key != key) break;
      const unsigned int b = it.row / T, t = it.row - b * T;
      s += c[b] * dev::widen(g.ptr[b * g.stride_b + t * g.stride_t + col]);
    }
    dev::add_into(out + id * s0 + col * s1, s);
  }
}

// Unsorted path: grad_weight[id, col] += c_b g[b, t, col] with atomics (out_t float or double,
// at least as wide as acc_t). Grid: x over rows (grid-stride), y over column blocks.
template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kColThreads)
    scatter_atomic_kernel(Ids ids, int64_t N, int64_t T, Mat<scalar_t> g,
                          const acc_of<scalar_t>* __restrict__ c, int64_t d, out_t* out,
                          int64_t s0, int64_t s1, int64_t V, bool has_pad, int64_t pad) {
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kColThreads + threadIdx.x;
  if (col >= d) return;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const int64_t id = load_id(ids, r);
    if ((has_pad && id == pad) || id < 0 || id >= V) continue;
    const int64_t b = r / T, t = r - b * T;
    const out_t v = static_cast<out_t>(c[b] * dev::widen(g.ptr[b * g.stride_b + t * g.stride_t + col]));
    atomicAdd(out + id * s0 + col * s1, v);
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

struct Workspace {
  Item* items;
  unsigned int* starts;
  unsigned int* count;
};

size_t items_bytes(int64_t N) { return static_cast<size_t>(padded_size(N)) * sizeof(Item); }
size_t starts_bytes(int64_t N) { return static_cast<size_t>(ceil_div(N, 4) * 4) * sizeof(unsigned int); }

Workspace carve(void* workspace, int64_t N) {
  char* p = static_cast<char*>(workspace);
  return Workspace{reinterpret_cast<Item*>(p), reinterpret_cast<unsigned int*>(p + items_bytes(N)),
                   reinterpret_cast<unsigned int*>(p + items_bytes(N) + starts_bytes(N))};
}

// Sorts, then lists the groups; returns the grid for the per-group kernels.
cudaError_t group_rows(Ids ids, int64_t N, int64_t T, bool per_example, bool has_pad, int64_t pad,
                       const Workspace& ws, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(ws.count, 0, sizeof(unsigned int), stream);
  if (err != cudaSuccess) return err;
  err = sort_items(ids, N, ws.items, stream);
  if (err != cudaSuccess) return err;
  // The padding id as a key (a pad no id can equal maps to a key no item has).
  const unsigned long long pad_key = static_cast<unsigned long long>(pad) ^ kSignBit;
  const unsigned grid = grid_x(std::min<int64_t>(ceil_div(N, kThreads), 65536));
  group_starts_kernel<<<grid, kThreads, 0, stream>>>(ws.items, N, per_example,
                                                     static_cast<unsigned int>(T), has_pad,
                                                     pad_key, ws.starts, ws.count);
  return cudaGetLastError();
}

dim3 group_grid(int64_t N, int64_t d) {
  // Enough blocks to fill the GPU a few times; they stride over the groups.
  return dim3(grid_x(std::min<int64_t>(N, 16LL * sm_count())), grid_yz(ceil_div(d, kColThreads)));
}

template <typename scalar_t>
Mat<scalar_t> typed(const Operand3d& x) {
  return Mat<scalar_t>{static_cast<const scalar_t*>(x.ptr), x.stride_b, x.stride_t};
}

// With shares (rows x column blocks, zeroed here), each group stores its share in its own slot
// and the shares are summed per example in a fixed order: bitwise reproducible.
template <typename scalar_t>
cudaError_t norm_typed(Ids ids, Operand3d g, bool has_pad, int64_t pad, void* out, int64_t B,
                       int64_t T, int64_t d, const Workspace& ws, void* shares, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const int64_t N = B * T;
  const int64_t ncb = ceil_div(d, kColThreads);
  cudaError_t err = group_rows(ids, N, T, /*per_example=*/true, has_pad, pad, ws, stream);
  if (err != cudaSuccess) return err;
  if (shares != nullptr) {
    err = cudaMemsetAsync(shares, 0, static_cast<size_t>(N * ncb) * sizeof(acc_t), stream);
    if (err != cudaSuccess) return err;
  }
  norm_groups_kernel<scalar_t><<<group_grid(N, d), kColThreads, 0, stream>>>(
      ws.items, ws.starts, ws.count, N, static_cast<unsigned int>(T), typed<scalar_t>(g), d,
      static_cast<acc_t*>(out), static_cast<acc_t*>(shares), ncb);
  launch_sum_shares<acc_t>(shares, T * ncb, out, B, stream);
  return cudaGetLastError();
}

template <typename scalar_t, typename out_t>
cudaError_t clipped_sum_typed(Ids ids, Operand3d g, const void* c, bool has_pad, int64_t pad,
                              const OutMat& o, int64_t V, bool sorted, int64_t B, int64_t T,
                              int64_t d, const Workspace& ws, cudaStream_t stream) {
  using acc_t = acc_of<scalar_t>;
  const int64_t N = B * T;
  const acc_t* cc = static_cast<const acc_t*>(c);
  out_t* out = static_cast<out_t*>(o.ptr);
  if (sorted) {
    cudaError_t err = group_rows(ids, N, T, /*per_example=*/false, has_pad, pad, ws, stream);
    if (err != cudaSuccess) return err;
    scatter_groups_kernel<scalar_t, out_t><<<group_grid(N, d), kColThreads, 0, stream>>>(
        ws.items, ws.starts, ws.count, N, static_cast<unsigned int>(T), typed<scalar_t>(g), cc,
        d, out, o.stride0, o.stride1, V);
  } else {
    if constexpr (std::is_same_v<out_t, float> || std::is_same_v<out_t, double>) {
      const dim3 grid(grid_x(std::min<int64_t>(N, 64LL * sm_count())),
                      grid_yz(ceil_div(d, kColThreads)));
      scatter_atomic_kernel<scalar_t, out_t><<<grid, kColThreads, 0, stream>>>(
          ids, N, T, typed<scalar_t>(g), cc, d, out, o.stride0, o.stride1, V, has_pad, pad);
    } else {
      return cudaErrorInvalidValue;  // half outputs always take the sorted path
    }
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t clipped_sum_out(Ids ids, Operand3d g, const void* c, bool has_pad, int64_t pad,
                            const OutMat& o, int64_t V, bool sorted, int64_t B, int64_t T,
                            int64_t d, const Workspace& ws, cudaStream_t stream) {
  switch (o.dtype) {
    case DType::f32:
      return clipped_sum_typed<scalar_t, float>(ids, g, c, has_pad, pad, o, V, sorted, B, T, d, ws, stream);
    case DType::f64:
      return clipped_sum_typed<scalar_t, double>(ids, g, c, has_pad, pad, o, V, sorted, B, T, d, ws, stream);
    case DType::f16:
      return clipped_sum_typed<scalar_t, __half>(ids, g, c, has_pad, pad, o, V, sorted, B, T, d, ws, stream);
    case DType::bf16:
      return clipped_sum_typed<scalar_t, __nv_bfloat16>(ids, g, c, has_pad, pad, o, V, sorted, B, T, d, ws, stream);
  }
  return cudaErrorInvalidValue;
}

bool valid_dtype(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::f16 || t == DType::bf16;
}

// Rows are 32-bit in the sort, with one value left for the sentinel; columns are blocks of
// grid y.
bool valid_sizes(int64_t B, int64_t T, int64_t d) {
  return B >= 0 && T >= 0 && (T == 0 || B <= (int64_t{0xfffffffe} / T)) && d >= 0 &&
         ceil_div(d, kColThreads) <= kMaxGridYZ;
}

}  // namespace

cudaError_t embedding_check_ids(Ids ids, int64_t N, int64_t V, bool has_pad, int64_t pad,
                                int64_t* flags, cudaStream_t stream) {
  if (N < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const unsigned grid = grid_x(std::min<int64_t>(ceil_div(N, kThreads), 65536));
  check_ids_kernel<<<grid, kThreads, 0, stream>>>(ids, N, V, has_pad, pad,
                                                  reinterpret_cast<unsigned long long*>(flags));
  return cudaGetLastError();
}

size_t embedding_workspace_bytes(int64_t N) {
  if (N <= 0) return 0;
  return items_bytes(N) + starts_bytes(N) + 16;
}

// The sort's workspace, then (16-byte aligned) the groups' shares: N rows x column blocks of
// the accumulation type (8 bytes covers double).
size_t embedding_norm_workspace_bytes(int64_t N, int64_t d) {
  if (N <= 0) return 0;
  return ceil_div(embedding_workspace_bytes(N), 16) * 16 + static_cast<size_t>(N * ceil_div(d, kColThreads)) * 8;
}

bool embedding_clipped_sum_sorts(DType dtype, DType out_dtype, bool deterministic) {
  if (deterministic) return true;
  if (out_dtype == DType::f64) return false;
  return !(out_dtype == DType::f32 && dtype != DType::f64);
}

cudaError_t embedding_norm(DType dtype, Ids ids, Operand3d g, bool has_pad, int64_t pad,
                           void* out, int64_t B, int64_t T, int64_t d, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_dtype(dtype) || !valid_sizes(B, T, d)) return cudaErrorInvalidValue;
  const size_t out_elem = dtype == DType::f64 ? sizeof(double) : sizeof(float);
  if (B > 0) {
    const cudaError_t err = cudaMemsetAsync(out, 0, static_cast<size_t>(B) * out_elem, stream);
    if (err != cudaSuccess) return err;
  }
  const int64_t N = B * T;
  if (N == 0 || d == 0) return cudaGetLastError();
  if (workspace_bytes < embedding_workspace_bytes(N)) return cudaErrorInvalidValue;
  const Workspace ws = carve(workspace, N);
  void* shares = workspace_bytes >= embedding_norm_workspace_bytes(N, d)
                     ? static_cast<char*>(workspace) + ceil_div(embedding_workspace_bytes(N), 16) * 16
                     : nullptr;
  switch (dtype) {
    case DType::f32: return norm_typed<float>(ids, g, has_pad, pad, out, B, T, d, ws, shares, stream);
    case DType::f64: return norm_typed<double>(ids, g, has_pad, pad, out, B, T, d, ws, shares, stream);
    case DType::f16: return norm_typed<__half>(ids, g, has_pad, pad, out, B, T, d, ws, shares, stream);
    case DType::bf16:
      return norm_typed<__nv_bfloat16>(ids, g, has_pad, pad, out, B, T, d, ws, shares, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t embedding_clipped_sum(DType dtype, Ids ids, Operand3d g, const void* c, bool has_pad,
                                  int64_t pad, OutMat grad_weight, int64_t V, bool deterministic,
                                  int64_t B, int64_t T, int64_t d, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_dtype(dtype) || !valid_dtype(grad_weight.dtype) || !valid_sizes(B, T, d) || V < 0)
    return cudaErrorInvalidValue;
  const int64_t N = B * T;
  if (N == 0 || d == 0 || V == 0) return cudaSuccess;
  const bool sorted = embedding_clipped_sum_sorts(dtype, grad_weight.dtype, deterministic);
  if (sorted && workspace_bytes < embedding_workspace_bytes(N)) return cudaErrorInvalidValue;
  const Workspace ws = sorted ? carve(workspace, N) : Workspace{nullptr, nullptr, nullptr};
  switch (dtype) {
    case DType::f32:
      return clipped_sum_out<float>(ids, g, c, has_pad, pad, grad_weight, V, sorted, B, T, d, ws, stream);
    case DType::f64:
      return clipped_sum_out<double>(ids, g, c, has_pad, pad, grad_weight, V, sorted, B, T, d, ws, stream);
    case DType::f16:
      return clipped_sum_out<__half>(ids, g, c, has_pad, pad, grad_weight, V, sorted, B, T, d, ws, stream);
    case DType::bf16:
      return clipped_sum_out<__nv_bfloat16>(ids, g, c, has_pad, pad, grad_weight, V, sorted, B, T, d, ws, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bk
