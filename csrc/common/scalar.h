// Element types of the kernels, without torch: bfloat16 and float16 as 16-bit storage types
// that convert to and from float exactly as torch does (round to nearest even, NaN kept quiet),
// the accumulation type of each element type, and the dtype tag the binding layer passes.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__F16C__) && !defined(__CUDACC__)
#include <immintrin.h>
#define ALTEROPS_F16C 1  // float16 conversions in one instruction (the AVX2 and AVX-512 levels)
#else
#define ALTEROPS_F16C 0
#endif

namespace alterops {

enum class DType : int32_t { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct BFloat16 {
  uint16_t bits;
  BFloat16() = default;
  BFloat16(float f) : bits(round(f)) {}  // NOLINT: implicit, as c10::BFloat16
  operator float() const { return f32_from_bits(uint32_t(bits) << 16); }
  static uint16_t round(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7FC0;  // NaN: torch's canonical quiet NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

struct Half {
  uint16_t bits;
  Half() = default;
  Half(float f) : bits(from_float(f)) {}  // NOLINT: implicit, as c10::Half
  operator float() const { return to_float(bits); }

  static float to_float(uint16_t h) {
#if ALTEROPS_F16C
    return _cvtsh_ss(h);
#else
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * f32_from_bits(0x7800000u);
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result =
        sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
    return f32_from_bits(result);
#endif
  }
  static uint16_t from_float(float f) {
#if ALTEROPS_F16C
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    const float scale_to_inf = f32_from_bits(0x77800000u);
    const float scale_to_zero = f32_from_bits(0x08800000u);
    const float abs_f = f32_from_bits(f32_bits(f) & 0x7fffffffu);
    float base = (abs_f * scale_to_inf) * scale_to_zero;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
  }
};

// The type a kernel accumulates an element type in: double for double, float otherwise.
template <class T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// f(T{}) for the element type `dt` names (all four; a kernel that takes fewer checks first).
template <class F>
inline void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::BFloat16: f(BFloat16{}); break;
    case DType::Float16: f(Half{}); break;
  }
}

}  // namespace alterops
