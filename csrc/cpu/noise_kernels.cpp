// CPU kernel of bk::add_noise_ (see noise_kernels.h; counter layout in docs/OPS.md).
//
// Work goes in groups of L Philox blocks, L the lanes of a vector of 32-bit words: word j of
// the group's k-th block sits in lane k of the vector x[j], so Philox's rounds and Box-Muller
// are plain lane-wise vector code, then a 4 x L transpose puts the 4 L normals back in counter
// order. Groups are independent, so threads split them freely and the result does not depend
// on their number.
//
// The transcendental functions are our own float32 approximations, specialised to their
// inputs: the log works from the 32-bit word itself (so u1 near 1, where -ln u1 is tiny, keeps
// full relative precision), and sin/cos reduce the angle exactly in integers (the angle is a
// fraction of a turn). C++ test: csrc/tests/test_noise.cpp.
//
// Philox's rounds and the log's 9-step polynomial are chains of dependent instructions, and
// GCC does not reorder instructions before register allocation on x86, so the source order is
// the order the CPU's out-of-order window sees: one chain at a time, the kernel was bound by
// their latency. The functions below therefore take several independent vectors (two groups
// of blocks, each with two word pairs for Box-Muller) and advance all of them one statement at
// a time (BK_EACH): the same arithmetic per lane in the same order, so the bits do not depend
// on how many go together.
//
// One body (struct Noise<VB>), compiled three times on x86-64 with each instruction set's
// native vector width VB: AVX-512 (64 bytes), AVX2+FMA (32) and baseline SSE2 (16), picked at
// run time. (GCC vector extensions wider than the target's registers compile element by
// element for anything beyond lane-wise arithmetic, so one width for all would not do.)
#include "cpu/noise_kernels.h"

#include <cstring>

#include "cpu/simd.h"  // BK_MULTIVERSION, BK_ALWAYS_INLINE

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BK_NOISE_X86 1
#include <immintrin.h>
// One body per instruction set, each at its native vector width (see above).
#define BK_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define BK_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#endif

namespace bk {
namespace cpu {

namespace {

// Vectors of VB bytes.
template <int VB>
struct Vec;
#define BK_VEC_TYPES(VB)                                   \
  template <>                                              \
  struct Vec<VB> {                                         \
    typedef uint32_t U32 __attribute__((vector_size(VB))); \
    typedef int32_t I32 __attribute__((vector_size(VB)));  \
    typedef uint64_t U64 __attribute__((vector_size(VB))); \
    typedef float F32 __attribute__((vector_size(VB)));    \
  };
BK_VEC_TYPES(16)
BK_VEC_TYPES(32)
BK_VEC_TYPES(64)
#undef BK_VEC_TYPES

// The 64-bit products of the even 32-bit lanes of a and b (one pmuludq; GCC does not find it
// in generic code and multiplies all 64 bits).
#ifdef BK_NOISE_X86
// The builtins, not the _mm*_mul_epu32 wrappers: those carry a target attribute that this
// always-inline code (inlined only into functions of the right target) cannot have.
BK_ALWAYS_INLINE Vec<16>::U64 mul_even(Vec<16>::U32 a, Vec<16>::U32 b) {
  return (Vec<16>::U64)__builtin_ia32_pmuludq128((__v4si)a, (__v4si)b);
}
BK_ALWAYS_INLINE Vec<32>::U64 mul_even(Vec<32>::U32 a, Vec<32>::U32 b) {
  return (Vec<32>::U64)__builtin_ia32_pmuludq256((__v8si)a, (__v8si)b);
}
BK_ALWAYS_INLINE Vec<64>::U64 mul_even(Vec<64>::U32 a, Vec<64>::U32 b) {
  return (Vec<64>::U64)__builtin_ia32_pmuludq512_mask((__v16si)a, (__v16si)b, (__v8di){},
                                                      (__mmask8)-1);
}
#else
#define BK_MUL_EVEN(VB)                                                                 \
  BK_ALWAYS_INLINE Vec<VB>::U64 mul_even(Vec<VB>::U32 a, Vec<VB>::U32 b) {             \
    return ((Vec<VB>::U64)a & 0xffffffffu) * ((Vec<VB>::U64)b & 0xffffffffu);           \
  }
BK_MUL_EVEN(16)
BK_MUL_EVEN(32)
BK_MUL_EVEN(64)
#undef BK_MUL_EVEN
#endif

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // Philox multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments

// Chunks of 16 blocks (64 counters), a whole number of groups for every width, are what
// threads split.
constexpr int64_t kChunkBlocks = 16;

// Groups of Philox blocks computed side by side in the main loop (see the top of the file).
// Measured on a 2-core AMD EPYC (AVX2), one thread, Philox's rounds unrolled: 2, 3, 4 groups
// take 1.56, 1.51, 1.47 ns a normal with AVX2 and 3.9, 3.8, 4.8 with SSE2 (one group, rounds
// not unrolled, as before: 2.23 and 6.05). Two keep the register pressure low (AVX2 and SSE2
// have 16 vector registers); not measured with AVX-512.
constexpr int kInterleave = 2;

// for (i = 0; i < N; ++i), unrolled: each statement of a chain for all N vectors in a row.
#define BK_EACH(i, N) _Pragma("GCC unroll 8") for (int i = 0; i < (N); ++i)

// Only lane-wise arithmetic, bit operations and shuffles of native vectors below.
template <int VB>
struct Noise {
  using U32 = typename Vec<VB>::U32;
  using I32 = typename Vec<VB>::I32;
  using U64 = typename Vec<VB>::U64;
  using F32 = typename Vec<VB>::F32;
  static constexpr int kBlocks = VB / 4;      // Philox blocks per group: one per lane
  static constexpr int kGroup = 4 * kBlocks;  // counters (and normals) per group

