// window_attention2d: the float32 fast path for AVX2 + FMA machines (no AVX-512). Included by
// window_attention_cpu.cpp only, inside its anonymous namespace, after the pieces both fast
// paths share (Geometry, View5, fast::Plan, fast::make_plan, fast::scatter_tiles,
// fast::Prefetcher) and, at file scope, ../common/simd_avx2.h (exp2v, log2v, hsum, hmax,
// lanes_below, transpose8).
//
// The plan is the AVX-512 path's: windows grouped into classes, one precomputed base-2
// (bias + shift mask) tile per class and table head, logits in base 2 with a vectorised exp2,
// the backward recomputing P from the saved logsumexp, the bias gradient summed per class tile
// in fixed chunks of tasks. The layout is for 8-lane vectors and 16 ymm registers:
//  - a task (batch, window, head) copies its rows of q, k, v (grad_out, out) into contiguous
//    blocks of d rounded up to 8 floats per row (zero lanes past d);
//  - K^T (and V^T) are packed d x Np, Np = window tokens rounded up to 8 (not 16: a 7x7 window
//    computes 56 logits per query, not 64), with 8x8 register transposes;
//  - every product is one micro-kernel of 6 rows x 16 columns (12 accumulators, 2 B vectors and
//    a broadcast: 15 of the 16 registers) that reads A either by rows (S = Q K^T, O = P V,
//    dQ = dS K) or by columns (dV = P^T dO, dK = dS^T Q), so P and dS are never transposed.

#pragma once

namespace fast {

using avx2::exp2v;
using avx2::hmax;
using avx2::hsum;
using avx2::lanes_below;
using avx2::log2v;
using avx2::transpose8;

constexpr int kRows = 6;  // rows of one micro-kernel block

// dst[e0 .. e0+8) = v, lanes at or past d left unwritten.
static inline void store_chunk(float* dst, int64_t e0, int64_t d, __m256 v) {
  if (e0 + 8 <= d) {
    _mm256_storeu_ps(dst + e0, v);
  } else {
    _mm256_maskstore_ps(dst + e0, lanes_below(d - e0), v);
  }
}

// The same with a non-temporal store where the chunk is whole and 32-byte aligned: an output row
// is written once and read by the next op only after the whole map, so fetching its lines first
// (write-allocate) would only add DRAM reads. Needs _mm_sfence() before the writes are published.
static inline void stream_chunk(float* dst, int64_t e0, int64_t d, __m256 v) {
  if (e0 + 8 <= d && (reinterpret_cast<uintptr_t>(dst + e0) & 31) == 0) {
    _mm256_stream_ps(dst + e0, v);
  } else {
    store_chunk(dst, e0, d, v);
  }
}

// dst[e * Np + n] = src[n * ld + e] for n < Np, e < ld (Np and ld multiples of 8).
static inline void pack_transposed(const float* src, int64_t ld, int64_t Np, float* dst) {
  for (int64_t n0 = 0; n0 < Np; n0 += 8) {
    for (int64_t e0 = 0; e0 < ld; e0 += 8) {
      __m256 r[8];
      _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (n0 + i) * ld + e0);
      transpose8(r);
      _Pragma("GCC unroll 8") for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (e0 + j) * Np + n0, r[j]);
    }
  }
}

// acc[r][c] = sum_{k < K} A(r, k) * B[k * ldb + 8c .. +8] for r < R, c < CV, with
// A(r, k) = A[r * lda + k] (by rows) or A[k * lda + r] (TA: by columns); then epi(r, c, acc[r][c]).
template <int R, int CV, bool TA, class Epi>
static inline void micro(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K, Epi& epi) {
  __m256 acc[R][CV];
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 2") for (int c = 0; c < CV; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[CV];
    _Pragma("GCC unroll 2") for (int c = 0; c < CV; ++c) b[c] = _mm256_loadu_ps(B + k * ldb + 8 * c);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(TA ? A + k * lda + r : A + r * lda + k);
      _Pragma("GCC unroll 2") for (int c = 0; c < CV; ++c) acc[r][c] = _mm256_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 2") for (int c = 0; c < CV; ++c) epi(r, c, acc[r][c]);
}

struct NoHook {
  void operator()() const {}
};

