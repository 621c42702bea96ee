// What the C++ kernel tests share: conversions between double and each kernel dtype, and
// the known answers of the Philox generator behind add_noise_.
#pragma once
#include <cstdint>

#include "cpu/common.h"  // bf16, fp16, Operand3d, out_t

namespace bk {
namespace test {

inline double as_double(float x) { return x; }
inline double as_double(double x) { return x; }
inline double as_double(cpu::bf16 x) { return cpu::to_float(x); }
inline double as_double(cpu::fp16 x) { return cpu::to_float(x); }

// Rounds to the kernel dtype (16-bit floats: to nearest even).
template <typename S> S from_double(double x);
template <> inline float from_double<float>(double x) { return float(x); }
template <> inline double from_double<double>(double x) { return x; }
template <> inline cpu::bf16 from_double<cpu::bf16>(double x) { return cpu::to_bf16(float(x)); }
template <> inline cpu::fp16 from_double<cpu::fp16>(double x) { return cpu::to_fp16(float(x)); }

// Random123's kat_vectors for philox4x32 with 10 rounds.
struct PhiloxKat {
  uint32_t ctr[4], key[2], want[4];
};
inline constexpr PhiloxKat kPhiloxKats[] = {
    {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
    {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
     {0xffffffff, 0xffffffff},
     {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
    {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
     {0xa4093822, 0x299f31d0},
     {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
};

}  // namespace test
}  // namespace bk
