// box_blur2d / tanh_blur2d: the AVX-512 code of the CPU kernels (16-lane float vectors).
// Included by blur_cpu.cpp only, inside its namespace, when the level has AVX-512, after
// map_index and the scalar pointwise ops.
#pragma once

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

// The output row of a window whose last source row is zero padding: scale times the sum of the
// ring's other K - 1 rows of horizontal sums.
template <int K>
static inline void emit_ring_row(const float* const* rows, int64_t Wo, __m512 scale, float* __restrict__ orow) {
  for (int64_t o = 0; o < Wo; o += 16) {
    __m512 v = _mm512_loadu_ps(rows[0] + o);
    if constexpr (K == 3) v = _mm512_add_ps(v, _mm512_loadu_ps(rows[1] + o));
    _mm512_mask_storeu_ps(orow + o, tail_mask(Wo - o), _mm512_mul_ps(scale, v));
  }
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
      emit_ring_row<K>(rows, Wo, scale, orow);
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
      emit_ring_row<K>(rows, Wo, scale, orow);
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
