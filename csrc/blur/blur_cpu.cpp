// Spatial smoothing kernels on the CPU: box_blur2d and tanh_blur2d (forward and backward), on
// raw pointers (see blur.h; the binding in blur_binding.cpp checks the arguments).
//
// act = 0 (identity: box_blur2d), 1 (tau*tanh(x/tau)), 2 (relu(tau*tanh(x/tau))) is applied
// before padding, and padding = (top, bottom, left, right) >= 0 is filled per pad mode
// (0 zeros, 1 replicate, 2 reflect). The mean always divides by kh*kw (count_include_pad).
//
// Work is split over the B*C planes (torch's thread pool, dynamically handed-out chunks of
// planes). Each plane is read once and written once:
//  * general path (any kernel, stride, padding): the pointwise op runs on one padded row in a
//    small buffer, the horizontal window sums of every source row go to an L1/L2-resident
//    (H+1) x Wo buffer (the extra row is all zeros, used for zero padding), and the vertical
//    sums are formed from those rows; the backward is its transpose (vertical scatter onto
//    source rows, horizontal scatter, fold of the padding columns back onto their sources);
//  * K x K stride-1 windows (K = 2, 3: the paper's blur and 3x3 "same"): one pass per padded
//    row with a ring of K rows of horizontal sums;
//  * float32 with AVX-512, zero padding, K x K stride 1: registers only, masked loads supply the
//    zero padding and valignd the shifted windows (forward and backward).
// Padded rows are never materialised: a padded index is mapped to its source index. bfloat16
// is accumulated in float, float64 in double. Tensors are contiguous NCHW.
#include "blur.h"

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
// AVX2 + FMA builds without AVX-512 (e.g. AMD Zen 2/3): 8-lane versions of the float32 paths.
// An AVX-512 build never compiles them: its code is unchanged.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define ALTEROPS_BLUR_AVX2 1
#endif

