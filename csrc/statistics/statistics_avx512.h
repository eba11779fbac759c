// Fourier / variance statistics: the AVX-512 code of the CPU kernels (the n <= 32 DFT power of
// float32 maps, the variance's block moments). Included by statistics_cpu.cpp only, inside its
// namespace, when the level has AVX-512.
#pragma once

// n <= 32 with AVX-512: each row is loaded (masked) and rotated in registers by y lanes with
// one permute, then added: lane s of the rotated row holds p[y, (s - y) mod n]. The rotation
// indices (s - y) mod n (two registers per row: lanes s and s + 16) come from a table built
// once per map.
static void build_rotations(int n, std::vector<int32_t>& rot) {
  rot.assign(static_cast<size_t>(n) * 32, 0);
  for (int y = 0; y < n; ++y) {
    for (int s = 0; s < 32; ++s) rot[y * 32 + s] = s < n ? ((s - y) % n + n) % n : 0;
  }
}

static inline void antidiag_avx512(const float* __restrict p, float* __restrict a, int n, const int32_t* __restrict rot) {
  if (n <= 16) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    const __mmask16 all = static_cast<__mmask16>(0xFFFF);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int y = 0;
    for (; y + 1 < n; y += 2) {
      const __m512i i0 = _mm512_loadu_si512(rot + y * 32), i1 = _mm512_loadu_si512(rot + (y + 1) * 32);
      acc0 = _mm512_add_ps(acc0, _mm512_maskz_permutexvar_ps(all, i0, _mm512_maskz_loadu_ps(m, p + y * n)));
      acc1 = _mm512_add_ps(acc1, _mm512_maskz_permutexvar_ps(all, i1, _mm512_maskz_loadu_ps(m, p + (y + 1) * n)));
    }
    if (y < n) {
      const __m512i i0 = _mm512_loadu_si512(rot + y * 32);
      acc0 = _mm512_add_ps(acc0, _mm512_maskz_permutexvar_ps(all, i0, _mm512_maskz_loadu_ps(m, p + y * n)));
    }
    _mm512_store_ps(a, _mm512_add_ps(acc0, acc1));
    return;
  }
  // 16 < n <= 32: rows span two registers; permutex2var picks from both (index bit 4).
  const __mmask16 mhi = static_cast<__mmask16>((1u << (n - 16)) - 1u);
  __m512 acc_lo = _mm512_setzero_ps(), acc_hi = _mm512_setzero_ps();
  for (int y = 0; y < n; ++y) {
    const float* row = p + y * n;
    const __m512 lo = _mm512_loadu_ps(row);
    const __m512 hi = _mm512_maskz_loadu_ps(mhi, row + 16);
    acc_lo = _mm512_add_ps(acc_lo, _mm512_permutex2var_ps(lo, _mm512_loadu_si512(rot + y * 32), hi));
    acc_hi = _mm512_add_ps(acc_hi, _mm512_permutex2var_ps(lo, _mm512_loadu_si512(rot + y * 32 + 16), hi));
  }
  _mm512_store_ps(a, acc_lo);
  _mm512_store_ps(a + 16, acc_hi);
}