  template <typename V, typename S>
  static BK_ALWAYS_INLINE V splat(S x) {
    return V{} + x;
  }
  static BK_ALWAYS_INLINE F32 to_f32(I32 x) { return __builtin_convertvector(x, F32); }
  static BK_ALWAYS_INLINE F32 to_f32(U32 x) { return __builtin_convertvector(x, F32); }
  // mask ? a : b, for masks of all-ones or all-zeros lanes.
  static BK_ALWAYS_INLINE F32 select(U32 mask, F32 a, F32 b) {
    return (F32)(((U32)a & mask) | ((U32)b & ~mask));
  }

  // The counters of a group's blocks: block q = (q_lo, q_hi) as two lane vectors, advanced
  // by a group at a time with a carry from the low word into the high one (a + b with
  // b < 2^31 wrapped iff a's top bit is set and the sum's is not).
  struct Counters {
    U32 lo, hi;
    Counters() = default;
    BK_ALWAYS_INLINE explicit Counters(uint64_t q0) {
      U32 lane;
      for (int i = 0; i < kBlocks; ++i) lane[i] = uint32_t(i);
      const U32 base = splat<U32>(uint32_t(q0));
      lo = base + lane;
      hi = splat<U32>(uint32_t(q0 >> 32)) + ((base & ~lo) >> 31);
    }
    BK_ALWAYS_INLINE void advance(int groups = 1) {
      const U32 next = lo + uint32_t(groups * kBlocks);
      hi += (lo & ~next) >> 31;
      lo = next;
    }
  };