namespace alterops {
namespace blur {

// Source index of padded-relative position p (p < 0 or p >= n lies in the padding);
// -1 means "zero" (zeros mode). Reflect padding is < n, checked by the caller.
static inline int64_t map_index(int64_t p, int64_t n, int64_t mode) {
  if (p >= 0 && p < n) return p;
  if (mode == kZeros) return -1;
  if (mode == kReplicate) return p < 0 ? 0 : n - 1;
  return p < 0 ? -p : 2 * (n - 1) - p;
}

// tanh for float: rational minimax approximation (max abs error ~3.5e-7 on all of R; the
// coefficients are those of Eigen's float tanh). Branch-free so the loops vectorise.
static inline float tanh_approx(float x) {
  const float c = 7.90531110763549805f;
  float xc = x > c ? c : (x < -c ? -c : x);
  float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  float ax = x < 0.f ? -x : x;
  return ax < 0.0004f ? x : p / q;
}
static inline double tanh_acc(double x) { return std::tanh(x); }
static inline float tanh_acc(float x) { return tanh_approx(x); }

template <int ACT, typename acc_t>
static inline acc_t pointwise(acc_t v, acc_t tau, acc_t inv_tau) {
  if constexpr (ACT == kIdentity) {
    return v;
  } else {
    acc_t t = tau * tanh_acc(v * inv_tau);
    if constexpr (ACT == kTanhRelu) t = t < acc_t(0) ? acc_t(0) : t;  // NaN stays NaN (as torch.relu)
    return t;
  }
}

// d pointwise / dv
template <int ACT, typename acc_t>
static inline acc_t pointwise_grad(acc_t v, acc_t inv_tau) {
  if constexpr (ACT == kIdentity) {
    return acc_t(1);
  } else {
    acc_t t = tanh_acc(v * inv_tau);
    acc_t d = acc_t(1) - t * t;
    if constexpr (ACT == kTanhRelu) d = t > acc_t(0) ? d : acc_t(0);
    return d;
  }
}

#if defined(ALTEROPS_BLUR_AVX2)
// ------------------------------------------------------------------------------------------
// AVX2 + FMA primitives: tanh_approx on 8 lanes (the same rational function, clamp and
// small-|x| branch as the scalar one; an exact vdivps, so it matches the scalar results), and
// row loops of the pointwise op and of its gradient used by the generic per-plane code for
// float (the scalar tanh_approx there does not vectorise: GCC keeps its branches).
// ------------------------------------------------------------------------------------------
static inline __m256 tanh_approx8(__m256 x) {
  const __m256 c = _mm256_set1_ps(7.90531110763549805f);
  // min/max return their second operand for a NaN: NaN inputs stay NaN (as in the scalar code)
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(-7.90531110763549805f), _mm256_min_ps(c, x));
  // Estrin's scheme (shorter dependency chains than Horner: the loops are latency-bound)
  const __m256 x2 = _mm256_mul_ps(xc, xc);
  const __m256 x4 = _mm256_mul_ps(x2, x2);
  const __m256 x8 = _mm256_mul_ps(x4, x4);
  const __m256 p01 = _mm256_fmadd_ps(_mm256_set1_ps(6.37261928875436e-04f), x2, _mm256_set1_ps(4.89352455891786e-03f));
  const __m256 p23 = _mm256_fmadd_ps(_mm256_set1_ps(5.12229709037114e-08f), x2, _mm256_set1_ps(1.48572235717979e-05f));
  const __m256 p45 = _mm256_fmadd_ps(_mm256_set1_ps(2.00018790482477e-13f), x2, _mm256_set1_ps(-8.60467152213735e-11f));
  const __m256 p46 = _mm256_fmadd_ps(_mm256_set1_ps(-2.76076847742355e-16f), x4, p45);
  const __m256 p03 = _mm256_fmadd_ps(p23, x4, p01);
  const __m256 p = _mm256_mul_ps(_mm256_fmadd_ps(p46, x8, p03), xc);
  const __m256 q01 = _mm256_fmadd_ps(_mm256_set1_ps(2.26843463243900e-03f), x2, _mm256_set1_ps(4.89352518554385e-03f));
  const __m256 q23 = _mm256_fmadd_ps(_mm256_set1_ps(1.19825839466702e-06f), x2, _mm256_set1_ps(1.18534705686654e-04f));
  const __m256 q = _mm256_fmadd_ps(q23, x4, q01);
  return _mm256_div_ps(p, q);  // (|x| < 0.0004: p/q = x (1 - 1.3e-7), no separate branch)
}

template <int ACT>
static inline __m256 pointwise8(__m256 v, __m256 tau, __m256 inv_tau) {
  if constexpr (ACT == kIdentity) {
    return v;
  } else {
    __m256 t = _mm256_mul_ps(tau, tanh_approx8(_mm256_mul_ps(v, inv_tau)));
    if constexpr (ACT == kTanhRelu) t = _mm256_max_ps(_mm256_setzero_ps(), t);  // NaN stays NaN (second operand)
    return t;
  }
}

// d pointwise / dv on 8 lanes
template <int ACT>
static inline __m256 grad_factor8(__m256 xv, __m256 inv_tau) {
  if constexpr (ACT == kIdentity) {
    return _mm256_set1_ps(1.f);
  } else {
    const __m256 t = tanh_approx8(_mm256_mul_ps(xv, inv_tau));
    __m256 d = _mm256_fnmadd_ps(t, t, _mm256_set1_ps(1.f));
    if constexpr (ACT == kTanhRelu) d = _mm256_and_ps(_mm256_cmp_ps(t, _mm256_setzero_ps(), _CMP_GT_OQ), d);
    return d;
  }
}

// lanes l < n (n <= 0: none, n >= 8: all)
static inline __m256i tail_mask8(int64_t n) {
  const int32_t k = n < 0 ? 0 : (n > 8 ? 8 : static_cast<int32_t>(n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// out[w] = f(x[w]), w < n
template <int ACT>
static inline void pointwise_row_avx2(const float* __restrict__ xr, float* __restrict__ out, int64_t n, float tau_s,
                                      float inv_tau_s) {
  const __m256 tau = _mm256_set1_ps(tau_s), inv_tau = _mm256_set1_ps(inv_tau_s);
  int64_t w = 0;
  for (; w + 8 <= n; w += 8) _mm256_storeu_ps(out + w, pointwise8<ACT>(_mm256_loadu_ps(xr + w), tau, inv_tau));
  if (w < n) {
    const __m256i m = tail_mask8(n - w);
    _mm256_maskstore_ps(out + w, m, pointwise8<ACT>(_mm256_maskload_ps(xr + w, m), tau, inv_tau));
  }
}

// gr[w] = scale * gx[w] * f'(x[w]), w < n
template <int ACT>
static inline void grad_row_avx2(const float* __restrict__ gx, const float* __restrict__ xr, float* __restrict__ gr,
                                 int64_t n, float scale_s, float inv_tau_s) {
  const __m256 scale = _mm256_set1_ps(scale_s), inv_tau = _mm256_set1_ps(inv_tau_s);
  int64_t w = 0;
  for (; w + 8 <= n; w += 8)
    _mm256_storeu_ps(gr + w, _mm256_mul_ps(_mm256_mul_ps(scale, _mm256_loadu_ps(gx + w)),
                                           grad_factor8<ACT>(_mm256_loadu_ps(xr + w), inv_tau)));
  if (w < n) {
    const __m256i m = tail_mask8(n - w);
    _mm256_maskstore_ps(gr + w, m, _mm256_mul_ps(_mm256_mul_ps(scale, _mm256_maskload_ps(gx + w, m)),
                                                 grad_factor8<ACT>(_mm256_maskload_ps(xr + w, m), inv_tau)));
  }
}
#endif  // ALTEROPS_BLUR_AVX2


// ------------------------------------------------------------------------------------------
// Forward, one plane.
//   prow: Wp = pl + W + pr accumulators; hs: (H + 1) * Wo; vrow: Wo.
// ------------------------------------------------------------------------------------------
template <int ACT, typename scalar_t, typename acc_t>
static void forward_plane(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const Geometry& g,
                          acc_t tau, acc_t inv_tau, acc_t scale, acc_t* __restrict__ prow,
                          acc_t* __restrict__ hs, acc_t* __restrict__ vrow) {
  const int64_t H = g.H, W = g.W, Wo = g.Wo, kw = g.kw, sw = g.sw, pl = g.pl, pr = g.pr;
  acc_t* __restrict__ mid = prow + pl;
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* __restrict__ xr = x + h * W;
#if defined(ALTEROPS_BLUR_AVX2)
    if constexpr (std::is_same_v<scalar_t, float> && ACT != kIdentity) {
      pointwise_row_avx2<ACT>(xr, mid, W, tau, inv_tau);
    } else
#endif
    {
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) mid[w] = pointwise<ACT, acc_t>(static_cast<acc_t>(xr[w]), tau, inv_tau);
    }
    for (int64_t t = 0; t < pl; ++t) {
      int64_t s = map_index(t - pl, W, g.mode);
      prow[t] = s < 0 ? acc_t(0) : mid[s];
    }
    for (int64_t t = 0; t < pr; ++t) {
      int64_t s = map_index(W + t, W, g.mode);
      mid[W + t] = s < 0 ? acc_t(0) : mid[s];
    }
    acc_t* __restrict__ hr = hs + h * Wo;
    if (sw == 1) {
      switch (kw) {  // the common widths get one fused pass
        case 1:
#pragma omp simd
          for (int64_t o = 0; o < Wo; ++o) hr[o] = prow[o];
          break;
        case 2:
#pragma omp simd
          for (int64_t o = 0; o < Wo; ++o) hr[o] = prow[o] + prow[o + 1];
          break;
        case 3:
#pragma omp simd
          for (int64_t o = 0; o < Wo; ++o) hr[o] = prow[o] + prow[o + 1] + prow[o + 2];
          break;
        default:
#pragma omp simd
          for (int64_t o = 0; o < Wo; ++o) hr[o] = prow[o];
          for (int64_t j = 1; j < kw; ++j) {
            const acc_t* __restrict__ pj = prow + j;
#pragma omp simd
            for (int64_t o = 0; o < Wo; ++o) hr[o] += pj[o];
          }
      }
    } else {
      for (int64_t o = 0; o < Wo; ++o) {
        acc_t s = 0;
        for (int64_t j = 0; j < kw; ++j) s += prow[o * sw + j];
        hr[o] = s;
      }
    }
  }
  acc_t* __restrict__ zero_row = hs + H * Wo;
  for (int64_t o = 0; o < Wo; ++o) zero_row[o] = acc_t(0);

  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    scalar_t* __restrict__ orow = out + oh * Wo;
    if (g.kh > 8) {  // tall kernels: plain accumulation
      std::fill(vrow, vrow + Wo, acc_t(0));
      for (int64_t i = 0; i < g.kh; ++i) {
        int64_t s = map_index(oh * g.sh + i - g.pt, H, g.mode);
        if (s < 0) continue;
        const acc_t* __restrict__ ri = hs + s * Wo;
#pragma omp simd
        for (int64_t o = 0; o < Wo; ++o) vrow[o] += ri[o];
      }
#pragma omp simd
      for (int64_t o = 0; o < Wo; ++o) orow[o] = static_cast<scalar_t>(scale * vrow[o]);
      continue;
    }
    const acc_t* rows[8];
    int64_t n = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t s = map_index(oh * g.sh + i - g.pt, H, g.mode);
      if (s >= 0) rows[n++] = hs + s * Wo;
    }
    if (n == 0) {
      for (int64_t o = 0; o < Wo; ++o) orow[o] = scalar_t(0);
      continue;
    }
    if (n == 1) {
      const acc_t* __restrict__ r0 = rows[0];
#pragma omp simd
      for (int64_t o = 0; o < Wo; ++o) orow[o] = static_cast<scalar_t>(scale * r0[o]);
    } else if (n == 2) {
      const acc_t* __restrict__ r0 = rows[0];
      const acc_t* __restrict__ r1 = rows[1];
#pragma omp simd
      for (int64_t o = 0; o < Wo; ++o) orow[o] = static_cast<scalar_t>(scale * (r0[o] + r1[o]));
    } else if (n == 3) {
      const acc_t* __restrict__ r0 = rows[0];
      const acc_t* __restrict__ r1 = rows[1];
      const acc_t* __restrict__ r2 = rows[2];
#pragma omp simd
      for (int64_t o = 0; o < Wo; ++o) orow[o] = static_cast<scalar_t>(scale * (r0[o] + r1[o] + r2[o]));
    } else {
      const acc_t* __restrict__ r0 = rows[0];
#pragma omp simd
      for (int64_t o = 0; o < Wo; ++o) vrow[o] = r0[o];
      for (int64_t i = 1; i < n; ++i) {
        const acc_t* __restrict__ ri = rows[i];
#pragma omp simd
        for (int64_t o = 0; o < Wo; ++o) vrow[o] += ri[o];
      }
#pragma omp simd
      for (int64_t o = 0; o < Wo; ++o) orow[o] = static_cast<scalar_t>(scale * vrow[o]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Forward fast path: K x K window, stride 1 (the paper's 2x2 blur, 3x3 "same"). One pass per
// padded row: (1) the pointwise op into the padded row buffer, (2) one loop forming the row's
// horizontal sums, keeping them in a ring of K rows, and writing the output row from the ring.
//   prow: Wp; ring: K * Wo; zero: Wo zeros.
// ------------------------------------------------------------------------------------------
template <int ACT, int K, typename scalar_t, typename acc_t>
static void forward_plane_k(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const Geometry& g,
                            acc_t tau, acc_t inv_tau, acc_t scale, acc_t* __restrict__ prow,
                            acc_t* __restrict__ ring, const acc_t* __restrict__ zero) {
  const int64_t H = g.H, W = g.W, Wo = g.Wo, pl = g.pl, pr = g.pr;
  const int64_t Hp = g.Ho + K - 1;  // padded rows that some output uses
  acc_t* __restrict__ mid = prow + pl;
  const acc_t* rows[K];  // horizontal sums of padded rows r-K+1 .. r (oldest first)
  for (int i = 0; i < K; ++i) rows[i] = zero;
  for (int64_t r = 0; r < Hp; ++r) {
    for (int i = 0; i + 1 < K; ++i) rows[i] = rows[i + 1];
    const int64_t s = map_index(r - g.pt, H, g.mode);
    const bool emit = r >= K - 1;
    scalar_t* __restrict__ orow = out + (r - (K - 1)) * Wo;
    if (s < 0) {
      rows[K - 1] = zero;
      if (!emit) continue;
      const acc_t* __restrict__ r0 = rows[0];
      if constexpr (K == 2) {
#pragma omp simd
        for (int64_t o = 0; o < Wo; ++o) orow[o] = static_cast<scalar_t>(scale * r0[o]);
      } else {
        const acc_t* __restrict__ r1 = rows[1];
#pragma omp simd
        for (int64_t o = 0; o < Wo; ++o) orow[o] = static_cast<scalar_t>(scale * (r0[o] + r1[o]));
      }
      continue;
    }
    const scalar_t* __restrict__ xr = x + s * W;
#if defined(ALTEROPS_BLUR_AVX2)
    if constexpr (std::is_same_v<scalar_t, float> && ACT != kIdentity) {
      pointwise_row_avx2<ACT>(xr, mid, W, tau, inv_tau);
    } else
#endif
    {
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) mid[w] = pointwise<ACT, acc_t>(static_cast<acc_t>(xr[w]), tau, inv_tau);
    }
    for (int64_t t = 0; t < pl; ++t) {
      const int64_t m = map_index(t - pl, W, g.mode);
      prow[t] = m < 0 ? acc_t(0) : mid[m];
    }
    for (int64_t t = 0; t < pr; ++t) {
      const int64_t m = map_index(W + t, W, g.mode);
      mid[W + t] = m < 0 ? acc_t(0) : mid[m];
    }
    acc_t* __restrict__ hc = ring + (r % K) * Wo;
    rows[K - 1] = hc;
    if (!emit) {
#pragma omp simd
      for (int64_t o = 0; o < Wo; ++o) {
        acc_t v = prow[o] + prow[o + 1];
        if constexpr (K == 3) v += prow[o + 2];
        hc[o] = v;
      }
      continue;
    }
    const acc_t* __restrict__ r0 = rows[0];
    if constexpr (K == 2) {
#pragma omp simd
      for (int64_t o = 0; o < Wo; ++o) {
        const acc_t v = prow[o] + prow[o + 1];
        hc[o] = v;
        orow[o] = static_cast<scalar_t>(scale * (r0[o] + v));
      }
    } else {
      const acc_t* __restrict__ r1 = rows[1];
#pragma omp simd
      for (int64_t o = 0; o < Wo; ++o) {
        const acc_t v = prow[o] + prow[o + 1] + prow[o + 2];
        hc[o] = v;
        orow[o] = static_cast<scalar_t>(scale * (r0[o] + r1[o] + v));
      }
    }
  }
}

#if defined(__AVX512F__)
// ------------------------------------------------------------------------------------------
// The same fast path for float32 with AVX-512: rows of 28-ish elements are one or two
// 16-lane vectors, the ragged end is a lane mask (no scalar epilogue, which dominated the
// auto-vectorised loops on small maps). Buffers carry 32 floats of zeroed slack so that
// unmasked loads past a row end stay inside them; only loads of x and stores of out are masked.
// ------------------------------------------------------------------------------------------
// The plain forms of these intrinsics use an "undefined" source that GCC 12 flags with
// -Wmaybe-uninitialized; the full-mask forms with a zero source compile to the same instruction.
static inline __m512 max16(__m512 a, __m512 b) { return _mm512_mask_max_ps(_mm512_setzero_ps(), 0xFFFF, a, b); }
static inline __m512 min16(__m512 a, __m512 b) { return _mm512_mask_min_ps(_mm512_setzero_ps(), 0xFFFF, a, b); }
template <int N>
static inline __m512 shift_in16(__m512 lo, __m512 hi) {  // lanes N..15 of lo, then lanes 0..N-1 of hi
  return _mm512_castsi512_ps(_mm512_mask_alignr_epi32(_mm512_setzero_si512(), 0xFFFF, _mm512_castps_si512(hi),
                                                      _mm512_castps_si512(lo), N));
}

static inline __m512 tanh_approx16(__m512 x) {
  const __m512 c = _mm512_set1_ps(7.90531110763549805f);
  // min/max return their second operand when one is NaN: x second, so NaN stays NaN
  const __m512 xc = max16(_mm512_sub_ps(_mm512_setzero_ps(), c), min16(c, x));
  const __m512 x2 = _mm512_mul_ps(xc, xc);
  __m512 p = _mm512_set1_ps(-2.76076847742355e-16f);
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.00018790482477e-13f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-8.60467152213735e-11f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(5.12229709037114e-08f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(1.48572235717979e-05f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(6.37261928875436e-04f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(4.89352455891786e-03f));
  p = _mm512_mul_ps(p, xc);
  __m512 q = _mm512_set1_ps(1.19825839466702e-06f);
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(1.18534705686654e-04f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(2.26843463243900e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(4.89352518554385e-03f));
  // p / q via the 14-bit reciprocal and one Newton step (~1 ulp; a vdivps costs 5x more)
  __m512 rq = _mm512_maskz_rcp14_ps(0xFFFF, q);  // (full-mask form: see max16)
  rq = _mm512_mul_ps(rq, _mm512_fnmadd_ps(q, rq, _mm512_set1_ps(2.f)));
  const __m512 t = _mm512_mul_ps(p, rq);
  const __m512 ax = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
  const __mmask16 tiny = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.0004f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(tiny, t, x);
}

template <int ACT>
static inline __m512 pointwise16(__m512 v, __m512 tau, __m512 inv_tau) {
  if constexpr (ACT == kIdentity) {
    return v;
  } else {
    __m512 t = _mm512_mul_ps(tau, tanh_approx16(_mm512_mul_ps(v, inv_tau)));
    if constexpr (ACT == kTanhRelu) t = max16(_mm512_setzero_ps(), t);  // NaN stays NaN (second operand)
    return t;
  }
}

static inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}

// f(x[start .. start+15]) with zeros outside [0, n) (masked lanes are never read).
template <int ACT>
static inline __m512 load_row16(const float* __restrict__ xr, int64_t start, int64_t n, __m512 tau, __m512 inv_tau) {
  const int64_t lo = start < 0 ? -start : 0;
  const int64_t hi = n - start < 16 ? n - start : 16;
  if (hi <= lo) return _mm512_setzero_ps();
  const uint32_t bits = ((hi >= 16 ? 0xFFFFu : ((1u << hi) - 1u)) & ~((1u << lo) - 1u)) & 0xFFFFu;
  return pointwise16<ACT>(_mm512_maskz_loadu_ps(__mmask16(bits), xr + start), tau, inv_tau);
}

// Zero padding: the padded row never goes through memory. Each 16-lane chunk of the padded row
// is formed in a register by a masked load of x (zeros in the padding); the shifted windows
// P[o+1..], P[o+2..] come from valignd of two consecutive chunks. This avoids the
// store-to-load forwarding stalls of writing a row and re-reading it at an offset.
template <int ACT, int K>
static void forward_plane_k_zeros_avx512(const float* __restrict__ x, float* __restrict__ out, const Geometry& g,
                                         float tau_s, float inv_tau_s, float scale_s, float* __restrict__ ring,
                                         int64_t ring_stride, const float* __restrict__ zero,
                                         const __mmask16* __restrict__ in_mask) {
  // in_mask[j]: the lanes of x[16*j - pl .. +15] inside [0, W), the same for every row.
  const int64_t H = g.H, W = g.W, Wo = g.Wo, pl = g.pl;
  const int64_t Hp = g.Ho + K - 1;
  const __m512 tau = _mm512_set1_ps(tau_s), inv_tau = _mm512_set1_ps(inv_tau_s), scale = _mm512_set1_ps(scale_s);
  const float* rows[K];
  for (int i = 0; i < K; ++i) rows[i] = zero;
  for (int64_t r = 0; r < Hp; ++r) {
    for (int i = 0; i + 1 < K; ++i) rows[i] = rows[i + 1];
    const int64_t s = r - g.pt;
    const bool emit = r >= K - 1;
    float* __restrict__ orow = out + (r - (K - 1)) * Wo;
    if (s < 0 || s >= H) {
      rows[K - 1] = zero;
      if (!emit) continue;
      for (int64_t o = 0; o < Wo; o += 16) {
        __m512 v = _mm512_loadu_ps(rows[0] + o);
        if constexpr (K == 3) v = _mm512_add_ps(v, _mm512_loadu_ps(rows[1] + o));
        _mm512_mask_storeu_ps(orow + o, tail_mask(Wo - o), _mm512_mul_ps(scale, v));
      }
      continue;
    }
    const float* __restrict__ xr = x + s * W;
    float* __restrict__ hc = ring + (r % K) * ring_stride;
    rows[K - 1] = hc;
    // chunks entirely in the padding are zeros (f(0) = 0): skip the pointwise op there
    __m512 va = in_mask[0] ? pointwise16<ACT>(_mm512_maskz_loadu_ps(in_mask[0], xr - pl), tau, inv_tau)
                           : _mm512_setzero_ps();
    for (int64_t o = 0, j = 1; o < Wo; o += 16, ++j) {
      const __m512 vb = in_mask[j]
                            ? pointwise16<ACT>(_mm512_maskz_loadu_ps(in_mask[j], xr + (o + 16 - pl)), tau, inv_tau)
                            : _mm512_setzero_ps();
      __m512 v = _mm512_add_ps(va, shift_in16<1>(va, vb));
      if constexpr (K == 3) v = _mm512_add_ps(v, shift_in16<2>(va, vb));
      _mm512_storeu_ps(hc + o, v);
      if (emit) {
        __m512 sum = _mm512_add_ps(_mm512_loadu_ps(rows[0] + o), v);
        if constexpr (K == 3) sum = _mm512_add_ps(sum, _mm512_loadu_ps(rows[1] + o));
        _mm512_mask_storeu_ps(orow + o, tail_mask(Wo - o), _mm512_mul_ps(scale, sum));
      }
      va = vb;
    }
  }
}

template <int ACT, int K>
static void forward_plane_k_avx512(const float* __restrict__ x, float* __restrict__ out, const Geometry& g,
                                   float tau_s, float inv_tau_s, float scale_s, float* __restrict__ prow,
                                   float* __restrict__ ring, int64_t ring_stride, const float* __restrict__ zero) {
  const int64_t H = g.H, W = g.W, Wo = g.Wo, pl = g.pl, pr = g.pr;
  const int64_t Hp = g.Ho + K - 1;
  const __m512 tau = _mm512_set1_ps(tau_s), inv_tau = _mm512_set1_ps(inv_tau_s), scale = _mm512_set1_ps(scale_s);
  float* __restrict__ mid = prow + pl;
  const float* rows[K];
  for (int i = 0; i < K; ++i) rows[i] = zero;
  for (int64_t r = 0; r < Hp; ++r) {
    for (int i = 0; i + 1 < K; ++i) rows[i] = rows[i + 1];
    const int64_t s = map_index(r - g.pt, H, g.mode);
    const bool emit = r >= K - 1;
    float* __restrict__ orow = out + (r - (K - 1)) * Wo;
    if (s < 0) {
      rows[K - 1] = zero;
      if (!emit) continue;
      for (int64_t o = 0; o < Wo; o += 16) {
        __m512 v = _mm512_loadu_ps(rows[0] + o);
        if constexpr (K == 3) v = _mm512_add_ps(v, _mm512_loadu_ps(rows[1] + o));
        _mm512_mask_storeu_ps(orow + o, tail_mask(Wo - o), _mm512_mul_ps(scale, v));
      }
      continue;
    }
    const float* __restrict__ xr = x + s * W;
    for (int64_t w = 0; w < W; w += 16) {
      const __mmask16 m = tail_mask(W - w);
      _mm512_mask_storeu_ps(mid + w, m, pointwise16<ACT>(_mm512_maskz_loadu_ps(m, xr + w), tau, inv_tau));
    }
    for (int64_t t = 0; t < pl; ++t) {
      const int64_t mi = map_index(t - pl, W, g.mode);
      prow[t] = mi < 0 ? 0.f : mid[mi];
    }
    for (int64_t t = 0; t < pr; ++t) {
      const int64_t mi = map_index(W + t, W, g.mode);
      mid[W + t] = mi < 0 ? 0.f : mid[mi];
    }
    float* __restrict__ hc = ring + (r % K) * ring_stride;
    rows[K - 1] = hc;
    for (int64_t o = 0; o < Wo; o += 16) {
      __m512 v = _mm512_add_ps(_mm512_loadu_ps(prow + o), _mm512_loadu_ps(prow + o + 1));
      if constexpr (K == 3) v = _mm512_add_ps(v, _mm512_loadu_ps(prow + o + 2));
      _mm512_storeu_ps(hc + o, v);
      if (emit) {
        __m512 sum = _mm512_add_ps(_mm512_loadu_ps(rows[0] + o), v);
        if constexpr (K == 3) sum = _mm512_add_ps(sum, _mm512_loadu_ps(rows[1] + o));
        _mm512_mask_storeu_ps(orow + o, tail_mask(Wo - o), _mm512_mul_ps(scale, sum));
      }
    }
  }
}

// Backward of the zero-padded K x K stride-1 blur, registers only:
//   gx[h, w] = scale * f'(x[h, w]) * sum_{b<K} V_h[w + pl - b],  V_h[o] = sum_{a<K} G[h + pt - a, o]
// with G (grad_out) zero outside its Ho x Wo extent. A 16-lane chunk of V_h starting at column
// q = w + pl - (K-1) and the next chunk give the K shifted windows by valignd.
template <int ACT>
static inline __m512 grad_factor16(__m512 xv, __m512 inv_tau) {
  if constexpr (ACT == kIdentity) {
    return _mm512_set1_ps(1.f);
  } else {
    const __m512 t = tanh_approx16(_mm512_mul_ps(xv, inv_tau));
    __m512 d = _mm512_fnmadd_ps(t, t, _mm512_set1_ps(1.f));
    if constexpr (ACT == kTanhRelu)
      d = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_GT_OQ), d);
    return d;
  }
}

static inline __m512 vsum16(const float* const* grows, int n, int64_t start, __mmask16 m) {
  __m512 v = _mm512_setzero_ps();
  for (int i = 0; i < n; ++i) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, grows[i] + start));
  return v;
}

template <int ACT, int K>
static void backward_plane_k_zeros_avx512(const float* __restrict__ gout, const float* __restrict__ x,
                                          float* __restrict__ gin, const Geometry& g, float inv_tau_s,
                                          float scale_s, const __mmask16* __restrict__ g_mask) {
  // g_mask[j]: the lanes of a grad_out row at columns pl - (K-1) + 16*j .. +15 inside [0, Wo).
  const int64_t H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo;
  const __m512 inv_tau = _mm512_set1_ps(inv_tau_s), scale = _mm512_set1_ps(scale_s);
  for (int64_t h = 0; h < H; ++h) {
    const float* grows[K];
    int n = 0;
    for (int a = 0; a < K; ++a) {
      const int64_t oh = h + g.pt - a;
      if (oh >= 0 && oh < Ho) grows[n++] = gout + oh * Wo;
    }
    float* __restrict__ gr = gin + h * W;
    const float* __restrict__ xr = x != nullptr ? x + h * W : nullptr;
    const int64_t q0 = g.pl - (K - 1);
    __m512 lo = vsum16(grows, n, q0, g_mask[0]);
    for (int64_t w = 0, j = 1; w < W; w += 16, ++j) {
      const __m512 hi = vsum16(grows, n, q0 + w + 16, g_mask[j]);
      __m512 acc = _mm512_add_ps(lo, shift_in16<1>(lo, hi));
      if constexpr (K == 3) acc = _mm512_add_ps(acc, shift_in16<2>(lo, hi));
      acc = _mm512_mul_ps(acc, scale);
      const __mmask16 m = tail_mask(W - w);
      if constexpr (ACT != kIdentity) acc = _mm512_mul_ps(acc, grad_factor16<ACT>(_mm512_maskz_loadu_ps(m, xr + w), inv_tau));
      _mm512_mask_storeu_ps(gr + w, m, acc);
      lo = hi;
    }
  }
}
#endif  // __AVX512F__

#if defined(ALTEROPS_BLUR_AVX2)
// ------------------------------------------------------------------------------------------
// AVX2 versions of the zero-padded K x K stride-1 paths (K = 2, 3), float32: rows are 8-lane
// vectors, padded rows are formed in registers by masked loads of x (zeros in the padding),
// the shifted windows come from a lane shift across two consecutive chunks. The ragged end of
// a row is stored unmasked when the 8 lanes stay inside the plane: the lanes past the row end
// land in the next row of the same plane, which this thread writes afterwards; otherwise masked.
// ------------------------------------------------------------------------------------------
template <int N>
static inline __m256 shift_in8(__m256 lo, __m256 hi) {  // lanes N..7 of lo, then lanes 0..N-1 of hi
  const __m256i mid = _mm256_castps_si256(_mm256_permute2f128_ps(lo, hi, 0x21));  // lo[4..7], hi[0..3]
  return _mm256_castsi256_ps(_mm256_alignr_epi8(mid, _mm256_castps_si256(lo), 4 * N));
}

struct LaneMasks8 {  // per 8-lane chunk j: the lanes inside the valid range, and whether any/all are
  std::vector<int32_t> bits;
  std::vector<uint8_t> any, all;
  // lanes of [start0 + 8 j, start0 + 8 j + 8) inside [0, n), j <= nchunks
  LaneMasks8(int64_t start0, int64_t n, int64_t nchunks) : bits(8 * (nchunks + 1)), any(nchunks + 1), all(nchunks + 1) {
    for (int64_t j = 0; j <= nchunks; ++j) {
      int cnt = 0;
      for (int l = 0; l < 8; ++l) {
        const int64_t c = start0 + 8 * j + l;
        bits[8 * j + l] = (c >= 0 && c < n) ? -1 : 0;
        cnt += (c >= 0 && c < n) ? 1 : 0;
      }
      any[j] = cnt > 0;
      all[j] = cnt == 8;
    }
  }
  __m256i m(int64_t j) const { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits.data() + 8 * j)); }
};

