// window_attention2d on the CPU: Swin (shifted-)window MSA, forward and backward, fused.
//
// One task = (batch, window, head). A task gathers the present tokens of its window (the shift
// is index arithmetic on the padded map, absent padding tokens are skipped) into small
// contiguous buffers, then does the window's dense attention as small GEMMs that stay in L1:
// S = scale*Q K^T + bias + region mask, softmax, O = P V. The forward saves the logsumexp of
// every query row; the backward recomputes P from it. Tasks run in parallel on torch's thread
// pool (alterops::Parallel); the bias-table gradient is accumulated per fixed chunk of tasks and
// the chunks are reduced in a fixed order afterwards, so it is deterministic (independent of
// the thread count).
//
// Compiled once per instruction-set level (no torch headers): the float32 fast paths are
// AVX-512 (window_attention_avx512.h) or AVX2 + FMA (window_attention_avx2.h), chosen by the
// level's compile flags; the generic kernels below serve float64, the generic level and the
// shapes the fast paths do not take.
#include "window_attention.h"

#include "../common/exp_approx.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// The SIMD fast paths: AVX-512 (16-lane) or AVX2 + FMA (8-lane).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define ALTEROPS_WA_FAST 1
#include <immintrin.h>

#include "../common/simd_avx2.h"
#else
#define ALTEROPS_WA_FAST 0
#endif

