// window_attention2d on the CPU: Swin (shifted-)window MSA, forward and backward, fused.
//
// One task = (batch, window, head). A task gathers the present tokens of its window (the shift
// is index arithmetic on the padded map, absent padding tokens are skipped) into small
// contiguous buffers, then does the window's dense attention as small GEMMs that stay in L1:
// S = scale*Q K^T + bias + region mask, softmax, O = P V. The forward saves the logsumexp of
// every query row; the backward recomputes P from it. Tasks run in parallel with OpenMP; the
// bias-table gradient is accumulated per fixed chunk of tasks and the chunks are reduced in a
// fixed order afterwards, so it is deterministic (independent of the thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// The SIMD fast paths: AVX-512 (16-lane, below) or AVX2 + FMA (8-lane, window_attention_avx2.h).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define ALTEROPS_WA_FAST 1
#include <immintrin.h>
#else
#define ALTEROPS_WA_FAST 0
#endif

#include "output_pool.h"

namespace alterops {
namespace window_attention {
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

Geometry make_geometry(const at::Tensor& q, at::IntArrayRef window, at::IntArrayRef shift) {
  Geometry g;
  g.B = q.size(0); g.H = q.size(1); g.W = q.size(2); g.nh = q.size(3); g.d = q.size(4);
  g.wh = window[0]; g.ww = window[1]; g.sh = shift[0]; g.sw = shift[1];
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
  explicit View5(const at::Tensor& t)
      : sb(t.stride(0)), sy(t.stride(1)), sx(t.stride(2)), sh(t.stride(3)), sd(t.stride(4)) {}
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
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
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
void forward_kernel(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const acc_t* table, int64_t table_heads, acc_t scale, scalar_t* out, acc_t* lse) {
  const View5 vq(q), vk(k), vv(v);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const int64_t d = g.d, nh = g.nh, N = g.N, Np = round_up(N, 16);
  const int64_t tsize = (2 * g.wh - 1) * g.tw;
  const int64_t tasks = g.B * g.nWin * nh;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
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
void backward_kernel(const Geometry& g, const at::Tensor& gout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const acc_t* lse_p, const at::Tensor& lse,
                     const acc_t* table, int64_t table_heads, acc_t scale, scalar_t* dq, scalar_t* dk, scalar_t* dv,
                     acc_t* dtable) {
  const View5 vq(q), vk(k), vv(v), vo(out), vg(gout);
  const int64_t ls_b = lse.stride(0), ls_y = lse.stride(1), ls_x = lse.stride(2), ls_h = lse.stride(3);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* gp = gout.data_ptr<scalar_t>();
  const int64_t d = g.d, nh = g.nh, N = g.N, Np = round_up(N, 16);
  const int64_t tsize = (2 * g.wh - 1) * g.tw;
  const int64_t tasks = g.B * g.nWin * nh;
  // Fixed chunks of tasks own one partial bias gradient each (deterministic reduction).
  const int64_t chunk = 64;
  const int64_t nchunks = (tasks + chunk - 1) / chunk;
  std::vector<acc_t> partial(dtable ? nchunks * table_heads * tsize : 0, acc_t(0));
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
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
// Input dtypes of the fast kernels: float32, and bfloat16 through float32 copies.
inline bool takes(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

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

// 2^x, |rel err| ~ 1e-7 (Cephes exp2f polynomial on [-0.5, 0.5]); x = -inf gives 0.
static inline __m512 exp2v(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-200.0f));
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
void forward_small(const Geometry& g, const Plan& pl, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   bool per_head_tiles, float scale, float* out, float* lse) {
  constexpr int LD = 16 * DV;  // row stride of gathered Q and V
  constexpr int LS = 64;       // row stride of S
  const View5 vq(q), vk(k), vv(v);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t d = g.d, nh = g.nh, Np = pl.Np, HW = g.H * g.W;
  const __mmask16 tail = lane_mask(d - 16 * (DV - 1));
  const int64_t rows_cap = Np + 16;
  const int64_t tasks = g.B * g.nWin * nh;
  const float c2 = scale * kLog2e;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
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
        store_scaled_row<DV>(out + ((b * HW + pos[m]) * nh + h) * d, a, _mm512_set1_ps(inv[m]), tail);
      };
      constexpr int R = pv_rows<DV>();
      for (int64_t m0 = 0; m0 < M; m0 += R) {
        pv_rows_c<R, DV, LS>(Sp, m0, Vc, M, epi_o);
        pf.run();
      }
      pf.finish();
    }
  });
}

void forward(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* table,
             int64_t table_heads, float scale, float* out, float* lse) {
  const Plan pl = make_plan(g, table, table_heads, 16);
  if (pl.Np <= 64) {
    dispatch_dv((g.d + 15) / 16, [&](auto dvc) {
      forward_small<decltype(dvc)::value>(g, pl, q, k, v, table && table_heads != 1, scale, out, lse);
    });
    return;
  }
  const View5 vq(q), vk(k), vv(v);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t d = g.d, nh = g.nh, Np = pl.Np, HW = g.H * g.W;
  const int64_t DV = (d + 15) / 16;
  const __mmask16 tail = lane_mask(d - 16 * (DV - 1));
  const int64_t rows_cap = Np + 16;  // row blocks round M up by at most 15
  const int64_t tasks = g.B * g.nWin * nh;
  const float c2 = scale * kLog2e;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
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
          store_scaled_row<DVc>(out + ((b * HW + pos[m]) * nh + h) * d, a, _mm512_set1_ps(inv[m]), tail);
        };
        constexpr int R = pv_rows<DVc>();
        for (int64_t m0 = 0; m0 < M; m0 += R) {
          pv_block<R, DVc>(Sp, Np, m0, vr.p.data(), M, tail, epi_o);
          pf.run();
        }
      });
      pf.finish();
    }
  });
}