template <int ACT, int K>
static void forward_plane_k_zeros_avx2(const float* __restrict__ x, float* __restrict__ out, const Geometry& g,
                                       float tau_s, float inv_tau_s, float scale_s, float* __restrict__ ring,
                                       int64_t ring_stride, const float* __restrict__ zero, const LaneMasks8& in) {
  // in: the lanes of x[8*j - pl .. +7] inside [0, W), the same for every row.
  const int64_t H = g.H, W = g.W, Wo = g.Wo, pl = g.pl, Ho = g.Ho;
  const int64_t Hp = Ho + K - 1;
  const __m256 tau = _mm256_set1_ps(tau_s), inv_tau = _mm256_set1_ps(inv_tau_s), scale = _mm256_set1_ps(scale_s);
  const __m256i last_mask = tail_mask8(Wo - (Wo - 1) / 8 * 8);
  const int64_t o_last = (Wo - 1) / 8 * 8;
  const float* rows[K];
  for (int i = 0; i < K; ++i) rows[i] = zero;
  const int64_t plane_size = Ho * Wo;
  auto store_out = [&](float* orow, int64_t o, __m256 v, int64_t row_off) {
    if (o == o_last && row_off + o + 8 > plane_size) _mm256_maskstore_ps(orow + o, last_mask, v);
    else _mm256_storeu_ps(orow + o, v);
  };
  auto load_x = [&](const float* xr, int64_t j) -> __m256 {
    if (!in.any[j]) return _mm256_setzero_ps();
    const float* src = xr + (8 * j - pl);
    const __m256 v = in.all[j] ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, in.m(j));
    return pointwise8<ACT>(v, tau, inv_tau);
  };
  for (int64_t r = 0; r < Hp; ++r) {
    for (int i = 0; i + 1 < K; ++i) rows[i] = rows[i + 1];
    const int64_t s = r - g.pt;
    const bool emit = r >= K - 1;
    const int64_t row_off = (r - (K - 1)) * Wo;
    float* __restrict__ orow = out + row_off;
    if (s < 0 || s >= H) {
      rows[K - 1] = zero;
      if (!emit) continue;
      for (int64_t o = 0; o < Wo; o += 8) {
        __m256 v = _mm256_loadu_ps(rows[0] + o);
        if constexpr (K == 3) v = _mm256_add_ps(v, _mm256_loadu_ps(rows[1] + o));
        store_out(orow, o, _mm256_mul_ps(scale, v), row_off);
      }
      continue;
    }
    const float* __restrict__ xr = x + s * W;
    float* __restrict__ hc = ring + (r % K) * ring_stride;
    rows[K - 1] = hc;
    __m256 va = load_x(xr, 0);
    for (int64_t o = 0, j = 1; o < Wo; o += 8, ++j) {
      const __m256 vb = load_x(xr, j);
      __m256 v = _mm256_add_ps(va, shift_in8<1>(va, vb));
      if constexpr (K == 3) v = _mm256_add_ps(v, shift_in8<2>(va, vb));
      _mm256_storeu_ps(hc + o, v);
      if (emit) {
        __m256 sum = _mm256_add_ps(_mm256_loadu_ps(rows[0] + o), v);
        if constexpr (K == 3) sum = _mm256_add_ps(sum, _mm256_loadu_ps(rows[1] + o));
        store_out(orow, o, _mm256_mul_ps(scale, sum), row_off);
      }
      va = vb;
    }
  }
}

