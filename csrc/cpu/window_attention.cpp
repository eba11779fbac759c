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
#include <vector>

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

// Per-thread scratch of one task.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> Q, Kt, K, V, Vt, S, O, dO, dQ, dK, dV, D, lse;
  void resize(int64_t N, int64_t Np, int64_t d, bool backward) {
    Q.assign(N * d, 0); Kt.assign(d * Np, 0); V.assign(N * d, 0); S.assign(N * Np, 0);
    if (backward) {
      K.assign(N * d, 0); Vt.assign(d * Np, 0); O.assign(N * d, 0); dO.assign(N * d, 0);
      dQ.assign(N * d, 0); dK.assign(N * d, 0); dV.assign(N * d, 0); D.assign(N, 0); lse.assign(N, 0);
    }
  }
};

// logits of row m into s[0..M): scale*q.k (Q pre-scaled) + bias + region mask (-inf).
template <typename acc_t>
inline void logits_row(acc_t* s, const acc_t* qrow, const acc_t* Kt, int64_t Np, int64_t d, int64_t M,
                       const acc_t* table_h, const int32_t* keyofs, int32_t qofs, const int32_t* region,
                       bool mixed, int32_t reg_m) {
#pragma omp simd
  for (int64_t n = 0; n < Np; ++n) s[n] = 0;
  for (int64_t e = 0; e < d; ++e) {
    const acc_t qe = qrow[e];
    const acc_t* kt = Kt + e * Np;
#pragma omp simd
    for (int64_t n = 0; n < Np; ++n) s[n] += qe * kt[n];
  }
  if (table_h != nullptr) {
    const acc_t* tq = table_h + qofs;
    for (int64_t n = 0; n < M; ++n) s[n] += tq[keyofs[n]];
  }
  if (mixed) {
    for (int64_t n = 0; n < M; ++n)
      if (region[n] != reg_m) s[n] = -std::numeric_limits<acc_t>::infinity();
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
    sc.resize(N, Np, d, false);
    std::vector<acc_t> orow(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % nh;
      const int64_t win = (task / nh) % g.nWin;
      const int64_t b = task / (nh * g.nWin);
      const int64_t M = g.count[win];
      if (M == 0) continue;
      const int32_t* pos = g.pos.data() + win * N;
      const int32_t* keyofs = g.keyofs.data() + win * N;
      const int32_t* qryofs = g.qryofs.data() + win * N;
      const int32_t* region = g.region.data() + win * N;
      const bool mixed = g.mixed[win] != 0;
      const acc_t* table_h = table ? table + (table_heads == 1 ? 0 : h) * tsize : nullptr;
      std::fill(sc.Kt.begin(), sc.Kt.end(), acc_t(0));
      for (int64_t m = 0; m < M; ++m) {
        gather_row(sc.Q.data() + m * d, qp + vq.row(b, pos[m], g.W, h), vq.sd, d, scale);
        gather_row(sc.V.data() + m * d, vp + vv.row(b, pos[m], g.W, h), vv.sd, d, acc_t(1));
        const scalar_t* kr = kp + vk.row(b, pos[m], g.W, h);
        for (int64_t e = 0; e < d; ++e) sc.Kt[e * Np + m] = to_acc(kr[e * vk.sd]);
      }
      for (int64_t m = 0; m < M; ++m) {
        acc_t* s = sc.S.data() + m * Np;
        logits_row(s, sc.Q.data() + m * d, sc.Kt.data(), Np, d, M, table_h, keyofs, qryofs[m], region, mixed,
                   region[m]);
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
        std::fill(orow.begin(), orow.end(), acc_t(0));
        for (int64_t n = 0; n < M; ++n) {
          const acc_t p = s[n];
          const acc_t* vr = sc.V.data() + n * d;
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) orow[e] += p * vr[e];
        }
        const acc_t inv = acc_t(1) / sum;
        const int64_t o = ((b * g.H * g.W + pos[m]) * nh + h);
        scalar_t* dst = out + o * d;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<scalar_t>(orow[e] * inv);
        lse[o] = mx + std::log(sum);
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
    sc.resize(N, Np, d, true);
    std::vector<acc_t> dprow(Np);
    for (int64_t c = cbegin; c < cend; ++c) {
      acc_t* part = dtable ? partial.data() + c * table_heads * tsize : nullptr;
      for (int64_t task = c * chunk; task < std::min(tasks, (c + 1) * chunk); ++task) {
        const int64_t h = task % nh;
        const int64_t win = (task / nh) % g.nWin;
        const int64_t b = task / (nh * g.nWin);
        const int64_t M = g.count[win];
        if (M == 0) continue;
        const int32_t* pos = g.pos.data() + win * N;
        const int32_t* keyofs = g.keyofs.data() + win * N;
        const int32_t* qryofs = g.qryofs.data() + win * N;
        const int32_t* region = g.region.data() + win * N;
        const bool mixed = g.mixed[win] != 0;
        const int64_t th = table_heads == 1 ? 0 : h;
        const acc_t* table_h = table ? table + th * tsize : nullptr;
        acc_t* part_h = part ? part + th * tsize : nullptr;
        std::fill(sc.Kt.begin(), sc.Kt.end(), acc_t(0));
        std::fill(sc.Vt.begin(), sc.Vt.end(), acc_t(0));
        std::fill(sc.dK.begin(), sc.dK.begin() + M * d, acc_t(0));
        std::fill(sc.dV.begin(), sc.dV.begin() + M * d, acc_t(0));
        for (int64_t m = 0; m < M; ++m) {
          const int64_t p = pos[m];
          gather_row(sc.Q.data() + m * d, qp + vq.row(b, p, g.W, h), vq.sd, d, scale);
          gather_row(sc.K.data() + m * d, kp + vk.row(b, p, g.W, h), vk.sd, d, acc_t(1));
          gather_row(sc.V.data() + m * d, vp + vv.row(b, p, g.W, h), vv.sd, d, acc_t(1));
          gather_row(sc.O.data() + m * d, op + vo.row(b, p, g.W, h), vo.sd, d, acc_t(1));
          gather_row(sc.dO.data() + m * d, gp + vg.row(b, p, g.W, h), vg.sd, d, acc_t(1));
          for (int64_t e = 0; e < d; ++e) {
            sc.Kt[e * Np + m] = sc.K[m * d + e];
            sc.Vt[e * Np + m] = sc.V[m * d + e];
          }
          acc_t D = 0;
          for (int64_t e = 0; e < d; ++e) D += sc.dO[m * d + e] * sc.O[m * d + e];
          sc.D[m] = D;
          sc.lse[m] = lse_p[b * ls_b + (p / g.W) * ls_y + (p % g.W) * ls_x + h * ls_h];
        }
        for (int64_t m = 0; m < M; ++m) {
          acc_t* s = sc.S.data() + m * Np;
          logits_row(s, sc.Q.data() + m * d, sc.Kt.data(), Np, d, M, table_h, keyofs, qryofs[m], region, mixed,
                     region[m]);
          const acc_t l = sc.lse[m];
#pragma omp simd
          for (int64_t n = 0; n < M; ++n) {
            const acc_t e = exp_approx(s[n] - l);
            s[n] = s[n] == ninf ? acc_t(0) : e;  // P
          }
          // dP = dO V^T
          const acc_t* dorow = sc.dO.data() + m * d;
#pragma omp simd
          for (int64_t n = 0; n < Np; ++n) dprow[n] = 0;
          for (int64_t e = 0; e < d; ++e) {
            const acc_t ge = dorow[e];
            const acc_t* vt = sc.Vt.data() + e * Np;
#pragma omp simd
            for (int64_t n = 0; n < Np; ++n) dprow[n] += ge * vt[n];
          }
          // dV += P^T dO ; dS = P (dP - D)
          const acc_t Dm = sc.D[m];
          for (int64_t n = 0; n < M; ++n) {
            const acc_t pn = s[n];
            acc_t* dvr = sc.dV.data() + n * d;
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) dvr[e] += pn * dorow[e];
          }
#pragma omp simd
          for (int64_t n = 0; n < M; ++n) s[n] = s[n] * (dprow[n] - Dm);  // dS (logit gradient)
          if (part_h != nullptr) {
            acc_t* pq = part_h + qryofs[m];
            for (int64_t n = 0; n < M; ++n) pq[keyofs[n]] += s[n];
          }
          // dQ = scale * dS K ; dK += scale * dS^T Q   (Q is pre-scaled)
          acc_t* dqr = sc.dQ.data() + m * d;
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) dqr[e] = 0;
          const acc_t* qr = sc.Q.data() + m * d;
          for (int64_t n = 0; n < M; ++n) {
            const acc_t ds = s[n];
            const acc_t* kr = sc.K.data() + n * d;
            acc_t* dkr = sc.dK.data() + n * d;
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) {
              dqr[e] += ds * kr[e];
              dkr[e] += ds * qr[e];
            }
          }
        }
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
  if (dtable != nullptr) {
    const int64_t n = table_heads * tsize;
    for (int64_t i = 0; i < n; ++i) dtable[i] = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      const acc_t* p = partial.data() + c * n;
      for (int64_t i = 0; i < n; ++i) dtable[i] += p[i];
    }
  }
}

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
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(acc_type));
  if (q.numel() == 0) return {out, lse};
  const Geometry g = make_geometry(q, window_size, shift);
  at::Tensor table = rel_pos_bias.has_value() ? rel_pos_bias->contiguous() : at::Tensor();
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
  auto dq = at::empty(q.sizes(), opts);
  auto dk = at::empty(q.sizes(), opts);
  auto dv = at::empty(q.sizes(), opts);
  const bool want_db = bias_grad && rel_pos_bias.has_value();
  auto db = want_db ? at::zeros(rel_pos_bias->sizes(), rel_pos_bias->options()) : at::empty({0}, q.options().dtype(acc_type));
  if (q.numel() == 0) return {dq, dk, dv, db};
  const Geometry g = make_geometry(q, window_size, shift);
  at::Tensor table = rel_pos_bias.has_value() ? rel_pos_bias->contiguous() : at::Tensor();
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
