// Shared building blocks of the CPU micro-kernels: function multiversioning, 64-byte SIMD
// vectors through GCC's vector extensions, and loads that convert 16-bit floats.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/norms_kernels.h"

// Compile the micro-kernels for AVX-512, AVX2+FMA and baseline x86-64, picked at load time,
// so one wheel is both portable and fast. Bodies are forced inline into each clone so they
// compile for its target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BK_MULTIVERSION
#endif
#define BK_ALWAYS_INLINE inline __attribute__((always_inline))

// The 64-byte vectors only cross function boundaries inside always-inlined helpers.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace bk {
namespace cpu {
namespace simd {

// One 64-byte register of A (16 floats or 8 doubles): the micro-kernels say exactly which
// values live in registers, and each multiversioned clone maps them to its instruction set.
template <typename A>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
};
template <typename A>
using Vec = typename Simd<A>::V;
template <typename A>
constexpr int64_t kLanes = 64 / sizeof(A);

template <typename A>
BK_ALWAYS_INLINE Vec<A> load_vec(const A* p) {
  Vec<A> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned
  return v;
}

template <typename A>
BK_ALWAYS_INLINE void store_vec(A* p, const Vec<A>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename A>
BK_ALWAYS_INLINE double horizontal_sum(const Vec<A>& v) {
  double total = 0;
  for (int64_t i = 0; i < kLanes<A>; ++i) total += v[i];
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