// Backward: gx[h, w] = scale * f'(x[h, w]) * sum_{b<K} V_h[w + pl - b], V_h[o] = sum_{a<K} G[h + pt - a, o]
// (as the AVX-512 version). gm: the lanes of a grad_out row at columns pl - (K-1) + 8*j .. +7
// inside [0, Wo); xm: lanes of x[8*j .. +7] inside [0, W).
template <int ACT, int K>
static void backward_plane_k_zeros_avx2(const float* __restrict__ gout, const float* __restrict__ x,
                                        float* __restrict__ gin, const Geometry& g, float inv_tau_s, float scale_s,
                                        const LaneMasks8& gm) {
  const int64_t H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo;
  const __m256 inv_tau = _mm256_set1_ps(inv_tau_s), scale = _mm256_set1_ps(scale_s);
  const int64_t q0 = g.pl - (K - 1);
  const int64_t w_last = (W - 1) / 8 * 8;
  const __m256i last_mask = tail_mask8(W - w_last);
  for (int64_t h = 0; h < H; ++h) {
    const float* grows[K];
    int n = 0;
    for (int a = 0; a < K; ++a) {
      const int64_t oh = h + g.pt - a;
      if (oh >= 0 && oh < Ho) grows[n++] = gout + oh * Wo;
    }
    auto vsum = [&](int64_t j) -> __m256 {
      __m256 v = _mm256_setzero_ps();
      if (!gm.any[j]) return v;
      const int64_t start = q0 + 8 * j;
      if (gm.all[j]) {
        for (int i = 0; i < n; ++i) v = _mm256_add_ps(v, _mm256_loadu_ps(grows[i] + start));
      } else {
        for (int i = 0; i < n; ++i) v = _mm256_add_ps(v, _mm256_maskload_ps(grows[i] + start, gm.m(j)));
      }
      return v;
    };
    float* __restrict__ gr = gin + h * W;
    const float* __restrict__ xr = x != nullptr ? x + h * W : nullptr;
    const bool masked_tail = h * W + w_last + 8 > H * W;  // the 8 lanes would leave the plane
    __m256 lo = vsum(0);
    for (int64_t w = 0, j = 1; w < W; w += 8, ++j) {
      const __m256 hi = vsum(j);
      __m256 acc = _mm256_add_ps(lo, shift_in8<1>(lo, hi));
      if constexpr (K == 3) acc = _mm256_add_ps(acc, shift_in8<2>(lo, hi));
      acc = _mm256_mul_ps(acc, scale);
      const bool tail = w == w_last;
      if constexpr (ACT != kIdentity) {
        const __m256 xv = tail ? _mm256_maskload_ps(xr + w, last_mask) : _mm256_loadu_ps(xr + w);
        acc = _mm256_mul_ps(acc, grad_factor8<ACT>(xv, inv_tau));
      }
      if (tail && masked_tail) _mm256_maskstore_ps(gr + w, last_mask, acc);
      else _mm256_storeu_ps(gr + w, acc);
      lo = hi;
    }
  }
}
#endif  // ALTEROPS_BLUR_AVX2

