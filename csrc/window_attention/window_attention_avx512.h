// window_attention2d: the float32 fast path for AVX-512 machines. Included by
// window_attention_cpu.cpp only (when the level's flags enable AVX-512), inside its anonymous
// namespace, after the pieces both fast paths share (Geometry, View5, fast::Plan,
// fast::make_plan, fast::scatter_tiles, fast::Prefetcher).
#pragma once

// ----------------------------------------------------------------------------------------
// float32 fast path (AVX-512). Per call, windows are grouped into classes that share the same
// present tokens and shift regions (interior windows, last window row/column, corner, padded
// edges); one tile per (class, table head) holds log2(e) * (bias + region mask), -inf for masked
// and padding columns, so a task adds one precomputed row instead of gathering bias entries.
// Logits are kept in base-2 units (scale * log2(e) applied in the GEMM epilogue) and the
// softmax uses a vectorised exp2. Rows of q, k, v, out, grad_out are read in place (unit
// inner stride) or gathered once; K^T (and V^T in backward) is packed d x Np with 16x16
// register transposes, and the small GEMMs are register-blocked (rows x 16-lane vectors).
// ----------------------------------------------------------------------------------------
namespace fast {

// 2^x, |rel err| ~ 1e-7 (Cephes exp2f polynomial on [-0.5, 0.5]); x = -inf gives 0, NaN gives
// NaN (max returns its second operand when one is NaN).
static inline __m512 exp2v(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// log2(x) for normal x > 0, |abs err| ~ 1e-7: exponent + 2/ln2 * atanh((m-1)/(m+1)), m in [1, 2).
static inline __m512 log2v(__m512 x) {
  const __m512 e = _mm512_getexp_ps(x);
  const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 z = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
  const __m512 z2 = _mm512_mul_ps(z, z);
  __m512 p = _mm512_set1_ps(1.0f / 13.0f);
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(1.0f / 11.0f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(1.0f / 9.0f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(1.0f / 7.0f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(1.0f / 5.0f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(1.0f / 3.0f));
  p = _mm512_fmadd_ps(p, z2, one);
  return _mm512_fmadd_ps(_mm512_mul_ps(p, z), _mm512_set1_ps(2.0f * kLog2e), e);
}

static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  _Pragma("GCC unroll 32") for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  _Pragma("GCC unroll 32") for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  _Pragma("GCC unroll 32") for (int h = 0; h < 2; ++h) {
    _Pragma("GCC unroll 32") for (int j = 0; j < 4; ++j) {
      t[8 * h + j] = _mm512_shuffle_f32x4(r[8 * h + j], r[8 * h + 4 + j], 0x88);
      t[8 * h + 4 + j] = _mm512_shuffle_f32x4(r[8 * h + j], r[8 * h + 4 + j], 0xDD);
    }
  }
  _Pragma("GCC unroll 32") for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
  }
}

static inline __mmask16 lane_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

// Reduces each of v[0..8) over its 16 lanes at once (23 shuffles/ops instead of 8 horizontal
// reductions): the result of v[r] is in lane reduce8_lane(r) of the returned vector.
template <class Op>
static inline __m512 reduce8(const __m512* v, Op op) {
  __m512 t[4];
  _Pragma("GCC unroll 4") for (int i = 0; i < 4; ++i)
    t[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
              _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 u[2];
  _Pragma("GCC unroll 2") for (int j = 0; j < 2; ++j)
    u[j] = op(_mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
              _mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w = op(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  return op(w, _mm512_permute_ps(w, _MM_SHUFFLE(2, 3, 0, 1)));
}
constexpr int reduce8_lane(int r) { return r < 4 ? 4 * r : 4 * (r - 4) + 2; }
struct MaxOp { __m512 operator()(__m512 a, __m512 b) const { return _mm512_max_ps(a, b); } };
struct AddOp { __m512 operator()(__m512 a, __m512 b) const { return _mm512_add_ps(a, b); } };

// dst[e * ld + m] = rows[m][e] for m < M (zero for M <= m < Mp16), e < d.
static inline void pack_transposed(const float* const* rows, int64_t M, int64_t d, float* dst, int64_t ld) {
  const int64_t Mp = round_up(M, 16);
  for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
    for (int64_t e0 = 0; e0 < d; e0 += 16) {
      const __mmask16 km = lane_mask(d - e0);
      __m512 r[16];
      _Pragma("GCC unroll 32") for (int i = 0; i < 16; ++i)
        r[i] = m0 + i < M ? _mm512_maskz_loadu_ps(km, rows[m0 + i] + e0) : _mm512_setzero_ps();
      transpose16(r);
      const int64_t ne = std::min<int64_t>(16, d - e0);
      for (int64_t j = 0; j < ne; ++j) _mm512_storeu_ps(dst + (e0 + j) * ld + m0, r[j]);
    }
  }
}

// acc[r][c] = sum_e A[m0 + r][e] * Bt[e * ld + n0 + 16c]; then epi(m, n, acc).
template <int R, int CV, class Epi>
static inline void qk_block(const float* const* arows, int64_t m0, const float* Bt, int64_t ld, int64_t n0,
                            int64_t d, Epi& epi) {
  __m512 acc[R][CV];
  const float* a[R];
  _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r) {
    a[r] = arows[m0 + r];
    _Pragma("GCC unroll 32") for (int c = 0; c < CV; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  const float* b = Bt + n0;
  for (int64_t e = 0; e < d; ++e, b += ld) {
    __m512 bv[CV];
    _Pragma("GCC unroll 32") for (int c = 0; c < CV; ++c) bv[c] = _mm512_loadu_ps(b + 16 * c);
    _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r][e]);
      _Pragma("GCC unroll 32") for (int c = 0; c < CV; ++c) acc[r][c] = _mm512_fmadd_ps(x, bv[c], acc[r][c]);
    }
  }
  _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 32") for (int c = 0; c < CV; ++c) epi(m0 + r, n0 + 16 * c, acc[r][c]);
}

// Rows m < M (row blocks padded to R: pad rows of arows point at zeros), all Np columns.
template <class Epi>
static inline void qk_all(const float* const* arows, int64_t M, const float* Bt, int64_t Np, int64_t d, Epi& epi) {
  for (int64_t n0 = 0; n0 < Np; n0 += 64) {
    const int64_t cv = std::min<int64_t>(4, (Np - n0) / 16);
    switch (cv) {
      case 4: for (int64_t m0 = 0; m0 < M; m0 += 7) qk_block<7, 4>(arows, m0, Bt, Np, n0, d, epi); break;
      case 3: for (int64_t m0 = 0; m0 < M; m0 += 7) qk_block<7, 3>(arows, m0, Bt, Np, n0, d, epi); break;
      case 2: for (int64_t m0 = 0; m0 < M; m0 += 8) qk_block<8, 2>(arows, m0, Bt, Np, n0, d, epi); break;
      default: for (int64_t m0 = 0; m0 < M; m0 += 8) qk_block<8, 1>(arows, m0, Bt, Np, n0, d, epi); break;
    }
  }
}

// acc[r][c] = sum_{n < K} A[(m0 + r) * lda + n] * X[n][16c..]; then epi(m, acc[r]) for m < M.
template <int R, int DV, class Epi>
static inline void pv_block(const float* A, int64_t lda, int64_t m0, const float* const* xrows, int64_t K,
                            __mmask16 tail, Epi& epi) {
  __m512 acc[R][DV];
  _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* a = A + m0 * lda;
  for (int64_t n = 0; n < K; ++n) {
    const float* x = xrows[n];
    __m512 xv[DV];
    _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c) xv[c] = _mm512_maskz_loadu_ps(c == DV - 1 ? tail : (__mmask16)0xFFFF, x + 16 * c);
    _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(a[r * lda + n]);
      _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_fmadd_ps(p, xv[c], acc[r][c]);
    }
  }
  _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r) epi(m0 + r, acc[r]);
}