  // Philox4x32-10 of G groups: x[g][j] lane k is word j of block k of group g.
  // The rounds run on the even and the odd 32-bit lanes separately, each word in the low half
  // of a 64-bit lane: there the 32 x 32 -> 64-bit products take one pmuludq (which ignores
  // the upper halves, so they may hold anything), their upper halves are the hi words and
  // their lower halves the lo words, left in place.
  template <int G>
  static BK_ALWAYS_INLINE void philox(const Counters (&c)[G], const uint32_t key[2], U32 (&x)[G][4]) {
    const U32 m0 = splat<U32>(kMul0), m1 = splat<U32>(kMul1);
    U64 x0[G][2], x1[G][2], x2[G][2] = {}, x3[G][2] = {};
    BK_EACH(g, G) {
      x0[g][0] = (U64)c[g].lo;
      x0[g][1] = (U64)c[g].lo >> 32;
      x1[g][0] = (U64)c[g].hi;
      x1[g][1] = (U64)c[g].hi >> 32;
    }
    uint32_t k0 = key[0], k1 = key[1];
    _Pragma("GCC unroll 10") for (int round = 0; round < 10; ++round) {  // unrolled: 1.2x on AVX2
      BK_EACH(g, G) {
        for (int h = 0; h < 2; ++h) {  // even, odd lanes
          const U64 p0 = mul_even((U32)x0[g][h], m0), p1 = mul_even((U32)x2[g][h], m1);
          x0[g][h] = (p1 >> 32) ^ x1[g][h] ^ k0;
          x2[g][h] = (p0 >> 32) ^ x3[g][h] ^ k1;
          x1[g][h] = p1;
          x3[g][h] = p0;
        }
      }
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    // The even and odd lanes back together.
    BK_EACH(g, G) {
      const U64 words[4][2] = {{x0[g][0], x0[g][1]}, {x1[g][0], x1[g][1]},
                               {x2[g][0], x2[g][1]}, {x3[g][0], x3[g][1]}};
      for (int j = 0; j < 4; ++j) x[g][j] = (U32)((words[j][0] & 0xffffffffu) | (words[j][1] << 32));
    }
  }

  // ln(u1), u1 = (w + 1) 2^-32 in (0, 1], to a few float32 ulp for every w. As in Cephes'
  // logf, u1 = 2^e (1 + f) with 1 + f near [sqrt(1/2), sqrt(2)) and
  // ln(1 + f) = f - f^2/2 + f^3 P(f), but f comes from the integer N = w + 1 itself: with
  // N = 2^k (1 + f), f = (N - 2^k) 2^-k is an integer difference rounded once, so f keeps
  // its full relative precision even when u1 is within 2^-32 of 1, which a rounded float u1
  // could not express.
  template <int N>
  static BK_ALWAYS_INLINE void log_u1(const U32 (&w)[N], F32 (&out)[N]) {
    F32 f[N], e[N];
    BK_EACH(i, N) {
      // k = the exponent of N sqrt(2), in [0, 32] (rounding near a boundary may give the
      // neighbour: f then lies just outside the interval, where P is still accurate).
      const F32 n_sqrt2 = to_f32(w[i]) * 1.41421356f + 1.41421356f;
      const I32 k = (I32)((U32)n_sqrt2 >> 23) - 127;
      // N - 2^k modulo 2^32, where 2^32 is 0 (N = 2^32 when w = 2^32 - 1): as a signed int,
      // the true difference, |N - 2^k| < 2^(k - 1).
      const U32 below_32 = (U32)((k - 32) >> 31);  // all ones where k < 32
      const U32 pow2 = (splat<U32>(1u) << (U32)(k & 31)) & below_32;
      const I32 diff = (I32)(w[i] + 1u - pow2);
      f[i] = to_f32(diff) * (F32)((U32)(127 - k) << 23);  // times 2^-k, exact
      e[i] = to_f32(k - 32);                               // the 2^-32 goes into e
    }
    // Cephes logf's polynomial on [sqrt(1/2) - 1, sqrt(2) - 1], and ln 2 in two parts (the
    // first, 355/512, times e is exact).
    F32 z[N], p[N];
    BK_EACH(i, N) z[i] = f[i] * f[i];
    BK_EACH(i, N) p[i] = 7.0376836292e-2f * f[i] - 1.1514610310e-1f;
    BK_EACH(i, N) p[i] = p[i] * f[i] + 1.1676998740e-1f;
    BK_EACH(i, N) p[i] = p[i] * f[i] - 1.2420140846e-1f;
    BK_EACH(i, N) p[i] = p[i] * f[i] + 1.4249322787e-1f;
    BK_EACH(i, N) p[i] = p[i] * f[i] - 1.6668057665e-1f;
    BK_EACH(i, N) p[i] = p[i] * f[i] + 2.0000714765e-1f;
    BK_EACH(i, N) p[i] = p[i] * f[i] - 2.4999993993e-1f;
    BK_EACH(i, N) p[i] = p[i] * f[i] + 3.3333331174e-1f;
    BK_EACH(i, N) {
      F32 y = p[i] * f[i] * z[i] + e[i] * -2.12194440e-4f;
      y -= 0.5f * z[i];
      out[i] = (f[i] + y) + e[i] * 0.693359375f;
    }
  }

  // sqrt(x) for x >= 0 (0 included) to about an ulp, in vector arithmetic only: GCC does not
  // vectorize __builtin_sqrtf unless errno is off for the whole build. The bit-trick estimate
  // y of 1/sqrt(x) (3.5% off) gets two Newton steps (5e-6 off), r = x y, and a last Newton
  // step on r itself by the residual x - r^2 (error squared again, below float's).
  template <int N>
  static BK_ALWAYS_INLINE void sqrt(const F32 (&x)[N], F32 (&out)[N]) {
    F32 y[N], half[N];
    BK_EACH(i, N) {
      y[i] = (F32)(0x5f375a86u - ((U32)x[i] >> 1));
      half[i] = 0.5f * x[i];
    }
    for (int step = 0; step < 2; ++step)
      BK_EACH(i, N) y[i] = y[i] * (1.5f - half[i] * y[i] * y[i]);  // x = 0: y stays finite
    BK_EACH(i, N) {
      const F32 r = x[i] * y[i];
      out[i] = r + (0.5f * y[i]) * (x[i] - r * r);
    }
  }

  // cos and sin of 2 pi w 2^-32. The turn splits exactly in integers into a quadrant and a
  // remainder in [-1/8, 1/8) of a turn, where Cephes' sinf/cosf polynomials are accurate.
  template <int N>
  static BK_ALWAYS_INLINE void sincos_turn(const U32 (&w)[N], F32 (&c)[N], F32 (&s)[N]) {
    F32 x[N];
    U32 quadrant[N];
    BK_EACH(i, N) {
      const U32 t = w[i] + 0x20000000u;  // an eighth of a turn ahead, so quadrants are centred
      quadrant[i] = t >> 30;
      const I32 r = (I32)(t & 0x3fffffffu) - 0x20000000;  // in [-2^29, 2^29)
      // x = r 2 pi 2^-32 in [-pi/4, pi/4), rounded about once (with or without FMA):
      // 2 pi 2^-32 = c_hi + c_lo with c_hi of 8 significant bits, and r = r_hi + r_lo with r_hi
      // the nearest multiple of 2^13 (16 significant bits), so r_hi c_hi is exact and the rest,
      // |r_lo| <= 2^12 <= |r| unless r_hi = 0, adds little rounding.
      const I32 r_hi = (r + 0x1000) & ~0x1fff;
      const float c_hi = 0x1.92p-30f, c_lo = 0x1.fb5444p-42f;
      x[i] = to_f32(r_hi) * c_hi + (to_f32(r - r_hi) * c_hi + to_f32(r) * c_lo);
    }
    BK_EACH(i, N) {
      const F32 z = x[i] * x[i];
      const F32 sin_x =
          ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x[i] + x[i];
      const F32 cos_x =
          ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
          0.5f * z + 1.0f;
      // Angle q pi/2 + x: odd quadrants swap sin and cos; cos is negative in quadrants 1, 2 and
      // sin in 2, 3 (sign flips by xor, exact).
      const U32 odd = 0u - (quadrant[i] & 1u);  // all ones in odd quadrants
      c[i] = (F32)((U32)select(odd, sin_x, cos_x) ^ (((quadrant[i] + 1u) & 2u) << 30));
      s[i] = (F32)((U32)select(odd, cos_x, sin_x) ^ ((quadrant[i] & 2u) << 30));
    }
  }

  // Box-Muller: the two normals z0[i], z1[i] of each word pair (w0[i], w1[i]).
  template <int N>
  static BK_ALWAYS_INLINE void box_muller(const U32 (&w0)[N], const U32 (&w1)[N], F32 (&z0)[N],
                                          F32 (&z1)[N]) {
    F32 minus_2_log[N], radius[N], c[N], s[N];
    log_u1(w0, minus_2_log);
    BK_EACH(i, N) minus_2_log[i] = -2.0f * minus_2_log[i];
    sqrt(minus_2_log, radius);
    sincos_turn(w1, c, s);
    BK_EACH(i, N) {
      z0[i] = radius[i] * c[i];
      z1[i] = radius[i] * s[i];
    }
  }

  // a and b interleaved: (a0, b0, a1, b1, ...) from the first (half 0) or second half of the lanes.
  static BK_ALWAYS_INLINE F32 zip(F32 a, F32 b, int half) {
    I32 index;
    for (int i = 0; i < kBlocks; ++i) index[i] = (i % 2) * kBlocks + half * (kBlocks / 2) + i / 2;
#ifdef __clang__  // no __builtin_shuffle; untested
    F32 r;
    for (int i = 0; i < kBlocks; ++i)
      r[i] = index[i] < kBlocks ? a[index[i]] : b[index[i] - kBlocks];
    return r;
#else
    return __builtin_shuffle(a, b, index);
#endif
  }

  // out[g][4 k + j] = the normal of counter 4 q + j, q the k-th block of `counters[g]`.
  template <int G>
  static BK_ALWAYS_INLINE void group_normals(const Counters (&counters)[G], const uint32_t key[2],
                                             float (&out)[G][kGroup]) {
    U32 x[G][4];
    philox(counters, key, x);
    // The word pairs (0, 1) and (2, 3) of every group's blocks, side by side.
    U32 w0[2 * G], w1[2 * G];
    BK_EACH(g, G) {
      w0[2 * g] = x[g][0], w1[2 * g] = x[g][1];
      w0[2 * g + 1] = x[g][2], w1[2 * g + 1] = x[g][3];
    }
    F32 z0[2 * G], z1[2 * G];
    box_muller(w0, w1, z0, z1);
    BK_EACH(g, G) {
      // Transpose: the normals of words (0, 1, 2, 3), lane k -> out[g][4 k ...].
      const F32 a = zip(z0[2 * g], z0[2 * g + 1], 0), b = zip(z0[2 * g], z0[2 * g + 1], 1);
      const F32 c = zip(z1[2 * g], z1[2 * g + 1], 0), d = zip(z1[2 * g], z1[2 * g + 1], 1);
      const F32 rows[4] = {zip(a, c, 0), zip(a, c, 1), zip(b, d, 0), zip(b, d, 1)};
      std::memcpy(out[g], rows, sizeof(rows));
    }
  }

  // The chunks [c_begin, c_end) of the call's counters (chunk c: the groups of the blocks
  // q_first + 16 c + [0, 16)); group g holds the counters 4 (q_first + L g) + [0, 4 L), that is
  // the elements 4 L g - head + [0, 4 L), clipped to [0, n).
  template <typename scalar_t>
  static BK_ALWAYS_INLINE void chunks(scalar_t* grad, int64_t n, int64_t head, uint64_t q_first,
                                      const uint32_t key[2], double sd_in, double scale_in,
                                      int64_t c_begin, int64_t c_end) {
    using C = decltype(load(scalar_t{}));
    const C sd = C(sd_in), scale = C(scale_in);
    const int64_t groups = (n + head + kGroup - 1) / kGroup;
    constexpr int64_t kGroupsPerChunk = kChunkBlocks / kBlocks;
    const int64_t g_begin = c_begin * kGroupsPerChunk;
    const int64_t g_end = c_end * kGroupsPerChunk < groups ? c_end * kGroupsPerChunk : groups;
    Counters counters(q_first + uint64_t(g_begin) * kBlocks);
    int64_t g = g_begin;
    for (; g + kInterleave <= g_end; g += kInterleave, counters.advance(kInterleave))
      add_groups<kInterleave>(grad, n, g * kGroup - head, counters, key, sd, scale);
    for (; g < g_end; ++g, counters.advance()) add_groups<1>(grad, n, g * kGroup - head, counters, key, sd, scale);
  }

  // The noise of G consecutive groups, the first at `first`, added into grad from element
  // `base` on (add_group).
  template <int G, typename scalar_t, typename C>
  static BK_ALWAYS_INLINE void add_groups(scalar_t* grad, int64_t n, int64_t base, const Counters& first,
                                          const uint32_t key[2], C sd, C scale) {
    Counters group_counters[G];
    for (int i = 0; i < G; ++i) {
      group_counters[i] = first;
      group_counters[i].advance(i);
    }
    alignas(64) float z[G][kGroup];
    group_normals(group_counters, key, z);
    for (int i = 0; i < G; ++i) add_group(grad, n, base + i * kGroup, z[i], sd, scale);
  }

  // grad[base + j] = (grad[base + j] + sd z[j]) * scale for the j with 0 <= base + j < n.
  template <typename scalar_t, typename C>
  static BK_ALWAYS_INLINE void add_group(scalar_t* grad, int64_t n, int64_t base, const float* z, C sd,
                                         C scale) {
    if (base >= 0 && base + kGroup <= n) {
      scalar_t* out = grad + base;
      for (int j = 0; j < kGroup; ++j) store(out[j], (load(out[j]) + sd * C(z[j])) * scale);
    } else {  // the first or the last group
      const int64_t lo = base < 0 ? -base : 0, hi = n - base < kGroup ? n - base : kGroup;
      for (int64_t j = lo; j < hi; ++j) {
        scalar_t& out = grad[base + j];
        store(out, (load(out) + sd * C(z[j])) * scale);
      }
    }
  }

  // The pieces on arrays, for the C++ tests.
  static BK_ALWAYS_INLINE void philox_array(uint64_t q0, int64_t nblocks, const uint32_t key[2],
                                            uint32_t* out) {
    Counters counters[1] = {Counters(q0)};
    for (int64_t b0 = 0; b0 < nblocks; b0 += kBlocks, counters[0].advance()) {
      U32 x[1][4];
      philox(counters, key, x);
      for (int64_t b = b0; b < nblocks && b < b0 + kBlocks; ++b)
        for (int j = 0; j < 4; ++j) out[4 * b + j] = x[0][j][b - b0];
    }
  }
  // (No lambdas here: a lambda would be a function of the default target, and vectors wider
  // than its registers cross its boundary under another ABI.)
  template <typename V, typename In>
  static BK_ALWAYS_INLINE V load_lanes(const In* in, int64_t n, int64_t i0) {
    V v = {};
    for (int64_t i = i0; i < n && i < i0 + kBlocks; ++i) v[i - i0] = in[i];
    return v;
  }
  static BK_ALWAYS_INLINE void store_lanes(F32 v, int64_t n, int64_t i0, float* out) {
    for (int64_t i = i0; i < n && i < i0 + kBlocks; ++i) out[i] = v[i - i0];
  }
  static BK_ALWAYS_INLINE void log_array(const uint32_t* w, int64_t n, float* out) {
    for (int64_t i0 = 0; i0 < n; i0 += kBlocks) {
      const U32 in[1] = {load_lanes<U32>(w, n, i0)};
      F32 result[1];
      log_u1(in, result);
      store_lanes(result[0], n, i0, out);
    }
  }
  static BK_ALWAYS_INLINE void sqrt_array(const float* x, int64_t n, float* out) {
    for (int64_t i0 = 0; i0 < n; i0 += kBlocks) {
      const F32 in[1] = {load_lanes<F32>(x, n, i0)};
      F32 result[1];
      sqrt(in, result);
      store_lanes(result[0], n, i0, out);
    }
  }
  static BK_ALWAYS_INLINE void sincos_array(const uint32_t* w, int64_t n, float* c, float* s) {
    for (int64_t i0 = 0; i0 < n; i0 += kBlocks) {
      const U32 in[1] = {load_lanes<U32>(w, n, i0)};
      F32 cv[1], sv[1];
      sincos_turn(in, cv, sv);
      store_lanes(cv[0], n, i0, c);
      store_lanes(sv[0], n, i0, s);
    }
  }

  // Loads and stores in the compute type: float for float/bf16/fp16, double for double.
  // The 16-bit conversions are branch-free so the element loops vectorize.
  static BK_ALWAYS_INLINE float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static BK_ALWAYS_INLINE uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
  }
  static BK_ALWAYS_INLINE float load(float x) { return x; }
  static BK_ALWAYS_INLINE double load(double x) { return x; }
  static BK_ALWAYS_INLINE float load(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
  static BK_ALWAYS_INLINE float load(fp16 x) {
    // Exponent and mantissa shifted into place and rebiased; then exponent 31 (inf/nan) gets
    // float's maximal exponent, and subnormals (exponent 0) are renormalised by a float
    // subtraction (exact), as in F. Giesen's half_to_float.
    const uint32_t shifted = uint32_t(x.bits & 0x7fffu) << 13;
    const uint32_t exp = shifted & 0x0f800000u;
    uint32_t u = shifted + ((127u - 15u) << 23);
    u = exp == 0x0f800000u ? u + ((128u - 16u) << 23) : u;
    const float sub = bits_to_float(u + (1u << 23)) - bits_to_float(113u << 23);
    u = exp == 0 ? float_to_bits(sub) : u;
    return bits_to_float(u | uint32_t(x.bits & 0x8000u) << 16);
  }
  static BK_ALWAYS_INLINE void store(float& out, float x) { out = x; }
  static BK_ALWAYS_INLINE void store(double& out, double x) { out = x; }
  static BK_ALWAYS_INLINE void store(bf16& out, float x) {
    const uint32_t u = float_to_bits(x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // to nearest even
    const uint32_t nan = (u >> 16) | 0x40u;                           // quiet nan
    out.bits = uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
  }
  static BK_ALWAYS_INLINE void store(fp16& out, float x) {
    // To nearest even (F. Giesen's float_to_half_fast3_rtne): normal results add the rounding
    // bias and rebias the exponent (a carry rounds up into the next binade or to inf);
    // subnormal ones let a float addition round onto their grid of 2^-24.
    const uint32_t u = float_to_bits(x);
    const uint32_t sign = u & 0x80000000u;
    const uint32_t a = u ^ sign;
    const uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    const uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - (126u << 23);
    uint32_t h = a < (113u << 23) ? subnormal : normal;
    h = a >= (143u << 23) ? (a > 0x7f800000u ? 0x7e00u : 0x7c00u) : h;  // >= 2^16: inf or nan
    out.bits = uint16_t(h | sign >> 16);
  }

  // std == 0: grad[i] *= scale on [begin, end), exactly what an eager multiply gives.
  template <typename scalar_t>
  static BK_ALWAYS_INLINE void scale(scalar_t* grad, int64_t begin, int64_t end, double scale_in) {
    using C = decltype(load(scalar_t{}));
    const C s = C(scale_in);
    for (int64_t i = begin; i < end; ++i) store(grad[i], load(grad[i]) * s);
  }
};

// The entry points of each instruction set. On x86-64 the AVX-512 and AVX2 ones only run
// where the CPU has them (best_isa()); elsewhere only the base one exists (16-byte vectors).
#define BK_NOISE_ENTRIES(TARGET, SUFFIX, VB)                                                  \
  template <typename scalar_t>                                                               \
  TARGET void chunks_##SUFFIX(scalar_t* grad, int64_t n, int64_t head, uint64_t q_first,     \
                              const uint32_t key[2], double sd, double scale,                \
                              int64_t c_begin, int64_t c_end) {                              \
    Noise<VB>::chunks(grad, n, head, q_first, key, sd, scale, c_begin, c_end);               \
  }                                                                                          \
  TARGET void philox_##SUFFIX(uint64_t q0, int64_t nblocks, const uint32_t key[2],           \
                              uint32_t* out) {                                               \
    Noise<VB>::philox_array(q0, nblocks, key, out);                                          \
  }                                                                                          \
  TARGET void log_##SUFFIX(const uint32_t* w, int64_t n, float* out) {                       \
    Noise<VB>::log_array(w, n, out);                                                         \
  }                                                                                          \
  TARGET void sqrt_##SUFFIX(const float* x, int64_t n, float* out) {                         \
    Noise<VB>::sqrt_array(x, n, out);                                                        \
  }                                                                                          \
  TARGET void sincos_##SUFFIX(const uint32_t* w, int64_t n, float* c, float* s) {            \
    Noise<VB>::sincos_array(w, n, c, s);                                                     \
  }