namespace alterops {
namespace window {
namespace {

// ----------------------------------------------------------------------------------------
// Window geometry, shared by every batch and head.
// ----------------------------------------------------------------------------------------
struct Geometry {
  int64_t B, H, W, nh, d;
  int64_t wh, ww, sh, sw;
  int64_t Hp, Wp, nWy, nWx, nWin, N;
  int64_t tw;  // table row length 2*ww-1
  // Per window: the present tokens (count[win] of them, in window order).
  std::vector<int32_t> count;
  std::vector<int32_t> pos;     // y*W + x in the original map
  std::vector<int32_t> keyofs;  // i*(2ww-1) + j          (key part of the bias index)
  std::vector<int32_t> qryofs;  // (wh-1-i)*(2ww-1) + (ww-1-j)   (query part)
  std::vector<int32_t> region;  // shift region 0..8
  std::vector<uint8_t> mixed;   // the window holds tokens of more than one region
};

inline int64_t shift_region(int64_t r, int64_t L, int64_t w, int64_t s) {
  if (r < L - w) return 0;
  if (s > 0 && r >= L - s) return 2;
  return 1;
}

Geometry make_geometry(const Problem& p) {
  Geometry g;
  g.B = p.batch; g.H = p.height; g.W = p.width; g.nh = p.heads; g.d = p.head_dim;
  g.wh = p.window_h; g.ww = p.window_w; g.sh = p.shift_h; g.sw = p.shift_w;
  g.Hp = (g.H + g.wh - 1) / g.wh * g.wh;
  g.Wp = (g.W + g.ww - 1) / g.ww * g.ww;
  g.nWy = g.Hp / g.wh; g.nWx = g.Wp / g.ww; g.nWin = g.nWy * g.nWx; g.N = g.wh * g.ww;
  g.tw = 2 * g.ww - 1;
  g.count.assign(g.nWin, 0);
  g.pos.assign(g.nWin * g.N, 0);
  g.keyofs.assign(g.nWin * g.N, 0);
  g.qryofs.assign(g.nWin * g.N, 0);
  g.region.assign(g.nWin * g.N, 0);
  g.mixed.assign(g.nWin, 0);
  for (int64_t wy = 0; wy < g.nWy; ++wy) {
    for (int64_t wx = 0; wx < g.nWx; ++wx) {
      const int64_t win = wy * g.nWx + wx;
      int32_t m = 0;
      int32_t first_region = -1;
      for (int64_t i = 0; i < g.wh; ++i) {
        for (int64_t j = 0; j < g.ww; ++j) {
          const int64_t r = wy * g.wh + i, c = wx * g.ww + j;  // rolled padded coordinates
          const int64_t y = (r + g.sh) % g.Hp, x = (c + g.sw) % g.Wp;
          if (y >= g.H || x >= g.W) continue;  // absent padding token
          const int32_t reg = (int32_t)(shift_region(r, g.Hp, g.wh, g.sh) * 3 + shift_region(c, g.Wp, g.ww, g.sw));
          const int64_t t = win * g.N + m;
          g.pos[t] = (int32_t)(y * g.W + x);
          g.keyofs[t] = (int32_t)(i * g.tw + j);
          g.qryofs[t] = (int32_t)((g.wh - 1 - i) * g.tw + (g.ww - 1 - j));
          g.region[t] = reg;
          if (first_region < 0) first_region = reg;
          if (reg != first_region) g.mixed[win] = 1;
          ++m;
        }
      }
      g.count[win] = m;
    }
  }
  return g;
}

// Strides of a (B, H, W, heads, d) tensor, in elements.
struct View5 {
  int64_t sb, sy, sx, sh, sd;
  explicit View5(const Strided& t)
      : sb(t.stride[0]), sy(t.stride[1]), sx(t.stride[2]), sh(t.stride[3]), sd(t.stride[4]) {}
  inline int64_t row(int64_t b, int64_t p, int64_t W, int64_t h) const {
    return b * sb + (p / W) * sy + (p % W) * sx + h * sh;
  }
};

template <typename T>
inline float to_acc(T v) { return static_cast<float>(v); }
inline double to_acc(double v) { return v; }

// Vectorisable exp for float (|rel err| ~ 2e-7); masked entries are handled by the caller.
inline float exp_approx(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = std::floor(t + 0.5f);
  const float r = (t - n) * 0.693147180559945309f;
  const float p = exp_poly(r);
  const int32_t bits = ((int32_t)n + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return p * s;
}
inline double exp_approx(double x) { return std::exp(x); }

template <typename scalar_t, typename acc_t>
inline void gather_row(acc_t* dst, const scalar_t* src, int64_t sd, int64_t d, acc_t mul) {
  if (sd == 1) {
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) dst[e] = to_acc(src[e]) * mul;
  } else {
    for (int64_t e = 0; e < d; ++e) dst[e] = to_acc(src[e * sd]) * mul;
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[m][n] (+)= sum_k A[m*lda + k] * B[k*ldb + n] for m < rows (a multiple of 4), n < cols,
// k < K: a register-blocked micro-GEMM (4 rows x one SIMD width of columns in registers).
template <typename T>
inline void gemm_nn(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t rows,
                    int64_t cols, int64_t K) {
  constexpr int R = 4;
  constexpr int V = 64 / sizeof(T);
  int64_t n0 = 0;
  for (; n0 + V <= cols; n0 += V) {
    for (int64_t m0 = 0; m0 < rows; m0 += R) {
      T acc[R][V];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < V; ++c) acc[r][c] = T(0);
      const T* a = A + m0 * lda;
      for (int64_t k = 0; k < K; ++k) {
        const T* b = B + k * ldb + n0;
        for (int r = 0; r < R; ++r) {
          const T ar = a[r * lda + k];
#pragma omp simd
          for (int c = 0; c < V; ++c) acc[r][c] += ar * b[c];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < V; ++c) C[(m0 + r) * ldc + n0 + c] = acc[r][c];
    }
  }
  if (n0 < cols) {
    for (int64_t m = 0; m < rows; ++m) {
      T* crow = C + m * ldc;
      for (int64_t n = n0; n < cols; ++n) crow[n] = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T a = A[m * lda + k];
        const T* b = B + k * ldb;
        for (int64_t n = n0; n < cols; ++n) crow[n] += a * b[n];
      }
    }
  }
}

template <typename T>
inline void transpose(const T* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) dst[j * n + i] = src[i * n + j];
}

// Per-thread scratch of one task: Np = tokens per window rounded up to 16 (zero padding).
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> Q, Kt, K, V, Vt, S, T, U, O, dO, dQ, dK, dV, D, lse;
  void resize(int64_t Np, int64_t d, bool backward) {
    Q.assign(Np * d, 0); Kt.assign(d * Np, 0); V.assign(Np * d, 0); S.assign(Np * Np, 0); O.assign(Np * d, 0);
    if (backward) {
      K.assign(Np * d, 0); Vt.assign(d * Np, 0); T.assign(Np * Np, 0); U.assign(Np * Np, 0);
      dO.assign(Np * d, 0); dQ.assign(Np * d, 0); dK.assign(Np * d, 0); dV.assign(Np * d, 0);
      D.assign(Np, 0); lse.assign(Np, 0);
    }
  }
};

// bias + region mask (-inf) on the logits row s[0..M) of query m.
template <typename acc_t>
inline void bias_mask_row(acc_t* s, int64_t M, const acc_t* table_h, const int32_t* keyofs, int32_t qofs,
                          const int32_t* region, bool mixed, int32_t reg_m) {
  if (table_h != nullptr) {
    const acc_t* tq = table_h + qofs;
    for (int64_t n = 0; n < M; ++n) s[n] += tq[keyofs[n]];
  }
  if (mixed) {
    for (int64_t n = 0; n < M; ++n)
      if (region[n] != reg_m) s[n] = -std::numeric_limits<acc_t>::infinity();
  }
}

// dtable[i] = sum over chunks c, in order, of partial[c * n + i]: the fixed-order reduction of
// the per-chunk bias-gradient partials (the same result for any thread count).
template <typename acc_t>
inline void reduce_partials(const std::vector<acc_t>& partial, int64_t nchunks, int64_t n, acc_t* dtable) {
  for (int64_t i = 0; i < n; ++i) dtable[i] = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const acc_t* p = partial.data() + c * n;
    for (int64_t i = 0; i < n; ++i) dtable[i] += p[i];
  }
}

// ----------------------------------------------------------------------------------------
// Forward
// ----------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
void forward_kernel(const Geometry& g, const Strided& q, const Strided& k, const Strided& v,
                    const acc_t* table, int64_t table_heads, acc_t scale, scalar_t* out, acc_t* lse,
                    const Parallel& par) {
  const View5 vq(q), vk(k), vv(v);
  const scalar_t* qp = q.as<scalar_t>();
  const scalar_t* kp = k.as<scalar_t>();
  const scalar_t* vp = v.as<scalar_t>();
  const int64_t d = g.d, nh = g.nh, N = g.N, Np = round_up(N, 16);
  const int64_t tsize = (2 * g.wh - 1) * g.tw;
  const int64_t tasks = g.B * g.nWin * nh;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  par.for_each(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> sc;
    sc.resize(Np, d, false);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % nh;
      const int64_t win = (task / nh) % g.nWin;
      const int64_t b = task / (nh * g.nWin);
      const int64_t M = g.count[win];
      if (M == 0) continue;
      const int64_t Mp = round_up(M, 16);
      const int32_t* pos = g.pos.data() + win * N;
      const int32_t* keyofs = g.keyofs.data() + win * N;
      const int32_t* qryofs = g.qryofs.data() + win * N;
      const int32_t* region = g.region.data() + win * N;
      const bool mixed = g.mixed[win] != 0;
      const acc_t* table_h = table ? table + (table_heads == 1 ? 0 : h) * tsize : nullptr;
      // Gather the window's present rows once (zero padding up to Mp).
      for (int64_t m = 0; m < Mp; ++m) {
        acc_t* qd = sc.Q.data() + m * d;
        acc_t* vd = sc.V.data() + m * d;
        if (m < M) {
          gather_row(qd, qp + vq.row(b, pos[m], g.W, h), vq.sd, d, scale);
          gather_row(vd, vp + vv.row(b, pos[m], g.W, h), vv.sd, d, acc_t(1));
          const scalar_t* kr = kp + vk.row(b, pos[m], g.W, h);
          for (int64_t e = 0; e < d; ++e) sc.Kt[e * Mp + m] = to_acc(kr[e * vk.sd]);
        } else {
          for (int64_t e = 0; e < d; ++e) { qd[e] = 0; vd[e] = 0; sc.Kt[e * Mp + m] = 0; }
        }
      }
      // S = (scale Q) K^T   (Mp x Mp, leading dimension Mp)
      acc_t* S = sc.S.data();
      gemm_nn(sc.Q.data(), d, sc.Kt.data(), Mp, S, Mp, Mp, Mp, d);
      for (int64_t m = 0; m < Mp; ++m) {
        acc_t* s = S + m * Mp;
        if (m >= M) {
          for (int64_t n = 0; n < Mp; ++n) s[n] = 0;
          continue;
        }
        bias_mask_row(s, M, table_h, keyofs, qryofs[m], region, mixed, region[m]);
        acc_t mx = ninf;
        for (int64_t n = 0; n < M; ++n) mx = std::max(mx, s[n]);
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t n = 0; n < M; ++n) {
          const acc_t e = exp_approx(s[n] - mx);
          const acc_t p = s[n] == ninf ? acc_t(0) : e;
          s[n] = p;
          sum += p;
        }
        const acc_t inv = acc_t(1) / sum;
#pragma omp simd
        for (int64_t n = 0; n < M; ++n) s[n] *= inv;
        for (int64_t n = M; n < Mp; ++n) s[n] = 0;
        lse[(b * g.H * g.W + pos[m]) * nh + h] = mx + std::log(sum);
      }
      // O = P V
      gemm_nn(S, Mp, sc.V.data(), d, sc.O.data(), d, round_up(M, 4), d, Mp);
      for (int64_t m = 0; m < M; ++m) {
        scalar_t* dst = out + ((b * g.H * g.W + pos[m]) * nh + h) * d;
        const acc_t* o = sc.O.data() + m * d;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<scalar_t>(o[e]);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------
// Backward
// ----------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
void backward_kernel(const Geometry& g, const Strided& gout, const Strided& q, const Strided& k,
                     const Strided& v, const Strided& out, const Strided& lse, const acc_t* table,
                     int64_t table_heads, acc_t scale, scalar_t* dq, scalar_t* dk, scalar_t* dv, acc_t* dtable,
                     const Parallel& par) {
  const View5 vq(q), vk(k), vv(v), vo(out), vg(gout);
  const int64_t ls_b = lse.stride[0], ls_y = lse.stride[1], ls_x = lse.stride[2], ls_h = lse.stride[3];
  const acc_t* lse_p = lse.as<acc_t>();
  const scalar_t* qp = q.as<scalar_t>();
  const scalar_t* kp = k.as<scalar_t>();
  const scalar_t* vp = v.as<scalar_t>();
  const scalar_t* op = out.as<scalar_t>();
  const scalar_t* gp = gout.as<scalar_t>();
  const int64_t d = g.d, nh = g.nh, N = g.N, Np = round_up(N, 16);
  const int64_t tsize = (2 * g.wh - 1) * g.tw;
  const int64_t tasks = g.B * g.nWin * nh;
  // Fixed chunks of tasks own one partial bias gradient each (deterministic reduction).
  const int64_t chunk = 64;
  const int64_t nchunks = (tasks + chunk - 1) / chunk;
  std::vector<acc_t> partial(dtable ? nchunks * table_heads * tsize : 0, acc_t(0));
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  par.for_each(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
    Scratch<acc_t> sc;
    sc.resize(Np, d, true);
    for (int64_t c = cbegin; c < cend; ++c) {
      acc_t* part = dtable ? partial.data() + c * table_heads * tsize : nullptr;
      for (int64_t task = c * chunk; task < std::min(tasks, (c + 1) * chunk); ++task) {
        const int64_t h = task % nh;
        const int64_t win = (task / nh) % g.nWin;
        const int64_t b = task / (nh * g.nWin);
        const int64_t M = g.count[win];
        if (M == 0) continue;
        const int64_t Mp = round_up(M, 16);
        const int64_t Mr = round_up(M, 4);
        const int32_t* pos = g.pos.data() + win * N;
        const int32_t* keyofs = g.keyofs.data() + win * N;
        const int32_t* qryofs = g.qryofs.data() + win * N;
        const int32_t* region = g.region.data() + win * N;
        const bool mixed = g.mixed[win] != 0;
        const int64_t th = table_heads == 1 ? 0 : h;
        const acc_t* table_h = table ? table + th * tsize : nullptr;
        acc_t* part_h = part ? part + th * tsize : nullptr;
        for (int64_t m = 0; m < Mp; ++m) {
          acc_t* qd = sc.Q.data() + m * d;
          acc_t* kd = sc.K.data() + m * d;
          acc_t* vd = sc.V.data() + m * d;
          acc_t* od = sc.O.data() + m * d;
          acc_t* gd = sc.dO.data() + m * d;
          if (m < M) {
            const int64_t p = pos[m];
            gather_row(qd, qp + vq.row(b, p, g.W, h), vq.sd, d, scale);
            gather_row(kd, kp + vk.row(b, p, g.W, h), vk.sd, d, acc_t(1));
            gather_row(vd, vp + vv.row(b, p, g.W, h), vv.sd, d, acc_t(1));
            gather_row(od, op + vo.row(b, p, g.W, h), vo.sd, d, acc_t(1));
            gather_row(gd, gp + vg.row(b, p, g.W, h), vg.sd, d, acc_t(1));
            acc_t D = 0;
            for (int64_t e = 0; e < d; ++e) D += gd[e] * od[e];
            sc.D[m] = D;
            sc.lse[m] = lse_p[b * ls_b + (p / g.W) * ls_y + (p % g.W) * ls_x + h * ls_h];
          } else {
            for (int64_t e = 0; e < d; ++e) { qd[e] = 0; kd[e] = 0; vd[e] = 0; od[e] = 0; gd[e] = 0; }
            sc.D[m] = 0;
            sc.lse[m] = 0;
          }
          for (int64_t e = 0; e < d; ++e) {
            sc.Kt[e * Mp + m] = kd[e];
            sc.Vt[e * Mp + m] = vd[e];
          }
        }
        acc_t* S = sc.S.data();  // logits, then P
        acc_t* T = sc.T.data();  // dP, then dS
        acc_t* U = sc.U.data();  // transposes
        gemm_nn(sc.Q.data(), d, sc.Kt.data(), Mp, S, Mp, Mp, Mp, d);
        gemm_nn(sc.dO.data(), d, sc.Vt.data(), Mp, T, Mp, Mp, Mp, d);  // dP = dO V^T
        for (int64_t m = 0; m < Mp; ++m) {
          acc_t* s = S + m * Mp;
          acc_t* t = T + m * Mp;
          if (m >= M) {
            for (int64_t n = 0; n < Mp; ++n) { s[n] = 0; t[n] = 0; }
            continue;
          }
          bias_mask_row(s, M, table_h, keyofs, qryofs[m], region, mixed, region[m]);
          const acc_t l = sc.lse[m];
          const acc_t Dm = sc.D[m];
#pragma omp simd
          for (int64_t n = 0; n < M; ++n) {
            const acc_t e = exp_approx(s[n] - l);
            const acc_t p = s[n] == ninf ? acc_t(0) : e;
            s[n] = p;
            t[n] = p * (t[n] - Dm);  // dS
          }
          for (int64_t n = M; n < Mp; ++n) { s[n] = 0; t[n] = 0; }
          if (part_h != nullptr) {
            acc_t* pq = part_h + qryofs[m];
            for (int64_t n = 0; n < M; ++n) pq[keyofs[n]] += t[n];
          }
        }
        // dQ = dS K (scale applied at the write); dV = P^T dO; dK = dS^T (scale Q)
        gemm_nn(T, Mp, sc.K.data(), d, sc.dQ.data(), d, Mr, d, Mp);
        transpose(S, U, Mp);
        gemm_nn(U, Mp, sc.dO.data(), d, sc.dV.data(), d, Mr, d, Mp);
        transpose(T, U, Mp);
        gemm_nn(U, Mp, sc.Q.data(), d, sc.dK.data(), d, Mr, d, Mp);
        for (int64_t m = 0; m < M; ++m) {
          const int64_t o = ((b * g.H * g.W + pos[m]) * nh + h) * d;
          const acc_t* dqr = sc.dQ.data() + m * d;
          const acc_t* dkr = sc.dK.data() + m * d;
          const acc_t* dvr = sc.dV.data() + m * d;
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) {
            dq[o + e] = static_cast<scalar_t>(dqr[e] * scale);
            dk[o + e] = static_cast<scalar_t>(dkr[e]);
            dv[o + e] = static_cast<scalar_t>(dvr[e]);
          }
        }
      }
    }
  });
  if (dtable != nullptr) reduce_partials(partial, nchunks, table_heads * tsize, dtable);
}

#if ALTEROPS_WA_FAST
// ----------------------------------------------------------------------------------------
// What the float32 fast paths (AVX-512 and AVX2) share.
// ----------------------------------------------------------------------------------------
namespace fast {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline bool supported(const Geometry& g) { return g.d <= 128 && g.N <= 1024; }

// Window classes and their (bias + mask) tiles, in base-2 units; tiles are Np x Np with Np the
// window size rounded up to the vector width `lanes`.
struct Plan {
  int64_t Np = 0, thn = 1, tsz = 0, ncls = 0;
  std::vector<int32_t> win_cls, cls_M, cls_win;  // cls_win: a representative window
  std::vector<float> tiles;                       // [cls][th][Np][Np]
  std::vector<int32_t> py, px;                    // map coordinates of each window's present tokens
};

Plan make_plan(const Geometry& g, const float* table, int64_t table_heads, int64_t lanes) {
  Plan pl;
  pl.Np = round_up(g.N, lanes);
  pl.thn = table ? table_heads : 1;
  pl.tsz = pl.Np * pl.Np;
  pl.win_cls.assign(g.nWin, 0);
  std::vector<std::vector<int32_t>> sigs;
  for (int64_t w = 0; w < g.nWin; ++w) {
    std::vector<int32_t> sig;
    const int32_t M = g.count[w];
    sig.reserve(2 * M + 1);
    sig.push_back(M);
    for (int32_t m = 0; m < M; ++m) {
      sig.push_back(g.keyofs[w * g.N + m]);
      sig.push_back(g.mixed[w] ? g.region[w * g.N + m] : 0);
    }
    int64_t c = 0;
    for (; c < (int64_t)sigs.size(); ++c)
      if (sigs[c] == sig) break;
    if (c == (int64_t)sigs.size()) {
      sigs.push_back(std::move(sig));
      pl.cls_M.push_back(M);
      pl.cls_win.push_back((int32_t)w);
    }
    pl.win_cls[w] = (int32_t)c;
  }
  pl.ncls = (int64_t)sigs.size();
  pl.py.resize(g.nWin * g.N);
  pl.px.resize(g.nWin * g.N);
  for (int64_t t = 0; t < g.nWin * g.N; ++t) {
    pl.py[t] = (int32_t)(g.pos[t] / g.W);
    pl.px[t] = (int32_t)(g.pos[t] % g.W);
  }
  const int64_t tsize = (2 * g.wh - 1) * g.tw;
  const float ninf = -std::numeric_limits<float>::infinity();
  pl.tiles.assign(pl.ncls * pl.thn * pl.tsz, ninf);
  for (int64_t c = 0; c < pl.ncls; ++c) {
    const int64_t w = pl.cls_win[c], M = pl.cls_M[c];
    const int32_t* keyofs = g.keyofs.data() + w * g.N;
    const int32_t* qryofs = g.qryofs.data() + w * g.N;
    const int32_t* region = g.region.data() + w * g.N;
    const bool mixed = g.mixed[w] != 0;
    for (int64_t th = 0; th < pl.thn; ++th) {
      float* t = pl.tiles.data() + (c * pl.thn + th) * pl.tsz;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < M; ++n) {
          if (mixed && region[n] != region[m]) continue;
          t[m * pl.Np + n] = table ? table[th * tsize + qryofs[m] + keyofs[n]] * kLog2e : 0.0f;
        }
    }
  }
  return pl;
}

// part[th][qryofs[m] + keyofs[n]] += tiles[cls][th][m][n] for every touched (class, table head):
// a chunk's dS sums, per window class, folded into its partial bias-table gradient.
inline void scatter_tiles(const Geometry& g, const Plan& pl, const float* tiles, const uint8_t* touched, float* part) {
  const int64_t tsize = (2 * g.wh - 1) * g.tw;
  for (int64_t cls = 0; cls < pl.ncls; ++cls) {
    const int64_t w = pl.cls_win[cls], M = pl.cls_M[cls];
    const int32_t* keyofs = g.keyofs.data() + w * g.N;
    const int32_t* qryofs = g.qryofs.data() + w * g.N;
    for (int64_t th = 0; th < pl.thn; ++th) {
      if (!touched[cls * pl.thn + th]) continue;
      const float* t = tiles + (cls * pl.thn + th) * pl.tsz;
      float* ph = part + th * tsize;
      for (int64_t m = 0; m < M; ++m) {
        float* pq = ph + qryofs[m];
        for (int64_t n = 0; n < M; ++n) pq[keyofs[n]] += t[m * pl.Np + n];
      }
    }
  }
}

// Prefetch the rows of the next task (b, window, head) so that its loads overlap this task's math.
static inline void prefetch_task(const Geometry& g, const Plan& pl, int64_t task, const float* base, const View5& v) {
  const int64_t nh = g.nh;
  const int64_t h = task % nh, win = (task / nh) % g.nWin, b = task / (nh * g.nWin);
  const int64_t M = pl.cls_M[pl.win_cls[win]];
  const int32_t* py = pl.py.data() + win * g.N;
  const int32_t* px = pl.px.data() + win * g.N;
  const int64_t bytes = (g.d - 1) * v.sd * (int64_t)sizeof(float);
  base += b * v.sb + h * v.sh;
  for (int64_t m = 0; m < M; ++m) {
    const char* row = reinterpret_cast<const char*>(base + py[m] * v.sy + px[m] * v.sx);
    for (int64_t o = 0; o <= bytes; o += 64) _mm_prefetch(row + o, _MM_HINT_T0);
  }
}

// The rows of the next task, prefetched a few at a time between the blocks of this task's math
// (a burst of a whole window's prefetches fills the miss buffers and stalls this task's loads).
struct Prefetcher {
  std::vector<const char*> rows;
  int64_t n = 0, cur = 0, lines = 1, step = 1;
  bool far = false;  // prefetch into L2 instead of L1
  void init(int64_t cap, int64_t d, int64_t sd) {
    rows.assign(cap, nullptr);
    lines = ((d - 1) * sd * (int64_t)sizeof(float)) / 64 + 1;
  }
  inline void add_task(const Geometry& g, const Plan& pl, int64_t task, const float* base, const View5& v) {
    const int64_t nh = g.nh;
    const int64_t h = task % nh, win = (task / nh) % g.nWin, b = task / (nh * g.nWin);
    const int64_t M = pl.cls_M[pl.win_cls[win]];
    const int32_t* py = pl.py.data() + win * g.N;
    const int32_t* px = pl.px.data() + win * g.N;
    base += b * v.sb + h * v.sh;
    for (int64_t m = 0; m < M; ++m) rows[n++] = reinterpret_cast<const char*>(base + py[m] * v.sy + px[m] * v.sx);
  }
  inline void start(int64_t slots) { cur = 0; step = (n + slots - 1) / std::max<int64_t>(slots, 1); }
  inline void run() {
    const int64_t e = std::min(n, cur + step);
    if (far) {
      for (; cur < e; ++cur)
        for (int64_t l = 0; l < lines; ++l) _mm_prefetch(rows[cur] + 64 * l, _MM_HINT_T1);
      return;
    }
    for (; cur < e; ++cur)
      for (int64_t l = 0; l < lines; ++l) _mm_prefetch(rows[cur] + 64 * l, _MM_HINT_T0);
  }
  inline void finish() {
    step = n;
    run();
    n = 0;
  }
};

}  // namespace fast
#endif  // ALTEROPS_WA_FAST