// |F[k, k]|^2 for k < K of one float plane with n <= 32, all in registers: anti-diagonal sums,
// then the (n x cols) table product (cols = 16 or 32 lanes: [re_0..re_{K-1}, im_0..im_{K-1}]),
// then re^2 + im^2 with one permute.
static inline void dft_power_avx512(const float* __restrict a, int n, int K, const float* __restrict table,
                                    float* __restrict out) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i pair = _mm512_add_epi32(lane, _mm512_set1_epi32(K));  // lane k -> k + K
  const __mmask16 mk = static_cast<__mmask16>((1u << K) - 1u);
  if (2 * K <= 16) {
    __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps();
    int s = 0;
    for (; s + 1 < n; s += 2) {
      f0 = _mm512_fmadd_ps(_mm512_set1_ps(a[s]), _mm512_loadu_ps(table + s * 16), f0);
      f1 = _mm512_fmadd_ps(_mm512_set1_ps(a[s + 1]), _mm512_loadu_ps(table + (s + 1) * 16), f1);
    }
    if (s < n) f0 = _mm512_fmadd_ps(_mm512_set1_ps(a[s]), _mm512_loadu_ps(table + s * 16), f0);
    const __m512 f = _mm512_add_ps(f0, f1);  // lanes: re_0..re_{K-1}, im_0..im_{K-1}, 0...
    const __m512 sq = _mm512_mul_ps(f, f);
    const __m512 other = _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(0xFFFF), pair, sq);
    _mm512_mask_storeu_ps(out, mk, _mm512_add_ps(sq, other));
    return;
  }
  __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
  for (int s = 0; s < n; ++s) {
    const __m512 as = _mm512_set1_ps(a[s]);
    lo = _mm512_fmadd_ps(as, _mm512_loadu_ps(table + s * 32), lo);
    hi = _mm512_fmadd_ps(as, _mm512_loadu_ps(table + s * 32 + 16), hi);
  }
  const __m512 sq_lo = _mm512_mul_ps(lo, lo), sq_hi = _mm512_mul_ps(hi, hi);
  const __m512 other = _mm512_permutex2var_ps(sq_lo, pair, sq_hi);
  _mm512_mask_storeu_ps(out, mk, _mm512_add_ps(sq_lo, other));
}

static inline void plane_power_avx512(const float* __restrict p, int n, int K, const float* __restrict table,
                                      const int32_t* __restrict rot, float* __restrict out) {
  alignas(64) float a[32];
  antidiag_avx512(p, a, n, rot);
  dft_power_avx512(a, n, K, table, out);
}

// Horizontal sum in a fixed order (512 -> 256 -> 128 -> scalar).
static inline float hsum512(__m512 v) {
  const __m256 lo = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(static_cast<__mmask8>(0xFF), _mm512_castps_pd(v), 0));
  const __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(static_cast<__mmask8>(0xFF), _mm512_castps_pd(v), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x55));
  return _mm_cvtss_f32(s1);
}

// Sum and sum of squared deviations from the block's own mean (two passes over an L1-resident
// block), float, fixed accumulation order.
static inline void block_moments_avx512(const float* __restrict p, int64_t n, float* mean_out, float* m2_out) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(p + i));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(p + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_loadu_ps(p + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_loadu_ps(p + i + 48));
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_add_ps(s0, _mm512_loadu_ps(p + i));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1u);
  if (i < n) s1 = _mm512_add_ps(s1, _mm512_maskz_loadu_ps(tail, p + i));
  const float mean = hsum512(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3))) /
                     static_cast<float>(n);
  const __m512 vm = _mm512_set1_ps(mean);
  __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps(), q2 = _mm512_setzero_ps(), q3 = _mm512_setzero_ps();
  i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(p + i), vm);
    const __m512 d1 = _mm512_sub_ps(_mm512_loadu_ps(p + i + 16), vm);
    const __m512 d2 = _mm512_sub_ps(_mm512_loadu_ps(p + i + 32), vm);
    const __m512 d3 = _mm512_sub_ps(_mm512_loadu_ps(p + i + 48), vm);
    q0 = _mm512_fmadd_ps(d0, d0, q0);
    q1 = _mm512_fmadd_ps(d1, d1, q1);
    q2 = _mm512_fmadd_ps(d2, d2, q2);
    q3 = _mm512_fmadd_ps(d3, d3, q3);
  }
  for (; i + 16 <= n; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(p + i), vm);
    q0 = _mm512_fmadd_ps(d, d, q0);
  }
  if (i < n) {
    const __m512 d = _mm512_maskz_sub_ps(tail, _mm512_maskz_loadu_ps(tail, p + i), vm);
    q1 = _mm512_fmadd_ps(d, d, q1);
  }
  *mean_out = mean;
  *m2_out = hsum512(_mm512_add_ps(_mm512_add_ps(q0, q1), _mm512_add_ps(q2, q3)));
}