// acc1[r] = sum_{m < M} A1[m * lda + n0 + r] * X1[m];  acc2[r] = sum_m A2[m * lda + n0 + r] * X2[m].
template <int R, int DV, class Epi>
static inline void tn_block(const float* A1, const float* A2, int64_t lda, int64_t n0, const float* const* x1rows,
                            const float* const* x2rows, int64_t M, __mmask16 tail, Epi& epi) {
  __m512 acc1[R][DV], acc2[R][DV];
  _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c) { acc1[r][c] = _mm512_setzero_ps(); acc2[r][c] = _mm512_setzero_ps(); }
  for (int64_t m = 0; m < M; ++m) {
    const float* x1 = x1rows[m];
    const float* x2 = x2rows[m];
    const float* a1 = A1 + m * lda + n0;
    const float* a2 = A2 + m * lda + n0;
    __m512 u[DV], w[DV];
    _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c) {
      const __mmask16 km = c == DV - 1 ? tail : (__mmask16)0xFFFF;
      u[c] = _mm512_maskz_loadu_ps(km, x1 + 16 * c);
      w[c] = _mm512_maskz_loadu_ps(km, x2 + 16 * c);
    }
    _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r) {
      const __m512 p1 = _mm512_set1_ps(a1[r]);
      const __m512 p2 = _mm512_set1_ps(a2[r]);
      _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c) {
        acc1[r][c] = _mm512_fmadd_ps(p1, u[c], acc1[r][c]);
        acc2[r][c] = _mm512_fmadd_ps(p2, w[c], acc2[r][c]);
      }
    }
  }
  _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r) epi(n0 + r, acc1[r], acc2[r]);
}

template <int DV> constexpr int pv_rows() { return DV == 1 ? 8 : DV <= 3 ? 7 : DV == 4 ? 4 : 3; }