#if defined(__AVX512F__)
#include "window_attention_avx512.h"
#elif ALTEROPS_WA_FAST
#include "window_attention_avx2.h"
#endif

// ----------------------------------------------------------------------------------------
// Non-finite values in mixed windows. The kernels form S = Q K^T and O = P V as dense products
// over the window's present tokens and mask the keys of other shift regions afterwards (the
// fast paths add -inf to the logit, and such a key's weight is exactly 0 in P V): a NaN or inf
// in k or v of another region would give NaN + -inf or 0 * inf = NaN in rows that never see
// it. After the forward, the (rare) tasks whose window is mixed and holds a non-finite k or v
// get their output rows and logsumexp recomputed over the allowed keys only (in double).
// ----------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
void fix_nonfinite_values(const Geometry& g, const Strided& q, const Strided& k, const Strided& v,
                          const acc_t* table, int64_t table_heads, double scale, scalar_t* out, acc_t* lse,
                          const Parallel& par) {
  bool any_mixed = false;
  for (int64_t w = 0; w < g.nWin; ++w) any_mixed = any_mixed || g.mixed[w] != 0;
  if (!any_mixed) return;
  const View5 vq(q), vk(k), vv(v);
  const scalar_t* qp = q.as<scalar_t>();
  const scalar_t* kp = k.as<scalar_t>();
  const scalar_t* vp = v.as<scalar_t>();
  const int64_t d = g.d, nh = g.nh, N = g.N, HW = g.H * g.W;
  const int64_t tsize = (2 * g.wh - 1) * g.tw;
  par.for_each(0, g.B * g.nWin * nh, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(d), s(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % nh;
      const int64_t win = (task / nh) % g.nWin;
      const int64_t b = task / (nh * g.nWin);
      if (!g.mixed[win]) continue;
      const int64_t M = g.count[win];
      const int32_t* pos = g.pos.data() + win * N;
      bool finite = true;
      for (int64_t n = 0; n < M && finite; ++n) {
        const scalar_t* kr = kp + vk.row(b, pos[n], g.W, h);
        const scalar_t* vr = vp + vv.row(b, pos[n], g.W, h);
        for (int64_t e = 0; e < d; ++e)
          finite = finite && std::isfinite(static_cast<double>(kr[e * vk.sd])) &&
                   std::isfinite(static_cast<double>(vr[e * vv.sd]));
      }
      if (finite) continue;
      const int32_t* keyofs = g.keyofs.data() + win * N;
      const int32_t* qryofs = g.qryofs.data() + win * N;
      const int32_t* region = g.region.data() + win * N;
      const acc_t* table_h = table ? table + (table_heads == 1 ? 0 : h) * tsize : nullptr;
      for (int64_t m = 0; m < M; ++m) {
        const scalar_t* qr = qp + vq.row(b, pos[m], g.W, h);
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t n = 0; n < M; ++n) {
          if (region[n] != region[m]) continue;
          const scalar_t* kr = kp + vk.row(b, pos[n], g.W, h);
          double t = 0;
          for (int64_t e = 0; e < d; ++e) t += static_cast<double>(qr[e * vq.sd]) * static_cast<double>(kr[e * vk.sd]);
          t *= scale;
          if (table_h) t += static_cast<double>(table_h[qryofs[m] + keyofs[n]]);
          s[n] = t;
          if (std::isnan(t) || t > mx) mx = std::isnan(mx) ? mx : t;  // NaN propagates
        }
        double sum = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t n = 0; n < M; ++n) {
          if (region[n] != region[m]) continue;
          const scalar_t* vr = vp + vv.row(b, pos[n], g.W, h);
          const double pw = std::exp(s[n] - mx);
          sum += pw;
          for (int64_t e = 0; e < d; ++e) acc[e] += pw * static_cast<double>(vr[e * vv.sd]);
        }
        scalar_t* dst = out + ((b * HW + pos[m]) * nh + h) * d;
        for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<scalar_t>(acc[e] / sum);
        lse[(b * HW + pos[m]) * nh + h] = static_cast<acc_t>(mx + std::log(sum));
      }
    }
  });
}

