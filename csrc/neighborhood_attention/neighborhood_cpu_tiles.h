// Neighbourhood attention CPU kernels: the register-blocked tiles (logits of a slot block,
// P.V and dS.K mixes, key-centric sums, the float32 multi-row tiles, P.V tiles and the AVX-512
// band logits of long 1-D windows).
// Part of neighborhood_attention_cpu.cpp, the one translation unit that includes it (compiled once
// per instruction-set level; everything here has internal linkage).
#pragma once

#include "neighborhood_cpu_plan.h"

namespace alterops {
namespace neighborhood {
namespace {

// S[j][0:V] = sum_c A[c*Ws + 0:V] * key(j, c) for NJ neighbours.
template <typename T, int NJ>
static inline void dot_block(const T* A, int64_t Ws, int64_t D, const T* base, int64_t cstride, const int64_t* joff,
                             T* S, int64_t sstride) {
  Vec<T> acc[NJ];
  const T* kp[NJ];
  NA_UNROLL
  for (int jj = 0; jj < NJ; ++jj) {
    acc[jj] = splat<T>(T(0));
    kp[jj] = base + joff[jj];
  }
  for (int64_t c = 0; c < D; ++c) {
    Vec<T> a = loadu(A + c * Ws);
    NA_UNROLL
    for (int jj = 0; jj < NJ; ++jj) acc[jj] += a * loadu(kp[jj] + c * cstride);
  }
  NA_UNROLL
  for (int jj = 0; jj < NJ; ++jj) storeu(S + jj * sstride, acc[jj]);
}

template <typename T>
static void dot_row(const T* A, int64_t Ws, int64_t D, const KeyView<T>& kv, int64_t kw, T* S,
                    int64_t sstride = VecOf<T>::N) {
  for (int64_t j0 = 0, nj; j0 < kw; j0 += nj) {
    nj = even_chunk(kw - j0, 8);
    const int64_t* jo = kv.joff + j0;
    T* s = S + j0 * sstride;
    switch (nj) {
      case 8: dot_block<T, 8>(A, Ws, D, kv.base, kv.cstride, jo, s, sstride); break;
      case 7: dot_block<T, 7>(A, Ws, D, kv.base, kv.cstride, jo, s, sstride); break;
      case 6: dot_block<T, 6>(A, Ws, D, kv.base, kv.cstride, jo, s, sstride); break;
      case 5: dot_block<T, 5>(A, Ws, D, kv.base, kv.cstride, jo, s, sstride); break;
      case 4: dot_block<T, 4>(A, Ws, D, kv.base, kv.cstride, jo, s, sstride); break;
      case 3: dot_block<T, 3>(A, Ws, D, kv.base, kv.cstride, jo, s, sstride); break;
      case 2: dot_block<T, 2>(A, Ws, D, kv.base, kv.cstride, jo, s, sstride); break;
      default: dot_block<T, 1>(A, Ws, D, kv.base, kv.cstride, jo, s, sstride); break;
    }
  }
}

// Out[c][0:V] = sum_{r, j} P[row_i[r]][j][0:V] * view_r(j, c) for NC channels from c0.
template <typename T, int NC>
static inline void mix_block(const T* P, int64_t pstride, const KeyView<T>* views, const int64_t* row_i,
                             int64_t nrows, int64_t kw, int64_t c0, T* Out, int64_t out_stride) {
  Vec<T> acc[NC];
  NA_UNROLL
  for (int cc = 0; cc < NC; ++cc) acc[cc] = splat<T>(T(0));
  for (int64_t r = 0; r < nrows; ++r) {
    const KeyView<T>& kv = views[r];
    const T* Pr = P + row_i[r] * kw * pstride;
    const T* b0 = kv.base + c0 * kv.cstride;
    for (int64_t j = 0; j < kw; ++j) {
      Vec<T> p = loadu(Pr + j * pstride);
      const T* vc = b0 + kv.joff[j];
      NA_UNROLL
      for (int cc = 0; cc < NC; ++cc) acc[cc] += p * loadu(vc + cc * kv.cstride);
    }
  }
  NA_UNROLL
  for (int cc = 0; cc < NC; ++cc) storeu(Out + (c0 + cc) * out_stride, acc[cc]);
}

// f(std::integral_constant<int, NC>{}) for a channel-block width nc in 1..8.
template <class Fn>
static inline void dispatch_nc(int64_t nc, Fn&& f) {
  switch (nc) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

template <typename T>
static void mix_cblock(const T* P, int64_t pstride, const KeyView<T>* views, const int64_t* row_i, int64_t nrows,
                       int64_t kw, int64_t c0, int64_t nc, T* Out, int64_t out_stride) {
  dispatch_nc(nc, [&](auto ncv) {
    mix_block<T, decltype(ncv)::value>(P, pstride, views, row_i, nrows, kw, c0, Out, out_stride);
  });
}

template <typename T>
static void mix_row(const T* P, const KeyView<T>* views, const int64_t* row_i, int64_t nrows, int64_t kw, int64_t D,
                    T* Out, int64_t out_stride) {
  for (int64_t c0 = 0; c0 < D; c0 += 8)
    mix_cblock<T>(P, VecOf<T>::N, views, row_i, nrows, kw, c0, std::min<int64_t>(8, D - c0), Out, out_stride);
}

// dst[c*dstride + 0:V] += sum_j Wt[j*ws + 0:V] * A[c*ws - off[j] + 0:V], NC channels from c0. (The
// weights are stored at their key columns, so their loads are aligned.)
template <typename T, int NC>
static inline void key_sum_block(const T* Wt, const T* A, int64_t ws, const int64_t* off, int64_t kw, int64_t c0,
                                 T* dst, int64_t dstride) {
  Vec<T> acc[NC];
  NA_UNROLL
  for (int cc = 0; cc < NC; ++cc) acc[cc] = splat<T>(T(0));
  for (int64_t j = 0; j < kw; ++j) {
    Vec<T> w = loadu(Wt + j * ws);
    const T* a = A + c0 * ws - off[j];
    NA_UNROLL
    for (int cc = 0; cc < NC; ++cc) acc[cc] += w * loadu(a + cc * ws);
  }
  NA_UNROLL
  for (int cc = 0; cc < NC; ++cc) {
    T* d = dst + (c0 + cc) * dstride;
    storeu(d, loadu(d) + acc[cc]);
  }
}

template <typename T>
static void key_sum_row(const T* Wt, const T* A, int64_t ws, const int64_t* off, int64_t kw, int64_t D, T* dst,
                        int64_t dstride) {
  for (int64_t c0 = 0; c0 < D; c0 += 8) {
    dispatch_nc(std::min<int64_t>(8, D - c0), [&](auto ncv) {
      key_sum_block<T, decltype(ncv)::value>(Wt, A, ws, off, kw, c0, dst, dstride);
    });
  }
}

// key_sum_row for NI key rows whose weights Wt[a] multiply the same A (the key rows of one query
// row): each A vector is loaded once for the NI rows. dst[a][c*dstride + 0:V] +=
// sum_j Wt[a][j*ws + 0:V] * A[c*ws - off[j] + 0:V], NC channels from c0.
template <typename T, int NI, int NC>
NA_TILE void key_sum_multi_block(const T* const* Wt, const T* A, int64_t ws, const int64_t* off, int64_t kw,
                                int64_t c0, T* const* dst, int64_t dstride) {
  Vec<T> acc[NI][NC];
  NA_UNROLL
  for (int a = 0; a < NI; ++a)
    NA_UNROLL
    for (int cc = 0; cc < NC; ++cc) acc[a][cc] = splat<T>(T(0));
  for (int64_t j = 0; j < kw; ++j) {
    const int64_t o = j * ws;
    Vec<T> w[NI];
    NA_UNROLL
    for (int a = 0; a < NI; ++a) {
      w[a] = loadu(Wt[a] + o);
      if (NC > 1) pin_register(w[a]);
    }
    const T* ac = A + c0 * ws - off[j];
    NA_UNROLL
    for (int cc = 0; cc < NC; ++cc) {
      const Vec<T> av = loadu(ac + cc * ws);
      NA_UNROLL
      for (int a = 0; a < NI; ++a) acc[a][cc] += w[a] * av;
    }
  }
  NA_UNROLL
  for (int a = 0; a < NI; ++a)
    NA_UNROLL
    for (int cc = 0; cc < NC; ++cc) {
      T* d = dst[a] + (c0 + cc) * dstride;
      storeu(d, loadu(d) + acc[a][cc]);
    }
}

// Rows per key_sum_multi_block and channels per block: NI * NC accumulators, NI weights and one
// A vector within the 32 zmm registers (AVX-512) or the 16 ymm registers (AVX2).
#if NA_AVX2
constexpr int kKeySumRows = 3, kKeySumChannels = 3;
#else
constexpr int kKeySumRows = 7, kKeySumChannels = 3;
#endif

template <typename T, int NI>
static void key_sum_multi_n(const T* const* Wt, const T* A, int64_t ws, const int64_t* off, int64_t kw, int64_t D,
                            T* const* dst, int64_t dstride) {
  constexpr int NC = kKeySumChannels;
  int64_t c0 = 0;
  for (; c0 + NC <= D; c0 += NC) key_sum_multi_block<T, NI, NC>(Wt, A, ws, off, kw, c0, dst, dstride);
  // the last D % NC channels in one block (two single channels would each wait on their loads)
  if (D - c0 == 2) key_sum_multi_block<T, NI, 2>(Wt, A, ws, off, kw, c0, dst, dstride);
  if (D - c0 == 1) key_sum_multi_block<T, NI, 1>(Wt, A, ws, off, kw, c0, dst, dstride);
}

// key_sum_row for nr key rows sharing A, up to kKeySumRows at a time.
template <typename T>
static void key_sum_rows(const T* const* Wt, const T* A, int64_t ws, const int64_t* off, int64_t kw, int64_t D,
                         T* const* dst, int64_t dstride, int64_t nr) {
  for (int64_t r0 = 0; r0 < nr; r0 += kKeySumRows) {
    const int64_t n = std::min<int64_t>(kKeySumRows, nr - r0);
    const T* const* w = Wt + r0;
    T* const* d = dst + r0;
    switch (n) {
#if !NA_AVX2
      case 7: key_sum_multi_n<T, 7>(w, A, ws, off, kw, D, d, dstride); break;
      case 6: key_sum_multi_n<T, 6>(w, A, ws, off, kw, D, d, dstride); break;
      case 5: key_sum_multi_n<T, 5>(w, A, ws, off, kw, D, d, dstride); break;
      case 4: key_sum_multi_n<T, 4>(w, A, ws, off, kw, D, d, dstride); break;
#endif
      case 3: key_sum_multi_n<T, 3>(w, A, ws, off, kw, D, d, dstride); break;
      case 2: key_sum_multi_n<T, 2>(w, A, ws, off, kw, D, d, dstride); break;
      default: key_sum_multi_n<T, 1>(w, A, ws, off, kw, D, d, dstride); break;
    }
  }
}

// One slot block (V queries of row y) of S[nkr*kw][V] holding Q.K of its valid key rows: adds
// the bias to those and fills the logits of the other rows (-inf, or the bias alone for "zero").
template <typename T>
static void block_bias(const Plan<T>& pl, int64_t ht, int64_t y, int64_t ci, T* S) {
  constexpr int N = VecOf<T>::N;
  const int64_t s0 = ci * N;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < pl.nkr; ++i) {
    const T* brow = pl.bias_row(ht, y, i);
    T* Si = S + i * pl.kw * N;
    if (!pl.rowvalid[y * pl.nkr + i]) {
      for (int64_t j = 0; j < pl.kw; ++j) {
        Vec<T> b = pl.dead_rows_masked() ? splat<T>(ninf) : loadu(brow + j * pl.Ws + s0);
        storeu(Si + j * N, b);
      }
      continue;
    }
    // (all-zero bias columns: nothing to add)
    if (pl.any_bias)
      for (int64_t j = 0; j < pl.kw; ++j) storeu(Si + j * N, loadu(Si + j * N) + loadu(brow + j * pl.Ws + s0));
  }
}

// Logits of one slot block (V queries of row y) against all neighbours -> S[nkr*kw][V].
template <typename T>
static void block_logits(const Plan<T>& pl, const T* Qp, int64_t astride, KeyPack<T>& kp, int64_t ht, int64_t y,
                         int64_t ci, T* S) {
  constexpr int N = VecOf<T>::N;
  for (int64_t i = 0; i < pl.nkr; ++i)
    if (pl.rowvalid[y * pl.nkr + i])
      dot_row<T>(Qp + ci * N, astride, pl.D, key_view(pl, kp, pl.rowpos[y * pl.nkr + i], ci), pl.kw,
                 S + i * pl.kw * N);
  block_bias(pl, ht, y, ci, S);
}

// S[a][j][0:V] = sum_c A[a][c*Ws + 0:V] * key(j, c) for NR query rows a and NJ neighbours: each
// key vector is loaded once for the NR rows.
template <int NR, int NJ>
static inline void dot_block_multi(const float* const* A, int64_t Ws, int64_t D, const float* base, int64_t cstride,
                                   const int64_t* joff, float* const* S, int64_t sstride) {
  Vec<float> acc[NR][NJ];
  const float* kp[NJ];
  NA_UNROLL
  for (int jj = 0; jj < NJ; ++jj) {
    kp[jj] = base + joff[jj];
    NA_UNROLL
    for (int a = 0; a < NR; ++a) acc[a][jj] = splat<float>(0.0f);
  }
  for (int64_t c = 0; c < D; ++c) {
    Vec<float> q[NR];
    NA_UNROLL
    for (int a = 0; a < NR; ++a) q[a] = loadu(A[a] + c * Ws);
    NA_UNROLL
    for (int jj = 0; jj < NJ; ++jj) {
      Vec<float> kk = loadu(kp[jj] + c * cstride);
      if (NR > 1) pin_register(kk);
      NA_UNROLL
      for (int a = 0; a < NR; ++a) acc[a][jj] += q[a] * kk;
    }
  }
  NA_UNROLL
  for (int a = 0; a < NR; ++a)
    NA_UNROLL
    for (int jj = 0; jj < NJ; ++jj) storeu(S[a] + jj * sstride, acc[a][jj]);
}

#if defined(__AVX512F__)
// dot_block_multi for NJ neighbours at consecutive key columns (dilation 1) whose first key
// vector starts R floats past a 64-byte boundary at `a` (channel stride a multiple of 16): per
// channel, the two or three aligned vectors that hold the NJ shifted key vectors are loaded and
// the shifted ones formed with valignd. Unaligned loads at the shifts had crossed a cache line
// each (on a Xeon with AVX-512 they held dot_block_multi<3, 7> to about 60% of the FMA rate that
// the aligned loads and shifts reach). Every line loaded holds a key of the window, so no load
// touches a page that the unaligned ones would not.
template <int S>
NA_TILE Vec<float> shifted_keys(__m512i v0, __m512i v1, __m512i v2) {
  if constexpr (S == 0) return (Vec<float>)v0;
  else if constexpr (S < 16) return (Vec<float>)_mm512_alignr_epi32(v1, v0, S);
  else if constexpr (S == 16) return (Vec<float>)v1;
  else return (Vec<float>)_mm512_alignr_epi32(v2, v1, S - 16);
}

template <int NR, int NJ, int R, int J>
NA_TILE void shifted_fma(Vec<float> (&acc)[NR][NJ], const Vec<float> (&q)[NR], __m512i v0, __m512i v1, __m512i v2) {
  const Vec<float> kk = shifted_keys<R + J>(v0, v1, v2);
  NA_UNROLL
  for (int a = 0; a < NR; ++a) acc[a][J] += q[a] * kk;
}

template <int NR, int NJ, int R, int... J>
NA_TILE void shifted_fmas(std::integer_sequence<int, J...>, Vec<float> (&acc)[NR][NJ], const Vec<float> (&q)[NR],
                          __m512i v0, __m512i v1, __m512i v2) {
  (shifted_fma<NR, NJ, R, J>(acc, q, v0, v1, v2), ...);
}

// The frame of the AVX-512 logits blocks below: NR x NJ accumulators, zeroed; per channel c the
// NR query vectors (A[r] + c * Ws) and fmas(c, q, acc), which adds channel c's terms; the sums
// stored at S[r] + j * sstride.
template <int NR, int NJ, typename Fmas>
NA_TILE void dot_block_frame(const float* const* A, int64_t Ws, int64_t D, float* const* S, int64_t sstride,
                             Fmas&& fmas) {
  Vec<float> acc[NR][NJ];
  NA_UNROLL
  for (int jj = 0; jj < NJ; ++jj)
    NA_UNROLL
    for (int r = 0; r < NR; ++r) acc[r][jj] = splat<float>(0.0f);
  for (int64_t c = 0; c < D; ++c) {
    Vec<float> q[NR];
    NA_UNROLL
    for (int r = 0; r < NR; ++r) q[r] = loadu(A[r] + c * Ws);
    fmas(c, q, acc);
  }
  NA_UNROLL
  for (int r = 0; r < NR; ++r)
    NA_UNROLL
    for (int jj = 0; jj < NJ; ++jj) storeu(S[r] + jj * sstride, acc[r][jj]);
}

template <int NR, int NJ, int R>
static void dot_block_shifted(const float* const* A, int64_t Ws, int64_t D, const float* a, int64_t cstride,
                              float* const* S, int64_t sstride) {
  constexpr bool three = R + NJ - 1 > 16;  // (the last shift reaches into a third vector)
  dot_block_frame<NR, NJ>(A, Ws, D, S, sstride, [&](int64_t c, const Vec<float>(&q)[NR], Vec<float>(&acc)[NR][NJ])
                                                    __attribute__((always_inline)) {
    const float* ac = a + c * cstride;
    const __m512i v0 = _mm512_load_si512(ac), v1 = _mm512_load_si512(ac + 16);
    const __m512i v2 = three ? _mm512_load_si512(ac + 32) : v1;
    shifted_fmas<NR, NJ, R>(std::make_integer_sequence<int, NJ>{}, acc, q, v0, v1, v2);
  });
}

// dot_block_shifted for the first key's offset R = 0..15 from its 64-byte boundary
template <int NR, int NJ>
static void dot_block_shifted_any(int R, const float* const* A, int64_t Ws, int64_t D, const float* a,
                                  int64_t cstride, float* const* S, int64_t sstride) {
  switch (R) {
#define NA_SH(RV) \
  case RV: dot_block_shifted<NR, NJ, RV>(A, Ws, D, a, cstride, S, sstride); break;
    NA_SH(0) NA_SH(1) NA_SH(2) NA_SH(3) NA_SH(4) NA_SH(5) NA_SH(6) NA_SH(7)
    NA_SH(8) NA_SH(9) NA_SH(10) NA_SH(11) NA_SH(12) NA_SH(13) NA_SH(14) default: NA_SH(15)
#undef NA_SH
  }
}
#endif

// dot_block_multi<nr, nj> through dot_block_shifted where it applies: AVX-512, packed rows (a
// channel stride of whole cache lines) and nj consecutive key columns, nr rows by nj neighbours
// of those instantiated (1-3 rows by 4-8 neighbours, 4 by 4-6, 5 by 4: the chunks that
// dot_row_multi_n, dot_rows_shared and dot_blocks_shared form); false: not taken. (Aligned loads
// shifted, where unaligned ones would split cache lines: 2 threads on a Xeon with AVX-512,
// same-process A/B: 2-D forward, B = 4, 56 x 56, 4 heads, d = 32, k = 7, 3.45 -> 3.16 ms; 3-D,
// 8 x 32 x 32, k = (3, 7, 7), 6.14 -> 5.48 ms; with the packed rows 64-byte aligned.)
static inline bool dot_block_shifted_n(int nr, int64_t nj, const float* const* A, int64_t Ws, int64_t D,
                                       const float* base, int64_t cstride, const int64_t* joff, float* const* S,
                                       int64_t sstride) {
#if defined(__AVX512F__)
  if (nj < 4 || nj > 8 || cstride % 16 != 0 || (nr == 4 && nj > 6) || (nr == 5 && nj > 4) || nr > 5) return false;
  for (int64_t j = 1; j < nj; ++j)
    if (joff[j] != joff[0] + j) return false;
  const float* first = base + joff[0];
  const int R = floats_past_line(first);
  const float* a = first - R;
#define NA_SHJ(NRV)                                                                       \
  switch (nj) {                                                                           \
    case 8: dot_block_shifted_any<NRV, 8>(R, A, Ws, D, a, cstride, S, sstride); break; \
    case 7: dot_block_shifted_any<NRV, 7>(R, A, Ws, D, a, cstride, S, sstride); break; \
    case 6: dot_block_shifted_any<NRV, 6>(R, A, Ws, D, a, cstride, S, sstride); break; \
    case 5: dot_block_shifted_any<NRV, 5>(R, A, Ws, D, a, cstride, S, sstride); break; \
    default: dot_block_shifted_any<NRV, 4>(R, A, Ws, D, a, cstride, S, sstride); break; \
  }
  switch (nr) {
    case 5: dot_block_shifted_any<5, 4>(R, A, Ws, D, a, cstride, S, sstride); break;
    case 4:
      switch (nj) {
        case 6: dot_block_shifted_any<4, 6>(R, A, Ws, D, a, cstride, S, sstride); break;
        case 5: dot_block_shifted_any<4, 5>(R, A, Ws, D, a, cstride, S, sstride); break;
        default: dot_block_shifted_any<4, 4>(R, A, Ws, D, a, cstride, S, sstride); break;
      }
      break;
    case 3: NA_SHJ(3) break;
    case 2: NA_SHJ(2) break;
    default: NA_SHJ(1) break;
  }
#undef NA_SHJ
  return true;
#else
  (void)nr, (void)nj, (void)A, (void)Ws, (void)D, (void)base, (void)cstride, (void)joff, (void)S, (void)sstride;
  return false;
#endif
}

#if defined(__AVX512F__)
// A border block's logits read from the packed key row itself (AVX-512), where every lane's key
// columns lie within 32 (TWO: 64) columns from a 64-byte boundary `a` (the clamped windows of rows
// of up to 32 or 64 columns, such as the 3-D ops' 32 x 32 planes and the 2-D ops' 56 x 56 maps):
// per channel, the two (four) aligned vectors of those columns are loaded once and neighbour j's
// key vector is formed with one vpermt2ps (TWO: one per pair of vectors, lanes from the first
// pair in mask[j], from the second in mask2[j], the two ORed); lane l from column
// a + idx[j][l] (modulo 32 for TWO), lanes outside the masks (the non-keys) zero. The gathered
// copies that these blocks read otherwise hold kw key vectors per channel and key row (all lanes'
// columns of every neighbour), transposed from the tokens once per key row: with 27 key rows per
// row group of the 3-D forward they do not stay in L1, and their logits waited on L2.
template <int NR, int NJ, bool TWO>
static void dot_block_perm(const float* const* A, int64_t Ws, int64_t D, const float* a, int64_t cstride,
                           const int32_t* idx, const uint16_t* mask, const uint16_t* mask2, float* const* S,
                           int64_t sstride) {
  dot_block_frame<NR, NJ>(A, Ws, D, S, sstride, [&](int64_t c, const Vec<float>(&q)[NR], Vec<float>(&acc)[NR][NJ])
                                                    __attribute__((always_inline)) {
    const float* ac = a + c * cstride;
    const __m512 v0 = _mm512_load_ps(ac), v1 = _mm512_load_ps(ac + 16);
    __m512 v2 = v0, v3 = v1;
    if constexpr (TWO) v2 = _mm512_load_ps(ac + 32), v3 = _mm512_load_ps(ac + 48);
    NA_UNROLL
    for (int jj = 0; jj < NJ; ++jj) {
      const __m512i ix = _mm512_loadu_si512(idx + jj * 16);
      __m512 k = _mm512_maskz_permutex2var_ps((__mmask16)mask[jj], v0, ix, v1);
      if constexpr (TWO) k = _mm512_or_ps(k, _mm512_maskz_permutex2var_ps((__mmask16)mask2[jj], v2, ix, v3));
      const Vec<float> kk = (Vec<float>)k;
      NA_UNROLL
      for (int r = 0; r < NR; ++r) acc[r][jj] += q[r] * kk;
    }
  });
}

// dot_row_multi for a border block through dot_block_perm: nr (1..3) query rows by kw
// neighbours, idx/mask/mask2 per neighbour (16 lanes, one mask each; mask2 null: one pair of
// vectors), in chunks of up to 8 neighbours (7 with two pairs: 3 x 7 accumulators, 3 query
// vectors and 4 key vectors leave two registers of 32).
static void dot_row_perm(int nr, const float* const* A, int64_t Ws, int64_t D, const float* a, int64_t cstride,
                         int64_t kw, const int32_t* idx, const uint16_t* mask, const uint16_t* mask2,
                         float* const* S, int64_t sstride) {
  for (int64_t j0 = 0, nj; j0 < kw; j0 += nj) {
    nj = even_chunk(kw - j0, mask2 ? 7 : 8);
    float* s[3];
    for (int r = 0; r < nr; ++r) s[r] = S[r] + j0 * sstride;
    const int32_t* ij = idx + j0 * 16;
    const uint16_t *mj = mask + j0, *m2j = mask2 ? mask2 + j0 : nullptr;
#define NA_DP2(NRV, NJV, TW) dot_block_perm<NRV, NJV, TW>(A, Ws, D, a, cstride, ij, mj, m2j, s, sstride)
#define NA_DP(NRV, NJV)      \
  if (m2j)                   \
    NA_DP2(NRV, NJV, true);  \
  else                       \
    NA_DP2(NRV, NJV, false);
#define NA_DP_J(NRV)                \
  switch (nj) {                     \
    case 8: NA_DP2(NRV, 8, false); break; \
    case 7: NA_DP(NRV, 7); break;   \
    case 6: NA_DP(NRV, 6); break;   \
    case 5: NA_DP(NRV, 5); break;   \
    case 4: NA_DP(NRV, 4); break;   \
    case 3: NA_DP(NRV, 3); break;   \
    case 2: NA_DP(NRV, 2); break;   \
    default: NA_DP(NRV, 1); break;  \
  }
    switch (nr) {
      case 3: NA_DP_J(3) break;
      case 2: NA_DP_J(2) break;
      default: NA_DP_J(1) break;
    }
#undef NA_DP_J
#undef NA_DP
#undef NA_DP2
  }
}
#endif

template <int NR>
static void dot_row_multi_n(const float* const* A, int64_t Ws, int64_t D, const KeyView<float>& kv, int64_t kw,
                            float* const* S, int64_t sstride) {
#if NA_AVX2
  // NR * JB accumulators + NR query vectors + 1 key vector within 16 ymm registers
  constexpr int64_t JB = NR == 1 ? 8 : 4;
#else
  constexpr int64_t JB = 8;
#endif
  for (int64_t j0 = 0, nj; j0 < kw; j0 += nj) {
    nj = even_chunk(kw - j0, JB);
    const int64_t* jo = kv.joff + j0;
    float* s[NR];
    for (int a = 0; a < NR; ++a) s[a] = S[a] + j0 * sstride;
    if (dot_block_shifted_n(NR, nj, A, Ws, D, kv.base, kv.cstride, jo, s, sstride)) continue;
#define NA_DM(NJV) dot_block_multi<NR, NJV>(A, Ws, D, kv.base, kv.cstride, jo, s, sstride)
    switch (nj) {
      case 8: NA_DM(8); break;
      case 7: NA_DM(7); break;
      case 6: NA_DM(6); break;
      case 5: NA_DM(5); break;
      case 4: NA_DM(4); break;
      case 3: NA_DM(3); break;
      case 2: NA_DM(2); break;
      default: NA_DM(1); break;
    }
#undef NA_DM
  }
}

// dot_block_multi<nr, nj> for nr in 1..kSharedRows and nj in 1..8.
#if NA_AVX2
constexpr int kSharedRows = 3;     // nr * nj <= kSharedAcc accumulators, nr query vectors and
constexpr int64_t kSharedAcc = 12; // one key vector within 16 ymm registers
#else
constexpr int kSharedRows = 5;     // ... within 32 zmm registers
constexpr int64_t kSharedAcc = 24;
#endif
static void dot_block_multi_n(int nr, int64_t nj, const float* const* A, int64_t Ws, int64_t D, const float* base,
                              int64_t cstride, const int64_t* joff, float* const* S, int64_t sstride) {
  if (dot_block_shifted_n(nr, nj, A, Ws, D, base, cstride, joff, S, sstride)) return;
#define NA_DM(NRV, NJV) dot_block_multi<NRV, NJV>(A, Ws, D, base, cstride, joff, S, sstride)
#define NA_DM_J(NRV)        \
  switch (nj) {             \
    case 8: NA_DM(NRV, 8); break; \
    case 7: NA_DM(NRV, 7); break; \
    case 6: NA_DM(NRV, 6); break; \
    case 5: NA_DM(NRV, 5); break; \
    case 4: NA_DM(NRV, 4); break; \
    case 3: NA_DM(NRV, 3); break; \
    case 2: NA_DM(NRV, 2); break; \
    default: NA_DM(NRV, 1); break; \
  }
  switch (nr) {
#if !NA_AVX2
    case 5: NA_DM_J(5); break;
    case 4: NA_DM_J(4); break;
#endif
    case 3: NA_DM_J(3); break;
    case 2: NA_DM_J(2); break;
    default: NA_DM_J(1); break;
  }
#undef NA_DM_J
#undef NA_DM
}

// Logits of nb adjacent interior slot blocks of one query row when the window is wider than a
// block (dilation 1, kw > V). Neighbour j of block b reads the key vector at column shift
// off[0] + b V + j, the vector that neighbour j + V of block b - 1 reads too. So the blocks run
// as one wavefront over the shift u = b V + j in [0, kw + (nb - 1) V): each key vector is loaded
// once for all the blocks whose window holds it (about kw / V of them), where one block at a
// time would load one per FMA.
// A: block 0's queries (block b at A + b V, channel stride Ws); kbase: the packed key row at
// block 0's first column plus off[0]; S: block 0's logits (block b at S + b V, neighbour stride
// sstride); shift: scratch of kw + (nb - 1) V entries.
static void dot_blocks_shared(int64_t nb, const float* A, int64_t Ws, int64_t D, const float* kbase,
                              int64_t cstride, int64_t kw, float* S, int64_t sstride, int64_t* shift) {
  constexpr int64_t N = VecOf<float>::N;
  const int64_t uend = kw + (nb - 1) * N;
  for (int64_t u = 0; u < uend; ++u) shift[u] = u;
  int64_t u0 = 0;
  while (u0 < uend) {
    // blocks b with 0 <= u - b V < kw: [blo, bhi], the same up to the next boundary u1
    const int64_t bhi = std::min<int64_t>(nb - 1, u0 / N);
    const int64_t blo = u0 >= kw ? (u0 - kw) / N + 1 : 0;
    int64_t u1 = uend;
    if (bhi + 1 < nb) u1 = std::min(u1, (bhi + 1) * N);
    u1 = std::min(u1, kw + blo * N);
    for (int64_t g0 = blo; g0 <= bhi; g0 += kSharedRows) {  // groups of at most kSharedRows blocks
      const int na = (int)std::min<int64_t>(kSharedRows, bhi - g0 + 1);
      const int64_t most = std::min<int64_t>(8, kSharedAcc / na);
      const float* Ab[kSharedRows];
      float* Sb[kSharedRows];
      for (int64_t u = u0, nj; u < u1; u += nj) {
        nj = even_chunk(u1 - u, most);
        for (int a = 0; a < na; ++a) {
          const int64_t b = g0 + a;
          Ab[a] = A + b * N;
          Sb[a] = S + b * N + (u - b * N) * sstride;
        }
        dot_block_multi_n(na, nj, Ab, Ws, D, kbase, cstride, shift + u, Sb, sstride);
      }
    }
    u0 = u1;
  }
}

static void dot_row_multi(int nr, const float* const* A, int64_t Ws, int64_t D, const KeyView<float>& kv, int64_t kw,
                          float* const* S, int64_t sstride) {
  switch (nr) {
    case 3: dot_row_multi_n<3>(A, Ws, D, kv, kw, S, sstride); break;
    case 2: dot_row_multi_n<2>(A, Ws, D, kv, kw, S, sstride); break;
    default: dot_row_multi_n<1>(A, Ws, D, kv, kw, S, sstride); break;
  }
}

// dot_row for na <= kSharedRows query rows that read the same key row: S[a][j * sstride + 0:V] =
// sum_c A[a][c * Ws + 0:V] * kv(j, c), each key vector loaded once for the na rows. (The same
// sums in the same order as dot_row.)
[[maybe_unused]] static void dot_rows_shared(int na, const float* const* A, int64_t Ws, int64_t D,
                                             const KeyView<float>& kv, int64_t kw, float* const* S, int64_t sstride) {
  const int64_t most = std::min<int64_t>(8, kSharedAcc / na);
  float* Sb[kSharedRows];
  for (int64_t j0 = 0, nj; j0 < kw; j0 += nj) {
    nj = even_chunk(kw - j0, most);
    for (int a = 0; a < na; ++a) Sb[a] = S[a] + j0 * sstride;
    dot_block_multi_n(na, nj, A, Ws, D, kv.base, kv.cstride, kv.joff + j0, Sb, sstride);
  }
}

// Out[a][(c0 + cc) * os + 0:V] += sum_j P[a][j * ps + 0:V] * kv(j, c0 + cc) for NA query rows that
// read the same key row (each key vector loaded once for them) and NC channels from c0.
template <int NA, int NC>
static inline void mix_block_shared(const float* const* P, int64_t ps, const KeyView<float>& kv, int64_t kw,
                                    int64_t c0, float* const* Out, int64_t os) {
  Vec<float> acc[NA][NC];
  NA_UNROLL
  for (int a = 0; a < NA; ++a)
    NA_UNROLL
    for (int cc = 0; cc < NC; ++cc) acc[a][cc] = loadu(Out[a] + (c0 + cc) * os);
  const float* b0 = kv.base + c0 * kv.cstride;
  for (int64_t j = 0; j < kw; ++j) {
    Vec<float> p[NA];
    NA_UNROLL
    for (int a = 0; a < NA; ++a) p[a] = loadu(P[a] + j * ps);
    const float* kc = b0 + kv.joff[j];
    NA_UNROLL
    for (int cc = 0; cc < NC; ++cc) {
      Vec<float> kk = loadu(kc + cc * kv.cstride);
      if (NA > 1) pin_register(kk);
      NA_UNROLL
      for (int a = 0; a < NA; ++a) acc[a][cc] += p[a] * kk;
    }
  }
  NA_UNROLL
  for (int a = 0; a < NA; ++a)
    NA_UNROLL
    for (int cc = 0; cc < NC; ++cc) storeu(Out[a] + (c0 + cc) * os, acc[a][cc]);
}

// Channels per mix_block_shared for NA rows: NA * NC accumulators, NA weights and one key vector
// within the registers.
#if NA_AVX2
constexpr int kMixChannels[kSharedRows + 1] = {0, 8, 4, 3};
#else
constexpr int kMixChannels[kSharedRows + 1] = {0, 8, 8, 8, 6, 4};
#endif

template <int NA>
static void mix_rows_shared_n(const float* const* P, int64_t ps, const KeyView<float>& kv, int64_t kw, int64_t D,
                              float* const* Out, int64_t os) {
  for (int64_t c0 = 0, nc; c0 < D; c0 += nc) {
    nc = even_chunk(D - c0, kMixChannels[NA]);
    dispatch_nc(nc, [&](auto ncv) {
      constexpr int NC = decltype(ncv)::value;
      if constexpr (NC <= kMixChannels[NA]) mix_block_shared<NA, NC>(P, ps, kv, kw, c0, Out, os);
    });
  }
}

// Out[a] += P[a] . kv for na <= kSharedRows query rows that read the same key row (dQ = dS K).
[[maybe_unused]] static void mix_rows_shared(int na, const float* const* P, int64_t ps, const KeyView<float>& kv,
                                             int64_t kw, int64_t D, float* const* Out, int64_t os) {
  switch (na) {
#if !NA_AVX2
    case 5: mix_rows_shared_n<5>(P, ps, kv, kw, D, Out, os); break;
    case 4: mix_rows_shared_n<4>(P, ps, kv, kw, D, Out, os); break;
#endif
    case 3: mix_rows_shared_n<3>(P, ps, kv, kw, D, Out, os); break;
    case 2: mix_rows_shared_n<2>(P, ps, kv, kw, D, Out, os); break;
    default: mix_rows_shared_n<1>(P, ps, kv, kw, D, Out, os); break;
  }
}


// acc[t][:] += sum_j P[j * pstride + t] * V[t + j * dw][:] for T queries, DV vectors of 16 channels.
template <int T, int DV>
NA_TILE void pv_tile(const float* P, int64_t pstride, const float* V, int64_t xs, int64_t dw, int64_t kw,
                     Vec<float> (&acc)[T][DV]) {
  for (int64_t j = 0; j < kw; ++j) {
    const float* pj = P + j * pstride;
    const float* vj = V + j * dw * xs;
    NA_UNROLL
    for (int t = 0; t < T; ++t) {
      const Vec<float> p = splat<float>(pj[t]);
      NA_UNROLL
      for (int d = 0; d < DV; ++d) acc[t][d] += p * loadu(vj + t * xs + d * VecOf<float>::N);
    }
  }
}

// The same with dilation 1 and KW neighbours per key row, by key column: column u feeds queries
// t = u - j, so each value row is loaded once per tile. PS > 0: pstride is PS (the weights'
// addresses are then constant offsets from P).
template <int T, int DV, int KW, int PS = 0>
NA_TILE void pv_tile_diag(const float* P, int64_t pstride_rt, const float* V, int64_t xs,
                          Vec<float> (&acc)[T][DV]) {
  const int64_t pstride = PS > 0 ? PS : pstride_rt;
  // (one pointer stepped by xs: with V + u * xs, GCC kept the offsets of all but the first
  // channel vector in stack slots, a load of its own for each value load)
  const float* vu = V;
#pragma GCC unroll 32
  for (int u = 0; u < T + KW - 1; ++u, vu += xs) {
    Vec<float> vv[DV];
    NA_UNROLL
    for (int d = 0; d < DV; ++d) {
      vv[d] = loadu(vu + d * VecOf<float>::N);
      pin_register(vv[d]);
    }
    NA_UNROLL
    for (int t = (u - KW + 1 > 0 ? u - KW + 1 : 0); t <= (u < T - 1 ? u : T - 1); ++t) {
      const Vec<float> p = splat<float>(P[(u - t) * pstride + t]);
      NA_UNROLL
      for (int d = 0; d < DV; ++d) acc[t][d] += p * vv[d];
    }
  }
}

// pv_tile_diag for any number kw >= T of neighbours (dilation 1): columns u < T - 1 and
// u >= kw feed fewer than T queries, the columns between feed all T.
// (query t's weights at P + t * tstride: 1 for the logits' neighbour-major layout, the row width
// for the band logits' query-major one)
template <int T, int DV>
NA_TILE void pv_tile_diag_any(const float* P, int64_t pstride, const float* V, int64_t xs, int64_t kw,
                              Vec<float> (&acc)[T][DV], int64_t tstride = 1) {
  auto column = [&](int64_t u, auto full) __attribute__((always_inline)) {
    Vec<float> vv[DV];
    NA_UNROLL
    for (int d = 0; d < DV; ++d) vv[d] = loadu(V + u * xs + d * VecOf<float>::N);
    NA_UNROLL
    for (int t = 0; t < T; ++t) {
      if (!decltype(full)::value && (u - t < 0 || u - t >= kw)) continue;
      const Vec<float> p = splat<float>(P[(u - t) * pstride + t * tstride]);
      NA_UNROLL
      for (int d = 0; d < DV; ++d) acc[t][d] += p * vv[d];
    }
  };
  int64_t u = 0;
  for (; u < T - 1; ++u) column(u, std::false_type{});
  for (; u < kw; ++u) column(u, std::true_type{});
  for (; u < kw + T - 1; ++u) column(u, std::false_type{});
}

// acc[t][:] += sum_j P[j * pstride + t * tstride] * V[j * xs][:] for T queries that share one
// window of kw value tokens (a stride group's): each value vector is loaded once per tile.
template <int T, int DV>
NA_TILE void pv_tile_shared(const float* P, int64_t pstride, const float* V, int64_t xs, int64_t kw,
                            Vec<float> (&acc)[T][DV], int64_t tstride) {
  for (int64_t j = 0; j < kw; ++j) {
    Vec<float> vv[DV];
    NA_UNROLL
    for (int d = 0; d < DV; ++d) vv[d] = loadu(V + j * xs + d * VecOf<float>::N);
    NA_UNROLL
    for (int t = 0; t < T; ++t) {
      const Vec<float> p = splat<float>(P[j * pstride + t * tstride]);
      NA_UNROLL
      for (int d = 0; d < DV; ++d) acc[t][d] += p * vv[d];
    }
  }
}

constexpr int kBandQ = 4;  // queries per band tile: 4 * NV accumulators + NV key vectors in 32 zmm
constexpr int kBandMaxNV = 6;
#if NA_X86V3
// Band logits of one key row (dilation 1, windows wider than a vector: the 1-D ops' long
// windows). MQ adjacent interior queries (token layout, channel stride 1, query i at q + i * qxs)
// against NV vectors of consecutive packed key columns from kt (channel stride cstride), as a
// register-blocked matrix product: per channel, NV key vectors and MQ broadcast query values for
// MQ * NV FMAs (no query transpose; the columns outside a query's window, at most
// NV * V - kw - MQ + 1 per query, are computed and dropped). Query i's window (columns
// wo + i + j of the band, j < kw) is stored scaled at C + i * cs + j; each row writes
// [i * cs - wo - i, i * cs - wo - i + NV * V). (MQ = 1: a single query whose window may start
// anywhere in the band, the border slots' clamped windows that do not move with the query.
// STEP = 0: MQ adjacent queries that share one window, columns wo + j, such as a stride group's.)
// (Also built for AVX2, where the band backward takes it with MQ = 2 and NV <= 6.)
template <int NV, int MQ = kBandQ, int STEP = 1>
static inline void band_logits(const float* q, int64_t qxs, int64_t D, const float* kt, int64_t cstride,
                               float scale, int64_t wo, float* C, int64_t cs, bool prefetch_next) {
  constexpr int N = VecOf<float>::N;
  Vec<float> acc[MQ][NV];
  NA_UNROLL
  for (int i = 0; i < MQ; ++i)
    NA_UNROLL
    for (int n = 0; n < NV; ++n) acc[i][n] = splat<float>(0.0f);
  for (int64_t c = 0; c < D; ++c) {
    Vec<float> kk[NV];
    NA_UNROLL
    for (int n = 0; n < NV; ++n) {
      kk[n] = loadu(kt + c * cstride + n * N);
      pin_register(kk[n]);
    }
    NA_UNROLL
    for (int i = 0; i < MQ; ++i) {
      const Vec<float> qv = splat<float>(q[i * qxs + c]);
      NA_UNROLL
      for (int n = 0; n < NV; ++n) acc[i][n] += qv * kk[n];
    }
  }
  const Vec<float> sv = splat<float>(scale);
  NA_UNROLL
  for (int i = 0; i < MQ; ++i)
    NA_UNROLL
    for (int n = 0; n < NV; ++n) storeu(C + i * cs - wo - i * STEP + n * N, acc[i][n] * sv);
  // the next tile's queries into L1 (each query token is read by one tile only: its first load
  // would stall the FMAs)
  if (prefetch_next)
    for (int i = 2 * MQ; i < 3 * MQ; ++i)
      for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(q + i * qxs + c, 0, 3);
}

// band_logits over a band of nv key vectors (AVX2's bands of more than 6 ymm vectors, the band
// backward's of windows wider than 6 zmm): in passes of at most kBandMaxNV vectors, as even as
// they can be, where it is wider (the prefetch with the first).
template <int MQ, int STEP>
static inline void band_logits_passes(int64_t nv, const float* q, int64_t qxs, int64_t D, const float* kt,
                                      int64_t cstride, float scale, int64_t wo, float* C, int64_t cs,
                                      bool prefetch_next) {
  constexpr int N = VecOf<float>::N;
  const int64_t passes = (nv + kBandMaxNV - 1) / kBandMaxNV, p1 = (nv + passes - 1) / passes;
  for (int64_t n0 = 0; n0 < nv; n0 += p1)
    dispatch_nc(std::min(p1, nv - n0), [&](auto nvv) {
      constexpr int NV = decltype(nvv)::value;
      if constexpr (NV <= kBandMaxNV)
        band_logits<NV, MQ, STEP>(q, qxs, D, kt + n0 * N, cstride, scale, wo - n0 * N, C, cs,
                                  prefetch_next && n0 == 0);
    });
}
#endif

#if NA_X86V3
// The sum and the maximum of a vector's lanes.
static inline float lane_sum(Vec<float> x) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)x);
#else
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128((__m256)x), _mm256_extractf128_ps((__m256)x, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
#endif
}

static inline float lane_max(Vec<float> x) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps((__m512)x);
#else
  const __m128 h = _mm_max_ps(_mm256_castps256_ps128((__m256)x), _mm256_extractf128_ps((__m256)x, 1));
  const __m128 q = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(q, _mm_shuffle_ps(q, q, 1)));