void backward(const Geometry& g, const at::Tensor& gout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const float* lse_p, const at::Tensor& lse,
              const float* table, int64_t table_heads, float scale, float* dq, float* dk, float* dv, float* dtable) {
  const Plan pl = make_plan(g, table, table_heads, 16);
  const View5 vq(q), vk(k), vv(v), vo(out), vg(gout);
  const int64_t ls_b = lse.stride(0), ls_y = lse.stride(1), ls_x = lse.stride(2), ls_h = lse.stride(3);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  const float* gp = gout.data_ptr<float>();
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

  at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
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
            store_scaled_row<DVc>(dq + ((b * HW + pos[m]) * nh + h) * d, a, sc, tail);
          };
          pv_all<DVc>(dSp, Np, M, kr.p.data(), M, tail, epi_dq);
          auto epi_kv = [&](int64_t n, __m512* a1, __m512* a2) {
            if (n >= M) return;
            const int64_t o = ((b * HW + pos[n]) * nh + h) * d;
            _Pragma("GCC unroll 32") for (int cc = 0; cc < DVc; ++cc) {
              const __mmask16 km = cc == DVc - 1 ? tail : (__mmask16)0xFFFF;
              _mm512_mask_storeu_ps(dv + o + 16 * cc, km, a1[cc]);
              _mm512_mask_storeu_ps(dk + o + 16 * cc, km, _mm512_mul_ps(a2[cc], sc));
            }
          };
          tn_all<DVc>(Pp, dSp, Np, gr.p.data(), qr.p.data(), M, tail, epi_kv);
        });
      }
      if (dtable) scatter_tiles(g, pl, acc_tiles.data(), touched.data(), partial.data() + c * table_heads * tsize);
    }
  });
  if (dtable != nullptr) reduce_partials(partial, nchunks, table_heads * tsize, dtable);
}

}  // namespace fast
#elif ALTEROPS_WA_FAST
#include "window_attention_avx2.h"
#endif  // __AVX512F__

// ----------------------------------------------------------------------------------------
// Tensor-level entry points
// ----------------------------------------------------------------------------------------
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& bias, at::IntArrayRef window, at::IntArrayRef shift) {
  TORCH_CHECK(q.dim() == 5, "window_attention2d: q must be (B, H, W, heads, head_dim)");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "window_attention2d: q, k, v shapes differ");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "window_attention2d: q, k, v dtypes differ");
  TORCH_CHECK(window.size() == 2 && shift.size() == 2, "window_attention2d: window_size and shift are pairs");
  TORCH_CHECK(window[0] >= 1 && window[1] >= 1, "window_attention2d: window_size must be >= 1");
  TORCH_CHECK(shift[0] >= 0 && shift[0] < window[0] && shift[1] >= 0 && shift[1] < window[1],
              "window_attention2d: shift must be in [0, window_size)");
  if (bias.has_value()) {
    const auto& t = *bias;
    const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == q.size(3)) && t.size(1) == 2 * window[0] - 1 &&
                    t.size(2) == 2 * window[1] - 1,
                "window_attention2d: rel_pos_bias must be (heads or 1, 2wh-1, 2ww-1)");
    TORCH_CHECK(t.scalar_type() == acc, "window_attention2d: rel_pos_bias must be float32 (float64 for float64 q)");
  }
}