// ----------------------------------------------------------------------------------------
// Entry points
// ----------------------------------------------------------------------------------------
bool empty(const Problem& p) { return p.batch == 0 || p.height == 0 || p.width == 0 || p.heads == 0 || p.head_dim == 0; }

void forward(const ForwardArgs& a, const Parallel& par) {
  const Problem& p = a.p;
  if (empty(p)) return;
  const Geometry g = make_geometry(p);
  const int64_t table_heads = p.table != nullptr ? p.table_heads : 0;
#if ALTEROPS_WA_FAST
  if (p.dtype == DType::Float32 && fast::supported(g)) {
    fast::forward(g, a.q, a.k, a.v, static_cast<const float*>(p.table), table_heads, static_cast<float>(p.scale),
                  static_cast<float*>(a.out), static_cast<float*>(a.lse), par);
    fix_nonfinite_values<float, float>(g, a.q, a.k, a.v, static_cast<const float*>(p.table), table_heads, p.scale,
                                       static_cast<float*>(a.out), static_cast<float*>(a.lse), par);
    return;
  }
#endif
  if (p.dtype == DType::Float64) {
    forward_kernel<double, double>(g, a.q, a.k, a.v, static_cast<const double*>(p.table), table_heads, p.scale,
                                   static_cast<double*>(a.out), static_cast<double*>(a.lse), par);
    fix_nonfinite_values<double, double>(g, a.q, a.k, a.v, static_cast<const double*>(p.table), table_heads, p.scale,
                                         static_cast<double*>(a.out), static_cast<double*>(a.lse), par);
  } else {  // Float32 (the binding passes bfloat16 as float32 copies)
    forward_kernel<float, float>(g, a.q, a.k, a.v, static_cast<const float*>(p.table), table_heads,
                                 static_cast<float>(p.scale), static_cast<float*>(a.out), static_cast<float*>(a.lse),
                                 par);
    fix_nonfinite_values<float, float>(g, a.q, a.k, a.v, static_cast<const float*>(p.table), table_heads, p.scale,
                                       static_cast<float*>(a.out), static_cast<float*>(a.lse), par);
  }
}

