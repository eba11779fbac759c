// box_blur2d / tanh_blur2d: the AVX2 + FMA code of the CPU kernels (8-lane float vectors).
// Included by blur_cpu.cpp only, inside its namespace, when the level has AVX2 + FMA and not
// AVX-512 (ALTEROPS_BLUR_AVX2), after map_index and the scalar pointwise ops.
#pragma once

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