// ------------------------------------------------------------------------------------------
// Backward, one plane (the transpose of the forward).
//   gvs: H * Wo (vertical scatter of grad_out onto source rows); grow: Wo; gp: Wp; gx: W.
// ------------------------------------------------------------------------------------------
template <int ACT, typename scalar_t, typename acc_t>
static void backward_plane(const scalar_t* __restrict__ gout, const scalar_t* __restrict__ x,
                           scalar_t* __restrict__ gin, const Geometry& g, acc_t inv_tau, acc_t scale,
                           acc_t* __restrict__ gvs, acc_t* __restrict__ grow, acc_t* __restrict__ gp,
                           acc_t* __restrict__ gx) {
  const int64_t H = g.H, W = g.W, Wo = g.Wo, kw = g.kw, sw = g.sw, pl = g.pl, pr = g.pr;
  const int64_t Wp = pl + W + pr;
  std::fill(gvs, gvs + H * Wo, acc_t(0));
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const scalar_t* __restrict__ go = gout + oh * Wo;
#pragma omp simd
    for (int64_t o = 0; o < Wo; ++o) grow[o] = static_cast<acc_t>(go[o]);
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t s = map_index(oh * g.sh + i - g.pt, H, g.mode);
      if (s < 0) continue;
      acc_t* __restrict__ dst = gvs + s * Wo;
#pragma omp simd
      for (int64_t o = 0; o < Wo; ++o) dst[o] += grow[o];
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    const acc_t* __restrict__ gv = gvs + h * Wo;
    std::fill(gp, gp + Wp, acc_t(0));
    if (sw == 1) {
      for (int64_t j = 0; j < kw; ++j) {
        acc_t* __restrict__ dst = gp + j;
#pragma omp simd
        for (int64_t o = 0; o < Wo; ++o) dst[o] += gv[o];
      }
    } else {
      for (int64_t o = 0; o < Wo; ++o)
        for (int64_t j = 0; j < kw; ++j) gp[o * sw + j] += gv[o];
    }
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) gx[w] = gp[pl + w];
    if (g.mode != kZeros) {
      for (int64_t t = 0; t < pl; ++t) gx[map_index(t - pl, W, g.mode)] += gp[t];
      for (int64_t t = 0; t < pr; ++t) gx[map_index(W + t, W, g.mode)] += gp[pl + W + t];
    }
    scalar_t* __restrict__ gr = gin + h * W;
    if constexpr (ACT == kIdentity) {
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) gr[w] = static_cast<scalar_t>(scale * gx[w]);
    } else {
      const scalar_t* __restrict__ xr = x + h * W;
#if defined(ALTEROPS_BLUR_AVX2)
      if constexpr (std::is_same_v<scalar_t, float>) {
        grad_row_avx2<ACT>(gx, xr, gr, W, scale, inv_tau);
      } else
#endif
      {
#pragma omp simd
      for (int64_t w = 0; w < W; ++w)
        gr[w] = static_cast<scalar_t>(scale * gx[w] * pointwise_grad<ACT, acc_t>(static_cast<acc_t>(xr[w]), inv_tau));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Entry points.
// ------------------------------------------------------------------------------------------
template <typename F>
static void dispatch_act(int64_t act, F&& f) {
  if (act == kIdentity) f(std::integral_constant<int, kIdentity>{});
  else if (act == kTanh) f(std::integral_constant<int, kTanh>{});
  else f(std::integral_constant<int, kTanhRelu>{});
}

// Runs f(begin, end) over [0, n) planes in chunks handed out dynamically to torch's threads: on
// a busy machine a thread that loses its core does not hold back a statically assigned half of
// the planes.
template <typename F>
static void parallel_planes(const Parallel& par, int64_t n, const F& f) {
  const int64_t nt = par.num_threads;
  if (nt <= 1 || n <= 1) {
    f(int64_t(0), n);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(64, n / (8 * nt)));
  par.for_dynamic(n, chunk, f);
}

template <typename scalar_t>
static void forward_typed(const ForwardArgs& a, const Parallel& par) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = a.g;
  const int64_t planes = a.planes;
  const scalar_t* xp = static_cast<const scalar_t*>(a.x);
  scalar_t* op = static_cast<scalar_t*>(a.out);
  const acc_t tau_a = static_cast<acc_t>(a.tau), inv_tau = static_cast<acc_t>(1.0 / a.tau);
  const acc_t scale = static_cast<acc_t>(1.0 / double(g.kh * g.kw));
  const int64_t Wp = g.pl + g.W + g.pr;
  dispatch_act(a.act, [&](auto act_c) {
    constexpr int ACT = decltype(act_c)::value;
    const int fast_k = (g.sh == 1 && g.sw == 1 && g.kh == g.kw && (g.kh == 2 || g.kh == 3)) ? int(g.kh) : 0;
    parallel_planes(par, planes, [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (fast_k != 0) {
          // prow (Wp + slack), zero row, K ring rows; every row padded to a multiple of 16 + 32
          const int64_t stride = (g.Wo + 15) / 16 * 16 + 32;
          std::vector<float> buf((Wp + 48) / 16 * 16 + 4 * stride + 16, 0.f);
          float* prow = buf.data() + ((16 - (reinterpret_cast<uintptr_t>(buf.data()) / 4) % 16) % 16);  // 64 B
          float* zero = prow + (Wp + 48) / 16 * 16;
          float* ring = zero + stride;
          if (g.mode == kZeros) {
            const int64_t nchunks = (g.Wo + 15) / 16;
            std::vector<__mmask16> in_mask(nchunks + 1);
            for (int64_t j = 0; j <= nchunks; ++j) {
              const int64_t start = 16 * j - g.pl;
              const int64_t lo = start < 0 ? -start : 0, hi = g.W - start < 16 ? g.W - start : 16;
              uint32_t bits = 0;
              for (int64_t l = lo; l < hi; ++l) bits |= 1u << l;
              in_mask[j] = __mmask16(bits);
            }
            for (int64_t p = begin; p < end; ++p) {
              if (fast_k == 2)
                forward_plane_k_zeros_avx512<ACT, 2>(xp + p * g.H * g.W, op + p * g.Ho * g.Wo, g, tau_a, inv_tau,
                                                     scale, ring, stride, zero, in_mask.data());
              else
                forward_plane_k_zeros_avx512<ACT, 3>(xp + p * g.H * g.W, op + p * g.Ho * g.Wo, g, tau_a, inv_tau,
                                                     scale, ring, stride, zero, in_mask.data());
            }
            return;
          }
          for (int64_t p = begin; p < end; ++p) {
            if (fast_k == 2)
              forward_plane_k_avx512<ACT, 2>(xp + p * g.H * g.W, op + p * g.Ho * g.Wo, g, tau_a, inv_tau, scale,
                                             prow, ring, stride, zero);
            else
              forward_plane_k_avx512<ACT, 3>(xp + p * g.H * g.W, op + p * g.Ho * g.Wo, g, tau_a, inv_tau, scale,
                                             prow, ring, stride, zero);
          }
          return;
        }
      }
#elif defined(ALTEROPS_BLUR_AVX2)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (fast_k != 0 && g.mode == kZeros) {
          // zero row and K ring rows, each a multiple of 8 floats plus 16 of slack
          const int64_t rstride = (g.Wo + 7) / 8 * 8 + 16;
          std::vector<float> buf(4 * rstride, 0.f);
          float* zero = buf.data();
          float* ring = zero + rstride;
          const LaneMasks8 in(-g.pl, g.W, (g.Wo + 7) / 8);
          for (int64_t p = begin; p < end; ++p) {
            if (fast_k == 2)
              forward_plane_k_zeros_avx2<ACT, 2>(xp + p * g.H * g.W, op + p * g.Ho * g.Wo, g, tau_a, inv_tau, scale,
                                                 ring, rstride, zero, in);
            else
              forward_plane_k_zeros_avx2<ACT, 3>(xp + p * g.H * g.W, op + p * g.Ho * g.Wo, g, tau_a, inv_tau, scale,
                                                 ring, rstride, zero, in);
          }
          return;
        }
      }
#endif
      if (fast_k != 0) {
        std::vector<acc_t> buf(Wp + 4 * g.Wo + 16, acc_t(0));
        acc_t* prow = buf.data();
        acc_t* zero = prow + Wp;
        acc_t* ring = zero + g.Wo;
        for (int64_t p = begin; p < end; ++p) {
          if (fast_k == 2)
            forward_plane_k<ACT, 2, scalar_t, acc_t>(xp + p * g.H * g.W, op + p * g.Ho * g.Wo, g, tau_a, inv_tau,
                                                     scale, prow, ring, zero);
          else
            forward_plane_k<ACT, 3, scalar_t, acc_t>(xp + p * g.H * g.W, op + p * g.Ho * g.Wo, g, tau_a, inv_tau,
                                                     scale, prow, ring, zero);
        }
        return;
      }
      std::vector<acc_t> buf(Wp + (g.H + 1) * g.Wo + g.Wo + 16);
      acc_t* prow = buf.data();
      acc_t* hs = prow + Wp;
      acc_t* vrow = hs + (g.H + 1) * g.Wo;
      for (int64_t p = begin; p < end; ++p)
        forward_plane<ACT, scalar_t, acc_t>(xp + p * g.H * g.W, op + p * g.Ho * g.Wo, g, tau_a, inv_tau, scale,
                                            prow, hs, vrow);
    });
  });
}