BK_NOISE_ENTRIES(, base, 16)
#ifdef BK_NOISE_X86
BK_NOISE_ENTRIES(BK_TARGET_AVX2, avx2, 32)
BK_NOISE_ENTRIES(BK_TARGET_AVX512, avx512, 64)
#endif
#undef BK_NOISE_ENTRIES

// std == 0: only the element loads and stores (no vectors of ours), vectorized by GCC per clone.
#define BK_SCALE_RANGE(S)                                                  \
  BK_MULTIVERSION void scale_range(S* grad, int64_t b, int64_t e, double s) { \
    Noise<16>::scale(grad, b, e, s);                                          \
  }
BK_SCALE_RANGE(float)
BK_SCALE_RANGE(double)
BK_SCALE_RANGE(bf16)
BK_SCALE_RANGE(fp16)
#undef BK_SCALE_RANGE

// Runs body(begin, end) over [0, items) in pieces of `piece` items, on at most num_threads
// threads with at least min_per_thread items each. Pieces are handed out dynamically, so a
// thread that starts late (a busy machine) does not hold the others up.
template <typename Body>
void parallel_ranges(int64_t items, int64_t piece, int64_t min_per_thread, int num_threads,
                     Body body) {
  int64_t threads = items / min_per_thread;
  if (threads > num_threads) threads = num_threads;
  if (threads <= 1) {
    body(int64_t(0), items);
    return;
  }
  const int64_t pieces = (items + piece - 1) / piece;
#pragma omp parallel for schedule(dynamic, 1) num_threads(int(threads))
  for (int64_t p = 0; p < pieces; ++p) body(p * piece, p + 1 < pieces ? (p + 1) * piece : items);
}

