// Neighbourhood attention CPU kernels: maps whose windows are whole cells (float32 forward and
// backward as dense attention within each cell).
// Part of neighborhood_attention_cpu.cpp, the one translation unit that includes it (compiled once
// per instruction-set level; everything here has internal linkage).
//
// With the "clamp" border, an axis whose dilation sub-grids are exactly one window long (length ==
// kernel * dilation, not causal) gives every query of a sub-grid the same window: the whole
// sub-grid, whatever the stride (NATTEN's clamp shifts every window into [0, kernel)). When every
// axis is either such an axis or has kernel 1 (the query alone on it), the map falls apart into
// cells of N = kt * kh * kw positions (one residue per split axis, one position per kernel-1 axis)
// whose queries attend to all N keys of their own cell and to nothing else: dense attention per
// cell, with the bias of key minus query per axis in sub-grid steps. This is the shape of every
// dilated layer of DiNAT at 224 x 224 (56 x 56 with dilation 8, 28 x 28 with 4, 14 x 14 with 2, all
// with kernel 7) and of NAT's and DiNAT's last stage (7 x 7, kernel 7). The general routes handle
// such maps as rows of border slots (a cell narrower than a vector, windows gathered per slot, one
// parallel region per dilation sub-grid); here a cell is two small matrix products:
//   S[j][q] = scale q . k_j + bias (keys j in rows, queries q in the lanes: the softmax over j is
//   lane-wise, no horizontal reductions), P = exp(S - m), out[q] = sum_j P[j][q] v_j / l[q]
// with the queries transposed once per cell, the keys and values read in place, and the output
// rows written in place. The backward recomputes P from the saved logsumexp:
//   dP[j][q] = dout_q . v_j, dS = P (dP - delta + dlse), delta[q] = sum_j P dP,
//   dq = scale sum_j dS[j][q] k_j, dk_j = scale sum_q dS[j][q] q_q, dv_j = sum_q P[j][q] dout_q,
// a task per (batch, key/value head, run of cells) summing the grouped query heads' dK/dV in turn
// (each key belongs to one cell: dk and dv are written once, by that task), dbias per task and then
// summed in task order (the split depends on the shapes only: the same bits for any thread count).
#pragma once

#include "neighborhood_attention.h"
#include "neighborhood_cpu_forward.h"  // softmax_block
#include "neighborhood_cpu_simd.h"
#include "neighborhood_cpu_tiles.h"

namespace alterops {
namespace neighborhood {
namespace {

// Register blocks: logits tiles of kCellTJ keys by kCellQC query vectors; weighted row sums (P.V,
// dS.K, dK, dV) of up to kCellAcc accumulators, at most kCellDC channel vectors at a time.
#if defined(__AVX512F__)
constexpr int kCellTJ = 6, kCellQC = 4, kCellAcc = 24, kCellDC = 4;
#elif NA_AVX2
constexpr int kCellTJ = 6, kCellQC = 2, kCellAcc = 10, kCellDC = 2;
#else  // 64-byte vectors of four SSE registers each
constexpr int kCellTJ = 2, kCellQC = 1, kCellAcc = 2, kCellDC = 1;
#endif
// Queries per weighted-row tile at DC channel vectors
template <int DC>
constexpr int cell_tq() {
  return kCellAcc / DC > 0 ? kCellAcc / DC : 1;
}
// Whether the float32 op with these inputs takes the cell route (see the top of this file).
static bool cells_route(const View6& q, const View6& k, const View6& v, const View6* dout, const Window& w) {
  return whole_window_cells(q.size + 1, w) && q.size[5] % 16 == 0 && q.stride[5] == 1 && k.stride[5] == 1 &&
         v.stride[5] == 1 && (dout == nullptr || dout->stride[5] == 1);
}

// The cells: cell c (one residue per split axis, one position per kernel-1 axis) and member n
// (its index along each axis of the window, row-major) sit at position c_a + step_a * i_a.
struct Cells {
  int64_t B, NH, NKV, G, D, DV;
  int64_t k[3], step[3], cnt[3], L[3];
  int64_t N, Np, ncell, S;  // members, members rounded up to the vector, cells per (batch, head), positions
  int64_t nbt = 0;          // bias table entries per head
  std::vector<int64_t> mflat;  // [N] member offset in the flattened (T, H, W) positions
  std::vector<int32_t> bidx;   // [N * N] bias table index of key j for query q at [j * N + q]