// dst[0 .. 16*DV) = a[..] * s, the last vector masked by `tail` (one row of d values).
template <int DV>
static inline void store_scaled_row(float* dst, const __m512* a, __m512 s, __mmask16 tail) {
  _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c)
    _mm512_mask_storeu_ps(dst + 16 * c, c == DV - 1 ? tail : (__mmask16)0xFFFF, _mm512_mul_ps(a[c], s));
}
// The same with non-temporal stores for the whole vectors where dst is 64-byte aligned (the
// forward's output rows, each written once and read only by the next op: fetching their lines
// first would only add reads); the tail, or a row off alignment, through the caches. Needs
// _mm_sfence() before the writes are published.
template <int DV>
static inline void stream_scaled_row(float* dst, const __m512* a, __m512 s, __mmask16 tail) {
  if ((reinterpret_cast<uintptr_t>(dst) & 63) != 0) return store_scaled_row<DV>(dst, a, s, tail);
  _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c) {
    if (c == DV - 1 && tail != (__mmask16)0xFFFF)
      _mm512_mask_storeu_ps(dst + 16 * c, tail, _mm512_mul_ps(a[c], s));
    else
      _mm512_stream_ps(dst + 16 * c, _mm512_mul_ps(a[c], s));
  }
}
template <int DV> constexpr int tn_rows() { return DV == 1 ? 8 : DV == 2 ? 7 : DV <= 4 ? 3 : 1; }

template <int DV, class Epi>
static inline void pv_all(const float* A, int64_t lda, int64_t M, const float* const* xrows, int64_t K,
                          __mmask16 tail, Epi& epi) {
  constexpr int R = pv_rows<DV>();
  for (int64_t m0 = 0; m0 < M; m0 += R) pv_block<R, DV>(A, lda, m0, xrows, K, tail, epi);
}
template <int DV, class Epi>
static inline void tn_all(const float* A1, const float* A2, int64_t lda, const float* const* x1rows,
                          const float* const* x2rows, int64_t M, __mmask16 tail, Epi& epi) {
  constexpr int R = tn_rows<DV>();
  for (int64_t n0 = 0; n0 < M; n0 += R) tn_block<R, DV>(A1, A2, lda, n0, x1rows, x2rows, M, tail, epi);
}

struct Rows {
  std::vector<const float*> p;
  std::vector<float> buf;
  // Row pointers of one (b, window, head): in place for unit inner stride, else gathered.
  inline void set(const float* base, const View5& v, const Geometry& g, const Plan& pl, int64_t b, int64_t h,
                  int64_t win, int64_t M, const float* zero) {
    const int32_t* py = pl.py.data() + win * g.N;
    const int32_t* px = pl.px.data() + win * g.N;
    base += b * v.sb + h * v.sh;
    for (int64_t m = 0; m < M; ++m) {
      const float* src = base + py[m] * v.sy + px[m] * v.sx;
      if (v.sd == 1) {
        p[m] = src;
      } else {
        float* dst = buf.data() + m * g.d;
        for (int64_t e = 0; e < g.d; ++e) dst[e] = src[e * v.sd];
        p[m] = dst;
      }
    }
    for (int64_t m = M; m < (int64_t)p.size(); ++m) p[m] = zero;
  }
  void init(int64_t rows, int64_t d) { p.assign(rows, nullptr); buf.assign(rows * d, 0.0f); }
};

template <class F>
static inline void dispatch_dv(int64_t DV, F&& f) {
  switch (DV) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}


// acc[r * CV + c] = sum_{e < d} A[(m0 + r) * LDA + e] * Bt[e * ld + 16c]; then epi(m0, acc).
// A is a gathered block with a compile-time row stride, so the R row addresses are one base
// pointer plus constant offsets (no per-row pointers competing for registers).
template <int R, int CV, int LDA, class Epi>
static inline void qk_rows_c(const float* A, int64_t m0, const float* Bt, int64_t ld, int64_t d, Epi& epi) {
  __m512 acc[R * CV];
  _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 32") for (int c = 0; c < CV; ++c) acc[r * CV + c] = _mm512_setzero_ps();
  const float* a = A + m0 * LDA;
  const float* b = Bt;
  for (int64_t e = 0; e < d; ++e, b += ld) {
    __m512 bv[CV];
    _Pragma("GCC unroll 32") for (int c = 0; c < CV; ++c) bv[c] = _mm512_loadu_ps(b + 16 * c);
    _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * LDA + e]);
      _Pragma("GCC unroll 32") for (int c = 0; c < CV; ++c) acc[r * CV + c] = _mm512_fmadd_ps(x, bv[c], acc[r * CV + c]);
    }
  }
  epi(m0, acc);
}

