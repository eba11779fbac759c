// Neighbourhood attention CPU kernels: the plan (windows, slot order, bias columns: everything
// that depends on the shapes only), key views, and the per-task packed key rows.
// Part of neighborhood_attention_cpu.cpp, the one translation unit that includes it (compiled once
// per instruction-set level; everything here has internal linkage).
#pragma once

#include "neighborhood_attention.h"
#include "neighborhood_cpu_simd.h"

namespace alterops {
namespace neighborhood {
namespace {

// Window slot j in [0, k) of query i on one axis of length L (see neighborhood_attention.h):
// pos[j] its key position and valid[j] whether that is a key of the query. "mask"/"zero"
// slots outside [0, L) are not (pos lies outside); nor are the slots past the end of a causal
// window that holds fewer than k keys (pos = i there, which keeps the bias index in the table).
static void axis_window(int64_t i, int64_t L, int64_t k, int64_t d, int64_t s, bool causal, int border,
                        int64_t* pos, uint8_t* valid) {
  const int64_t left = k / 2, right = k / 2 + k % 2 - 1;
  if (border != kClamp) {
    for (int64_t j = 0; j < k; ++j) {
      pos[j] = i + d * (j - left);
      valid[j] = pos[j] >= 0 && pos[j] < L;
    }
    return;
  }
  // within i's dilation sub-grid: res + d * index, index in [0, Lg)
  const int64_t res = i % d, Lg = (L - res + d - 1) / d, ig = i / d;
  int64_t start, end;
  if (!causal) {
    const int64_t leader = std::min((ig / s) * s + s / 2, Lg - 1);
    start = std::max<int64_t>(leader - left, 0);
    if (leader + right >= Lg) start += Lg - right - leader - 1;
    end = start + k;
  } else {
    const int64_t leader = std::min((ig / s) * s + s - 1, Lg - 1);
    start = std::max<int64_t>(leader - left - right, 0);
    end = std::min(ig + 1, Lg);
  }
  for (int64_t j = 0; j < k; ++j) {
    valid[j] = start + j < end;
    pos[j] = valid[j] ? res + d * (start + j) : i;
  }
}

// Everything that depends only on the shapes, shared by all rows. A "row" is one (t, y) pair,
// r = t * Hn + y (R of them per (batch, head)); its keys lie on nkr = kt * kh key rows (slot
// n = it * kh + ih, key row t' * Hn + y'), and in each key row at kw columns that depend only on
// the query column.
template <typename T>
struct Plan {
  int64_t B, Tn, Hn, R, W, NH, NKV, G, D;  // G = NH / NKV query heads per key/value head
  int64_t nkr, kw, dw;
  int border;
  int64_t V;        // lanes per vector
  int64_t Ws;       // query slots per row (W rounded up to V)
  int64_t Wk;       // packed key row width (W + sink, rounded up; see zero_rows)
  int64_t kml = 0;  // zero columns before each packed key row (zero_rows)
  bool zero_rows = false;  // "zero"/"mask" border with every column interior (see the constructor)
  int64_t xlo, n_int;  // interior columns [xlo, xlo + n_int) are slots [0, n_int)
  std::vector<int32_t> slotx;    // slot -> column (W for dummy slots)
  std::vector<int32_t> kidx;     // [kw][Ws] key column (W = sink when not a key)
  std::vector<int64_t> off;      // [kw] interior column shift: kidx[j][slot] = column + off[j]
  std::vector<int64_t> goff;     // [kw] j * D * V (offsets in a gathered border block)
  int64_t n_full, NG;            // contiguous (all-interior) slot blocks, border blocks
  std::vector<int32_t> bx;       // [kw][Ws] bias column index
  std::vector<int64_t> rowpos;   // [R][nkr] key row (-1 when not a key row of the query row)
  std::vector<uint8_t> rowvalid; // [R][nkr]
  std::vector<int32_t> by;       // [R][nkr] bias row: at * (2kh - 1) + ah
  int64_t nbr;                   // bias rows (2kt - 1) * (2kh - 1)
  int64_t row_span;              // most key rows between the first and last of one query row
  int64_t nht;                   // bias tables (heads or 1)
  Buf<T> biascol;                // [nht][nbr][kw][Ws]: table value (+ -inf column mask)
  bool any_bias;                 // whether biascol has an entry other than 0
  bool int_bias;                 // whether an interior slot's column has one (a table's value, a zero_rows -inf)
  std::vector<int64_t> row_t, row_y;  // [R] the (t, y) of each row

