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
// Padded rows are never materialised: a padded index is mapped to its source index. float64 is
// accumulated in double; bfloat16 and float16 arrive as float32 copies (blur_binding.cpp).
// Tensors are contiguous NCHW.
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

// The vector code of the level: blur_avx512.h (AVX-512: the zero-padded K x K stride-1 paths
// forward and backward) or blur_avx2.h (AVX2 + FMA: 8-lane pointwise rows for the generic
// per-plane code, and the same K x K paths).
#if defined(__AVX512F__)
#include "blur_avx512.h"
#elif defined(ALTEROPS_BLUR_AVX2)
#include "blur_avx2.h"
#endif


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

// float32 and float64 (the binding runs bfloat16 and float16 on float32 copies).
template <typename F>
static void dispatch_blur_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    default: break;
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