#endif
}

// Softmax of one query's kw logits at C (in place, left unnormalised): returns the max m and the
// sum l of exp(s - m). Reads up to the next multiple of V past kw (the band row's padding). The
// lanes of the last partial vector past kw are masked in registers (they had been zeroed one at a
// time through the stack, a store-forwarding stall per query: 65-key windows have one key in
// their fifth vector). Inlined into the callers' loops, which keep the exp's constants.
static inline __attribute__((always_inline)) void band_softmax(float* C, int64_t kw, float& m_out, float& l_out) {
  constexpr int N = VecOf<float>::N;
  const int64_t kf = kw / N * N;
#if defined(__AVX512F__)
  const __mmask16 tail = (__mmask16)((1u << (kw - kf)) - 1u);
  auto keep = [&](Vec<float> x) { return (Vec<float>)_mm512_maskz_mov_ps(tail, (__m512)x); };
#else
  const __m256 tail = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(kw - kf)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  auto keep = [&](Vec<float> x) { return (Vec<float>)_mm256_and_ps((__m256)x, tail); };
#endif
  Vec<float> mv = kf > 0 ? loadu(C) : splat<float>(-std::numeric_limits<float>::infinity());
  for (int64_t e = N; e < kf; e += N) mv = vmax<float>(mv, loadu(C + e));
  if (kf < kw) {  // (the masked lanes as -inf: no effect on the max)
    const Vec<float> x = loadu(C + kf), ninf = splat<float>(-std::numeric_limits<float>::infinity());
#if defined(__AVX512F__)
    mv = vmax<float>(mv, (Vec<float>)_mm512_mask_mov_ps((__m512)ninf, tail, (__m512)x));
#else
    mv = vmax<float>(mv, (Vec<float>)_mm256_blendv_ps((__m256)ninf, (__m256)x, tail));
#endif
  }
  const float m = lane_max(mv);
  const Vec<float> ms = splat<float>(m);
  Vec<float> lv = splat<float>(0.0f);
  for (int64_t e = 0; e < kf; e += N) {
    const Vec<float> p = vexp(loadu(C + e) - ms);
    storeu(C + e, p);
    lv += p;
  }
  if (kf < kw) {
    const Vec<float> p = keep(vexp(loadu(C + kf) - ms));
    storeu(C + kf, p);
    lv += p;
  }
  const float l = lane_sum(lv);
  m_out = m;
  l_out = l;
}
#endif

}  // namespace
}  // namespace neighborhood
}  // namespace alterops
