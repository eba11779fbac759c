// Small AVX2 + FMA helpers of the CPU kernels (8-lane float vectors): exp2 and log2 with ~1e-7
// error, horizontal sum and max, lane masks, the 8x8 register transpose. Kernel code only, for
// the levels compiled with AVX2 and FMA (x86-64-v3 and up); empty elsewhere.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <cstdint>

namespace alterops {
namespace avx2 {

// 2^x, |rel err| ~ 1e-7 (Cephes exp2f polynomial on [-0.5, 0.5]); x < -126 (and -inf) gives
// exactly 0, NaN gives NaN.
static inline __m256 exp2v(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  // max/min return their second operand when one is NaN: x second, so NaN stays NaN
  x = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(lo, x));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// log2(x) for normal x > 0, |abs err| ~ 1e-7: exponent + 2/ln2 * atanh((m-1)/(m+1)), m in [1, 2).
static inline __m256 log2v(__m256 x) {
  constexpr float kLog2e = 1.4426950408889634f;
  const __m256i xi = _mm256_castps_si256(x);
  const __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127)));
  const __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x7fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 z = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
  const __m256 z2 = _mm256_mul_ps(z, z);
  __m256 p = _mm256_set1_ps(1.0f / 13.0f);
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 11.0f));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 9.0f));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 7.0f));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 5.0f));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 3.0f));
  p = _mm256_fmadd_ps(p, z2, one);
  return _mm256_fmadd_ps(_mm256_mul_ps(p, z), _mm256_set1_ps(2.0f * kLog2e), e);
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Lanes i < n set (n in 1..8).
static inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// In-register transpose: r[j] lane i <- r[i] lane j.
static inline void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  _Pragma("GCC unroll 8") for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  _Pragma("GCC unroll 8") for (int h = 0; h < 2; ++h) {
    s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  _Pragma("GCC unroll 8") for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x31);
  }
}

}  // namespace avx2
}  // namespace alterops
#endif  // __AVX2__ && __FMA__