// Work per thread and per piece handed out, in chunks of 64 counters: a piece is 4096
// elements (a few microseconds), and a thread gets at least two pieces, so small tensors do
// not pay for starting threads.
constexpr int64_t kChunksPerPiece = 64;
constexpr int64_t kMinChunksPerThread = 128;

}  // namespace

// Calls the entry point NAME_<isa>(args...) of an ISA this CPU runs.
#ifdef BK_NOISE_X86
#define BK_NOISE_DISPATCH(isa, NAME, ...)                        \
  switch (isa) {                                                 \
    case Isa::avx512: NAME##_avx512(__VA_ARGS__); break;         \
    case Isa::avx2: NAME##_avx2(__VA_ARGS__); break;             \
    default: NAME##_base(__VA_ARGS__); break;                    \
  }
#else
#define BK_NOISE_DISPATCH(isa, NAME, ...) NAME##_base(__VA_ARGS__)
#endif

void philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t x0 = ctr[0], x1 = ctr[1], x2 = ctr[2], x3 = ctr[3], k0 = key[0], k1 = key[1];
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(kMul0) * x0, p1 = uint64_t(kMul1) * x2;
    const uint32_t y0 = uint32_t(p1 >> 32) ^ x1 ^ k0, y2 = uint32_t(p0 >> 32) ^ x3 ^ k1;
    x0 = y0;
    x1 = uint32_t(p1);
    x2 = y2;
    x3 = uint32_t(p0);
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  out[0] = x0;
  out[1] = x1;
  out[2] = x2;
  out[3] = x3;
}