// C(m, n) = sum_{k < K} A(m, k) * B[k * ldb + n] for m < rows, n < cols (a multiple of 8), handed
// to epi(m, n, 8 columns) vector by vector; hook() runs after each block (prefetches). Rows go
// in blocks of kRows: A must be readable (any finite values) up to row (or, with TA, column)
// round_up(rows, kRows) - 1; epi sees those padding rows too and drops them.
template <bool TA, class Epi, class Hook = NoHook>
static inline void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K, int64_t rows,
                        int64_t cols, Epi&& epi, Hook&& hook = Hook{}) {
  for (int64_t n0 = 0; n0 < cols; n0 += 16) {
    for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
      const float* a = TA ? A + m0 : A + m0 * lda;
      auto e = [&](int r, int c, __m256 v) { epi(m0 + r, n0 + 8 * c, v); };
      if (n0 + 16 <= cols) {
        micro<kRows, 2, TA>(a, lda, B + n0, ldb, K, e);
      } else {
        micro<kRows, 1, TA>(a, lda, B + n0, ldb, K, e);
      }
      hook();
    }
  }
}

// Copies rows m < M of (b, window, head) of a (B, H, W, heads, d) tensor into dst[m * ld ..] (lanes
// past d zero) and zeroes rows M..Mz.
static inline void gather_rows(float* dst, int64_t ld, const float* base, const View5& v, const Geometry& g,
                               const Plan& pl, int64_t b, int64_t h, int64_t win, int64_t M, int64_t Mz) {
  const int32_t* py = pl.py.data() + win * g.N;
  const int32_t* px = pl.px.data() + win * g.N;
  const int64_t d = g.d, full = d / 8 * 8;
  const __m256i tail = lanes_below(d - full);
  base += b * v.sb + h * v.sh;
  for (int64_t m = 0; m < M; ++m) {
    const float* src = base + py[m] * v.sy + px[m] * v.sx;
    float* row = dst + m * ld;
    if (v.sd == 1) {
      for (int64_t e = 0; e < full; e += 8) _mm256_storeu_ps(row + e, _mm256_loadu_ps(src + e));
      if (full < d) _mm256_storeu_ps(row + full, _mm256_maskload_ps(src + full, tail));
    } else {
      for (int64_t e = 0; e < d; ++e) row[e] = src[e * v.sd];
      for (int64_t e = d; e < ld; ++e) row[e] = 0.0f;
    }
  }
  if (Mz > M) std::memset(dst + M * ld, 0, (Mz - M) * ld * sizeof(float));
}

// Per-thread scratch: row blocks of d8 floats (rows padded to whole micro-kernel blocks, a
// transposed read of A overruns its last row by < kRows floats, hence the slack).
struct Buf {
  std::vector<float> v;
  float* init(int64_t n) {
    v.assign(n + 16, 0.0f);
    return v.data();
  }
};

