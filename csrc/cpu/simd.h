// Shared building blocks of the CPU micro-kernels: one body per instruction set at that set's
// native vector width (GCC vector extensions), and loads that convert 16-bit floats.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/norms_kernels.h"

// Compile the micro-kernels for AVX-512, AVX2+FMA and baseline x86-64, picked at load time,
// so one wheel is both portable and fast. Bodies are forced inline into each clone so they
// compile for its target. BK_MULTIVERSION suits bodies with no vectors of ours (GCC
// vectorizes them per clone); bodies written with Vec take BK_SIMD_VERSIONS (below).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BK_X86_FMV 1
#define BK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BK_MULTIVERSION
#endif
#define BK_ALWAYS_INLINE inline __attribute__((always_inline))

// `ret name params { return impl<W> args; }` once per instruction set, W its vector width in
// bytes: 64 with AVX-512, 32 with AVX2+FMA, 16 on baseline x86-64 (and off x86-64 GCC), one
// picked at load time (GCC's function multiversioning). A vector wider than the target's
// registers is not an error to GCC: it compiles to element-by-element code through the stack,
// which made the 64-byte kernels 5-50x slower than BLAS on an AVX2-only AMD EPYC (session 20).
#if defined(BK_SIMD_WIDTH)  // one width only: the C++ tests build each width's bodies this way
#if defined(BK_X86_FMV) && BK_SIMD_WIDTH == 64
#define BK_SIMD_TARGET __attribute__((target("arch=x86-64-v4")))
#elif defined(BK_X86_FMV) && BK_SIMD_WIDTH == 32
#define BK_SIMD_TARGET __attribute__((target("arch=x86-64-v3")))
#else
#define BK_SIMD_TARGET
#endif
#define BK_SIMD_VERSIONS(ret, name, params, impl, args) \
  BK_SIMD_TARGET ret name params { return impl<BK_SIMD_WIDTH> args; }
#elif defined(BK_X86_FMV)
#define BK_SIMD_VERSIONS(ret, name, params, impl, args)                     \
  __attribute__((target("arch=x86-64-v4"))) ret name params { return impl<64> args; } \
  __attribute__((target("arch=x86-64-v3"))) ret name params { return impl<32> args; } \
  __attribute__((target("default"))) ret name params { return impl<16> args; }
#else
#define BK_SIMD_VERSIONS(ret, name, params, impl, args) \
  ret name params { return impl<16> args; }
#endif

// The vectors only cross function boundaries inside always-inlined helpers.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace bk {
namespace cpu {
namespace simd {

// One register of W bytes holding A (W = 64: 16 floats or 8 doubles). The kernels' data
// layouts (tile widths) are in 64-byte units, kLanes<A>, on every instruction set, so all
// clones read the same packed buffers; a clone with narrower registers covers a 64-byte unit
// with several and splits its register tile into passes that fit its register file.
template <typename A, int W>
struct Simd {
  typedef A V __attribute__((vector_size(W)));
};
template <typename A, int W = 64>
using Vec = typename Simd<A, W>::V;
template <typename A, int W = 64>
constexpr int64_t kLanes = W / sizeof(A);

template <int W, typename A>
BK_ALWAYS_INLINE Vec<A, W> load_vec(const A* p) {
  Vec<A, W> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned
  return v;
}

template <typename V, typename A>
BK_ALWAYS_INLINE void store_vec(A* p, const V& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename V>
BK_ALWAYS_INLINE double horizontal_sum(const V& v) {
  double total = 0;
  for (size_t i = 0; i < sizeof(V) / sizeof(v[0]); ++i) total += v[i];
  return total;
}

// Input element -> accumulation type.
inline float load(bf16 x) { return to_float(x); }
inline float load(fp16 x) { return to_float(x); }
inline float load(float x) { return x; }
inline double load(double x) { return x; }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A per-thread scratch buffer of at least n elements that lives as long as the thread, so a
// kernel called every step does not map (and page-fault in) fresh memory each call. `slot`
// tells apart buffers used at the same time. Contents are unspecified.
template <typename A, int slot = 0>
A* scratch(size_t n) {
  thread_local std::vector<A> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace simd
}  // namespace cpu
}  // namespace bk