  Cells(const View6& q, const View6& kk, const Window& w) {
    B = q.size[0];
    NH = q.size[4];
    NKV = kk.size[4];
    G = NH / NKV;
    D = q.size[5];
    DV = D / VecOf<float>::N;
    N = 1;
    ncell = 1;
    for (int a = 0; a < 3; ++a) {
      L[a] = q.size[1 + a];
      k[a] = w.kernel[a];
      step[a] = k[a] > 1 ? w.dilation[a] : 0;
      cnt[a] = k[a] > 1 ? w.dilation[a] : L[a];
      N *= k[a];
      ncell *= cnt[a];
    }
    S = L[0] * L[1] * L[2];
    Np = (N + VecOf<float>::N - 1) / VecOf<float>::N * VecOf<float>::N;
    mflat.resize(N);
    for (int64_t n = 0; n < N; ++n) {
      int64_t i[3];
      member(n, i);
      mflat[n] = ((i[0] * step[0]) * L[1] + i[1] * step[1]) * L[2] + i[2] * step[2];
    }
    nbt = (2 * k[0] - 1) * (2 * k[1] - 1) * (2 * k[2] - 1);
    bidx.resize(N * N);
    for (int64_t j = 0; j < N; ++j)
      for (int64_t qn = 0; qn < N; ++qn) {
        int64_t ij[3], iq[3];
        member(j, ij);
        member(qn, iq);
        bidx[j * N + qn] =
            (int32_t)(((ij[0] - iq[0] + k[0] - 1) * (2 * k[1] - 1) + ij[1] - iq[1] + k[1] - 1) * (2 * k[2] - 1) +
                      ij[2] - iq[2] + k[2] - 1);
      }
  }
  void member(int64_t n, int64_t i[3]) const {
    i[2] = n % k[2];
    i[1] = n / k[2] % k[1];
    i[0] = n / (k[2] * k[1]);
  }
  // position of cell c's base on each axis
  void base(int64_t c, int64_t p[3]) const {
    p[2] = c % cnt[2];
    p[1] = c / cnt[2] % cnt[1];
    p[0] = c / (cnt[2] * cnt[1]);
  }
  // flattened position of cell c's base
  int64_t cell_flat(int64_t c) const {
    int64_t p[3];
    base(c, p);
    return (p[0] * L[1] + p[1]) * L[2] + p[2];
  }
};

// The tokens of one tensor's cells: rows(b, h, cell, r) sets r[n] to member n's token (head h).
struct CellRows {
  const float* data;
  const int64_t* st;  // the view's strides
  const Cells* c;
  std::vector<int64_t> rel;  // [N] member offset from the cell's base
  CellRows(const View6& t, const Cells& cells) : data(static_cast<const float*>(t.data)), st(t.stride), c(&cells) {
    rel.resize(c->N);
    for (int64_t n = 0; n < c->N; ++n) {
      int64_t i[3];
      c->member(n, i);
      rel[n] = i[0] * c->step[0] * st[1] + i[1] * c->step[1] * st[2] + i[2] * c->step[2] * st[3];
    }
  }
  const float* base(int64_t b, int64_t h, int64_t cell) const {
    int64_t p[3];
    c->base(cell, p);
    return data + b * st[0] + p[0] * st[1] + p[1] * st[2] + p[2] * st[3] + h * st[4];
  }
  void rows(int64_t b, int64_t h, int64_t cell, const float** r) const {
    const float* p = base(b, h, cell);
    for (int64_t n = 0; n < c->N; ++n) r[n] = p + rel[n];
  }
  // Prefetches the cell's tokens into L1 (a cell's tokens lie far apart when dilated: the hardware
  // prefetchers do not follow them).
  void prefetch(int64_t b, int64_t h, int64_t cell) const {
    const float* p = base(b, h, cell);
    for (int64_t n = 0; n < c->N; ++n)
      for (int64_t e = 0; e < c->D; e += 16) __builtin_prefetch(p + rel[n] + e, 0, 3);
  }
};

// S[t * ss + v * V + lane] = sum_c A[t][c] * XT[c * xs + v * V + lane] for t < TJ, v < QC.
template <int TJ, int QC>
NA_TILE void cell_dots(const float* const* A, const float* XT, int64_t xs, int64_t D, float* S, int64_t ss) {
  constexpr int V = VecOf<float>::N;
  Vec<float> acc[TJ][QC];
  NA_UNROLL
  for (int t = 0; t < TJ; ++t)
    NA_UNROLL
    for (int u = 0; u < QC; ++u) acc[t][u] = splat<float>(0.0f);
  const float* a[TJ];
  NA_UNROLL
  for (int t = 0; t < TJ; ++t) a[t] = A[t];
  for (int64_t c = 0; c < D; ++c) {
    Vec<float> x[QC];
    NA_UNROLL
    for (int u = 0; u < QC; ++u) {
      x[u] = loadu(XT + c * xs + u * V);
      pin_register(x[u]);
    }
    NA_UNROLL
    for (int t = 0; t < TJ; ++t) {
      const Vec<float> s = splat<float>(a[t][c]);
      NA_UNROLL
      for (int u = 0; u < QC; ++u) acc[t][u] += s * x[u];
    }
  }
  NA_UNROLL
  for (int t = 0; t < TJ; ++t)
    NA_UNROLL
    for (int u = 0; u < QC; ++u) storeu(S + t * ss + u * V, acc[t][u]);
}

// S[j][0:np] (rows np apart) = A[j] . XT[:, 0:np] for j < n: the logits of n keys (rows A) with
// np query lanes of XT ([D][np], np a multiple of the vector).
static void cell_logits(const float* const* A, int64_t n, const float* XT, int64_t np, int64_t D, float* S) {
  constexpr int V = VecOf<float>::N;
  const int64_t nv = np / V;
  for (int64_t v0 = 0; v0 < nv; v0 += kCellQC)
    dispatch_nc(std::min<int64_t>(kCellQC, nv - v0), [&](auto qcv) {
      constexpr int QC = decltype(qcv)::value;
      if constexpr (QC <= kCellQC) {
        int64_t j = 0;
        for (; j + kCellTJ <= n; j += kCellTJ) cell_dots<kCellTJ, QC>(A + j, XT + v0 * V, np, D, S + j * np + v0 * V, np);
        for (; j < n; ++j) cell_dots<1, QC>(A + j, XT + v0 * V, np, D, S + j * np + v0 * V, np);
      }
    });
}

// acc[t][d] = sum_{m < nm} W[t * wt + m * wm] * X[m][c0 + d * V + lane] for t < TQ, d < DC.
template <int TQ, int DC>
NA_TILE void cell_mix(const float* W, int64_t wt, int64_t wm, int64_t nm, const float* const* X, int64_t c0,
                      Vec<float> (&acc)[TQ][DC]) {
  constexpr int V = VecOf<float>::N;
  NA_UNROLL
  for (int t = 0; t < TQ; ++t)
    NA_UNROLL
    for (int d = 0; d < DC; ++d) acc[t][d] = splat<float>(0.0f);
  for (int64_t m = 0; m < nm; ++m) {
    Vec<float> x[DC];
    NA_UNROLL
    for (int d = 0; d < DC; ++d) {
      x[d] = loadu(X[m] + c0 + d * V);
      pin_register(x[d]);
    }
    const float* w = W + m * wm;
    NA_UNROLL
    for (int t = 0; t < TQ; ++t) {
      const Vec<float> s = splat<float>(w[t * wt]);
      NA_UNROLL
      for (int d = 0; d < DC; ++d) acc[t][d] += s * x[d];
    }
  }
}

// Calls f(dcv) with the channel block DC (the largest divisor of DV of at most kCellDC).
template <class F>
static inline void with_cell_dc(int64_t DV, F&& f) {
  if constexpr (kCellDC >= 4)
    if (DV % 4 == 0) return f(std::integral_constant<int, 4>{});
  if constexpr (kCellDC >= 3)
    if (DV % 3 == 0) return f(std::integral_constant<int, 3>{});
  if constexpr (kCellDC >= 2)
    if (DV % 2 == 0) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

// For t < nt rows: acc[t][d] for the channel blocks at c0 = dc V, where acc sums nm weighted rows
// X (weights W[t * wt + m * wm]); store(t, c0, acc_row, DC) writes them. Rows in tiles of TQ, then
// of 4, then one at a time (a cell of 49 queries is 4 tiles of 12 and one row at AVX-512).
template <class Store>
static void cell_mix_rows(const float* W, int64_t wt, int64_t wm, int64_t nt, int64_t nm, const float* const* X,
                          int64_t DV, const Store& store) {
  constexpr int V = VecOf<float>::N;
  with_cell_dc(DV, [&](auto dcv) {
    constexpr int DC = decltype(dcv)::value;
    for (int64_t dc = 0; dc < DV; dc += DC) {
      int64_t t0 = 0;
      auto tiles = [&](auto tqv) {
        constexpr int TQ = decltype(tqv)::value;
        for (; t0 + TQ <= nt; t0 += TQ) {
          Vec<float> acc[TQ][DC];
          cell_mix<TQ, DC>(W + t0 * wt, wt, wm, nm, X, dc * V, acc);
          NA_UNROLL
          for (int t = 0; t < TQ; ++t) store(t0 + t, dc * V, acc[t], std::integral_constant<int, DC>{});
        }
      };
      tiles(std::integral_constant<int, cell_tq<DC>()>{});
      if constexpr (cell_tq<DC>() > 4) tiles(std::integral_constant<int, 4>{});
      if constexpr (cell_tq<DC>() > 1) tiles(std::integral_constant<int, 1>{});
    }
  });
}

// Thread-local buffers of one cell.
struct CellBufs {
  Buf<float> xt, dot, s, p, inv, lv, dlv, dkv;  // (inv: forward; dot, lv, dlv, dkv: backward)
  std::vector<const float*> qr, kr, vr, dr;
  CellBufs(const Cells& c, bool backward) {
    xt.assign(c.D * c.Np, 0.0f);
    s.assign(c.N * c.Np, 0.0f);
    p.assign(c.N * c.Np, 0.0f);
    inv.assign(c.Np, 0.0f);
    qr.resize(c.N + VecOf<float>::N);
    kr.resize(c.N);
    vr.resize(c.N);
    if (backward) {
      dot.assign(c.D * c.Np, 0.0f);
      lv.assign(c.Np, 0.0f);
      dlv.assign(c.Np, 0.0f);
      dkv.assign(2 * c.N * c.D, 0.0f);
      dr.resize(c.N + VecOf<float>::N);
    }
  }
};

// XT[c][n] = mul * rows[n][c] for n < N (zero lanes up to Np).
static void cell_transpose(const Cells& c, const float** rows, float mul, float* XT) {
  constexpr int V = VecOf<float>::N;
  for (int64_t n = c.N; n < c.Np; ++n) rows[n] = nullptr;
  for (int64_t n0 = 0; n0 < c.Np; n0 += V) NA_TRANSPOSE_BLK(rows + n0, c.D, mul, XT + n0, c.Np);
}

// The bias matrices: Bm[ht][j][q] (q < Np; zero past N).
static Buf<float> cell_bias(const Cells& c, const float* table, int64_t nht) {
  Buf<float> bm(nht * c.N * c.Np, 0.0f);
  for (int64_t ht = 0; ht < nht; ++ht)
    for (int64_t j = 0; j < c.N; ++j)
      for (int64_t q = 0; q < c.N; ++q) bm[(ht * c.N + j) * c.Np + q] = table[ht * c.nbt + c.bidx[j * c.N + q]];
  return bm;
}

// S += the bias matrix of table head ht (rows j < N).
static void cell_add_bias(const Cells& c, const Buf<float>& bm, int64_t ht, float* S) {
  constexpr int V = VecOf<float>::N;
  const float* b = bm.data() + ht * c.N * c.Np;
  for (int64_t e = 0; e < c.N * c.Np; e += V) storeu(S + e, loadu(S + e) + loadu(b + e));
}

static void forward_cells(const ForwardArgs& a, const Parallel& par) {
  constexpr int V = VecOf<float>::N;
  const Cells c(a.q, a.k, a.win);
  const float scale = (float)a.scale;
  const float* table = static_cast<const float*>(a.bias);
  const Buf<float> bm = table ? cell_bias(c, table, a.bias_heads) : Buf<float>();
  float* out = static_cast<float*>(a.out);
  float* lse = static_cast<float*>(a.lse);
  const CellRows qrows(a.q, c), krows(a.k, c), vrows(a.v, c);
  // task (batch, cell, head): the heads of a cell innermost (their tokens share cache lines)
  const int64_t ntask = c.B * c.NH * c.ncell;
  auto decode = [&](int64_t t, int64_t& b, int64_t& cell, int64_t& h) {
    h = t % c.NH;
    cell = t / c.NH % c.ncell;
    b = t / (c.ncell * c.NH);
  };
  par.for_tasks(ntask, [&](auto next) {
    CellBufs w(c, false);
    int64_t task;
    while (next(task)) {
      int64_t b, cell, h;
      decode(task, b, cell, h);
      const int64_t hk = h / c.G, p0 = c.cell_flat(cell);
      qrows.rows(b, h, cell, w.qr.data());
      krows.rows(b, hk, cell, w.kr.data());
      vrows.rows(b, hk, cell, w.vr.data());
      if (task + 1 < ntask) {  // the next task's tokens (most often the next one this thread takes)
        int64_t b1, cell1, h1;
        decode(task + 1, b1, cell1, h1);
        qrows.prefetch(b1, h1, cell1);
        if (h1 / c.G != hk || cell1 != cell) {
          krows.prefetch(b1, h1 / c.G, cell1);
          vrows.prefetch(b1, h1 / c.G, cell1);
        }
      }
      cell_transpose(c, w.qr.data(), scale, w.xt.data());
      float* S = w.s.data();
      cell_logits(w.kr.data(), c.N, w.xt.data(), c.Np, c.D, S);
      if (table) cell_add_bias(c, bm, a.bias_heads == 1 ? 0 : h, S);
      // softmax over the keys j, lane-wise per query
      float* L = lse + (b * c.NH + h) * c.S + p0;
      for (int64_t v0 = 0; v0 < c.Np; v0 += V) {
        Vec<float> m, l;
        softmax_block(S + v0, c.Np, c.N, m, l);
        storeu(w.inv.data() + v0, 1.0f / l);
        const Vec<float> ls = m + vlog(l);
        for (int lane = 0; lane < V && v0 + lane < c.N; ++lane) L[c.mflat[v0 + lane]] = ls[lane];
      }
      // out[q] = sum_j P[j][q] v_j / l[q]
      const float* inv = w.inv.data();
      float* O = out + (b * c.S + p0) * c.NH * c.D + h * c.D;
      const int64_t ostr = c.NH * c.D;
      cell_mix_rows(S, 1, c.Np, c.N, c.N, w.vr.data(), c.DV, [&](int64_t q, int64_t c0, const auto& acc, auto dcv) {
        constexpr int DC = decltype(dcv)::value;
        const Vec<float> s = splat<float>(inv[q]);
        float* o = O + c.mflat[q] * ostr + c0;
        NA_UNROLL
        for (int d = 0; d < DC; ++d) storeu(o + d * V, acc[d] * s);
      });
    }
  });
}

static void backward_cells(const BackwardArgs& a, const Parallel& par) {
  constexpr int V = VecOf<float>::N;
  const Cells c(a.q, a.k, a.win);
  const float scale = (float)a.scale;
  const float* table = static_cast<const float*>(a.bias);
  const Buf<float> bm = table ? cell_bias(c, table, a.bias_heads) : Buf<float>();
  const float* lse = static_cast<const float*>(a.lse);
  const float* dlse = static_cast<const float*>(a.dlse);
  float* dq = static_cast<float*>(a.dq);
  float* dk = static_cast<float*>(a.dk);
  float* dv = static_cast<float*>(a.dv);
  float* dbias = static_cast<float*>(a.dbias);
  // tasks: (batch, key/value head, run of cpt cells), at most about 2048 of them (their dbias
  // partials are kept until the ordered sum); the split depends on the shapes only
  const int64_t BK = c.B * c.NKV;
  const int64_t cpt = std::max<int64_t>(1, (BK * c.ncell + 2047) / 2048);
  const int64_t runs = (c.ncell + cpt - 1) / cpt, ntask = BK * runs;
  const int64_t gb = a.bias_heads == 1 ? 1 : c.G;  // dbias tables per task
  // task (batch, run, key/value head)
  auto decode = [&](int64_t t, int64_t& b, int64_t& run, int64_t& hk) {
    hk = t % c.NKV;
    run = t / c.NKV % runs;
    b = t / (runs * c.NKV);
  };
  Buf<float> dbp(dbias ? ntask * gb * c.nbt : 0, 0.0f);
  const CellRows qrows(a.q, c), krows(a.k, c), vrows(a.v, c), drows(a.dout, c);
  par.for_tasks(ntask, [&](auto next) {
    CellBufs w(c, true);
    int64_t task;
    while (next(task)) {
      int64_t b, run, hk;
      decode(task, b, run, hk);
      float* dbt = dbias ? dbp.data() + task * gb * c.nbt : nullptr;
      for (int64_t cell = run * cpt; cell < std::min(c.ncell, (run + 1) * cpt); ++cell) {
        const int64_t p0 = c.cell_flat(cell);
        krows.rows(b, hk, cell, w.kr.data());
        vrows.rows(b, hk, cell, w.vr.data());
        float* dK = w.dkv.data();
        float* dV = dK + c.N * c.D;
        for (int64_t g = 0; g < c.G; ++g) {
          const int64_t h = hk * c.G + g;
          qrows.rows(b, h, cell, w.qr.data());
          drows.rows(b, h, cell, w.dr.data());
          if (g + 1 < c.G) {  // the next query head's tokens
            qrows.prefetch(b, h + 1, cell);
            drows.prefetch(b, h + 1, cell);
          } else {  // the next cell's: this task's next, or the next task's first
            int64_t b1 = b, hk1 = hk, cell1 = cell + 1;
            if (cell1 == std::min(c.ncell, (run + 1) * cpt)) {
              int64_t run1;
              decode(task + 1, b1, run1, hk1);
              cell1 = run1 * cpt;
            }
            if (b1 < c.B) {
              krows.prefetch(b1, hk1, cell1);
              vrows.prefetch(b1, hk1, cell1);
              qrows.prefetch(b1, hk1 * c.G, cell1);
              drows.prefetch(b1, hk1 * c.G, cell1);
            }
          }
          cell_transpose(c, w.qr.data(), scale, w.xt.data());
          cell_transpose(c, w.dr.data(), 1.0f, w.dot.data());
          float* P = w.p.data();
          float* dS = w.s.data();
          cell_logits(w.kr.data(), c.N, w.xt.data(), c.Np, c.D, P);
          if (table) cell_add_bias(c, bm, a.bias_heads == 1 ? 0 : h, P);
          cell_logits(w.vr.data(), c.N, w.dot.data(), c.Np, c.D, dS);  // dP
          const int64_t lo = (b * c.NH + h) * c.S + p0;
          for (int64_t n = 0; n < c.N; ++n) {
            w.lv[n] = lse[lo + c.mflat[n]];
            w.dlv[n] = dlse ? dlse[lo + c.mflat[n]] : 0.0f;
          }
          for (int64_t v0 = 0; v0 < c.Np; v0 += V) {
            const Vec<float> l = loadu(w.lv.data() + v0);
            Vec<float> delta = splat<float>(0.0f);
            for (int64_t j = 0; j < c.N; ++j) {
              const Vec<float> pj = vexp(loadu(P + j * c.Np + v0) - l);
              storeu(P + j * c.Np + v0, pj);
              delta += pj * loadu(dS + j * c.Np + v0);
            }
            const Vec<float> sub = delta - loadu(w.dlv.data() + v0);
            for (int64_t j = 0; j < c.N; ++j)
              storeu(dS + j * c.Np + v0, loadu(P + j * c.Np + v0) * (loadu(dS + j * c.Np + v0) - sub));
          }
          if (dbt) {
            float* db = dbt + (gb == 1 ? 0 : g) * c.nbt;
            for (int64_t j = 0; j < c.N; ++j)
              for (int64_t q = 0; q < c.N; ++q) db[c.bidx[j * c.N + q]] += dS[j * c.Np + q];
          }
          // dq[q] = scale sum_j dS[j][q] k_j (each query's row written by this task alone)
          float* DQ = dq + (b * c.S + p0) * c.NH * c.D + h * c.D;
          const int64_t qstr = c.NH * c.D;
          cell_mix_rows(dS, 1, c.Np, c.N, c.N, w.kr.data(), c.DV, [&](int64_t q, int64_t c0, const auto& acc, auto dcv) {
            constexpr int DC = decltype(dcv)::value;
            float* o = DQ + c.mflat[q] * qstr + c0;
            NA_UNROLL
            for (int d = 0; d < DC; ++d) storeu(o + d * V, acc[d] * scale);
          });
          // dK[j] (+)= sum_q dS[j][q] q_q, dV[j] (+)= sum_q P[j][q] dout_q (the query heads in turn)
          auto sum_into = [&](float* dst) {
            return [&, dst](int64_t j, int64_t c0, const auto& acc, auto dcv) {
              constexpr int DC = decltype(dcv)::value;
              float* o = dst + j * c.D + c0;
              NA_UNROLL
              for (int d = 0; d < DC; ++d) storeu(o + d * V, g == 0 ? acc[d] : loadu(o + d * V) + acc[d]);
            };
          };
          cell_mix_rows(dS, c.Np, 1, c.N, c.N, w.qr.data(), c.DV, sum_into(dK));
          cell_mix_rows(P, c.Np, 1, c.N, c.N, w.dr.data(), c.DV, sum_into(dV));
        }
        float* DK = dk + (b * c.S + p0) * c.NKV * c.D + hk * c.D;
        float* DVo = dv + (b * c.S + p0) * c.NKV * c.D + hk * c.D;
        const int64_t kstr = c.NKV * c.D;
        const Vec<float> sv = splat<float>(scale);
        for (int64_t j = 0; j < c.N; ++j)
          for (int64_t e = 0; e < c.D; e += V) {
            storeu(DK + c.mflat[j] * kstr + e, loadu(dK + j * c.D + e) * sv);
            storeu(DVo + c.mflat[j] * kstr + e, loadu(dV + j * c.D + e));
          }
      }
    }
  });
  if (dbias) {
    const int64_t tabs = a.bias_heads * c.nbt;
    std::fill(dbias, dbias + tabs, 0.0f);
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t hk = t % c.NKV;
      for (int64_t g = 0; g < gb; ++g) {
        float* dst = dbias + (a.bias_heads == 1 ? 0 : hk * c.G + g) * c.nbt;
        const float* src = dbp.data() + (t * gb + g) * c.nbt;
        for (int64_t e = 0; e < c.nbt; ++e) dst[e] += src[e];
      }
    }
  }
}

}  // namespace
}  // namespace neighborhood
}  // namespace alterops