void forward(const Geometry& g, const Strided& q, const Strided& k, const Strided& v, const float* table,
             int64_t table_heads, float scale, float* out, float* lse, const Parallel& par) {
  const Plan pl = make_plan(g, table, table_heads, 8);
  const View5 vq(q), vk(k), vv(v);
  const float* qp = q.as<float>();
  const float* kp = k.as<float>();
  const float* vp = v.as<float>();
  const int64_t d = g.d, d8 = round_up(d, 8), nh = g.nh, Np = pl.Np, HW = g.H * g.W;
  const int64_t rows_cap = round_up(Np, kRows);
  const int64_t tasks = g.B * g.nWin * nh;
  const bool per_head = table && table_heads != 1;
  const __m256 c2 = _mm256_set1_ps(scale * kLog2e);
  par.for_each(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Buf bq, bk, bkt, bv, bs, binv, blse;
    float* Q = bq.init(rows_cap * d8);
    float* K = bk.init(Np * d8);
    float* Kt = bkt.init(d8 * Np);
    float* V = bv.init(Np * d8);
    float* S = bs.init(rows_cap * Np);
    float* inv = binv.init(rows_cap);  // row sums, then their inverses
    float* lsev = blse.init(rows_cap);  // row maxima, then the logsumexp
    // The rows of the task kFar ahead go to L2 a few at a time between this task's blocks (as
    // in the AVX-512 path: the gathers otherwise wait on DRAM for a third of the time).
    Prefetcher pf;
    pf.init(3 * rows_cap, d, std::max({vq.sd, vk.sd, vv.sd}));
    pf.far = true;
    constexpr int64_t kFar = 4;
    auto hook = [&] { pf.run(); };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % nh;
      const int64_t win = (task / nh) % g.nWin;
      const int64_t b = task / (nh * g.nWin);
      const int64_t cls = pl.win_cls[win];
      const int64_t M = pl.cls_M[cls];
      if (M == 0) continue;
      const int32_t* pos = g.pos.data() + win * g.N;
      const float* tile = pl.tiles.data() + (cls * pl.thn + (per_head ? h : 0)) * pl.tsz;
      if (task + kFar < end) {
        pf.add_task(g, pl, task + kFar, qp, vq);
        pf.add_task(g, pl, task + kFar, kp, vk);
        pf.add_task(g, pl, task + kFar, vp, vv);
      }
      pf.start(((M + kRows - 1) / kRows) * ((Np + 15) / 16 + (d8 + 15) / 16));
      gather_rows(Q, d8, qp, vq, g, pl, b, h, win, M, M);
      gather_rows(K, d8, kp, vk, g, pl, b, h, win, M, Np);  // zero rows: zero columns of K^T
      gather_rows(V, d8, vp, vv, g, pl, b, h, win, M, M);
      pack_transposed(K, d8, Np, Kt);
      // S = log2(e) * (scale Q K^T + bias + mask); padding key columns are -inf from the tile.
      gemm<false>(Q, d8, Kt, Np, d, M, Np, [&](int64_t m, int64_t n, __m256 a) {
        if (m < M) _mm256_storeu_ps(S + m * Np + n, _mm256_fmadd_ps(a, c2, _mm256_loadu_ps(tile + m * Np + n)));
      }, hook);
      for (int64_t m = 0; m < M; ++m) {
        float* s = S + m * Np;
        __m256 mx = _mm256_loadu_ps(s);
        for (int64_t n = 8; n < Np; n += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + n));
        const float mxs = hmax(mx);
        const __m256 mxv = _mm256_set1_ps(mxs);
        __m256 sum = _mm256_setzero_ps();
        for (int64_t n = 0; n < Np; n += 8) {
          const __m256 p = exp2v(_mm256_sub_ps(_mm256_loadu_ps(s + n), mxv));
          _mm256_storeu_ps(s + n, p);
          sum = _mm256_add_ps(sum, p);
        }
        inv[m] = hsum(sum);
        lsev[m] = mxs;
      }
      for (int64_t m = M; m < round_up(M, 8); ++m) { inv[m] = 1.0f; lsev[m] = 0.0f; }
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const __m256 s = _mm256_loadu_ps(inv + m0);
        _mm256_storeu_ps(lsev + m0, _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(lsev + m0), log2v(s)),
                                                  _mm256_set1_ps(kLn2)));
        _mm256_storeu_ps(inv + m0, _mm256_div_ps(_mm256_set1_ps(1.0f), s));
      }
      for (int64_t m = 0; m < M; ++m) lse[(b * HW + pos[m]) * nh + h] = lsev[m];
      // O = P V / rowsum
      gemm<false>(S, Np, V, d8, M, M, d8, [&](int64_t m, int64_t n, __m256 a) {
        if (m < M) stream_chunk(out + ((b * HW + pos[m]) * nh + h) * d, n, d, _mm256_mul_ps(a, _mm256_set1_ps(inv[m])));
      }, hook);
      pf.finish();
    }
    _mm_sfence();
  });
}