template <typename scalar_t>
static void backward_typed(const BackwardArgs& a, const Parallel& par) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = a.g;
  const int64_t planes = a.planes;
  const scalar_t* gp_ = static_cast<const scalar_t*>(a.grad_out);
  const scalar_t* xp = a.act != kIdentity ? static_cast<const scalar_t*>(a.x) : nullptr;
  scalar_t* ip = static_cast<scalar_t*>(a.grad_in);
  const acc_t inv_tau = static_cast<acc_t>(1.0 / a.tau);
  const acc_t scale = static_cast<acc_t>(1.0 / double(g.kh * g.kw));
  const int64_t Wp = g.pl + g.W + g.pr;
  dispatch_act(a.act, [&](auto act_c) {
    constexpr int ACT = decltype(act_c)::value;
    parallel_planes(par, planes, [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (g.mode == kZeros && g.sh == 1 && g.sw == 1 && g.kh == g.kw && (g.kh == 2 || g.kh == 3)) {
          const int64_t nchunks = (g.W + 15) / 16;
          std::vector<__mmask16> g_mask(nchunks + 1);
          for (int64_t j = 0; j <= nchunks; ++j) {
            const int64_t start = g.pl - (g.kh - 1) + 16 * j;
            const int64_t lo = start < 0 ? -start : 0, hi = g.Wo - start < 16 ? g.Wo - start : 16;
            uint32_t bits = 0;
            for (int64_t l = lo; l < hi; ++l) bits |= 1u << l;
            g_mask[j] = __mmask16(bits);
          }
          for (int64_t p = begin; p < end; ++p) {
            const float* xq = xp ? xp + p * g.H * g.W : nullptr;
            if (g.kh == 2)
              backward_plane_k_zeros_avx512<ACT, 2>(gp_ + p * g.Ho * g.Wo, xq, ip + p * g.H * g.W, g, inv_tau, scale,
                                                    g_mask.data());
            else
              backward_plane_k_zeros_avx512<ACT, 3>(gp_ + p * g.Ho * g.Wo, xq, ip + p * g.H * g.W, g, inv_tau, scale,
                                                    g_mask.data());
          }
          return;
        }
      }
#elif defined(ALTEROPS_BLUR_AVX2)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (g.mode == kZeros && g.sh == 1 && g.sw == 1 && g.kh == g.kw && (g.kh == 2 || g.kh == 3)) {
          const LaneMasks8 gm(g.pl - (g.kh - 1), g.Wo, (g.W + 7) / 8);
          for (int64_t p = begin; p < end; ++p) {
            const float* xq = xp ? xp + p * g.H * g.W : nullptr;
            if (g.kh == 2)
              backward_plane_k_zeros_avx2<ACT, 2>(gp_ + p * g.Ho * g.Wo, xq, ip + p * g.H * g.W, g, inv_tau, scale, gm);
            else
              backward_plane_k_zeros_avx2<ACT, 3>(gp_ + p * g.Ho * g.Wo, xq, ip + p * g.H * g.W, g, inv_tau, scale, gm);
          }
          return;
        }
      }
#endif
      std::vector<acc_t> buf(g.H * g.Wo + g.Wo + Wp + g.W + 16);
      acc_t* gvs = buf.data();
      acc_t* grow = gvs + g.H * g.Wo;
      acc_t* gpad = grow + g.Wo;
      acc_t* gx = gpad + Wp;
      for (int64_t p = begin; p < end; ++p)
        backward_plane<ACT, scalar_t, acc_t>(gp_ + p * g.Ho * g.Wo, xp ? xp + p * g.H * g.W : nullptr,
                                             ip + p * g.H * g.W, g, inv_tau, scale, gvs, grow, gpad, gx);
    });
  });
}

// bfloat16, float32 and float64 (the binding rejects float16).
template <typename F>
static void dispatch_blur_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::BFloat16: f(BFloat16{}); break;
    case DType::Float16: break;
  }
}

static void forward(const ForwardArgs& a, const Parallel& par) {
  if (a.planes <= 0) return;
  dispatch_blur_dtype(a.dtype, [&](auto t) { forward_typed<decltype(t)>(a, par); });
}

static void backward(const BackwardArgs& a, const Parallel& par) {
  if (a.planes <= 0) return;
  dispatch_blur_dtype(a.dtype, [&](auto t) { backward_typed<decltype(t)>(a, par); });
}

const Kernels& kernels() {
  static const Kernels k{&forward, &backward};
  return k;
}

}  // namespace blur
}  // namespace alterops