std::tuple<at::Tensor, at::Tensor> window_attention2d_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v,
                                                              const std::optional<at::Tensor>& rel_pos_bias,
                                                              at::IntArrayRef window_size, at::IntArrayRef shift,
                                                              double scale) {
  check_inputs(q, k, v, rel_pos_bias, window_size, shift);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // From the CPU output pool: a large fresh output would otherwise take a page fault per 4 KiB
  // page on first touch inside the kernel (~40% of the AlterNet CIFAR forward's time).
  auto out = cpu::new_output(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(acc_type));
  if (q.numel() == 0) return {out, lse};
  const Geometry g = make_geometry(q, window_size, shift);
  at::Tensor table = rel_pos_bias.has_value() ? rel_pos_bias->contiguous() : at::Tensor();
#if ALTEROPS_WA_FAST
  if (fast::takes(q.scalar_type()) && fast::supported(g)) {
    // bfloat16 runs the float32 kernel on float32 copies (the same float32 arithmetic as the
    // bfloat16 kernel below, which loads and widens element by element): 2-3x faster.
    const bool widen = q.scalar_type() != at::kFloat;
    at::Tensor qf = widen ? cpu::float_copy(q) : q, kf = widen ? cpu::float_copy(k) : k;
    at::Tensor vf = widen ? cpu::float_copy(v) : v;
    at::Tensor outf = widen ? cpu::new_output(q.sizes(), q.options().dtype(at::kFloat)) : out;
    fast::forward(g, qf, kf, vf, table.defined() ? table.data_ptr<float>() : nullptr,
                  table.defined() ? table.size(0) : 0, static_cast<float>(scale), outf.data_ptr<float>(),
                  lse.data_ptr<float>());
    if (widen) out.copy_(outf);
    return {out, lse};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "window_attention2d_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(g, q, k, v, table.defined() ? table.data_ptr<acc_t>() : nullptr,
                                    table.defined() ? table.size(0) : 0, static_cast<acc_t>(scale),
                                    out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention2d_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& rel_pos_bias,
    at::IntArrayRef window_size, at::IntArrayRef shift, double scale, bool bias_grad) {
  check_inputs(q, k, v, rel_pos_bias, window_size, shift);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "window_attention2d: grad_out/out shape");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "window_attention2d: grad_out/out dtype");
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.dim() == 4 && lse.scalar_type() == acc_type, "window_attention2d: lse must be (B, H, W, heads)");
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  auto dq = cpu::new_output(q.sizes(), opts);
  auto dk = cpu::new_output(q.sizes(), opts);
  auto dv = cpu::new_output(q.sizes(), opts);
  const bool want_db = bias_grad && rel_pos_bias.has_value();
  auto db = want_db ? at::zeros(rel_pos_bias->sizes(), rel_pos_bias->options()) : at::empty({0}, q.options().dtype(acc_type));
  if (q.numel() == 0) return {dq, dk, dv, db};
  const Geometry g = make_geometry(q, window_size, shift);
  at::Tensor table = rel_pos_bias.has_value() ? rel_pos_bias->contiguous() : at::Tensor();
#if ALTEROPS_WA_FAST
  if (fast::takes(q.scalar_type()) && fast::supported(g)) {
    const bool widen = q.scalar_type() != at::kFloat;  // bfloat16: as in the forward
    auto wide = [&](const at::Tensor& t) { return widen ? cpu::float_copy(t) : t; };
    auto wide_out = [&](const at::Tensor& t) {
      return widen ? cpu::new_output(q.sizes(), q.options().dtype(at::kFloat)) : t;
    };
    at::Tensor dqf = wide_out(dq), dkf = wide_out(dk), dvf = wide_out(dv);
    fast::backward(g, wide(grad_out), wide(q), wide(k), wide(v), wide(out), lse.data_ptr<float>(), lse,
                   table.defined() ? table.data_ptr<float>() : nullptr, table.defined() ? table.size(0) : 0,
                   static_cast<float>(scale), dqf.data_ptr<float>(), dkf.data_ptr<float>(), dvf.data_ptr<float>(),
                   want_db ? db.data_ptr<float>() : nullptr);
    if (widen) {
      dq.copy_(dqf);
      dk.copy_(dkf);
      dv.copy_(dvf);
    }
    return {dq, dk, dv, db};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "window_attention2d_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, acc_t>(g, grad_out, q, k, v, out, lse.data_ptr<acc_t>(), lse,
                                     table.defined() ? table.data_ptr<acc_t>() : nullptr,
                                     table.defined() ? table.size(0) : 0, static_cast<acc_t>(scale),
                                     dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                                     want_db ? db.data_ptr<acc_t>() : nullptr);
  });
  return {dq, dk, dv, db};
}

}  // namespace
}  // namespace window_attention
}  // namespace alterops

TORCH_LIBRARY_FRAGMENT(alterops, m) {
  m.def(
      "window_attention2d_fwd(Tensor q, Tensor k, Tensor v, Tensor? rel_pos_bias, int[2] window_size, "
      "int[2] shift, float scale) -> (Tensor, Tensor)");
  m.def(
      "window_attention2d_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? rel_pos_bias, int[2] window_size, int[2] shift, float scale, bool bias_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(alterops, CPU, m) {
  m.impl("window_attention2d_fwd", &alterops::window_attention::window_attention2d_fwd_cpu);
  m.impl("window_attention2d_bwd", &alterops::window_attention::window_attention2d_bwd_cpu);
}