// acc[r][c] = sum_{n < K} P[(m0 + r) * LDP + n] * X[n * 16DV + 16c]; then epi(m0 + r, acc[r]).
template <int R, int DV, int LDP, class Epi>
static inline void pv_rows_c(const float* P, int64_t m0, const float* X, int64_t K, Epi& epi) {
  __m512 acc[R][DV];
  _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* a = P + m0 * LDP;
  const float* x = X;
  for (int64_t n = 0; n < K; ++n, x += 16 * DV) {
    __m512 xv[DV];
    _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c) xv[c] = _mm512_load_ps(x + 16 * c);
    _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(a[r * LDP + n]);
      _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_fmadd_ps(p, xv[c], acc[r][c]);
    }
  }
  _Pragma("GCC unroll 32") for (int r = 0; r < R; ++r) epi(m0 + r, acc[r]);
}

// 64-byte aligned float scratch.
struct AlignedBuf {
  std::vector<float> v;
  float* p = nullptr;
  void init(int64_t n) {
    v.assign(n + 16, 0.0f);
    p = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
  }
};

// Copy rows (b, window, head) m < M of a (B, H, W, heads, d) tensor into dst[m * 16DV ..], the
// lanes past d zero.
template <int DV>
static inline void gather_rows(float* dst, const float* base, const View5& v, const Geometry& g, const Plan& pl,
                               int64_t b, int64_t h, int64_t win, int64_t M, __mmask16 tail) {
  const int32_t* py = pl.py.data() + win * g.N;
  const int32_t* px = pl.px.data() + win * g.N;
  base += b * v.sb + h * v.sh;
  for (int64_t m = 0; m < M; ++m, dst += 16 * DV) {
    const float* src = base + py[m] * v.sy + px[m] * v.sx;
    if (v.sd == 1) {
      _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c)
        _mm512_store_ps(dst + 16 * c, _mm512_maskz_loadu_ps(c == DV - 1 ? tail : (__mmask16)0xFFFF, src + 16 * c));
    } else {
      for (int64_t e = 0; e < g.d; ++e) dst[e] = src[e * v.sd];
    }
  }
}