void philox_blocks(Isa isa, uint64_t q0, int64_t nblocks, const uint32_t key[2], uint32_t* out) {
  BK_NOISE_DISPATCH(isa, philox, q0, nblocks, key, out);
}
void noise_log_u1(Isa isa, const uint32_t* w, int64_t n, float* out) {
  BK_NOISE_DISPATCH(isa, log, w, n, out);
}
void noise_sqrt(Isa isa, const float* x, int64_t n, float* out) {
  BK_NOISE_DISPATCH(isa, sqrt, x, n, out);
}
void noise_sincos(Isa isa, const uint32_t* w, int64_t n, float* c, float* s) {
  BK_NOISE_DISPATCH(isa, sincos, w, n, c, s);
}

template <typename scalar_t>
void add_noise_isa(Isa isa, scalar_t* grad, int64_t n, double sd, double scale, uint64_t seed,
                   uint64_t offset, int num_threads) {
  if (n <= 0) return;
  constexpr int64_t kChunk = 4 * kChunkBlocks;  // counters per chunk
  if (sd == 0) {
    parallel_ranges(n, kChunksPerPiece * kChunk, kMinChunksPerThread * kChunk, num_threads,
                    [&](int64_t b, int64_t e) { scale_range(grad, b, e, scale); });
    return;
  }
  const uint32_t key[2] = {uint32_t(seed), uint32_t(seed >> 32)};
  const int64_t head = int64_t(offset % 4);  // counters of the first block before element 0
  const uint64_t q_first = offset / 4;
  const int64_t chunks = (n + head + kChunk - 1) / kChunk;
  parallel_ranges(chunks, kChunksPerPiece, kMinChunksPerThread, num_threads, [&](int64_t b, int64_t e) {
    BK_NOISE_DISPATCH(isa, chunks, grad, n, head, q_first, key, sd, scale, b, e);
  });
}

template <typename scalar_t>
void add_noise(scalar_t* grad, int64_t n, double sd, double scale, uint64_t seed, uint64_t offset,
               int num_threads) {
  add_noise_isa(best_isa(), grad, n, sd, scale, seed, offset, num_threads);
}

#define BK_INSTANTIATE(S)                                                                      \
  template void add_noise<S>(S*, int64_t, double, double, uint64_t, uint64_t, int);            \
  template void add_noise_isa<S>(Isa, S*, int64_t, double, double, uint64_t, uint64_t, int);
BK_INSTANTIATE(float)
BK_INSTANTIATE(double)
BK_INSTANTIATE(bf16)
BK_INSTANTIATE(fp16)
#undef BK_INSTANTIATE

}  // namespace cpu
}  // namespace bk