void backward(const BackwardArgs& a, const Parallel& par) {
  const Problem& p = a.p;
  if (empty(p)) return;
  const Geometry g = make_geometry(p);
  const int64_t table_heads = p.table != nullptr ? p.table_heads : 0;
  void* dtable = p.table != nullptr ? a.dtable : nullptr;
#if ALTEROPS_WA_FAST
  if (p.dtype == DType::Float32 && fast::supported(g)) {
    fast::backward(g, a.grad_out, a.q, a.k, a.v, a.out, a.lse, static_cast<const float*>(p.table), table_heads,
                   static_cast<float>(p.scale), static_cast<float*>(a.dq), static_cast<float*>(a.dk),
                   static_cast<float*>(a.dv), static_cast<float*>(dtable), par);
    return;
  }
#endif
  if (p.dtype == DType::Float64) {
    backward_kernel<double, double>(g, a.grad_out, a.q, a.k, a.v, a.out, a.lse, static_cast<const double*>(p.table),
                                    table_heads, p.scale, static_cast<double*>(a.dq), static_cast<double*>(a.dk),
                                    static_cast<double*>(a.dv), static_cast<double*>(dtable), par);
  } else {
    backward_kernel<float, float>(g, a.grad_out, a.q, a.k, a.v, a.out, a.lse, static_cast<const float*>(p.table),
                                  table_heads, static_cast<float>(p.scale), static_cast<float*>(a.dq),
                                  static_cast<float*>(a.dk), static_cast<float*>(a.dv), static_cast<float*>(dtable),
                                  par);
  }
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k{&forward, &backward};
  return k;
}

}  // namespace window
}  // namespace alterops