  // zero_rows_if ("zero" and "mask" borders): every column is an interior slot, reading its window's
  // columns outside [0, W) as zero keys from the packed key rows' zero margins ("mask": with a
  // -inf bias in those slots' bias columns, so that they leave the softmax): kml columns before
  // each row, and Wk wide enough that a channel's last columns are zeros for the next channel's
  // negative columns and the last slot block's window stays in the row. Then no slot block is a
  // border block (the last one, partly past W, is contiguous too: its dummy lanes have zero q and
  // dout). For the backward's general route (backward_impl), which needs no other change for it
  // (the forward's routes and the band backward read key columns in ways that assume no margins).
  Plan(const View6& q, const View6& k, const Window& win, const T* table, int64_t nht_, bool zero_rows_if = false) {
    B = q.size[0];
    Tn = q.size[1];
    Hn = q.size[2];
    W = q.size[3];
    NH = q.size[4];
    D = q.size[5];
    R = Tn * Hn;
    NKV = k.size[4];
    G = NH / NKV;
    const int64_t kt = win.kernel[0], kh = win.kernel[1];
    kw = win.kernel[2];
    dw = win.dilation[2];
    border = win.border;
    nkr = kt * kh;
    V = VecOf<T>::N;
    Ws = (W + V - 1) / V * V;
    Wk = (W + 1 + V - 1) / V * V;
    // columns: key column and validity of every neighbour of up to 16 columns at a time (cpos,
    // cval: [16][kw]; a table for the whole row, megabytes for the 1-D ops' long rows and wide
    // windows, cost more than their kernel on short batches)
    std::vector<int64_t> cpos(16 * kw);
    std::vector<uint8_t> cval(16 * kw);
    auto column = [&](int64_t x, int64_t e) {
      axis_window(x, W, kw, dw, win.stride[2], win.causal[2] != 0, border, cpos.data() + e * kw, cval.data() + e * kw);
    };
    off.resize(kw);
    for (int64_t j = 0; j < kw; ++j) off[j] = (win.causal[2] ? j - kw + 1 : j - kw / 2) * dw;
    auto interior = [&](int64_t x) {
      column(x, 0);
      for (int64_t j = 0; j < kw; ++j)
        if (!cval[j] || cpos[j] != x + off[j]) return false;
      return true;
    };
    zero_rows = zero_rows_if && border != kClamp;
    xlo = 0;
    int64_t xhi = W;
    if (zero_rows) {
      const int64_t lreach = std::max<int64_t>(-off[0], 0), rreach = std::max<int64_t>(off[kw - 1], 0);
      Wk = std::max({W + 1, W + lreach, Ws + rreach});
      Wk = (Wk + V - 1) / V * V;
      kml = (lreach + V - 1) / V * V;
    } else {
      while (xlo < W && !interior(xlo)) ++xlo;
      xhi = xlo;
      while (xhi < W && interior(xhi)) ++xhi;
    }
    n_int = xhi - xlo;
    slotx.assign(Ws, (int32_t)W);
    int64_t s = 0;
    for (int64_t x = xlo; x < xhi; ++x) slotx[s++] = (int32_t)x;
    for (int64_t x = 0; x < W; ++x)
      if (x < xlo || x >= xhi) slotx[s++] = (int32_t)x;
    goff.resize(kw);
    for (int64_t j = 0; j < kw; ++j) goff[j] = j * D * V;
    n_full = zero_rows ? Ws / V : n_int / V;
    NG = Ws / V - n_full;
    kidx.assign(kw * Ws, (int32_t)W);
    bx.assign(kw * Ws, (int32_t)(kw - 1));
    std::vector<uint8_t> colvalid(kw * Ws, 0);
    // interior slots: key column x + off[j], bias column off[j] / dw + kw - 1 (plain stores: the
    // 1-D ops' rows of thousands of slots and windows of tens of neighbours made the general
    // loop below a serial millisecond per call)
    for (int64_t j = 0; j < kw; ++j) {
      const int32_t c0 = (int32_t)(xlo + off[j]), bj = (int32_t)(off[j] / dw + kw - 1);
      int32_t* kj = kidx.data() + j * Ws;
      int32_t* bxj = bx.data() + j * Ws;
      uint8_t* vj = colvalid.data() + j * Ws;
      for (int64_t sl = 0; sl < n_int; ++sl) {
        kj[sl] = c0 + (int32_t)sl;
        bxj[sl] = bj;
        vj[sl] = 1;
        if (zero_rows && (kj[sl] < 0 || kj[sl] >= W)) {  // not a key: the sink
          kj[sl] = (int32_t)W;
          vj[sl] = 0;
        }
      }
    }
    // the other slots (in blocks of 16, whose windows stay in L1 while each neighbour's entries
    // are written; one division per entry only with dilation)
    for (int64_t s0 = n_int; s0 < Ws; s0 += 16) {
      for (int64_t sl = s0; sl < std::min(Ws, s0 + 16); ++sl)
        if (slotx[sl] < W) column(slotx[sl], sl - s0);
      for (int64_t j = 0; j < kw; ++j)
        for (int64_t sl = s0; sl < std::min(Ws, s0 + 16); ++sl) {
          const int64_t x = slotx[sl];
          if (x >= W) continue;  // dummy slot: sink column, zero bias
          const int64_t p = cpos[(sl - s0) * kw + j];
          const bool ok = cval[(sl - s0) * kw + j];
          kidx[j * Ws + sl] = ok ? (int32_t)p : (int32_t)W;
          colvalid[j * Ws + sl] = ok;
          bx[j * Ws + sl] = (int32_t)((dw == 1 ? p - x : (p - x) / dw) + kw - 1);
        }
    }
    // rows: the product of the T and H windows
    std::vector<int64_t> tpos(Tn * kt), hpos(Hn * kh);
    std::vector<uint8_t> tval(Tn * kt), hval(Hn * kh);
    for (int64_t t = 0; t < Tn; ++t)
      axis_window(t, Tn, kt, win.dilation[0], win.stride[0], win.causal[0] != 0, border, tpos.data() + t * kt,
                  tval.data() + t * kt);
    for (int64_t y = 0; y < Hn; ++y)
      axis_window(y, Hn, kh, win.dilation[1], win.stride[1], win.causal[1] != 0, border, hpos.data() + y * kh,
                  hval.data() + y * kh);
    row_t.resize(R);
    row_y.resize(R);
    for (int64_t r = 0; r < R; ++r) {
      row_t[r] = r / Hn;
      row_y[r] = r % Hn;
    }
    rowpos.resize(R * nkr);
    rowvalid.resize(R * nkr);
    by.resize(R * nkr);
    row_span = 1;
    for (int64_t t = 0; t < Tn; ++t)
      for (int64_t y = 0; y < Hn; ++y) {
        const int64_t r = t * Hn + y;
        int64_t lo = R, hi = -1;
        for (int64_t it = 0; it < kt; ++it)
          for (int64_t ih = 0; ih < kh; ++ih) {
            const int64_t n = r * nkr + it * kh + ih;
            const int64_t pt = tpos[t * kt + it], ph = hpos[y * kh + ih];
            const bool ok = tval[t * kt + it] && hval[y * kh + ih];
            rowvalid[n] = ok;
            rowpos[n] = ok ? pt * Hn + ph : -1;
            by[n] = (int32_t)(((pt - t) / win.dilation[0] + kt - 1) * (2 * kh - 1) + (ph - y) / win.dilation[1] + kh -
                              1);
            if (ok) {
              lo = std::min(lo, rowpos[n]);
              hi = std::max(hi, rowpos[n]);
            }
          }
        row_span = std::max(row_span, hi - lo + 1);
      }
    nbr = (2 * kt - 1) * (2 * kh - 1);
    nht = table ? nht_ : 1;
    const int64_t tc = 2 * kw - 1;
    biascol.resize(nht * nbr * kw * Ws);
    const T ninf = -std::numeric_limits<T>::infinity();
    any_bias = int_bias = false;
    for (int64_t h = 0; h < nht; ++h)
      for (int64_t a = 0; a < nbr; ++a)
        for (int64_t j = 0; j < kw; ++j) {
          const T* tab = table ? table + (h * nbr + a) * tc : nullptr;
          T* dst = biascol.data() + ((h * nbr + a) * kw + j) * Ws;
          // interior slots: keys, all at bias column bx[j][0]
          const T vint = tab && n_int > 0 ? tab[bx[j * Ws]] : T(0);
          std::fill(dst, dst + n_int, vint);
          int_bias |= n_int > 0 && vint != T(0);
          if (zero_rows && border == kMask)  // ("mask": the columns outside the map leave the softmax)
            for (int64_t sl = 0; sl < n_int; ++sl)
              if (!colvalid[j * Ws + sl]) {
                dst[sl] = ninf;
                int_bias = true;
              }
          any_bias |= int_bias;
          for (int64_t sl = n_int; sl < Ws; ++sl) {
            T val = T(0);
            if (slotx[sl] < W) {
              if (tab) val = tab[bx[j * Ws + sl]];
              // a "zero" key keeps its logit (0 + bias); any other non-key leaves the softmax
              if (border != kZero && !colvalid[j * Ws + sl]) val = ninf;
            }
            dst[sl] = val;
            any_bias |= val != T(0);
          }
        }
  }
  const T* bias_row(int64_t ht, int64_t y, int64_t i) const {
    return biascol.data() + ((ht * nbr + by[y * nkr + i]) * kw) * Ws;
  }
  // dst[j] (j < kw) = the bias of slot sl's neighbour j in a row of bias_row() ([kw][Ws])
  void window_bias(const T* brow, int64_t sl, T* dst) const {
    for (int64_t j = 0; j < kw; ++j) dst[j] = brow[j * Ws + sl];
  }
  // Whether slot sl's window on its key row is kw consecutive keys of the row (the band's windows:
  // the "clamp" border without causal shortening, dilation 1), or, with masked_tail, a shorter
  // run of them followed by non-keys whose bias columns hold -inf (the causal windows near the
  // start of the row): either way the kw columns from the first key lie in the row.
  bool window_is_run(int64_t sl, bool masked_tail = false) const {
    const int64_t st = kidx[sl];
    if (st + kw > W) return false;
    int64_t j = 1;
    while (j < kw && kidx[j * Ws + sl] == st + j) ++j;
    if (j == kw) return true;
    if (!masked_tail || border == kZero) return false;  // ("zero" non-keys are zero keys, not masked)
    for (; j < kw; ++j)
      if (kidx[j * Ws + sl] != W) return false;
    return true;
  }
  // The logits of a key row that is not one of the query row's key rows: bias for "zero"
  // (zero keys), -inf otherwise.
  bool dead_rows_masked() const { return border != kZero; }
  // Element offset of row r of head h of batch b in a (B, T, H, W, heads, D) view.
  int64_t row_off(const int64_t* st, int64_t b, int64_t r, int64_t h) const {
    return b * st[0] + row_t[r] * st[1] + row_y[r] * st[2] + h * st[4];
  }
};

// A "key view" of one key row for one block of V query slots: the V-lane vector of neighbour j,
// channel c is at base + joff[j] + c * cstride. Interior blocks read the transposed key row
// directly (joff = column shift, cstride = row width); border blocks read a copy gathered once
// per key row (joff = j * D * V, cstride = V), shared by the kh query rows that use the key row.
template <typename T>
struct KeyView {
  const T* base;
  int64_t cstride;
  const int64_t* joff;
};

// The next chunk of at most `most` of `left` neighbours, the chunks as even as they can be: 65
// neighbours in chunks of 8 run as 8, 8, 7, ..., 7, not 8 x 8 + 1, whose last chunk is one
// accumulator waiting on its own FMA latency for the whole channel loop.
static inline int64_t even_chunk(int64_t left, int64_t most) {
  const int64_t chunks = (left + most - 1) / most;
  return (left + chunks - 1) / chunks;
}

// Per-task key storage: transposed rows Kt[y][c][Wk] (sink column W = 0) and the gathered
// border blocks Kg[y][g][j][c][V], for `rows` key rows: key row y is kept at y mod rows (a ring
// of the rows in use; rows = R keeps every key row of the map).
template <typename T>
struct KeyPack {
  Buf<T> t, g;  // (64-byte aligned: the packed rows start at cache lines)
  int64_t rows = 1;
  // (gathered: whether the border blocks' copies are packed)
  void alloc(const Plan<T>& pl, int64_t ring = 0, bool gathered = true) {
    rows = ring_rows(pl, ring);
    t.resize(rows * row_elems(pl));  // (the kml columns before each row are never written)
    g.resize(gathered ? std::max<int64_t>(1, rows * gathered_elems(pl)) : 0);
  }
  // the rows alloc keeps for a ring of `ring` rows (0: all), and the elements per row of the
  // packed rows and of the gathered copies
  static int64_t ring_rows(const Plan<T>& pl, int64_t ring) { return ring > 0 ? std::min(ring, pl.R) : pl.R; }
  static int64_t row_elems(const Plan<T>& pl) { return pl.kml + pl.D * pl.Wk; }
  static int64_t gathered_elems(const Plan<T>& pl) { return pl.NG * pl.kw * pl.D * VecOf<T>::N; }
  int64_t slot(int64_t y) const { return y < rows ? y : y % rows; }
  T* trow(const Plan<T>& pl, int64_t y) { return t.data() + slot(y) * row_elems(pl) + pl.kml; }
  T* grow(const Plan<T>& pl, int64_t y, int64_t g_) {
    return g.data() + ((slot(y) * pl.NG + g_) * pl.kw) * pl.D * VecOf<T>::N;
  }
};

// Tokens ahead of a packing loop whose lines it prefetches (the float32 forward's pack_group). With
// several heads per token, one head's lines of a token are 128 of its 512 bytes (4 heads of 32
// channels), a 4 KB page holds only 8 of its tokens, and the packing waits on memory: prefetching
// 32 tokens ahead made the 2-D forward (B = 4, 56 x 56, 4 heads, k = 7, 2 threads) 5% faster on
// Zen 3 (4.9-5.2 against 5.1-5.6 ms in alternating runs). The backward's packers gained nothing.
constexpr int64_t kPackAhead = 32;

// Prefetches (into L2) the lines of n tokens from p, step elements apart, of D channels each (unit
// channel stride). (Addresses past the tensor are harmless: prefetches do not fault.)
template <typename E>
static inline void prefetch_tokens(const E* p, int64_t step, int64_t n, int64_t D) {
  for (int64_t l = 0; l < n; ++l)
    for (int64_t c = 0; c < D; c += 64 / (int64_t)sizeof(E)) __builtin_prefetch(p + l * step + c, 0, 2);
}

template <typename scalar_t, typename T>
static void pack_keys(const View6& src, int64_t b, int64_t h, int64_t ylo, int64_t yhi, const Plan<T>& pl,
                      KeyPack<T>& kp) {
  constexpr int N = VecOf<T>::N;
  const scalar_t* base = static_cast<const scalar_t*>(src.data);
  const int64_t* st = src.stride;
  std::vector<T> tmp;
  for (int64_t y = ylo; y <= yhi; ++y) {
#if NA_X86V3
    if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
      if (st[5] == 1 && pl.D % 8 == 0) {
        // tb tokens by tb channels in registers (16 with AVX-512 when D allows, else 8); columns
        // past W (sink, padding) read zeros
        const int tb = !NA_AVX2 && pl.D % 16 == 0 ? 16 : 8;
        T* row = kp.trow(pl, y);
        const float* rows[16];
        const scalar_t* rb = base + pl.row_off(st, b, y, h);
        for (int64_t x0 = 0; x0 < pl.Wk; x0 += tb) {
          for (int l = 0; l < tb; ++l) rows[l] = x0 + l < pl.W ? rb + (x0 + l) * st[3] : nullptr;
          transpose_n(tb, rows, pl.D, 1.0f, row + x0, pl.Wk);
        }
        for (int64_t g = 0; g < pl.NG; ++g) {
          const int64_t s0 = (pl.n_full + g) * N;
          T* gb = kp.grow(pl, y, g);
          for (int64_t j = 0; j < pl.kw; ++j) {
            // the key tokens of tb slots at a time, transposed (not a key: the sink's zeros)
            const int32_t* ki = pl.kidx.data() + j * pl.Ws + s0;
            for (int l0 = 0; l0 < N; l0 += tb) {
              for (int l = 0; l < tb; ++l) rows[l] = ki[l0 + l] < pl.W ? rb + ki[l0 + l] * st[3] : nullptr;
              transpose_n(tb, rows, pl.D, 1.0f, gb + j * pl.D * N + l0, N);
            }
          }
        }
        continue;
      }
    }
#endif
    tmp.resize(pl.W * pl.D);
    // read the row in its natural (x, c) order, then transpose in cache
    for (int64_t x = 0; x < pl.W; ++x) {
      const scalar_t* s = base + pl.row_off(st, b, y, h) + x * st[3];
      T* d = tmp.data() + x * pl.D;
      if (st[5] == 1) {
        for (int64_t c = 0; c < pl.D; ++c) d[c] = static_cast<T>(s[c]);
      } else {
        for (int64_t c = 0; c < pl.D; ++c) d[c] = static_cast<T>(s[c * st[5]]);
      }
    }
    T* row = kp.trow(pl, y);
    for (int64_t c = 0; c < pl.D; ++c) {
      T* d = row + c * pl.Wk;
      for (int64_t x = 0; x < pl.W; ++x) d[x] = tmp[x * pl.D + c];
      for (int64_t x = pl.W; x < pl.Wk; ++x) d[x] = T(0);
    }
    for (int64_t g = 0; g < pl.NG; ++g) {
      const int64_t s0 = (pl.n_full + g) * N;
      T* gb = kp.grow(pl, y, g);
      for (int64_t j = 0; j < pl.kw; ++j) {
        const int32_t* ki = pl.kidx.data() + j * pl.Ws + s0;
        for (int64_t c = 0; c < pl.D; ++c) {
          const T* rc = row + c * pl.Wk;
          T* d = gb + (j * pl.D + c) * N;
          for (int l = 0; l < N; ++l) d[l] = rc[ki[l]];
        }
      }
    }
  }
}

// Pack row y of t[b, y, :, h, :] into dst[c][slot] (slot order, dummy slots zero), times mul.
template <typename scalar_t, typename T>
static void pack_row(const View6& t, int64_t b, int64_t y, int64_t h, const Plan<T>& pl, T mul, T* dst,
                     int64_t dstride) {
  const scalar_t* base = static_cast<const scalar_t*>(t.data);
  const int64_t* st = t.stride;
#if NA_X86V3
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
    if (st[5] == 1 && pl.D % 8 == 0) {
      const int tb = !NA_AVX2 && pl.D % 16 == 0 ? 16 : 8;  // (as in pack_keys)
      const float* rows[16];
      const scalar_t* rb = base + pl.row_off(st, b, y, h);
      for (int64_t s0 = 0; s0 < pl.Ws; s0 += tb) {
        for (int l = 0; l < tb; ++l) {
          const int64_t x = pl.slotx[s0 + l];
          rows[l] = x < pl.W ? rb + x * st[3] : nullptr;
        }
        transpose_n(tb, rows, pl.D, mul, dst + s0, dstride);
      }
      return;
    }
  }
#endif
  for (int64_t sl = 0; sl < pl.Ws; ++sl) {
    int64_t x = pl.slotx[sl];
    if (x >= pl.W) {
      for (int64_t c = 0; c < pl.D; ++c) dst[c * dstride + sl] = T(0);
      continue;
    }
    const scalar_t* src = base + pl.row_off(st, b, y, h) + x * st[3];
    for (int64_t c = 0; c < pl.D; ++c) dst[c * dstride + sl] = static_cast<T>(src[c * st[5]]) * mul;
  }
}

template <typename T>
static KeyView<T> key_view(const Plan<T>& pl, KeyPack<T>& kp, int64_t ky, int64_t ci) {
  constexpr int N = VecOf<T>::N;
  if (ci < pl.n_full) return KeyView<T>{kp.trow(pl, ky) + pl.xlo + ci * N, pl.Wk, pl.off.data()};
  return KeyView<T>{kp.grow(pl, ky, ci - pl.n_full), N, pl.goff.data()};
}

// Key rows that the query rows [y0, y1) read.
template <typename T>
static void key_rows(const Plan<T>& pl, int64_t y0, int64_t y1, int64_t& lo, int64_t& hi) {
  lo = pl.R;
  hi = -1;
  for (int64_t y = y0; y < y1; ++y)
    for (int64_t i = 0; i < pl.nkr; ++i)
      if (pl.rowvalid[y * pl.nkr + i]) {
        lo = std::min(lo, pl.rowpos[y * pl.nkr + i]);
        hi = std::max(hi, pl.rowpos[y * pl.nkr + i]);
      }
}

// Task t of a (batch, head, row chunk) split, nchunks chunks of rows_per query rows per pair:
// the pair bh = (b, h), the head's bias table ht, the chunk, its query rows [y0, y1) (empty for a
// chunk past the last row) and the key rows [klo, khi] they read.
struct RowTask {
  int64_t bh, b, h, ht, chunk, y0, y1, klo, khi;
};
template <typename T>
static RowTask row_task(const Plan<T>& pl, int64_t t, int64_t nchunks, int64_t rows_per) {
  RowTask r;
  r.bh = t / nchunks;
  r.b = r.bh / pl.NH;
  r.h = r.bh % pl.NH;
  r.ht = pl.nht == 1 ? 0 : r.h;
  r.chunk = t % nchunks;
  r.y0 = r.chunk * rows_per;
  r.y1 = std::min(pl.R, r.y0 + rows_per);
  key_rows(pl, r.y0, r.y1, r.klo, r.khi);
  return r;
}

// The packed key rows a task keeps (KeyPack's ring) when its query rows [y0, y1) of each row
// chunk are taken in groups of rg and every group first packs the key rows up to the last one it
// reads: the rows packed so far reach the running maximum of the groups' last rows, and a group
// reads rows from its first one on, so a ring of (running maximum - first row + 1) rows holds
// every row a group reads. (Keeping the whole map's packed rows, 1.3 MB per task for a 56 x 56
// map with k = 7 and head_dim 32, streamed them through L2 with every task.)
template <typename T>
static int64_t key_ring(const Plan<T>& pl, int64_t nchunks, int64_t rows_per, int64_t rg) {
  int64_t ring = 1;
  for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
    const int64_t y0 = chunk * rows_per, y1 = std::min(pl.R, y0 + rows_per);
    int64_t hi = -1;
    for (int64_t yg = y0; yg < y1; yg += rg) {
      int64_t lo, ghi;
      key_rows(pl, yg, std::min(y1, yg + rg), lo, ghi);
      hi = std::max(hi, ghi);
      if (lo <= hi) ring = std::max(ring, hi - lo + 1);
    }
  }
  return ring;
}

}  // namespace
}  // namespace neighborhood
}  // namespace alterops