// The forward for windows of at most 64 tokens (Np <= 64): per task, Q and V are gathered into
// contiguous blocks, K is packed transposed; S = scale*Q K^T + tile, row softmax in base 2 fused
// into the QK^T epilogue (P kept in S with a fixed row stride of 64), O = P V / rowsum.
template <int DV>
void forward_small(const Geometry& g, const Plan& pl, const Strided& q, const Strided& k, const Strided& v,
                   bool per_head_tiles, float scale, float* out, float* lse, const Parallel& par) {
  constexpr int LD = 16 * DV;  // row stride of gathered Q and V
  constexpr int LS = 64;       // row stride of S
  const View5 vq(q), vk(k), vv(v);
  const float* qp = q.as<float>();
  const float* kp = k.as<float>();
  const float* vp = v.as<float>();
  const int64_t d = g.d, nh = g.nh, Np = pl.Np, HW = g.H * g.W;
  const __mmask16 tail = lane_mask(d - 16 * (DV - 1));
  const int64_t rows_cap = Np + 16;
  const int64_t tasks = g.B * g.nWin * nh;
  const float c2 = scale * kLog2e;
  par.for_each(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Rows kr;
    kr.init(rows_cap, d);
    std::vector<float> zero(LD + 16, 0.0f);
    AlignedBuf Qb, Vb, Ktb, Sb, invb, rmaxb, lseb, tlb;
    Qb.init(rows_cap * LD); Vb.init(rows_cap * LD); Ktb.init(LD * Np + 16); Sb.init(rows_cap * LS + 64);
    invb.init(rows_cap + 16); rmaxb.init(rows_cap + 16); lseb.init(rows_cap + 16); tlb.init(rows_cap + 16);
    float* Qc = Qb.p; float* Vc = Vb.p; float* Kt = Ktb.p; float* Sp = Sb.p;
    float* inv = invb.p; float* rmax = rmaxb.p; float* lsev = lseb.p; float* tl = tlb.p;
    // The rows of the task kFar ahead are prefetched into L2 (one task ahead is too short to
    // hide DRAM latency when a task's rows are a few KiB of math; also fetching them into L1
    // measured slower: L2 to L1 is cheap and L1 is full with this task's blocks).
    Prefetcher pf;
    pf.init(3 * rows_cap, d, std::max({vq.sd, vk.sd, vv.sd}));
    pf.far = true;
    constexpr int64_t kFar = 4;
    const __m512 cv = _mm512_set1_ps(c2);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % nh;
      const int64_t win = (task / nh) % g.nWin;
      const int64_t b = task / (nh * g.nWin);
      const int64_t cls = pl.win_cls[win];
      const int64_t M = pl.cls_M[cls];
      if (M == 0) continue;
      const int32_t* pos = g.pos.data() + win * g.N;
      const float* tile = pl.tiles.data() + (cls * pl.thn + (per_head_tiles ? h : 0)) * pl.tsz;
      if (task + kFar < end) {
        pf.add_task(g, pl, task + kFar, qp, vq);
        pf.add_task(g, pl, task + kFar, kp, vk);
        pf.add_task(g, pl, task + kFar, vp, vv);
      }
      pf.start(2 * ((M + 6) / 7));
      gather_rows<DV>(Qc, qp, vq, g, pl, b, h, win, M, tail);
      gather_rows<DV>(Vc, vp, vv, g, pl, b, h, win, M, tail);
      kr.set(kp, vk, g, pl, b, h, win, M, zero.data());
      pack_transposed(kr.p.data(), M, d, Kt, Np);
      // Row softmax of the logits of rows m0..m0+R (R <= 8; acc[r * CVc + c]), plus the lone
      // last key in tl[m] when `lone`; the row maxima and sums are reduced 8 rows at a time.
      alignas(64) float red[16];
      auto softmax_blk = [&](int64_t m0, auto rc, auto cvc, auto lone, const __m512* acc) {
        constexpr int R = decltype(rc)::value;
        constexpr int CVc = decltype(cvc)::value;
        __m512 x[R][CVc], v[8];
        _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
          if (m0 + r < M) {
            const float* t = tile + (m0 + r) * Np;
            _Pragma("GCC unroll 32") for (int c = 0; c < CVc; ++c)
              x[r][c] = _mm512_fmadd_ps(acc[r * CVc + c], cv, _mm512_loadu_ps(t + 16 * c));
            v[r] = x[r][0];
            _Pragma("GCC unroll 32") for (int c = 1; c < CVc; ++c) v[r] = _mm512_max_ps(v[r], x[r][c]);
          } else {
            v[r] = _mm512_setzero_ps();
          }
        }
        _Pragma("GCC unroll 8") for (int r = R; r < 8; ++r) v[r] = v[0];
        _mm512_store_ps(red, reduce8(v, MaxOp{}));
        float mxs[R];
        _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
          mxs[r] = red[reduce8_lane(r)];
          if (m0 + r >= M) continue;
          if constexpr (decltype(lone)::value) {
            const float xt = tl[m0 + r] * c2 + tile[(m0 + r) * Np + M - 1];
            tl[m0 + r] = xt;
            mxs[r] = std::max(mxs[r], xt);
          }
          const __m512 mxv = _mm512_set1_ps(mxs[r]);
          float* srow = Sp + (m0 + r) * LS;
          __m512 sum = _mm512_setzero_ps();
          _Pragma("GCC unroll 32") for (int c = 0; c < CVc; ++c) {
            const __m512 p = exp2v(_mm512_sub_ps(x[r][c], mxv));
            _mm512_store_ps(srow + 16 * c, p);
            sum = _mm512_add_ps(sum, p);
          }
          v[r] = sum;
        }
        _mm512_store_ps(red, reduce8(v, AddOp{}));
        _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
          if (m0 + r >= M) continue;
          inv[m0 + r] = red[reduce8_lane(r)];  // the row sum; inverted below with the logsumexp
          rmax[m0 + r] = mxs[r];
        }
      };
      using T = std::true_type;
      using F = std::false_type;
      // Q K^T over row blocks of R rows x CV key vectors, each block's epilogue the softmax pass.
      auto qk_softmax = [&](auto rc, auto cvc, auto lone) {
        constexpr int R = decltype(rc)::value, CV = decltype(cvc)::value;
        auto e = [&](int64_t m0, const __m512* a) { softmax_blk(m0, rc, cvc, lone, a); };
        for (int64_t m0 = 0; m0 < M; m0 += R) { qk_rows_c<R, CV, LD>(Qc, m0, Kt, Np, d, e); pf.run(); }
      };
      // The last key alone in its 16-key block (M == Np - 15, e.g. 7x7 windows): score it with
      // one dot product per query instead of a mostly empty vector block; its exp is taken below
      // for 16 queries at once.
      const bool tail1 = Np >= 32 && M == Np - 15;
      if (tail1) {
        const float* kt = kr.p[M - 1];
        __m512 kv[DV];
        _Pragma("GCC unroll 32") for (int c = 0; c < DV; ++c)
          kv[c] = _mm512_maskz_loadu_ps(c == DV - 1 ? tail : (__mmask16)0xFFFF, kt + 16 * c);
        for (int64_t m = 0; m < M; ++m) {
          const float* qm = Qc + m * LD;
          __m512 acc = _mm512_mul_ps(_mm512_load_ps(qm), kv[0]);
          _Pragma("GCC unroll 32") for (int c = 1; c < DV; ++c) acc = _mm512_fmadd_ps(_mm512_load_ps(qm + 16 * c), kv[c], acc);
          tl[m] = _mm512_reduce_add_ps(acc);
        }
        switch (Np / 16) {
          case 4: qk_softmax(std::integral_constant<int, 7>{}, std::integral_constant<int, 3>{}, T{}); break;
          case 3: qk_softmax(std::integral_constant<int, 8>{}, std::integral_constant<int, 2>{}, T{}); break;
          default: qk_softmax(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{}, T{}); break;
        }
        for (int64_t m0 = 0; m0 < M; m0 += 16) {
          const __mmask16 km = lane_mask(M - m0);
          const __m512 p = _mm512_maskz_mov_ps(km, exp2v(_mm512_sub_ps(_mm512_loadu_ps(tl + m0), _mm512_loadu_ps(rmax + m0))));
          _mm512_storeu_ps(tl + m0, p);
          _mm512_mask_storeu_ps(inv + m0, km, _mm512_add_ps(_mm512_loadu_ps(inv + m0), p));
        }
        for (int64_t m = 0; m < M; ++m) Sp[m * LS + M - 1] = tl[m];
      } else {
        switch (Np / 16) {
          case 4: qk_softmax(std::integral_constant<int, 7>{}, std::integral_constant<int, 4>{}, F{}); break;
          case 3: qk_softmax(std::integral_constant<int, 7>{}, std::integral_constant<int, 3>{}, F{}); break;
          case 2: qk_softmax(std::integral_constant<int, 8>{}, std::integral_constant<int, 2>{}, F{}); break;
          default: qk_softmax(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{}, F{}); break;
        }
      }
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        const __mmask16 km = lane_mask(M - m0);
        const __m512 sm = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), km, inv + m0);
        const __m512 mxm = _mm512_maskz_loadu_ps(km, rmax + m0);
        _mm512_storeu_ps(inv + m0, _mm512_div_ps(_mm512_set1_ps(1.0f), sm));
        _mm512_storeu_ps(lsev + m0, _mm512_mul_ps(_mm512_add_ps(mxm, log2v(sm)), _mm512_set1_ps(kLn2)));
      }
      for (int64_t m = 0; m < M; ++m) lse[(b * HW + pos[m]) * nh + h] = lsev[m];
      auto epi_o = [&](int64_t m, __m512* a) {
        if (m >= M) return;
        stream_scaled_row<DV>(out + ((b * HW + pos[m]) * nh + h) * d, a, _mm512_set1_ps(inv[m]), tail);
      };
      constexpr int R = pv_rows<DV>();
      for (int64_t m0 = 0; m0 < M; m0 += R) {
        pv_rows_c<R, DV, LS>(Sp, m0, Vc, M, epi_o);
        pf.run();
      }
      pf.finish();
    }
    _mm_sfence();
  });
}