void backward(const Geometry& g, const Strided& gout, const Strided& q, const Strided& k, const Strided& v,
              const Strided& out, const Strided& lse, const float* table, int64_t table_heads, float scale,
              float* dq, float* dk, float* dv, float* dtable, const Parallel& par) {
  const Plan pl = make_plan(g, table, table_heads, 8);
  const View5 vq(q), vk(k), vv(v), vo(out), vg(gout);
  const int64_t ls_b = lse.stride[0], ls_y = lse.stride[1], ls_x = lse.stride[2], ls_h = lse.stride[3];
  const float* lse_p = lse.as<float>();
  const float* qp = q.as<float>();
  const float* kp = k.as<float>();
  const float* vp = v.as<float>();
  const float* op = out.as<float>();
  const float* gp = gout.as<float>();
  const int64_t d = g.d, d8 = round_up(d, 8), nh = g.nh, Np = pl.Np, HW = g.H * g.W;
  const int64_t rows_cap = round_up(Np, kRows);
  const int64_t tasks = g.B * g.nWin * nh;
  const int64_t tsize = (2 * g.wh - 1) * g.tw;
  const __m256 c2 = _mm256_set1_ps(scale * kLog2e);
  const __m256 sc = _mm256_set1_ps(scale);
  // Fixed chunks of tasks own one partial bias gradient each (deterministic reduction); within a
  // chunk dS is summed per (window class, table head) tile and scattered into the table at the end.
  const int64_t chunk = 64;
  const int64_t nchunks = (tasks + chunk - 1) / chunk;
  std::vector<float> partial(dtable ? nchunks * table_heads * tsize : 0, 0.0f);

  par.for_each(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
    Buf bq, bk, bv, bo, bg, bkt, bvt, bp, bds, bd, bl;
    float* Q = bq.init(rows_cap * d8);
    float* K = bk.init(rows_cap * d8);
    float* V = bv.init(Np * d8);
    float* O = bo.init(Np * d8);
    float* G = bg.init(rows_cap * d8);
    float* Kt = bkt.init(d8 * Np);
    float* Vt = bvt.init(d8 * Np);
    float* P = bp.init(rows_cap * Np);
    float* dS = bds.init(rows_cap * Np);
    float* Dm = bd.init(rows_cap);
    float* L2 = bl.init(rows_cap);
    std::vector<float> acc_tiles(dtable ? pl.ncls * pl.thn * pl.tsz : 0);
    std::vector<uint8_t> touched(dtable ? pl.ncls * pl.thn : 0);
    Prefetcher pf;
    pf.init(5 * rows_cap, d, std::max({vq.sd, vk.sd, vv.sd, vo.sd, vg.sd}));
    pf.far = true;
    constexpr int64_t kFar = 2;
    auto hook = [&] { pf.run(); };
    const int64_t task_end = std::min(tasks, cend * chunk);
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
        if (task + kFar < task_end) {
          pf.add_task(g, pl, task + kFar, qp, vq);
          pf.add_task(g, pl, task + kFar, kp, vk);
          pf.add_task(g, pl, task + kFar, vp, vv);
          pf.add_task(g, pl, task + kFar, op, vo);
          pf.add_task(g, pl, task + kFar, gp, vg);
        }
        pf.start(((M + kRows - 1) / kRows) * (2 * ((Np + 15) / 16) + 3 * ((d8 + 15) / 16)));
        gather_rows(Q, d8, qp, vq, g, pl, b, h, win, M, M);
        gather_rows(K, d8, kp, vk, g, pl, b, h, win, M, Np);
        gather_rows(V, d8, vp, vv, g, pl, b, h, win, M, Np);
        gather_rows(O, d8, op, vo, g, pl, b, h, win, M, M);
        gather_rows(G, d8, gp, vg, g, pl, b, h, win, M, M);
        const int32_t* py = pl.py.data() + win * g.N;
        const int32_t* px = pl.px.data() + win * g.N;
        for (int64_t m = 0; m < M; ++m) {
          __m256 s = _mm256_setzero_ps();
          for (int64_t e = 0; e < d8; e += 8)
            s = _mm256_fmadd_ps(_mm256_loadu_ps(G + m * d8 + e), _mm256_loadu_ps(O + m * d8 + e), s);
          Dm[m] = hsum(s);
          L2[m] = lse_p[b * ls_b + py[m] * ls_y + px[m] * ls_x + h * ls_h] * kLog2e;
        }
        pack_transposed(K, d8, Np, Kt);
        pack_transposed(V, d8, Np, Vt);
        // P = exp2(S - lse), recomputed; padding key columns give 0.
        gemm<false>(Q, d8, Kt, Np, d, M, Np, [&](int64_t m, int64_t n, __m256 a) {
          if (m >= M) return;
          const __m256 x = _mm256_fmadd_ps(a, c2, _mm256_loadu_ps(tile + m * Np + n));
          _mm256_storeu_ps(P + m * Np + n, exp2v(_mm256_sub_ps(x, _mm256_set1_ps(L2[m]))));
        }, hook);
        // dS = P * (dO V^T - D)
        gemm<false>(G, d8, Vt, Np, d, M, Np, [&](int64_t m, int64_t n, __m256 a) {
          if (m >= M) return;
          const __m256 ds = _mm256_mul_ps(_mm256_loadu_ps(P + m * Np + n), _mm256_sub_ps(a, _mm256_set1_ps(Dm[m])));
          _mm256_storeu_ps(dS + m * Np + n, ds);
          if (dbt) _mm256_storeu_ps(dbt + m * Np + n, _mm256_add_ps(_mm256_loadu_ps(dbt + m * Np + n), ds));
        }, hook);
        // dQ = scale dS K;  dV = P^T dO;  dK = scale dS^T Q
        gemm<false>(dS, Np, K, d8, M, M, d8, [&](int64_t m, int64_t n, __m256 a) {
          if (m < M) store_chunk(dq + ((b * HW + pos[m]) * nh + h) * d, n, d, _mm256_mul_ps(a, sc));
        }, hook);
        gemm<true>(P, Np, G, d8, M, M, d8, [&](int64_t m, int64_t n, __m256 a) {
          if (m < M) store_chunk(dv + ((b * HW + pos[m]) * nh + h) * d, n, d, a);
        }, hook);
        gemm<true>(dS, Np, Q, d8, M, M, d8, [&](int64_t m, int64_t n, __m256 a) {
          if (m < M) store_chunk(dk + ((b * HW + pos[m]) * nh + h) * d, n, d, _mm256_mul_ps(a, sc));
        }, hook);
        pf.finish();
      }
      if (dtable) scatter_tiles(g, pl, acc_tiles.data(), touched.data(), partial.data() + c * table_heads * tsize);
    }
  });
  if (dtable != nullptr) reduce_partials(partial, nchunks, table_heads * tsize, dtable);
}

}  // namespace fast