void forward(const Geometry& g, const Strided& q, const Strided& k, const Strided& v, const float* table,
             int64_t table_heads, float scale, float* out, float* lse, const Parallel& par) {
  const Plan pl = make_plan(g, table, table_heads, 16);
  if (pl.Np <= 64) {
    dispatch_dv((g.d + 15) / 16, [&](auto dvc) {
      forward_small<decltype(dvc)::value>(g, pl, q, k, v, table && table_heads != 1, scale, out, lse, par);
    });
    return;
  }
  const View5 vq(q), vk(k), vv(v);
  const float* qp = q.as<float>();
  const float* kp = k.as<float>();
  const float* vp = v.as<float>();
  const int64_t d = g.d, nh = g.nh, Np = pl.Np, HW = g.H * g.W;
  const int64_t DV = (d + 15) / 16;
  const __mmask16 tail = lane_mask(d - 16 * (DV - 1));
  const int64_t rows_cap = Np + 16;  // row blocks round M up by at most 15
  const int64_t tasks = g.B * g.nWin * nh;
  const float c2 = scale * kLog2e;
  par.for_each(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Rows qr, kr, vr;
    qr.init(rows_cap, d); kr.init(rows_cap, d); vr.init(rows_cap, d);
    std::vector<float> zero(16 * DV + 16, 0.0f), Kt(16 * DV * Np + 16, 0.0f), S(rows_cap * Np + 64, 0.0f),
        inv(rows_cap + 16, 0.0f);
    Prefetcher pf;
    pf.init(3 * rows_cap, d, std::max({vq.sd, vk.sd, vv.sd}));
    pf.far = true;
    constexpr int64_t kFar = 2;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % nh;
      const int64_t win = (task / nh) % g.nWin;
      const int64_t b = task / (nh * g.nWin);
      const int64_t cls = pl.win_cls[win];
      const int64_t M = pl.cls_M[cls];
      if (M == 0) continue;
      const int32_t* pos = g.pos.data() + win * g.N;
      const float* tile = pl.tiles.data() + (cls * pl.thn + (table && table_heads != 1 ? h : 0)) * pl.tsz;
      if (task + kFar < end) {
        pf.add_task(g, pl, task + kFar, qp, vq);
        pf.add_task(g, pl, task + kFar, kp, vk);
        pf.add_task(g, pl, task + kFar, vp, vv);
      }
      pf.start((M + 6) / 7);
      qr.set(qp, vq, g, pl, b, h, win, M, zero.data());
      kr.set(kp, vk, g, pl, b, h, win, M, zero.data());
      vr.set(vp, vv, g, pl, b, h, win, M, zero.data());
      pack_transposed(kr.p.data(), M, d, Kt.data(), Np);
      float* Sp = S.data();
      const __m512 cv = _mm512_set1_ps(c2);
      auto epi_s = [&](int64_t m, int64_t n, __m512 a) {
        _mm512_storeu_ps(Sp + m * Np + n, _mm512_fmadd_ps(a, cv, _mm512_loadu_ps(tile + m * Np + n)));
      };
      qk_all(qr.p.data(), M, Kt.data(), Np, d, epi_s);
      for (int64_t m = 0; m < M; ++m) {
        float* s = Sp + m * Np;
        __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t n = 0; n < Np; n += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + n));
        const float mxs = _mm512_reduce_max_ps(mx);
        const __m512 mxv = _mm512_set1_ps(mxs);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t n = 0; n < Np; n += 16) {
          const __m512 p = exp2v(_mm512_sub_ps(_mm512_loadu_ps(s + n), mxv));
          _mm512_storeu_ps(s + n, p);
          sum = _mm512_add_ps(sum, p);
        }
        const float sums = _mm512_reduce_add_ps(sum);
        inv[m] = 1.0f / sums;
        lse[(b * HW + pos[m]) * nh + h] = (mxs + std::log2(sums)) * kLn2;
      }
      dispatch_dv(DV, [&](auto dvc) {
        constexpr int DVc = decltype(dvc)::value;
        auto epi_o = [&](int64_t m, __m512* a) {
          if (m >= M) return;
          stream_scaled_row<DVc>(out + ((b * HW + pos[m]) * nh + h) * d, a, _mm512_set1_ps(inv[m]), tail);
        };
        constexpr int R = pv_rows<DVc>();
        for (int64_t m0 = 0; m0 < M; m0 += R) {
          pv_block<R, DVc>(Sp, Np, m0, vr.p.data(), M, tail, epi_o);
          pf.run();
        }
      });
      pf.finish();
    }
    _mm_sfence();
  });
}

void backward(const Geometry& g, const Strided& gout, const Strided& q, const Strided& k, const Strided& v,
              const Strided& out, const Strided& lse, const float* table, int64_t table_heads, float scale,
              float* dq, float* dk, float* dv, float* dtable, const Parallel& par) {
  const Plan pl = make_plan(g, table, table_heads, 16);
  const View5 vq(q), vk(k), vv(v), vo(out), vg(gout);
  const int64_t ls_b = lse.stride[0], ls_y = lse.stride[1], ls_x = lse.stride[2], ls_h = lse.stride[3];
  const float* lse_p = lse.as<float>();
  const float* qp = q.as<float>();
  const float* kp = k.as<float>();
  const float* vp = v.as<float>();
  const float* op = out.as<float>();
  const float* gp = gout.as<float>();
  const int64_t d = g.d, nh = g.nh, Np = pl.Np, HW = g.H * g.W;
  const int64_t DV = (d + 15) / 16;
  const __mmask16 tail = lane_mask(d - 16 * (DV - 1));
  const int64_t rows_cap = Np + 16;
  const int64_t tasks = g.B * g.nWin * nh;
  const int64_t tsize = (2 * g.wh - 1) * g.tw;
  const float c2 = scale * kLog2e;
  // Fixed chunks of tasks own one partial bias gradient each (deterministic reduction); within a
  // chunk dS is summed per (window class, table head) tile and scattered into the table at the end.
  const int64_t chunk = 64;
  const int64_t nchunks = (tasks + chunk - 1) / chunk;
  std::vector<float> partial(dtable ? nchunks * table_heads * tsize : 0, 0.0f);

  par.for_each(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
    Rows qr, kr, vr, orow, gr;
    qr.init(rows_cap, d); kr.init(rows_cap, d); vr.init(rows_cap, d); orow.init(rows_cap, d); gr.init(rows_cap, d);
    std::vector<float> zero(16 * DV + 16, 0.0f), Kt(16 * DV * Np + 16, 0.0f), Vt(16 * DV * Np + 16, 0.0f),
        P((rows_cap + 1) * Np + 64, 0.0f), dS((rows_cap + 1) * Np + 64, 0.0f), Dm(rows_cap, 0.0f),
        L2(rows_cap, 0.0f);
    std::vector<float> acc_tiles(dtable ? pl.ncls * pl.thn * pl.tsz : 0);
    std::vector<uint8_t> touched(dtable ? pl.ncls * pl.thn : 0);
    for (int64_t c = cbegin; c < cend; ++c) {
      if (dtable) {
        std::fill(acc_tiles.begin(), acc_tiles.end(), 0.0f);
        std::fill(touched.begin(), touched.end(), 0);
      }
      for (int64_t task = c * chunk; task < std::min(tasks, (c + 1) * chunk); ++task) {
        const int64_t h = task % nh;
        const int64_t win = (task / nh) % g.nWin;
        const int64_t b = task / (nh * g.nWin);
        const int64_t cls = pl.win_cls[win];
        const int64_t M = pl.cls_M[cls];
        if (M == 0) continue;
        const int32_t* pos = g.pos.data() + win * g.N;
        const int64_t th = table && table_heads != 1 ? h : 0;
        const float* tile = pl.tiles.data() + (cls * pl.thn + th) * pl.tsz;
        float* dbt = dtable ? acc_tiles.data() + (cls * pl.thn + th) * pl.tsz : nullptr;
        if (dtable) touched[cls * pl.thn + th] = 1;
        if (task + 1 < std::min(tasks, (c + 1) * chunk)) {
          prefetch_task(g, pl, task + 1, qp, vq);
          prefetch_task(g, pl, task + 1, kp, vk);
          prefetch_task(g, pl, task + 1, vp, vv);
          prefetch_task(g, pl, task + 1, op, vo);
          prefetch_task(g, pl, task + 1, gp, vg);
        }
        qr.set(qp, vq, g, pl, b, h, win, M, zero.data());
        kr.set(kp, vk, g, pl, b, h, win, M, zero.data());
        vr.set(vp, vv, g, pl, b, h, win, M, zero.data());
        orow.set(op, vo, g, pl, b, h, win, M, zero.data());
        gr.set(gp, vg, g, pl, b, h, win, M, zero.data());
        for (int64_t m = 0; m < M; ++m) {
          __m512 s = _mm512_setzero_ps();
          for (int64_t e0 = 0; e0 < d; e0 += 16) {
            const __mmask16 km = lane_mask(d - e0);
            s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, gr.p[m] + e0), _mm512_maskz_loadu_ps(km, orow.p[m] + e0), s);
          }
          Dm[m] = _mm512_reduce_add_ps(s);
          L2[m] = lse_p[b * ls_b + pl.py[win * g.N + m] * ls_y + pl.px[win * g.N + m] * ls_x + h * ls_h] * kLog2e;
        }
        pack_transposed(kr.p.data(), M, d, Kt.data(), Np);
        pack_transposed(vr.p.data(), M, d, Vt.data(), Np);
        float* Pp = P.data();
        float* dSp = dS.data();
        const __m512 cv = _mm512_set1_ps(c2);
        auto epi_p = [&](int64_t m, int64_t n, __m512 a) {
          if (m >= M) return;
          const __m512 x = _mm512_fmadd_ps(a, cv, _mm512_loadu_ps(tile + m * Np + n));
          _mm512_storeu_ps(Pp + m * Np + n, exp2v(_mm512_sub_ps(x, _mm512_set1_ps(L2[m]))));
        };
        qk_all(qr.p.data(), M, Kt.data(), Np, d, epi_p);
        auto epi_ds = [&](int64_t m, int64_t n, __m512 a) {
          if (m >= M) return;
          const __m512 ds = _mm512_mul_ps(_mm512_loadu_ps(Pp + m * Np + n), _mm512_sub_ps(a, _mm512_set1_ps(Dm[m])));
          _mm512_storeu_ps(dSp + m * Np + n, ds);
          if (dbt) _mm512_storeu_ps(dbt + m * Np + n, _mm512_add_ps(_mm512_loadu_ps(dbt + m * Np + n), ds));
        };
        qk_all(gr.p.data(), M, Vt.data(), Np, d, epi_ds);
        dispatch_dv(DV, [&](auto dvc) {
          constexpr int DVc = decltype(dvc)::value;
          const __m512 sc = _mm512_set1_ps(scale);
          auto epi_dq = [&](int64_t m, __m512* a) {
            if (m >= M) return;
            stream_scaled_row<DVc>(dq + ((b * HW + pos[m]) * nh + h) * d, a, sc, tail);
          };
          pv_all<DVc>(dSp, Np, M, kr.p.data(), M, tail, epi_dq);
          auto epi_kv = [&](int64_t n, __m512* a1, __m512* a2) {
            if (n >= M) return;
            const int64_t o = ((b * HW + pos[n]) * nh + h) * d;
            stream_scaled_row<DVc>(dv + o, a1, _mm512_set1_ps(1.0f), tail);
            stream_scaled_row<DVc>(dk + o, a2, sc, tail);
          };
          tn_all<DVc>(Pp, dSp, Np, gr.p.data(), qr.p.data(), M, tail, epi_kv);
        });
      }
      if (dtable) scatter_tiles(g, pl, acc_tiles.data(), touched.data(), partial.data() + c * table_heads * tsize);
    }
    _mm_sfence();
  });
  if (dtable != nullptr) reduce_partials(partial, nchunks, table_heads * tsize, dtable);
}

}  // namespace fast
