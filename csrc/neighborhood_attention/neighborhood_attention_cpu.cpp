// Neighborhood attention on the CPU (three spatial axes T, H, W; the 2D ops run it with T = 1):
// forward and backward, fused (no attention matrix in memory beyond the logits of one query
// row per thread). Raw pointers and strides only (the arguments are described in
// neighborhood_attention.h); compiled once per instruction-set level, which selects the
// AVX-512, AVX2 + FMA or generic paths below.
//
// Layout trick. A "row" is one (t, y) pair. The keys of query (t, y, x) lie on kt*kh key rows
// (the product of its T and H windows) that depend only on (t, y), and in each row at columns
// that depend only on x; causal, strided and even windows only change which rows and columns
// those are (a causal window near the start holds fewer: the missing slots get -inf). For the
// "interior" columns x (every neighbour a key at x + off_j, off_j = (j - k/2) dw, or
// (j - k + 1) dw when causal, which holds where the window is centred or ends at x, inside the
// image, with stride 1) the column of neighbour j is a fixed shift; strided windows and the
// border columns take the gathered path below.
// So per (batch, head) the keys and values are packed transposed, K[y][c][x] (head-dim major,
// columns contiguous, plus one all-zero "sink" column at x = W), and the queries of one row are
// packed Q[c][slot] with the interior columns first, then the border columns. For a block of
// 16 interior slots, logits for 8 neighbours j at once are plain vector FMAs
//   S[j][0:16] += Q[c][0:16] * K[c][x0 + off_j : x0 + off_j + 16]
// over c (register-blocked, no horizontal sums). Blocks holding border columns read a copy of
// their key columns gathered once per key row (out-of-image columns read the sink, so "zero"
// keys cost nothing extra and "mask" keys get -inf from an additive column mask). Each key
// vector is loaded once for every query the block computes with it: for the query rows of a
// group that share the key row (2-D, 3-D), and, when the window is wider than a block (1-D
// kw > 16), for the adjacent blocks whose windows hold it (dot_blocks_shared; on AVX-512 the
// interior blocks of rows with a single key row and no bias instead take band_logits: 4 queries
// in token layout broadcast against consecutive key vectors, no query transpose). A query
// row's logits are formed key row by key row (the key row stays in L1), the softmax runs on 16
// queries at a time, and P.V runs 8 head-dim channels at a time across the row (border queries
// whose clamped windows hold the same key columns in one tile). The backward recomputes P
// from the saved logsumexp; in float32 with AVX2/AVX-512 it takes the query rows in groups
// (3 / 5) whose logits, dP = dO V and dQ = dS K load each shared key/value vector once
// for the group's rows that read its key row. dK/dV of interior queries are summed
// key-centrically (each key column reads the dS/P rows, kept at their key columns so those loads
// are aligned, and the shifted Q/dO rows, for all the key rows of a query row at once), border
// queries sum theirs per key column across the channels. Key rows are packed just before the
// first query row (group) that reads them; only rows longer than a segment prefetch (the next
// segment's inputs), the others are left to the hardware prefetcher.
// Work is split over (batch, head) pairs, and over row chunks of each pair when there are
// fewer pairs than twice the threads; each task packs the key rows of its key/value head
// (heads / heads_kv query heads share one; nothing is copied to expand them). The float32
// forward takes several heads per task where there are enough tasks, heads innermost within
// each row group, forms a long row's logits in segments of kSegmentSlots queries, and splits a map of
// one long row (1-D) into column chunks taken heads innermost (batch, chunk, head), so that the
// heads' passes over a chunk share its tokens' cache lines in L2. The backward's
// tasks have private dK/dV/dbias accumulators reduced afterwards in a fixed order (the query
// heads of a key/value head, then the row chunks; a task that is the only one of its key/value
// head writes its dK/dV rows out itself); its split depends on the shapes only, never on the
// thread count, so its results are the same bits whatever the number of threads. bfloat16 is computed in float, float64 in double.
#include "neighborhood_attention.h"

#include "../common/exp_approx.h"
#include "../common/log_approx.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12's AVX-512 shuffle/unpack intrinsics start from _mm512_undefined_ps(), a deliberately
// self-initialised value that -Wmaybe-uninitialized reports at every use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Vector width. AVX-512 (and ISAs without AVX2) use 64-byte vectors (16 floats); AVX2 + FMA
// without AVX-512 uses 32-byte vectors (8 floats, one ymm register each), so that the register
// blocks below (up to ~14 live vectors) fit in the 16 ymm registers instead of spilling.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NA_AVX2 1
#define NA_VEC_BYTES 32
#else
#define NA_AVX2 0
#define NA_VEC_BYTES 64
#endif
// AVX2 + FMA instructions available (the AVX2 and AVX-512 levels): 8x8 register transposes for
// packing rows, whatever the vector width.
#if defined(__AVX2__) && defined(__FMA__)
#define NA_X86V3 1
#else
#define NA_X86V3 0
#endif

// 64-byte vectors passed by value between internal functions of the generic build: GCC notes
// that their calling convention differs from an AVX-512 build's, which no caller outside this
// file ever sees.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace alterops {
namespace neighborhood {
namespace {

template <typename T>
struct VecOf {
  static constexpr int N = NA_VEC_BYTES / sizeof(T);
  typedef T type __attribute__((vector_size(NA_VEC_BYTES)));
};

template <typename T>
using Vec = typename VecOf<T>::type;

// Allocator of 64-byte aligned storage: a buffer that vector loads read at multiples of the
// vector width from its start then never splits a cache line in those loads.
template <typename T>
struct CacheAligned {
  typedef T value_type;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};
template <typename T>
using Buf = std::vector<T, CacheAligned<T>>;

// 64-byte aligned storage left uninitialised (for buffers that their users fill: the first
// write then comes from the thread that uses the memory).
template <typename T>
class RawBuf {
 public:
  explicit RawBuf(size_t n)
      : p_(static_cast<T*>(::operator new(std::max<size_t>(n, 1) * sizeof(T), std::align_val_t(64)))) {}
  ~RawBuf() { ::operator delete(p_, std::align_val_t(64)); }
  RawBuf(const RawBuf&) = delete;
  RawBuf& operator=(const RawBuf&) = delete;
  T* data() { return p_; }
  const T* data() const { return p_; }

 private:
  T* p_;
};

template <typename T>
static inline Vec<T> loadu(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
static inline void storeu(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
static inline Vec<T> splat(T x) {
  return x - Vec<T>{};  // a broadcast (x - 0 folds to x; a per-lane loop compiles to masked inserts)
}

// Keeps v in a register from here on: the compiler may no longer re-read it from memory at each
// use. (GCC otherwise folds the load into every FMA that reads the vector, so a key vector
// shared by three query rows costs three unaligned loads, and the loads, not the FMAs, set the
// pace.)
template <typename V>
static inline void pin_register(V& v) {
#if defined(__AVX512F__)  // (with 16 ymm registers, AVX2 blocks have no register to spare)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// Fully unrolls a loop over a register block. GCC keeps an accumulator array such as
// acc[rows][channels] in registers only when the loops indexing it are unrolled before its scalar
// replacement pass; otherwise the array round-trips through the stack on entry and exit of every
// block, which costs about as much as the FMAs when the block's loop is short (7 neighbours).
#define NA_UNROLL _Pragma("GCC unroll 32")
// Register-block kernels whose accumulators the caller owns: inlined wherever they are used (an
// out-of-line call takes the accumulators by reference, through memory).
#define NA_TILE static inline __attribute__((always_inline))

// exp for float vectors: 2^n * p(f), |f| <= 1/2, degree-6 polynomial (rel. error ~2e-7);
// exactly 0 below -87.
static inline Vec<float> vexp(Vec<float> x) {
#if defined(__AVX512F__)
  // AVX-512: the same polynomial, with the rounding and the scaling by 2^n in one instruction
  // each (vrndscaleps, vscalefps; 2-D/3-D/1-D forward 1-3% faster), and the lanes below -87
  // zeroed by the mask of the scaling (unordered compare: a NaN stays NaN; t held at -126 or
  // above, so that no lane computes a denormal).
  const __m512 xv = (__m512)x;
  const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  const __m512 t =
      _mm512_max_ps(_mm512_set1_ps(-126.0f), _mm512_mul_ps(xv, _mm512_set1_ps(1.44269504088896341f)));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec<float> f = (Vec<float>)_mm512_sub_ps(t, n) * 0.693147180559945309f;
  const Vec<float> p = exp_poly(f);
  return (Vec<float>)_mm512_maskz_scalef_ps(keep, (__m512)p, n);
#else
  typedef int32_t VI __attribute__((vector_size(NA_VEC_BYTES)));
  const Vec<float> lo = splat<float>(-87.0f);
  Vec<float> xc = x < lo ? lo : x;
  Vec<float> t = xc * 1.44269504088896341f;
  VI n = __builtin_convertvector(t + 128.5f, VI) - 128;  // round to nearest
  Vec<float> f = (t - __builtin_convertvector(n, Vec<float>)) * 0.693147180559945309f;
  const Vec<float> p = exp_poly(f);
  VI bits = (n + 127) << 23;
  Vec<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  Vec<float> r = p * scale;
  return x < lo ? splat<float>(0.0f) : r;
#endif
}
// log for float vectors (log_approx, ~1 ulp); lanes that are not positive normal numbers (never
// the softmax sums it takes, which are >= 1) go through std::log.
static inline Vec<float> vlog(Vec<float> x) {
  typedef int32_t VI __attribute__((vector_size(NA_VEC_BYTES)));
  const VI bad = (x < std::numeric_limits<float>::min()) | (x > std::numeric_limits<float>::max()) | (x != x);
  bool any_bad = false;
  for (int l = 0; l < VecOf<float>::N; ++l) any_bad |= bad[l] != 0;
  if (any_bad) {
    Vec<float> r;
    for (int l = 0; l < VecOf<float>::N; ++l) r[l] = std::log(x[l]);
    return r;
  }
  return log_approx<Vec<float>, VI>(x);
}
static inline Vec<double> vexp(Vec<double> x) {
  Vec<double> r{};
  for (int l = 0; l < VecOf<double>::N; ++l) r[l] = std::exp(x[l]);
  return r;
}
template <typename T>
static inline Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}

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
  int64_t Wk;       // packed key row width (W + sink, rounded up)
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
  std::vector<int64_t> row_t, row_y;  // [R] the (t, y) of each row

  Plan(const View6& q, const View6& k, const Window& win, const T* table, int64_t nht_) {
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
    xlo = 0;
    while (xlo < W && !interior(xlo)) ++xlo;
    int64_t xhi = xlo;
    while (xhi < W && interior(xhi)) ++xhi;
    n_int = xhi - xlo;
    slotx.assign(Ws, (int32_t)W);
    int64_t s = 0;
    for (int64_t x = xlo; x < xhi; ++x) slotx[s++] = (int32_t)x;
    for (int64_t x = 0; x < W; ++x)
      if (x < xlo || x >= xhi) slotx[s++] = (int32_t)x;
    goff.resize(kw);
    for (int64_t j = 0; j < kw; ++j) goff[j] = j * D * V;
    n_full = n_int / V;
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
    any_bias = false;
    for (int64_t h = 0; h < nht; ++h)
      for (int64_t a = 0; a < nbr; ++a)
        for (int64_t j = 0; j < kw; ++j) {
          const T* tab = table ? table + (h * nbr + a) * tc : nullptr;
          T* dst = biascol.data() + ((h * nbr + a) * kw + j) * Ws;
          // interior slots: keys, all at bias column bx[j][0]
          const T vint = tab && n_int > 0 ? tab[bx[j * Ws]] : T(0);
          std::fill(dst, dst + n_int, vint);
          any_bias |= n_int > 0 && vint != T(0);
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
static inline void key_sum_multi_block(const T* const* Wt, const T* A, int64_t ws, const int64_t* off, int64_t kw,
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

#if NA_X86V3
// dst[c * ds + l] = mul * rows[l][c] for l < 8, c < D (D % 8 == 0); a null row reads zeros.
static inline void transpose8(const float* const* rows, int64_t D, float mul, float* dst, int64_t ds) {
  const __m256 m = _mm256_set1_ps(mul);
  for (int64_t c0 = 0; c0 < D; c0 += 8) {
    __m256 r[8], t[8];
    for (int l = 0; l < 8; ++l) r[l] = rows[l] ? _mm256_loadu_ps(rows[l] + c0) : _mm256_setzero_ps();
    for (int l = 0; l < 8; l += 2) {
      t[l] = _mm256_unpacklo_ps(r[l], r[l + 1]);
      t[l + 1] = _mm256_unpackhi_ps(r[l], r[l + 1]);
    }
    for (int l = 0; l < 8; l += 4) {
      r[l] = _mm256_shuffle_ps(t[l], t[l + 2], 0x44);
      r[l + 1] = _mm256_shuffle_ps(t[l], t[l + 2], 0xEE);
      r[l + 2] = _mm256_shuffle_ps(t[l + 1], t[l + 3], 0x44);
      r[l + 3] = _mm256_shuffle_ps(t[l + 1], t[l + 3], 0xEE);
    }
    // r[0..3]: channels 0,1,2,3 (+4..7 in the high halves) of rows 0-3; r[4..7]: of rows 4-7
    for (int l = 0; l < 4; ++l) {
      _mm256_storeu_ps(dst + (c0 + l) * ds, _mm256_mul_ps(_mm256_permute2f128_ps(r[l], r[4 + l], 0x20), m));
      _mm256_storeu_ps(dst + (c0 + 4 + l) * ds, _mm256_mul_ps(_mm256_permute2f128_ps(r[l], r[4 + l], 0x31), m));
    }
  }
}
#endif

// dst[c * ds + l] = mul * rows[l][c] for l < 16, c < D (D % 16 == 0); a null row reads zeros.
static inline void transpose16(const float* const* rows, int64_t D, float mul, float* dst, int64_t ds) {
#if defined(__AVX512F__)
  const __m512 m = _mm512_set1_ps(mul);
  for (int64_t c0 = 0; c0 < D; c0 += 16) {
    __m512 r[16], t[16];
    for (int l = 0; l < 16; ++l) r[l] = rows[l] ? _mm512_loadu_ps(rows[l] + c0) : _mm512_setzero_ps();
    for (int l = 0; l < 16; l += 2) {
      t[l] = _mm512_unpacklo_ps(r[l], r[l + 1]);
      t[l + 1] = _mm512_unpackhi_ps(r[l], r[l + 1]);
    }
    for (int l = 0; l < 16; l += 4) {
      r[l] = _mm512_shuffle_ps(t[l], t[l + 2], 0x44);
      r[l + 1] = _mm512_shuffle_ps(t[l], t[l + 2], 0xEE);
      r[l + 2] = _mm512_shuffle_ps(t[l + 1], t[l + 3], 0x44);
      r[l + 3] = _mm512_shuffle_ps(t[l + 1], t[l + 3], 0xEE);
    }
    for (int a = 0; a < 16; a += 8)
      for (int l = 0; l < 4; ++l) {
        t[a + l] = _mm512_shuffle_f32x4(r[a + l], r[a + 4 + l], 0x88);
        t[a + 4 + l] = _mm512_shuffle_f32x4(r[a + l], r[a + 4 + l], 0xdd);
      }
    for (int l = 0; l < 8; ++l) {
      r[l] = _mm512_shuffle_f32x4(t[l], t[8 + l], 0x88);
      r[8 + l] = _mm512_shuffle_f32x4(t[l], t[8 + l], 0xdd);
    }
    for (int l = 0; l < 16; ++l) _mm512_storeu_ps(dst + (c0 + l) * ds, _mm512_mul_ps(r[l], m));
  }
#else
  for (int l = 0; l < 16; ++l)
    for (int64_t c = 0; c < D; ++c) dst[c * ds + l] = rows[l] ? rows[l][c] * mul : 0.0f;
#endif
}

// one slot block of queries/keys (VecOf<float>::N columns)
#if NA_AVX2
#define NA_TRANSPOSE_BLK transpose8
#else
#define NA_TRANSPOSE_BLK transpose16
#endif

// rows[0..n) transposed by transpose16 or transpose8 (n = 16 or 8)
[[maybe_unused]] static inline void transpose_n(int n, const float* const* rows, int64_t D, float mul, float* dst,
                                                int64_t ds) {
#if NA_X86V3
  if (n == 8) {
    transpose8(rows, D, mul, dst, ds);
    return;
  }
#endif
  transpose16(rows, D, mul, dst, ds);
}

// Per-task key storage: transposed rows Kt[y][c][Wk] (sink column W = 0) and the gathered
// border blocks Kg[y][g][j][c][V], for `rows` key rows: key row y is kept at y mod rows (a ring
// of the rows in use; rows = R keeps every key row of the map).
template <typename T>
struct KeyPack {
  std::vector<T> t, g;
  int64_t rows = 1;
  // (gathered: whether the border blocks' copies are packed)
  void alloc(const Plan<T>& pl, int64_t ring = 0, bool gathered = true) {
    rows = ring > 0 ? std::min(ring, pl.R) : pl.R;
    t.resize(rows * pl.D * pl.Wk);
    g.resize(gathered ? std::max<int64_t>(1, rows * pl.NG * pl.kw * pl.D * VecOf<T>::N) : 0);
  }
  int64_t slot(int64_t y) const { return y < rows ? y : y % rows; }
  T* trow(const Plan<T>& pl, int64_t y) { return t.data() + slot(y) * pl.D * pl.Wk; }
  T* grow(const Plan<T>& pl, int64_t y, int64_t g_) {
    return g.data() + ((slot(y) * pl.NG + g_) * pl.kw) * pl.D * VecOf<T>::N;
  }
};

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

// The forward's split: (batch, head) work (or (batch, head group) work, BH being the number of
// those) in row chunks only when there are fewer of them than twice the threads. Every query row is computed the same way whichever task holds
// it, so the forward's results do not depend on the split.
static int64_t row_chunks(int64_t BH, int64_t H, const Parallel& par) {
  const int64_t nthreads = par.num_threads;
  int64_t n = BH >= 2 * nthreads ? 1 : std::min<int64_t>(H, (2 * nthreads + BH - 1) / BH);
  const int64_t per = (H + n - 1) / n;
  return (H + per - 1) / per;
}

// Row chunks of the backward: a function of the shapes only, never of the thread count. Each
// task sums its dK/dV/dbias contributions privately and the partials are added in chunk order,
// so the chunking fixes the rounding; with it independent of the threads, the gradients are the
// same bits whatever torch.set_num_threads says. A chunk packs and sums row_span - 1 key rows
// beyond its own ((kh - 1) dh in 2D), which costs: on B=4 or 1, 56x56, 4 heads, k=7 (2 threads, AVX2) four chunks
// per pair made the backward 10-20% slower than one. So pairs are cut only when there are
// fewer than kBackwardTasks of them (the split the thread-count rule gave for up to 8 threads),
// into chunks of at least max(8, 2 (row_span - 1)) query rows.
constexpr int64_t kBackwardTasks = 16;  // also the most chunks a pair is cut into

static int64_t backward_row_chunks(int64_t BH, int64_t H, int64_t row_span) {
  const int64_t min_rows = std::max<int64_t>(8, 2 * (row_span - 1));
  if (BH >= kBackwardTasks) return 1;
  const int64_t n =
      std::max<int64_t>(1, std::min<int64_t>((kBackwardTasks + BH - 1) / BH, H / min_rows));
  const int64_t per = (H + n - 1) / n;
  return (H + per - 1) / per;
}

template <typename scalar_t, typename T>
static void forward_impl(const View6& q, const View6& k, const View6& v, scalar_t* O, T* L, const Plan<T>& pl,
                         T scale, const Parallel& par) {
  constexpr int N = VecOf<T>::N;
  const int64_t BH = pl.B * pl.NH;
  const int64_t nchunks = row_chunks(BH, pl.R, par);
  const int64_t rows_per = (pl.R + nchunks - 1) / nchunks;
  const int64_t K2 = pl.nkr * pl.kw;
  par.for_each(0, BH * nchunks, 1, [&](int64_t t0, int64_t t1) {
    KeyPack<T> Kp, Vp;
    Kp.alloc(pl);
    Vp.alloc(pl);
    const int64_t nblk = pl.Ws / N;
    Buf<T> Qp(pl.D * pl.Ws), S(K2 * pl.Ws), Ob(pl.D * pl.Ws), Linv(pl.Ws);
    std::vector<KeyView<T>> views(nblk * pl.nkr);
    std::vector<int64_t> row_i(pl.nkr);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nchunks, chunk = t % nchunks, b = bh / pl.NH, h = bh % pl.NH;
      const int64_t ht = pl.nht == 1 ? 0 : h;
      const int64_t y0 = chunk * rows_per, y1 = std::min(pl.R, y0 + rows_per);
      if (y0 >= y1) continue;
      int64_t klo, khi;
      key_rows(pl, y0, y1, klo, khi);
      pack_keys<scalar_t, T>(k, b, h / pl.G, klo, khi, pl, Kp);
      pack_keys<scalar_t, T>(v, b, h / pl.G, klo, khi, pl, Vp);
      for (int64_t y = y0; y < y1; ++y) {
        pack_row<scalar_t, T>(q, b, y, h, pl, scale, Qp.data(), pl.Ws);
        T* Lrow = L + (bh * pl.R + y) * pl.W;
        // Logits of the whole row, key row by key row (each key row stays in L1 across blocks):
        // S[n][slot], n = i * kw + j.
        int64_t nrows = 0;
        for (int64_t i = 0; i < pl.nkr; ++i) {
          const T* brow = pl.bias_row(ht, y, i);
          T* Si = S.data() + i * pl.kw * pl.Ws;
          if (!pl.rowvalid[y * pl.nkr + i]) {
            for (int64_t j = 0; j < pl.kw; ++j)
              for (int64_t sl = 0; sl < pl.Ws; ++sl)
                Si[j * pl.Ws + sl] = pl.dead_rows_masked() ? -std::numeric_limits<T>::infinity() : brow[j * pl.Ws + sl];
            continue;
          }
          const int64_t ky = pl.rowpos[y * pl.nkr + i];
          for (int64_t ci = 0; ci < nblk; ++ci) {
            dot_row<T>(Qp.data() + ci * N, pl.Ws, pl.D, key_view(pl, Kp, ky, ci), pl.kw, Si + ci * N, pl.Ws);
            views[ci * pl.nkr + nrows] = key_view(pl, Vp, ky, ci);
          }
          row_i[nrows++] = i;
          for (int64_t j = 0; j < pl.kw; ++j)
            for (int64_t ci = 0; ci < nblk; ++ci) {
              T* sp = Si + j * pl.Ws + ci * N;
              storeu(sp, loadu(sp) + loadu(brow + j * pl.Ws + ci * N));
            }
        }
        // softmax per block of V queries
        for (int64_t ci = 0; ci < nblk; ++ci) {
          const int64_t s0 = ci * N;
          Vec<T> m = loadu(S.data() + s0);
          for (int64_t n = 1; n < K2; ++n) m = vmax<T>(m, loadu(S.data() + n * pl.Ws + s0));
          Vec<T> l = splat<T>(T(0));
          for (int64_t n = 0; n < K2; ++n) {
            Vec<T> p = vexp(loadu(S.data() + n * pl.Ws + s0) - m);
            storeu(S.data() + n * pl.Ws + s0, p);
            l += p;
          }
          storeu(Linv.data() + s0, T(1) / l);
          for (int lane = 0; lane < N; ++lane) {
            int64_t x = pl.slotx[s0 + lane];
            if (x < pl.W) Lrow[x] = m[lane] + std::log(l[lane]);
          }
        }
        // P . V, 8 channels at a time across all blocks (their value rows stay in L1)
        for (int64_t c0 = 0; c0 < pl.D; c0 += 8)
          for (int64_t ci = 0; ci < nblk; ++ci)
            mix_cblock<T>(S.data() + ci * N, pl.Ws, views.data() + ci * pl.nkr, row_i.data(), nrows, pl.kw, c0,
                          std::min<int64_t>(8, pl.D - c0), Ob.data() + ci * N, pl.Ws);
        for (int64_t ci = 0; ci < nblk; ++ci) {
          Vec<T> inv = loadu(Linv.data() + ci * N);
          for (int64_t c = 0; c < pl.D; ++c)
            storeu(Ob.data() + c * pl.Ws + ci * N, loadu(Ob.data() + c * pl.Ws + ci * N) * inv);
        }
        // out is contiguous (B, H, W, NH, D)
        for (int64_t sl = 0; sl < pl.Ws; ++sl) {
          int64_t x = pl.slotx[sl];
          if (x >= pl.W) continue;
          scalar_t* o = O + (((b * pl.R + y) * pl.W + x) * pl.NH + h) * pl.D;
          for (int64_t c = 0; c < pl.D; ++c) o[c] = static_cast<scalar_t>(Ob[c * pl.Ws + sl]);
        }
      }
    }
  });
}

// ---- float32 fast forward (head_dim a multiple of 16, up to 64, unit channel stride) ----
// Only the keys are transposed (for the logits); queries are transposed one row at a time,
// 16 tokens by 16 channels in registers, and P.V reads the value rows in their own (x, c)
// layout (one head's channels are contiguous), writing the output rows directly.

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
// t = u - j, so each value row is loaded once per tile.
template <int T, int DV, int KW>
NA_TILE void pv_tile_diag(const float* P, int64_t pstride, const float* V, int64_t xs,
                          Vec<float> (&acc)[T][DV]) {
#pragma GCC unroll 32
  for (int u = 0; u < T + KW - 1; ++u) {
    Vec<float> vv[DV];
    NA_UNROLL
    for (int d = 0; d < DV; ++d) {
      vv[d] = loadu(V + u * xs + d * VecOf<float>::N);
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

constexpr int kBandQ = 4;  // queries per band tile: 4 * NV accumulators + NV key vectors in 32 zmm
constexpr int kBandMaxNV = 6;
#if defined(__AVX512F__)
// Band logits of one key row (dilation 1, windows wider than a vector: the 1-D ops' long
// windows). MQ adjacent interior queries (token layout, channel stride 1, query i at q + i * qxs)
// against NV vectors of consecutive packed key columns from kt (channel stride cstride), as a
// register-blocked matrix product: per channel, NV key vectors and MQ broadcast query values for
// MQ * NV FMAs (no query transpose; the columns outside a query's window, at most
// NV * V - kw - MQ + 1 per query, are computed and dropped). Query i's window (columns
// wo + i + j of the band, j < kw) is stored scaled at C + i * cs + j; each row writes
// [i * cs - wo - i, i * cs - wo - i + NV * V). (MQ = 1: a single query whose window may start
// anywhere in the band, the border slots' clamped windows that do not move with the query.)
template <int NV, int MQ = kBandQ>
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
    for (int n = 0; n < NV; ++n) storeu(C + i * cs - wo - i + n * N, acc[i][n] * sv);
  // the next tile's queries into L1 (each query token is read by one tile only: its first load
  // would stall the FMAs)
  if (prefetch_next)
    for (int i = 2 * MQ; i < 3 * MQ; ++i)
      for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(q + i * qxs + c, 0, 3);
}

// Softmax of one query's kw logits at C (in place, left unnormalised): returns the max m and the
// sum l of exp(s - m). Reads up to the next multiple of V past kw (the band row's padding).
static inline void band_softmax(float* C, int64_t kw, float& m_out, float& l_out) {
  constexpr int N = VecOf<float>::N;
  const int64_t kf = kw / N * N;
  Vec<float> mv = loadu(C);
  for (int64_t e = N; e < kf; e += N) mv = vmax<float>(mv, loadu(C + e));
  float m = _mm512_reduce_max_ps((__m512)mv);
  for (int64_t e = kf; e < kw; ++e) m = std::max(m, C[e]);
  const Vec<float> ms = splat<float>(m);
  Vec<float> lv = splat<float>(0.0f);
  for (int64_t e = 0; e < kf; e += N) {
    const Vec<float> p = vexp(loadu(C + e) - ms);
    storeu(C + e, p);
    lv += p;
  }
  if (kf < kw) {
    Vec<float> p = vexp(loadu(C + kf) - ms);
    for (int l = 0; l < N; ++l)
      if (kf + l >= kw) p[l] = 0.0f;
    storeu(C + kf, p);
    lv += p;
  }
  const float l = _mm512_reduce_add_ps((__m512)lv);
  m_out = m;
  l_out = l;
}
#endif

// Calls loop(kern) with the P.V tile kernel of the window's shape: kern(tv, P, V, acc) adds to
// acc[T][DC] (T = decltype(tv)::value <= tmax queries by DC channel vectors) their weights at P
// (neighbour j of query t at P[j * pstride + t]) times the value rows from V (xs apart). GCC
// keeps the accumulators in registers only when a single kernel updates them, so the choice is
// made once, outside the caller's tile loop: with the five kernels behind a branch inside it,
// every FMA of the 2-D tiles loaded and stored its accumulator through the stack.
template <int DC, class Loop>
static inline void with_pv_kernel(const Plan<float>& pl, int64_t pstride, int64_t xs, int tmax, Loop&& loop) {
  if (pl.dw == 1 && pl.kw == 7)
    loop([&](auto tv, const float* P, const float* V, auto& acc) {
      pv_tile_diag<decltype(tv)::value, DC, 7>(P, pstride, V, xs, acc);
    });
  else if (pl.dw == 1 && pl.kw == 5)
    loop([&](auto tv, const float* P, const float* V, auto& acc) {
      pv_tile_diag<decltype(tv)::value, DC, 5>(P, pstride, V, xs, acc);
    });
  else if (pl.dw == 1 && pl.kw == 3)
    loop([&](auto tv, const float* P, const float* V, auto& acc) {
      pv_tile_diag<decltype(tv)::value, DC, 3>(P, pstride, V, xs, acc);
    });
  else if (pl.dw == 1 && pl.kw >= tmax)
    loop([&](auto tv, const float* P, const float* V, auto& acc) {
      pv_tile_diag_any<decltype(tv)::value, DC>(P, pstride, V, xs, pl.kw, acc);
    });
  else
    loop([&](auto tv, const float* P, const float* V, auto& acc) {
      pv_tile<decltype(tv)::value, DC>(P, pstride, V, xs, pl.dw, pl.kw, acc);
    });
}

// Query slots of one row whose logits are formed together (rows longer than this are done in
// segments).
constexpr int64_t kSegmentSlots = 128;
// Query slots per column chunk of a single long row (see forward_f32; a multiple of
// kSegmentSlots).
constexpr int64_t kColumnSlots = 256;
static_assert(kColumnSlots % kSegmentSlots == 0, "column chunks hold whole segments");

// Rows of tokens to prefetch into L2, issued a few tokens at a time (a burst of a whole row's
// prefetches would stall the loads of the work in between).
class PrefetchQueue {
 public:
  // n tokens from p, step_elems elements apart
  template <typename E>
  void add(const E* p, int64_t step_elems, int64_t n) {
    rows_.push_back({reinterpret_cast<const char*>(p), step_elems * (int64_t)sizeof(E), n});
  }
  int64_t pending() const {
    int64_t n = 0;
    for (size_t e = head_; e < rows_.size(); ++e) n += rows_[e].n;
    return n;
  }
  // Prefetches up to ntok tokens of tok_bytes bytes each.
  void step(int64_t ntok, int64_t tok_bytes) {
    while (ntok > 0 && head_ < rows_.size()) {
      Row& r = rows_[head_];
      const int64_t m = std::min(ntok, r.n);
      for (int64_t x = 0; x < m; ++x)
        for (int64_t o = 0; o < tok_bytes; o += 64) __builtin_prefetch(r.p + x * r.step + o, 0, 2);
      r.p += m * r.step;
      r.n -= m;
      ntok -= m;
      if (r.n == 0) ++head_;
    }
    if (head_ == rows_.size()) {
      rows_.clear();
      head_ = 0;
    }
  }

 private:
  struct Row {
    const char* p;
    int64_t step, n;  // step in bytes
  };
  std::vector<Row> rows_;
  size_t head_ = 0;
};

template <int DV>
static void forward_f32(const View6& q, const View6& k, const View6& v, float* O, float* L,
                        const Plan<float>& pl, float scale, const Parallel& par) {
  constexpr int N = VecOf<float>::N;
  constexpr int TQ = DV >= 4 ? 6 : 8;  // queries per P.V tile (TQ * DV accumulators in registers)
  constexpr int RG = 3;                 // query rows whose logits are formed together
  // queries per shared-window P.V tile: kShared * DV accumulators and DV value vectors within
  // the registers (32 zmm, 16 ymm)
  constexpr int kShared = std::max(1, std::min(6, (NA_AVX2 ? 12 : 24) / DV));
  const int64_t SW = std::min<int64_t>(pl.Ws, kSegmentSlots);
  const int64_t D = pl.D;
  // Rows no longer than a segment are taken NHG heads at a time, heads innermost: task (batch,
  // head group, row chunk), and each row group of the task is done for each of its heads in
  // turn. The heads of a token lie next to each other in memory, and the lines of the other
  // heads that one head's pass brings into cache are used while they are still there (a task per
  // head streamed each token's lines from memory once per head): 2-D forward (B = 4, 56 x 56,
  // 4 heads, k = 7) 9-13% faster at AVX-512, 4% at AVX2. NHG is the most heads that still leave
  // two tasks per thread: fewer tasks would split the rows into chunks that pack their halo key
  // rows twice, and the packed rows of several heads of a 3-D window (each head's ring about
  // 1.5 MB for 32 x 32 slices, k = (3, 7, 7)) do not fit in L2 (3-D forward 20-60% slower).
  const bool seg_pf = pl.Ws > SW;
  int64_t NHG = 1;
  if (!seg_pf)
    for (int64_t g = pl.NH; g > 1; --g)
      if (pl.NH % g == 0 && pl.B * (pl.NH / g) >= 2 * par.num_threads) {
        NHG = g;
        break;
      }
  const int64_t ngr = pl.NH / NHG;  // head groups
  const int64_t nchunks = row_chunks(pl.B * ngr, pl.R, par);
  const int64_t rows_per = (pl.R + nchunks - 1) / nchunks;
  const int64_t K2 = pl.nkr * pl.kw;
  const float* qb = static_cast<const float*>(q.data);
  const float* kb = static_cast<const float*>(k.data);
  const float* vb = static_cast<const float*>(v.data);
  const int64_t *qs = q.stride, *ks = k.stride, *vs = v.stride;
  // Bias columns are all zero without a table, except the -inf column mask of "mask".
  const bool any_bias = pl.any_bias;
  const int64_t ring = key_ring(pl, nchunks, rows_per, RG);
  // Rows with one key row (kernel 1 on the outer axes: the 1-D ops), dilation 1, windows wider
  // than a vector and no bias take their all-interior blocks through band_logits (AVX-512 only:
  // 4 * band_nv accumulators need its 32 registers): band_nv key vectors per tile (0: not
  // taken). Their logits rows are kBandCS apart in Cb, window at +32.
  int band_nv = 0;
  constexpr int64_t kBandCS = 32 + 16 * kBandMaxNV + 16;
#if defined(__AVX512F__)
  if (pl.nkr == 1 && pl.dw == 1 && pl.kw > N && !any_bias) {
    const int64_t nv = (pl.kw + kBandQ - 1 + N - 1) / N;
    if (nv <= kBandMaxNV && nv * N <= pl.Wk) band_nv = (int)nv;
  }
#endif
  // The slots of the border blocks (from block n_full: the clamped windows at both ends of the
  // row, the interior slots of the last partial block) go through the band as well, one query at
  // a time, when every one of their windows is kw consecutive keys of the row (the "clamp" border
  // without causal shortening) and every query row has its key row: no gathered border blocks are
  // then packed (for the 1-D ops' windows of 65 neighbours those were as many key transposes as
  // the whole row, for 1.5% of its queries). bstart[sl - n_full V]: the slot's band start (-1 for
  // a dummy slot).
  bool band_all = band_nv > 0;
  std::vector<int64_t> bstart;
  if (band_all) {
    for (int64_t n = 0; n < pl.R * pl.nkr; ++n) band_all &= pl.rowvalid[n] != 0;
    for (int64_t sl = pl.n_full * N; sl < pl.Ws && band_all; ++sl) {
      if (pl.slotx[sl] >= pl.W) {
        bstart.push_back(-1);
        continue;
      }
      const int64_t st = pl.kidx[sl];
      band_all &= st + pl.kw <= pl.W;
      for (int64_t j = 1; j < pl.kw && band_all; ++j) band_all &= pl.kidx[j * pl.Ws + sl] == st + j;
      bstart.push_back(std::min(st, pl.Wk - band_nv * N));
    }
  }
  // A single row longer than a segment (the 1-D ops) is split into column chunks of colslots
  // slots, taken heads innermost: task (b, chunk, h). The heads of one token lie next to each
  // other in memory; one head's pass over a chunk brings its neighbours' lines into L2 with its
  // own, and the other heads' passes over the same chunk then find them there (a whole row per
  // task streamed every token's lines from L3 once per head): 1-D forward 15% faster with k = 65,
  // 7-10% with a bias table or dilation. Chunks of 256 slots keep a chunk's q, k and v for 8
  // heads of 64 channels (about 1.9 MB) within a 2 MB L2; 128 and 512 were slower by 3-5%.
  const int64_t ncol = pl.R == 1 && nchunks == 1 && pl.Ws > SW ? (pl.Ws + kColumnSlots - 1) / kColumnSlots : 1;
  const int64_t colslots = ncol == 1 ? pl.Ws : kColumnSlots;
  par.for_each(0, pl.B * ngr * nchunks * ncol, 1, [&](int64_t t0, int64_t t1) {
    // per key/value head of the group: its packed key rows, the last packed row and the packed
    // columns
    struct HeadKeys {
      KeyPack<float> Kp;
      int64_t packed_hi = 0, packed_cols = 0;
    };
    std::vector<HeadKeys> hks(NHG);
    for (HeadKeys& e : hks) e.Kp.alloc(pl, ring, !band_all);
    std::vector<float> Cb(band_nv ? (SW + 1) * kBandCS : 0), Mb(band_nv ? pl.Ws : 0);
#if NA_AVX2
    // S padded by one vector: a P.V tile copies N weights from slot sl <= se - 2
    std::vector<float> Qp(RG * D * SW), S(RG * K2 * SW + N), Linv(pl.Ws), Pl(pl.kw * N);
#else
    std::vector<float> Qp(RG * D * SW), S(RG * K2 * SW), Linv(pl.Ws);
#endif
    const float* rows[16];
    // Rows longer than a segment have the next segment's q, k and v columns prefetched into L2
    // a few tokens at a time while this segment is worked on (a burst of a whole segment's
    // prefetches would stall its loads). Shorter rows are left to the hardware prefetcher:
    // prefetching the rows of the row group two ahead made the 2-D forward 6% and the 3-D
    // forward 10% slower.
    PrefetchQueue pfq;
    int64_t pf_quota = 0;
    const int64_t tok_bytes = D * (int64_t)sizeof(float);
    auto pf_step = [&](int64_t ntok) {
      if (seg_pf) pfq.step(ntok, tok_bytes);
    };
    std::vector<const float*> vrows(pl.nkr);  // the value rows of the current query row
    std::vector<int64_t> shift(pl.kw + SW);        // dot_blocks_shared's key shifts
    for (int64_t tc = t0; tc < t1; ++tc) {
      // t: the (batch, head group, row chunk) task; col: the column chunk, slots [s_lo, s_hi)
      // (column chunks only with NHG = 1)
      const int64_t t = ncol == 1 ? tc : (tc / (ncol * pl.NH)) * pl.NH + tc % pl.NH;
      const int64_t col = ncol == 1 ? 0 : (tc / pl.NH) % ncol;
      const int64_t s_lo = col * colslots, s_hi = std::min(pl.Ws, s_lo + colslots);
      const int64_t bg = t / nchunks, chunk = t % nchunks, b = bg / ngr, hg = bg % ngr;
      const int64_t y0 = chunk * rows_per, y1 = std::min(pl.R, y0 + rows_per);
      if (y0 >= y1) continue;
      int64_t klo, khi;
      key_rows(pl, y0, y1, klo, khi);
      const int64_t packed_lo =
          s_lo == 0 ? 0 : std::max<int64_t>(0, std::min(pl.xlo + s_lo + pl.off[0], pl.Wk - band_nv * N) / N * N);
      for (HeadKeys& e : hks) {
        e.packed_hi = klo - 1;
        e.packed_cols = seg_pf ? packed_lo : pl.Wk;
      }
      for (int64_t yg = y0; yg < y1; yg += RG) {
        const int64_t ng = std::min<int64_t>(RG, y1 - yg);
        int64_t kmin, kmax;
        key_rows(pl, yg, yg + ng, kmin, kmax);
        for (int64_t hh = 0; hh < NHG; ++hh) {
          const int64_t h = hg * NHG + hh, bh = b * pl.NH + h, hk = h / pl.G;
          const int64_t ht = pl.nht == 1 ? 0 : h;
          // (heads that share a key/value head share its packed rows: the first one packs them)
          HeadKeys& hkeys = hks[hk - hg * NHG / pl.G];
          KeyPack<float>& Kp = hkeys.Kp;
          int64_t& packed_hi = hkeys.packed_hi;
          int64_t& packed_cols = hkeys.packed_cols;
          auto krow = [&](int64_t y) { return kb + pl.row_off(ks, b, y, hk); };
          auto vrow = [&](int64_t y) { return vb + pl.row_off(vs, b, y, hk); };
          // transposed key rows (sink and padding columns zero) and the border blocks' copies,
          // packed just before the first row group that reads them (so they are still in cache)
          // Rows longer than a segment have their columns packed as the segments reach them (the
          // next segment's are prefetched; a whole row packed up front came from memory
          // unprefetched): columns [packed_lo, packed_cols) of every packed row, packed_lo the first
          // one that the task's column chunk reads (the band of its first slot, 0 for the first chunk).
          auto pack_cols = [&](int64_t y, int64_t c0, int64_t c1) {
            const float* kr = krow(y);
            float* dst = Kp.trow(pl, y);
            for (int64_t x0 = c0; x0 < c1; x0 += N) {
              for (int l = 0; l < N; ++l) rows[l] = x0 + l < pl.W ? kr + (x0 + l) * ks[3] : nullptr;
              NA_TRANSPOSE_BLK(rows, D, 1.0f, dst + x0, pl.Wk);
            }
          };
          // columns up to upto_col (exclusive) of the packed rows
          auto extend_cols = [&](int64_t upto_col) {
            const int64_t c1 = std::min(pl.Wk, (upto_col + N - 1) / N * N);
            if (c1 <= packed_cols) return;
            for (int64_t y = std::max(klo, packed_hi - Kp.rows + 1); y <= packed_hi; ++y) pack_cols(y, packed_cols, c1);
            packed_cols = c1;
          };
          auto pack_key_rows = [&](int64_t upto) {
            // (rows that the ring would drop before any group reads them are skipped)
            for (int64_t y = std::max(packed_hi + 1, upto - Kp.rows + 1); y <= upto; ++y) {
              const float* kr = krow(y);
              pack_cols(y, packed_lo, packed_cols);
              // border slots through the band: the columns of their bands that lie below the
              // chunk's packed columns
              if (band_all && s_hi > pl.n_full * N) {
                int64_t c0 = packed_lo, c1 = 0;
                for (int64_t st : bstart)
                  if (st >= 0 && st < packed_lo) {
                    c0 = std::min(c0, st / N * N);
                    c1 = std::max(c1, std::min(packed_lo, st + band_nv * N));
                  }
                if (c0 < c1) pack_cols(y, c0, c1);
              }
              // (border blocks only for the chunk that holds them)
              for (int64_t g = 0; g < pl.NG && s_hi > pl.n_full * N && !band_all; ++g) {
                const int64_t s0 = (pl.n_full + g) * N;
                float* gb = Kp.grow(pl, y, g);
                for (int64_t j = 0; j < pl.kw; ++j) {
                  const int32_t* ki = pl.kidx.data() + j * pl.Ws + s0;
                  for (int l = 0; l < N; ++l) rows[l] = ki[l] < pl.W ? kr + ki[l] * ks[3] : nullptr;
                  NA_TRANSPOSE_BLK(rows, D, 1.0f, gb + j * D * N, N);
                }
              }
            }
            packed_hi = std::max(packed_hi, upto);
          };
          if (kmax > packed_hi) pack_key_rows(kmax);
          // the group's slots in segments [sg, se) of at most SW (blocks [cb, ce)): a segment's
          // queries and logits stay in cache from the logits to the output
          for (int64_t sg = s_lo; sg < s_hi; sg += SW) {
            const int64_t se = std::min(s_hi, sg + SW), cb = sg / N, ce = se / N;
            // the key columns that this segment's interior blocks read (blocks [cb, ce) read
            // columns xlo + slot + off[j], slot < se), all of them once it reaches the border blocks
            // the segment's all-interior blocks through band_logits (rows with a key row): slots [sg, gend)
            // (and with band_all its border slots too: [iend, gend) one query at a time)
            int64_t gend = sg, iend = sg;
            if (band_nv > 0) {
              bool rows_ok = true;
              for (int64_t r = 0; r < ng; ++r) rows_ok &= pl.rowvalid[yg + r] != 0;
              if (rows_ok) iend = gend = std::max(sg, std::min(se, pl.n_full * N));
              if (band_all) gend = se;
            }
            const int64_t cg = gend / N;
            if (seg_pf)
              extend_cols(se > pl.n_full * N ? pl.Wk
                                             : std::min(pl.Wk, pl.xlo + se + std::max(pl.off[pl.kw - 1],
                                                                                       pl.off[0] + band_nv * N)));
            if (seg_pf && se < s_hi) {
              // the next segment's query columns and the key/value columns it adds (interior
              // slots: column xlo + slot), spread over this segment's key rows and query rows
              auto col = [&](int64_t x) { return std::min<int64_t>(std::max<int64_t>(x, 0), pl.W); };
              const int64_t ne = std::min(s_hi, se + SW);
              const int64_t qa = col(pl.xlo + se), qe = col(pl.xlo + ne);
              const int64_t ka = col(pl.xlo + se + pl.off[pl.kw - 1]), ke = col(pl.xlo + ne + pl.off[pl.kw - 1]);
              for (int64_t r = 0; r < ng; ++r)
                pfq.add(qb + pl.row_off(qs, b, yg + r, h) + qa * qs[3], qs[3], qe - qa);
              for (int64_t ky = kmin; ky <= kmax; ++ky) {
                pfq.add(krow(ky) + ka * ks[3], ks[3], ke - ka);
                pfq.add(vrow(ky) + ka * vs[3], vs[3], ke - ka);
              }
              const int64_t tokens = pfq.pending();
              // steps: one per key row and slot block, per query row and P.V tile
              pf_quota = tokens / ((kmax - kmin + 1) * (ce - cb) + ng * (se - sg) / 6) + 1;
            }
#if defined(__AVX512F__)
            for (int64_t r = 0; r < ng && gend > sg; ++r) {
              const int64_t y = yg + r;
              const int64_t ky = pl.rowpos[y];
              const float* qr = qb + pl.row_off(qs, b, y, h);
              const float* kt = Kp.trow(pl, ky);
              float* Lrow = L + (bh * pl.R + y) * pl.W;
              float* Orow = O + ((b * pl.R + y) * pl.W * pl.NH + h) * D;
              const int64_t ostr = pl.NH * D, vxs = vs[3];
              const float* vr0 = vrow(ky) + (pl.xlo + pl.off[0]) * vxs;  // slot 0's first key
              auto crow = [&](int64_t sl) { return Cb.data() + (sl - sg) * kBandCS + 32; };
              for (int64_t sl = sg; sl < iend; sl += kBandQ) {
                // the band's first column, moved left where the band would run past the packed row
                const int64_t want = pl.xlo + sl + pl.off[0];
                const int64_t start = std::min(want, pl.Wk - band_nv * N), wo = want - start;
                const float* qt = qr + (pl.xlo + sl) * qs[3];
                // (band_nv is 2..kBandMaxNV; dispatch_nc's other instances are never called)
                dispatch_nc(band_nv, [&](auto nvv) {
                  constexpr int NV = decltype(nvv)::value;
                  if constexpr (NV >= 2 && NV <= kBandMaxNV)
                    band_logits<NV>(qt, qs[3], D, kt + start, pl.Wk, scale, wo, crow(sl), kBandCS,
                                    sl + 2 * kBandQ < iend);
                });
                if ((sl - sg) % N == 0) pf_step(pf_quota);
              }
              // (the maxima in Mb, the sums in Linv until their logs are taken N at a time)
              for (int64_t sl = sg; sl < iend; ++sl) band_softmax(crow(sl), pl.kw, Mb[sl], Linv[sl]);
              for (int64_t sl = sg; sl < iend; sl += N) {  // (iend - sg is a multiple of N)
                const Vec<float> l = loadu(Linv.data() + sl);
                storeu(Lrow + pl.xlo + sl, loadu(Mb.data() + sl) + vlog(l));
                storeu(Linv.data() + sl, 1.0f / l);
              }
              auto pv = [&](auto tv, int64_t sl) {
                constexpr int T = decltype(tv)::value;
                Vec<float> acc[T][DV];
                NA_UNROLL
                for (int t = 0; t < T; ++t)
                  NA_UNROLL
                  for (int d = 0; d < DV; ++d) acc[t][d] = splat<float>(0.0f);
                pv_tile_diag_any<T, DV>(crow(sl), 1, vr0 + sl * vxs, vxs, pl.kw, acc, kBandCS);
                NA_UNROLL
                for (int t = 0; t < T; ++t) {
                  const Vec<float> inv = splat<float>(Linv[sl + t]);
                  float* o = Orow + (pl.xlo + sl + t) * ostr;
                  NA_UNROLL
                  for (int d = 0; d < DV; ++d) storeu(o + d * N, acc[t][d] * inv);
                }
              };
              int64_t sl = sg;
              for (; sl + TQ <= iend; sl += TQ) {
                pv(std::integral_constant<int, TQ>{}, sl);
                pf_step(pf_quota);
              }
              if (sl < iend)  // the rest, fewer than TQ queries, in one narrower tile
                dispatch_nc(iend - sl, [&](auto tv) {
                  if constexpr (decltype(tv)::value < TQ) pv(tv, sl);
                });
              // the border slots, one query at a time: logits of the band at its window, softmax,
              // P.V over the window's kw value tokens
              const float* vr = vrow(ky);
              for (sl = iend; sl < gend; ++sl) {
                const int64_t x = pl.slotx[sl], st0 = bstart[sl - pl.n_full * N];
                if (x >= pl.W) continue;  // dummy slot
                const int64_t ws = pl.kidx[sl];
                float* C = crow(sl);
                dispatch_nc(band_nv, [&](auto nvv) {
                  constexpr int NV = decltype(nvv)::value;
                  if constexpr (NV >= 2 && NV <= kBandMaxNV)
                    band_logits<NV, 1>(qr + x * qs[3], qs[3], D, kt + st0, pl.Wk, scale, ws - st0, C, kBandCS,
                                       false);
                });
                float m, l;
                band_softmax(C, pl.kw, m, l);
                Lrow[x] = m + std::log(l);
                Vec<float> acc[1][DV];
                NA_UNROLL
                for (int d = 0; d < DV; ++d) acc[0][d] = splat<float>(0.0f);
                pv_tile<1, DV>(C, 1, vr + ws * vxs, vxs, 1, pl.kw, acc);
                const Vec<float> inv = splat<float>(1.0f / l);
                NA_UNROLL
                for (int d = 0; d < DV; ++d) storeu(Orow + x * ostr + d * N, acc[0][d] * inv);
              }
            }
#endif
            for (int64_t r = 0; r < ng; ++r) {
              const int64_t y = yg + r;
              const float* qr = qb + pl.row_off(qs, b, y, h);
              for (int64_t ci = cg; ci < ce; ++ci) {
                const int32_t* sx = pl.slotx.data() + ci * N;
                for (int l = 0; l < N; ++l) rows[l] = sx[l] < pl.W ? qr + sx[l] * qs[3] : nullptr;
                NA_TRANSPOSE_BLK(rows, D, scale, Qp.data() + r * D * SW + (ci - cb) * N, SW);
              }
              for (int64_t i = 0; i < pl.nkr; ++i) {
                if (pl.rowvalid[y * pl.nkr + i]) continue;
                const float* brow = pl.bias_row(ht, y, i);
                float* Si = S.data() + (r * pl.nkr + i) * pl.kw * SW - sg;
                for (int64_t j = 0; j < pl.kw; ++j)
                  for (int64_t sl = sg; sl < se; ++sl)
                    Si[j * SW + sl] =
                        pl.dead_rows_masked() ? -std::numeric_limits<float>::infinity() : brow[j * pl.Ws + sl];
              }
            }
            // logits S[r][n][slot - sg], n = i * kw + j: each key row once for all the group's
            // rows that read it (the key vectors are loaded once for up to RG query rows)
            for (int64_t ky = kmin; ky <= kmax; ++ky) {
              int nr = 0;
              const float* A[RG];
              float* So[RG];
              for (int64_t r = 0; r < ng; ++r) {
                const int64_t y = yg + r;
                for (int64_t i = 0; i < pl.nkr; ++i)
                  if (pl.rowvalid[y * pl.nkr + i] && pl.rowpos[y * pl.nkr + i] == ky) {
                    A[nr] = Qp.data() + r * D * SW;
                    So[nr++] = S.data() + (r * pl.nkr + i) * pl.kw * SW;
                  }
              }
              if (nr == 0) continue;
              for (int64_t ci = cg; ci < ce; ++ci) {
                const int64_t nsh = std::min<int64_t>(ce, pl.n_full) - ci;
                if (nr == 1 && pl.dw == 1 && pl.kw > N && nsh >= 2) {
                  dot_blocks_shared(nsh, A[0] + (ci - cb) * N, SW, D, Kp.trow(pl, ky) + pl.xlo + ci * N + pl.off[0],
                                    pl.Wk, pl.kw, So[0] + (ci - cb) * N, SW, shift.data());
                  ci += nsh - 1;
                  pf_step(pf_quota * nsh);
                  continue;
                }
                const KeyView<float> kv = key_view(pl, Kp, ky, ci);
                const float* Ab[RG];
                float* Sb[RG];
                for (int a = 0; a < nr; ++a) {
                  Ab[a] = A[a] + (ci - cb) * N;
                  Sb[a] = So[a] + (ci - cb) * N;
                }
                dot_row_multi(nr, Ab, SW, D, kv, pl.kw, Sb, SW);
                pf_step(pf_quota);
              }
              pf_step(pf_quota);
            }
            if (any_bias)
              for (int64_t r = 0; r < ng; ++r)
                for (int64_t i = 0; i < pl.nkr; ++i) {
                  const int64_t y = yg + r;
                  if (!pl.rowvalid[y * pl.nkr + i]) continue;
                  const float* brow = pl.bias_row(ht, y, i);
                  float* Si = S.data() + (r * pl.nkr + i) * pl.kw * SW - sg;
                  for (int64_t j = 0; j < pl.kw; ++j)
                    for (int64_t e = sg; e < se; e += N)
                      storeu(Si + j * SW + e, loadu(Si + j * SW + e) + loadu(brow + j * pl.Ws + e));
                }
            for (int64_t r = 0; r < ng; ++r) {
              const int64_t y = yg + r;
              float* Sy = S.data() + r * K2 * SW - sg;  // Sy[n * SW + slot]
              float* Lrow = L + (bh * pl.R + y) * pl.W;
              // softmax per block of N queries (P left unnormalised; 1/l applied to the output)
              for (int64_t ci = cg; ci < ce; ++ci) {
                const int64_t s0 = ci * N;
                Vec<float> m = loadu(Sy + s0);
                for (int64_t n = 1; n < K2; ++n) m = vmax<float>(m, loadu(Sy + n * SW + s0));
                Vec<float> l = splat<float>(0.0f);
                for (int64_t n = 0; n < K2; ++n) {
                  Vec<float> p = vexp(loadu(Sy + n * SW + s0) - m);
                  storeu(Sy + n * SW + s0, p);
                  l += p;
                }
                storeu(Linv.data() + s0, 1.0f / l);
                const Vec<float> lse = m + vlog(l);
                for (int lane = 0; lane < N; ++lane) {
                  int64_t x = pl.slotx[s0 + lane];
                  if (x < pl.W) Lrow[x] = lse[lane];
                }
              }
              pf_step(pf_quota);
              // P.V: tiles of TQ interior queries (slots [0, n_int) are columns xlo + slot), then
              // the remaining queries one at a time.
              float* Orow = O + ((b * pl.R + y) * pl.W * pl.NH + h) * D;
              const int64_t ostr = pl.NH * D;
              const int64_t vxs = vs[3];
              const int64_t tile_end = std::min(pl.n_int, se);
              for (int64_t i = 0; i < pl.nkr; ++i)
                vrows[i] = pl.rowvalid[y * pl.nkr + i] ? vrow(pl.rowpos[y * pl.nkr + i]) : nullptr;
              int64_t sl = gend;
              // whether slots a and b read the same key column for every neighbour
              auto same_window = [&](int64_t a, int64_t b) {
                for (int64_t j = 0; j < pl.kw; ++j)
                  if (pl.kidx[j * pl.Ws + a] != pl.kidx[j * pl.Ws + b]) return false;
                return true;
              };
              // P.V of the NS queries from slot sl, whose windows hold the same key columns (NS is
              // at most kShared; dispatch_nc's wider instances are never called)
              auto pv_shared = [&](auto nsv) {
                constexpr int NS = decltype(nsv)::value;
                if constexpr (NS <= kShared) {
                  Vec<float> acc[NS][DV];
                  NA_UNROLL
                  for (int t = 0; t < NS; ++t)
                    NA_UNROLL
                    for (int d = 0; d < DV; ++d) acc[t][d] = splat<float>(0.0f);
                  for (int64_t i = 0; i < pl.nkr; ++i) {
                    if (!pl.rowvalid[y * pl.nkr + i]) continue;
                    const float* P = Sy + i * pl.kw * SW + sl;
                    for (int64_t j = 0; j < pl.kw; ++j) {
                      const int32_t col = pl.kidx[j * pl.Ws + sl];
                      if (col >= pl.W) continue;  // not a key (zero value or masked)
                      Vec<float> vv[DV];
                      NA_UNROLL
                      for (int d = 0; d < DV; ++d) {
                        vv[d] = loadu(vrows[i] + col * vxs + d * N);
                        pin_register(vv[d]);
                      }
                      NA_UNROLL
                      for (int t = 0; t < NS; ++t) {
                        const Vec<float> p = splat<float>(P[j * SW + t]);
                        NA_UNROLL
                        for (int d = 0; d < DV; ++d) acc[t][d] += p * vv[d];
                      }
                    }
                  }
                  NA_UNROLL
                  for (int t = 0; t < NS; ++t) {
                    const Vec<float> inv = splat<float>(Linv[sl + t]);
                    float* o = Orow + pl.slotx[sl + t] * ostr;
                    NA_UNROLL
                    for (int d = 0; d < DV; ++d) storeu(o + d * N, acc[t][d] * inv);
                  }
                }
              };
#if NA_AVX2
              // tiles of TQ2 queries by DC vectors of channels (TQ2 * DC accumulators + DC value
              // vectors + 1 weight within 16 ymm registers), then a narrower tile for the rest
              // (one tile kernel per loop, as below for AVX-512)
              auto pv_avx2 = [&](auto tqv, auto kern) {
                constexpr int TQ2 = decltype(tqv)::value;
                constexpr int DC = 2;
                const int64_t x0 = pl.xlo + sl;
                for (int dc = 0; dc < DV; dc += DC) {
                  Vec<float> acc[TQ2][DC];
                  NA_UNROLL
                  for (int t = 0; t < TQ2; ++t)
                    NA_UNROLL
                    for (int d = 0; d < DC; ++d) acc[t][d] = splat<float>(0.0f);
                  for (int64_t i = 0; i < pl.nkr; ++i) {
                    if (!pl.rowvalid[y * pl.nkr + i]) continue;
                    // the tile's weights, copied to Pl[j][0:N] (fixed offsets: no pointer per j)
                    const float* Pi = Sy + i * pl.kw * SW + sl;
                    for (int64_t j = 0; j < pl.kw; ++j) storeu(Pl.data() + j * N, loadu(Pi + j * SW));
                    kern(tqv, Pl.data(), vrows[i] + (x0 + pl.off[0]) * vxs + dc * N, acc);
                  }
                  NA_UNROLL
                  for (int t = 0; t < TQ2; ++t) {
                    const Vec<float> inv = splat<float>(Linv[sl + t]);
                    float* o = Orow + (x0 + t) * ostr + dc * N;
                    NA_UNROLL
                    for (int d = 0; d < DC; ++d) storeu(o + d * N, acc[t][d] * inv);
                  }
                }
                sl += TQ2;
                pf_step(pf_quota);
              };
              auto pv_avx2_tiles = [&](auto tqv) {
                constexpr int TQ2 = decltype(tqv)::value;
                with_pv_kernel<2>(pl, N, vxs, TQ2, [&](auto kern) {
                  while (sl + TQ2 <= tile_end) pv_avx2(tqv, kern);
                });
              };
              pv_avx2_tiles(std::integral_constant<int, 6>{});
              pv_avx2_tiles(std::integral_constant<int, 2>{});
              (void)TQ;
#else
              // tiles of TQ queries, then one tile of the rest
              auto tile = [&](auto tv, auto kern) {
                constexpr int T = decltype(tv)::value;
                pf_step(pf_quota);
                Vec<float> acc[T][DV];
                NA_UNROLL
                for (int t = 0; t < T; ++t)
                  NA_UNROLL
                  for (int d = 0; d < DV; ++d) acc[t][d] = splat<float>(0.0f);
                const int64_t x0 = pl.xlo + sl;
                for (int64_t i = 0; i < pl.nkr; ++i)
                  if (pl.rowvalid[y * pl.nkr + i])
                    kern(tv, Sy + i * pl.kw * SW + sl, vrows[i] + (x0 + pl.off[0]) * vxs, acc);
                NA_UNROLL
                for (int t = 0; t < T; ++t) {
                  const Vec<float> inv = splat<float>(Linv[sl + t]);
                  float* o = Orow + (x0 + t) * ostr;
                  NA_UNROLL
                  for (int d = 0; d < DV; ++d) storeu(o + d * N, acc[t][d] * inv);
                }
                sl += T;
              };
              with_pv_kernel<DV>(pl, SW, vxs, TQ, [&](auto kern) {
                while (sl + TQ <= tile_end) tile(std::integral_constant<int, TQ>{}, kern);
                if (sl < tile_end)
                  dispatch_nc(tile_end - sl, [&](auto tv) {
                    if constexpr (decltype(tv)::value < TQ) tile(tv, kern);
                  });
              });
#endif
              // the other queries: runs of up to kShared slots whose windows hold the same key
              // columns (the clamped windows at both ends of a row) in one tile that loads each
              // value vector once for the run, single queries in a tile of one
              while (sl < se) {
                if (pl.slotx[sl] >= pl.W) {
                  ++sl;
                  continue;
                }
                int64_t n = 1;
                while (n < kShared && sl + n < se && pl.slotx[sl + n] < pl.W && same_window(sl, sl + n)) ++n;
                dispatch_nc(n, pv_shared);
                sl += n;
              }
            }
          }
        }
      }
    }
  });
}

// The float32 forward (float32 inputs, head widths of float_fast_width, unit channel stride);
// false: not taken.
static bool forward_fast(const View6& q, const View6& k, const View6& v, float* out, float* lse,
                         const Plan<float>& pl, float scale, const Parallel& par) {
  if (!float_fast_width(pl.D)) return false;
  if (q.stride[5] != 1 || k.stride[5] != 1 || v.stride[5] != 1) return false;
  // DV = vectors per head (16 channels each on AVX-512, 8 on AVX2)
#if NA_AVX2
  switch (pl.D / 16) {
    case 1: forward_f32<2>(q, k, v, out, lse, pl, scale, par); break;
    case 2: forward_f32<4>(q, k, v, out, lse, pl, scale, par); break;
    case 3: forward_f32<6>(q, k, v, out, lse, pl, scale, par); break;
    default: forward_f32<8>(q, k, v, out, lse, pl, scale, par); break;
  }
#else
  switch (pl.D / 16) {
    case 1: forward_f32<1>(q, k, v, out, lse, pl, scale, par); break;
    case 2: forward_f32<2>(q, k, v, out, lse, pl, scale, par); break;
    case 3: forward_f32<3>(q, k, v, out, lse, pl, scale, par); break;
    default: forward_f32<4>(q, k, v, out, lse, pl, scale, par); break;
  }
#endif
  return true;
}


template <typename scalar_t, typename T>
static void backward_impl(const View6& dout, const View6& q, const View6& k, const View6& v, const View6& out,
                          const T* L, const T* dlse, scalar_t* DQ, scalar_t* DK, scalar_t* DV, T* dbias, const Plan<T>& pl,
                          T scale, const Parallel& par) {
  constexpr int N = VecOf<T>::N;
  const int64_t BH = pl.B * pl.NH;
  const int64_t rl = pl.D * pl.Wk;  // one transposed key row
  const int64_t nchunks = backward_row_chunks(BH, pl.R, pl.row_span);
  const int64_t rows_per = (pl.R + nchunks - 1) / nchunks;
  const int64_t ntasks = BH * nchunks;
  // Private dK/dV per task (transposed rows), reduced in a fixed order afterwards: chunk ch holds
  // the key rows [ck_lo[ch], ck_hi[ch]] its query rows read, at ck_off[ch] within its pair's
  // bh_size elements.
  std::vector<int64_t> ck_lo(nchunks), ck_hi(nchunks), ck_off(nchunks);
  int64_t bh_size = 0;
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const int64_t y0 = ch * rows_per, y1 = std::min(pl.R, y0 + rows_per);
    key_rows(pl, y0, y1, ck_lo[ch], ck_hi[ch]);
    ck_off[ch] = bh_size;
    bh_size += std::max<int64_t>(0, ck_hi[ch] - ck_lo[ch] + 1) * rl;
  }
  // When each key/value head has one query head and the pairs are not cut in chunks, a task's
  // partial is the final dK/dV of its pair: each key row is written out after the last query
  // row that reads it (while it is in cache), from a partial buffer private to the thread.
  const bool direct = nchunks == 1 && pl.G == 1;
  // (each task zeroes its key rows as it packs them)
  RawBuf<T> dKp(direct ? 0 : BH * bh_size), dVp(direct ? 0 : BH * bh_size);
  // dst[b, y, :, hk, :] = the transposed key row src[c][x] (contiguous (B, T, H, W, heads_kv, D))
  auto write_key_row = [&](scalar_t* dst, const T* src, int64_t b, int64_t hk, int64_t y) {
    scalar_t* orow = dst + ((b * pl.R + y) * pl.W * pl.NKV + hk) * pl.D;
    const int64_t ts = pl.NKV * pl.D;
#if NA_X86V3
    if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
      if (pl.D % 8 == 0) {
        // 8 channels by 8 columns transposed in registers
        int64_t x0 = 0;
        const float* rows[8];
        for (; x0 + 8 <= pl.W; x0 += 8)
          for (int64_t c0 = 0; c0 < pl.D; c0 += 8) {
            for (int l = 0; l < 8; ++l) rows[l] = src + (c0 + l) * pl.Wk + x0;
            transpose8(rows, 8, 1.0f, orow + x0 * ts + c0, ts);
          }
        for (; x0 < pl.W; ++x0)
          for (int64_t c = 0; c < pl.D; ++c) orow[x0 * ts + c] = src[c * pl.Wk + x0];
        return;
      }
    }
#endif
    for (int64_t x = 0; x < pl.W; ++x)
      for (int64_t c = 0; c < pl.D; ++c) orow[x * ts + c] = static_cast<scalar_t>(src[c * pl.Wk + x]);
  };
  const Buf<T> zero_row(rl, T(0));
  const int64_t tsize = pl.nbr * (2 * pl.kw - 1);
  Buf<T> dB(dbias ? ntasks * pl.nht * tsize : 0, T(0));
  const int64_t K2 = pl.nkr * pl.kw;
  const scalar_t* Oin = static_cast<const scalar_t*>(out.data);
  const int64_t* ost = out.stride;
  // Border queries (the border blocks' slots from n_int on) sum their dK/dV per key column,
  // channels contiguous: bcols the key columns they read, colmap[x] the index of column x there.
  std::vector<int32_t> colmap(pl.W, -1), bcols;
  std::vector<std::vector<int>> blanes(pl.NG);  // [g] the border queries' lanes of block g
  for (int64_t g = 0; g < pl.NG; ++g)
    for (int l = 0; l < N; ++l) {
      const int64_t sl = (pl.n_full + g) * N + l;
      if (sl < pl.n_int || pl.slotx[sl] >= pl.W) continue;
      blanes[g].push_back(l);
      for (int64_t j = 0; j < pl.kw; ++j) {
        const int32_t col = pl.kidx[j * pl.Ws + sl];
        if (col < pl.W && colmap[col] < 0) {
          colmap[col] = (int32_t)bcols.size();
          bcols.push_back(col);
        }
      }
    }
  const int64_t NB = (int64_t)bcols.size();
  const int64_t bsize = NB * 2 * pl.D;  // per key row: [column][dK D, dV D]
  // Lanes of the first border block that hold interior slots (their dK/dV go key-centric).
  Buf<T> imask(N);
  for (int l = 0; l < N; ++l) imask[l] = pl.n_full * N + l < pl.n_int ? T(1) : T(0);
  // how far an interior query's keys reach right and left of it
  const int64_t rreach = std::max<int64_t>(pl.off[pl.kw - 1], 0), lreach = std::max<int64_t>(-pl.off[0], 0);
  const int64_t LP = (pl.xlo + rreach + N - 1) / N * N;         // left margin of the row buffers
  // row stride with both margins; P and dS of neighbour j are kept at their key columns
  // (query slot + xlo + off[j]), up to rreach + xlo past the last slot
  const int64_t qs = LP + std::max(pl.Wk + (lreach + 1 + N - 1) / N * N, pl.Ws + LP);

  // Query rows in groups of RG (float, AVX2 and AVX-512): a key row's key and value vectors are
  // loaded once for all the group's rows that read it, in the logits, dP and dQ (one row at a
  // time, every FMA waited on its own unaligned key load).
  constexpr bool grouped = NA_X86V3 && std::is_same<T, float>::value;
  constexpr int RG = grouped ? kSharedRows : 1;
#if NA_X86V3
  // delta = rowsum(out * dout) and the dq rows with 8x8 transposes
  const bool vec_rows = std::is_same<scalar_t, float>::value && std::is_same<T, float>::value && pl.D % 8 == 0;
#endif
  const int64_t ring = key_ring(pl, nchunks, rows_per, RG);
  par.for_each(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    KeyPack<T> Kp, Vp;
    Kp.alloc(pl, ring);
    Vp.alloc(pl, ring);
    // The border queries' dK/dV of key row ky: bsize elements at bKV + ky * bsize.
    Buf<T> bKV(std::max<int64_t>(1, pl.R * bsize));
    std::vector<T> qt(pl.D), gt(pl.D);
    // Per row of a group: query-row buffers with zero margins (so that key-centric sums can read
    // shifted windows), P and dS of the interior blocks, a block's P and dS, dQ, lse and delta.
    Buf<T> Qbuf(RG * pl.D * qs, T(0)), Gbuf(RG * pl.D * qs, T(0)), Prow_g(RG * K2 * qs, T(0)),
        dSrow_g(RG * K2 * qs, T(0));
    auto Qrow = [&](int64_t r) { return Qbuf.data() + r * pl.D * qs + LP; };
    auto Grow = [&](int64_t r) { return Gbuf.data() + r * pl.D * qs + LP; };
    Buf<T> Sg(RG * K2 * N), dSg(RG * K2 * N), dQg(RG * pl.D * pl.Ws);
    Buf<T> lse_g(RG * pl.Ws), delta_g(RG * pl.Ws);
#if NA_X86V3
    Buf<T> Ot(pl.D * pl.Ws), dq8(8 * pl.D);  // transposed out row; 8 dq tokens
#endif
    struct RowPair {
      int r, i;  // row of the group, window row
    };
    // the slot block of a pair's window row in a per-group [row][nkr * kw][V] buffer
    auto pair_block = [&](T* buf, const RowPair& p) { return buf + (p.r * K2 + p.i * pl.kw) * N; };
    std::vector<std::vector<RowPair>> kpairs(pl.R);
    std::vector<KeyView<T>> kviews(pl.nkr);
    std::vector<int64_t> row_i(pl.nkr), last_use(pl.R);
    RawBuf<T> dKown(direct ? bh_size : 0), dVown(direct ? bh_size : 0);
    std::vector<uint8_t> written(direct ? pl.R : 0);  // key rows of dK/dV written out
    // The key-centric sums over several key rows at once (float; vector registers to hold them
    // in the AVX2 and AVX-512 builds). The same sums in the same order as one row at a time.
    constexpr bool multi_key_sum = NA_X86V3 && std::is_same<T, float>::value;
    std::vector<const T*> wk(pl.nkr), wv(pl.nkr);
    std::vector<T*> dk(pl.nkr), dv(pl.nkr);
    // (The next rows' q, dout, out, k and v rows are left to the hardware prefetcher: software
    // prefetches of them, a few tokens at a time, made the backward 5-8% slower.)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nchunks, chunk = t % nchunks, b = bh / pl.NH, h = bh % pl.NH;
      const int64_t ht = pl.nht == 1 ? 0 : h;
      const int64_t y0 = chunk * rows_per, y1 = std::min(pl.R, y0 + rows_per);
      if (y0 >= y1) continue;
      int64_t klo, khi;
      key_rows(pl, y0, y1, klo, khi);
      // the last query row of the task that reads each key row: the border queries' dK/dV are
      // added to the key row after that row (and the row written out, direct), while in cache
      for (int64_t ky = klo; ky <= khi; ++ky) last_use[ky] = -1;
      for (int64_t y = y0; y < y1; ++y)
        for (int64_t i = 0; i < pl.nkr; ++i)
          if (pl.rowvalid[y * pl.nkr + i]) last_use[pl.rowpos[y * pl.nkr + i]] = y;
      // key/value rows are packed (and their dK/dV accumulators zeroed) just before the first
      // query row that reads them
      int64_t packed_hi = klo - 1;
      // this task's dK/dV partial: key row ky at (ky - klo) * rl
      T* dKt = direct ? dKown.data() : dKp.data() + bh * bh_size + ck_off[chunk];
      T* dVt = direct ? dVown.data() : dVp.data() + bh * bh_size + ck_off[chunk];
      if (direct) std::fill(written.begin(), written.end(), uint8_t(0));
      T* dBt = dbias ? dB.data() + t * pl.nht * tsize : nullptr;
      for (int64_t yg = y0; yg < y1; yg += RG) {
        const int64_t ng = std::min<int64_t>(RG, y1 - yg);
        int64_t ylo, yhi;
        key_rows(pl, yg, yg + ng, ylo, yhi);
        if (yhi > packed_hi) {
          const int64_t pack_from = std::max(packed_hi + 1, yhi - ring + 1);  // (the ring keeps these)
          pack_keys<scalar_t, T>(k, b, h / pl.G, pack_from, yhi, pl, Kp);
          pack_keys<scalar_t, T>(v, b, h / pl.G, pack_from, yhi, pl, Vp);
          std::fill(bKV.begin() + (packed_hi + 1) * bsize, bKV.begin() + (yhi + 1) * bsize, T(0));
          std::fill(dKt + (packed_hi + 1 - klo) * rl, dKt + (yhi + 1 - klo) * rl, T(0));
          std::fill(dVt + (packed_hi + 1 - klo) * rl, dVt + (yhi + 1 - klo) * rl, T(0));
          packed_hi = yhi;
        }
        // the (row of the group, window row) pairs that read each key row of the group
        for (int64_t ky = ylo; ky <= yhi; ++ky) kpairs[ky - ylo].clear();
        for (int64_t r = 0; r < ng; ++r)
          for (int64_t i = 0; i < pl.nkr; ++i)
            if (pl.rowvalid[(yg + r) * pl.nkr + i]) kpairs[pl.rowpos[(yg + r) * pl.nkr + i] - ylo].push_back({(int)r, (int)i});
        for (int64_t r = 0; r < ng; ++r) {
          const int64_t y = yg + r;
          T* const Qp = Qrow(r);
          T* const Gp = Grow(r);
          T* const lse_s = lse_g.data() + r * pl.Ws;
          T* const delta_s = delta_g.data() + r * pl.Ws;
          pack_row<scalar_t, T>(q, b, y, h, pl, scale, Qp, qs);
          pack_row<scalar_t, T>(dout, b, y, h, pl, T(1), Gp, qs);
          const scalar_t* Orow = Oin + pl.row_off(ost, b, y, h);
#if NA_X86V3
          if (vec_rows) {  // delta = rowsum(out * dout), 8 channels by 8 tokens transposed
            pack_row<scalar_t, T>(out, b, y, h, pl, T(1), Ot.data(), pl.Ws);
            for (int64_t s0 = 0; s0 < pl.Ws; s0 += N) {
              Vec<T> acc = splat<T>(T(0));
              for (int64_t c = 0; c < pl.D; ++c) acc += loadu(Ot.data() + c * pl.Ws + s0) * loadu(Gp + c * qs + s0);
              storeu(delta_s + s0, acc);  // dummy slots: zero
            }
            for (int64_t sl = 0; sl < pl.Ws; ++sl) {
              const int64_t x = pl.slotx[sl];
              lse_s[sl] = x < pl.W ? L[(bh * pl.R + y) * pl.W + x] : T(0);
            }
          } else
#endif
          for (int64_t sl = 0; sl < pl.Ws; ++sl) {
            int64_t x = pl.slotx[sl];
            if (x >= pl.W) {
              lse_s[sl] = T(0);
              delta_s[sl] = T(0);
              continue;
            }
            lse_s[sl] = L[(bh * pl.R + y) * pl.W + x];
            const scalar_t* o = Orow + x * ost[3];
            T acc = 0;
            for (int64_t c = 0; c < pl.D; ++c) acc += static_cast<T>(o[c * ost[5]]) * Gp[c * qs + sl];
            delta_s[sl] = acc;
          }
          // dS = P (dP - delta + dlse): fold dlse into delta
          if (dlse)
            for (int64_t sl = 0; sl < pl.Ws; ++sl) {
              const int64_t x = pl.slotx[sl];
              if (x < pl.W) delta_s[sl] -= dlse[(bh * pl.R + y) * pl.W + x];
            }
        }
        for (int64_t ci = 0; ci * N < pl.Ws; ++ci) {
          const int64_t s0 = ci * N;
          const bool contiguous = ci < pl.n_full;
          // logits S = Q K + bias and dP = dO . V over valid rows (invalid rows: dP = 0)
          for (int64_t r = 0; r < ng; ++r)
            for (int64_t i = 0; i < pl.nkr; ++i)
              if (!pl.rowvalid[(yg + r) * pl.nkr + i]) {
                T* d = dSg.data() + (r * K2 + i * pl.kw) * N;
                std::fill(d, d + pl.kw * N, T(0));
              }
          if constexpr (grouped) {
            // each key row once for the group's rows that read it: its key and value vectors
            // are loaded once for them
            for (int64_t ky = ylo; ky <= yhi; ++ky) {
              const auto& pr = kpairs[ky - ylo];
              if (pr.empty()) continue;
              const KeyView<T> kv = key_view(pl, Kp, ky, ci), vv = key_view(pl, Vp, ky, ci);
              for (size_t a0 = 0; a0 < pr.size(); a0 += RG) {
                const int na = (int)std::min<size_t>(RG, pr.size() - a0);
                const T* A[RG];
                T* So[RG];
                for (int a = 0; a < na; ++a) {
                  A[a] = Qrow(pr[a0 + a].r) + s0;
                  So[a] = pair_block(Sg.data(), pr[a0 + a]);
                }
                dot_rows_shared(na, A, qs, pl.D, kv, pl.kw, So, N);
                for (int a = 0; a < na; ++a) {
                  A[a] = Grow(pr[a0 + a].r) + s0;
                  So[a] = pair_block(dSg.data(), pr[a0 + a]);
                }
                dot_rows_shared(na, A, qs, pl.D, vv, pl.kw, So, N);
              }
            }
            for (int64_t r = 0; r < ng; ++r) block_bias(pl, ht, yg + r, ci, Sg.data() + r * K2 * N);
          } else {
            for (int64_t r = 0; r < ng; ++r) {
              const int64_t y = yg + r;
              block_logits<T>(pl, Qrow(r), qs, Kp, ht, y, ci, Sg.data() + r * K2 * N);
              for (int64_t i = 0; i < pl.nkr; ++i)
                if (pl.rowvalid[y * pl.nkr + i]) {
                  dot_row<T>(Grow(r) + s0, qs, pl.D, key_view(pl, Vp, pl.rowpos[y * pl.nkr + i], ci), pl.kw,
                             dSg.data() + (r * K2 + i * pl.kw) * N);
                }
            }
          }
          // P = exp(S - lse), dS = P (dP - delta)
          for (int64_t r = 0; r < ng; ++r) {
            T* S = Sg.data() + r * K2 * N;
            T* dS = dSg.data() + r * K2 * N;
            const Vec<T> lv = loadu(lse_g.data() + r * pl.Ws + s0), dl = loadu(delta_g.data() + r * pl.Ws + s0);
            for (int64_t n = 0; n < K2; ++n) {
              const Vec<T> p = vexp(loadu(S + n * N) - lv);
              storeu(S + n * N, p);
              storeu(dS + n * N, p * (loadu(dS + n * N) - dl));
            }
          }
          // dQ (before the scale) = dS . K
          if constexpr (grouped) {
            for (int64_t r = 0; r < ng; ++r)
              for (int64_t c = 0; c < pl.D; ++c) storeu(dQg.data() + (r * pl.D + c) * pl.Ws + s0, splat<T>(T(0)));
            for (int64_t ky = ylo; ky <= yhi; ++ky) {
              const auto& pr = kpairs[ky - ylo];
              if (pr.empty()) continue;
              const KeyView<T> kv = key_view(pl, Kp, ky, ci);
              for (size_t a0 = 0; a0 < pr.size(); a0 += RG) {
                const int na = (int)std::min<size_t>(RG, pr.size() - a0);
                const T* P[RG];
                T* Out[RG];
                for (int a = 0; a < na; ++a) {
                  P[a] = pair_block(dSg.data(), pr[a0 + a]);
                  Out[a] = dQg.data() + pr[a0 + a].r * pl.D * pl.Ws + s0;
                }
                mix_rows_shared(na, P, N, kv, pl.kw, pl.D, Out, pl.Ws);
              }
            }
          }
          for (int64_t r = 0; r < ng; ++r) {
            const int64_t y = yg + r;
            const T* S = Sg.data() + r * K2 * N;
            const T* dS = dSg.data() + r * K2 * N;
            int64_t nrows = 0;  // the valid window rows
            for (int64_t i = 0; i < pl.nkr; ++i)
              if (pl.rowvalid[y * pl.nkr + i]) row_i[nrows++] = i;
            if constexpr (!grouped) {
              for (int64_t rr = 0; rr < nrows; ++rr)
                kviews[rr] = key_view(pl, Kp, pl.rowpos[y * pl.nkr + row_i[rr]], ci);
              mix_row<T>(dS, kviews.data(), row_i.data(), nrows, pl.kw, pl.D, dQg.data() + r * pl.D * pl.Ws + s0, pl.Ws);
            }
            T* Prow = Prow_g.data() + r * K2 * qs;
            T* dSrow = dSrow_g.data() + r * K2 * qs;
            if (contiguous) {
              // interior block: keep P and dS for the key-centric dK/dV sums after the row
              for (int64_t n = 0; n < K2; ++n) {
                const int64_t e = n * qs + LP + pl.xlo + pl.off[n % pl.kw] + s0;  // at the key columns
                storeu(Prow + e, loadu(S + n * N));
                storeu(dSrow + e, loadu(dS + n * N));
              }
            } else {
              // border block. Its interior slots: P and dS kept for the key-centric sums as above
              // (zero in the other lanes).
              if (s0 < pl.n_int) {
                const Vec<T> m = loadu(imask.data());
                for (int64_t n = 0; n < K2; ++n) {
                  const int64_t e = n * qs + LP + pl.xlo + pl.off[n % pl.kw] + s0;
                  storeu(Prow + e, loadu(S + n * N) * m);
                  storeu(dSrow + e, loadu(dS + n * N) * m);
                }
              }
              // Its border queries: dK[col] += dS * Qscaled, dV[col] += P * dO per key column
              // col, across the channels.
              const int64_t D = pl.D;
              const T* Qp = Qrow(r);
              const T* Gp = Grow(r);
              for (const int l : blanes[ci - pl.n_full]) {
                const int64_t sl = s0 + l;
                for (int64_t c = 0; c < D; ++c) {
                  qt[c] = Qp[c * qs + sl];
                  gt[c] = Gp[c * qs + sl];
                }
                for (int64_t rr = 0; rr < nrows; ++rr) {
                  const int64_t i = row_i[rr], ky = pl.rowpos[y * pl.nkr + i];
                  T* bk = bKV.data() + ky * bsize;
                  for (int64_t j = 0; j < pl.kw; ++j) {
                    const int32_t col = pl.kidx[j * pl.Ws + sl];
                    if (col >= pl.W) continue;  // not a key
                    const T ds = dS[(i * pl.kw + j) * N + l], p = S[(i * pl.kw + j) * N + l];
                    T* dk = bk + colmap[col] * 2 * D;
                    T* dv = dk + D;
                    for (int64_t c = 0; c < D; ++c) {
                      dk[c] += ds * qt[c];
                      dv[c] += p * gt[c];
                    }
                  }
                }
              }
            }
            if (dBt) {  // every offset, valid rows or not ("zero" keys: dP = 0, dS = -P * delta)
              const int64_t tc = 2 * pl.kw - 1;
              for (int64_t i = 0; i < pl.nkr; ++i) {
                T* trow = dBt + ht * tsize + pl.by[y * pl.nkr + i] * tc;
                for (int64_t j = 0; j < pl.kw; ++j) {
                  const T* dsv = dS + (i * pl.kw + j) * N;
                  const int32_t* bxj = pl.bx.data() + j * pl.Ws + s0;
                  for (int lane = 0; lane < N; ++lane)
                    if (pl.slotx[s0 + lane] < pl.W) trow[bxj[lane]] += dsv[lane];
                }
              }
            }
          }
        }
        for (int64_t r = 0; r < ng; ++r) {
          const int64_t y = yg + r;
          T* const Qp = Qrow(r);
          T* const Gp = Grow(r);
          const T* dQb = dQg.data() + r * pl.D * pl.Ws;
          const T* Prow = Prow_g.data() + r * K2 * qs;
          const T* dSrow = dSrow_g.data() + r * K2 * qs;
          // Interior queries' dK, dV, key-centric: key column x' receives dS[i][j] * Q of query
          // slot x' - off_j - xlo (zero margins outside the interior slots): loads only, one
          // read-modify-write of each dK/dV vector per (row, key block).
          if (pl.n_int > 0) {
            const int64_t xend = std::min<int64_t>(pl.Wk, pl.xlo + pl.n_int + pl.off[pl.kw - 1]);
            if constexpr (multi_key_sum) {
              // all the key rows of the query row at once: each Q / dO vector is loaded once for them
              int64_t nr = 0;
              for (int64_t i = 0; i < pl.nkr; ++i) {
                if (!pl.rowvalid[y * pl.nkr + i]) continue;
                row_i[nr++] = i;
              }
              for (int64_t x0 = 0; x0 < xend; x0 += N) {
                const int64_t sh = LP + x0 - pl.xlo;
                for (int64_t rr = 0; rr < nr; ++rr) {
                  const int64_t i = row_i[rr], ky = pl.rowpos[y * pl.nkr + i];
                  wk[rr] = dSrow + i * pl.kw * qs + LP + x0;
                  wv[rr] = Prow + i * pl.kw * qs + LP + x0;
                  dk[rr] = dKt + (ky - klo) * rl + x0;
                  dv[rr] = dVt + (ky - klo) * rl + x0;
                }
                key_sum_rows<T>(wk.data(), Qp - LP + sh, qs, pl.off.data(), pl.kw, pl.D, dk.data(), pl.Wk, nr);
                key_sum_rows<T>(wv.data(), Gp - LP + sh, qs, pl.off.data(), pl.kw, pl.D, dv.data(), pl.Wk, nr);
              }
            } else {
              for (int64_t i = 0; i < pl.nkr; ++i) {
                if (!pl.rowvalid[y * pl.nkr + i]) continue;
                const int64_t ky = pl.rowpos[y * pl.nkr + i];
                T* dKr = dKt + (ky - klo) * rl;
                T* dVr = dVt + (ky - klo) * rl;
                for (int64_t x0 = 0; x0 < xend; x0 += N) {
                  const int64_t sh = LP + x0 - pl.xlo;
                  key_sum_row<T>(dSrow + i * pl.kw * qs + LP + x0, Qp - LP + sh, qs, pl.off.data(), pl.kw, pl.D,
                                 dKr + x0, pl.Wk);
                  key_sum_row<T>(Prow + i * pl.kw * qs + LP + x0, Gp - LP + sh, qs, pl.off.data(), pl.kw, pl.D,
                                 dVr + x0, pl.Wk);
                }
              }
            }
          }
#if NA_X86V3
          if (vec_rows) {  // the dq rows, 8 channels by 8 tokens transposed
            if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
              const float* rows[8];
              for (int64_t s0 = 0; s0 < pl.Ws; s0 += 8) {
                for (int64_t c0 = 0; c0 < pl.D; c0 += 8) {
                  for (int l = 0; l < 8; ++l) rows[l] = dQb + (c0 + l) * pl.Ws + s0;
                  transpose8(rows, 8, scale, dq8.data() + c0, pl.D);  // dq8[slot][c]
                }
                for (int l = 0; l < 8; ++l) {
                  const int64_t x = pl.slotx[s0 + l];
                  if (x < pl.W)
                    std::memcpy(DQ + (((b * pl.R + y) * pl.W + x) * pl.NH + h) * pl.D, dq8.data() + l * pl.D,
                                pl.D * sizeof(float));
                }
              }
            }
          } else
#endif
          for (int64_t sl = 0; sl < pl.Ws; ++sl) {
            int64_t x = pl.slotx[sl];
            if (x >= pl.W) continue;
            scalar_t* o = DQ + (((b * pl.R + y) * pl.W + x) * pl.NH + h) * pl.D;
            for (int64_t c = 0; c < pl.D; ++c) o[c] = static_cast<scalar_t>(dQb[c * pl.Ws + sl] * scale);
          }
          // add the border queries' dK/dV of the key rows no later row of the task reads to their
          // key columns
          for (int64_t i = 0; i < pl.nkr; ++i) {
            const int64_t ky = pl.rowpos[y * pl.nkr + i];
            if (!pl.rowvalid[y * pl.nkr + i] || last_use[ky] != y) continue;
            last_use[ky] = -1;  // a key row listed twice in the query row is added once
            const T* bk = bKV.data() + ky * bsize;
            T* kr = dKt + (ky - klo) * rl;
            T* vr = dVt + (ky - klo) * rl;
            for (int64_t e = 0; e < NB; ++e)
              for (int64_t c = 0; c < pl.D; ++c) {
                kr[c * pl.Wk + bcols[e]] += bk[e * 2 * pl.D + c];
                vr[c * pl.Wk + bcols[e]] += bk[e * 2 * pl.D + pl.D + c];
              }
            if (direct) {
              write_key_row(DK, kr, b, h, ky);
              write_key_row(DV, vr, b, h, ky);
              written[ky] = 1;
            }
          }
        }
      }
      if (direct)  // key rows no query row reads
        for (int64_t ky = 0; ky < pl.R; ++ky)
          if (!written[ky]) {
            write_key_row(DK, zero_row.data(), b, h, ky);
            write_key_row(DV, zero_row.data(), b, h, ky);
          }
    }
  });
  if (!direct) {
    // Reduce the partials in a fixed order (query heads of the key/value head, then row chunks)
    // and unpack into (B, T, H, W, heads_kv, D). parts(a, bkv, y, out): key row y of the dK (a = 0)
    // or dV (a = 1) partials of the tasks that hold it.
    auto parts = [&](int a, int64_t bkv, int64_t y, std::vector<const T*>& out_parts) {
      out_parts.clear();
      const int64_t b = bkv / pl.NKV, hk = bkv % pl.NKV;
      for (int64_t g = 0; g < pl.G; ++g) {
        const int64_t bh = b * pl.NH + hk * pl.G + g;
        for (int64_t ch = 0; ch < nchunks; ++ch)
          if (y >= ck_lo[ch] && y <= ck_hi[ch])
            out_parts.push_back((a == 0 ? dKp : dVp).data() + bh * bh_size + ck_off[ch] + (y - ck_lo[ch]) * rl);
      }
    };
    const int64_t BKV = pl.B * pl.NKV;
#if NA_X86V3
    if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
      if (pl.D % 8 == 0) {
        // the same sums (same order), then 8 channels by 8 columns transposed in registers
        par.for_each(0, BKV * pl.R, 1, [&](int64_t t0, int64_t t1) {
          Buf<float> sum(2 * rl), zero;
          std::vector<const float*> ps;
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t bkv = t / pl.R, y = t % pl.R, b = bkv / pl.NKV, hk = bkv % pl.NKV;
            const float* src[2];
            for (int a = 0; a < 2; ++a) {
              parts(a, bkv, y, ps);
              const int64_t np = (int64_t)ps.size();
              if (np == 1) {
                src[a] = ps[0];
                continue;
              }
              if (np == 0) {  // a key row no query reads
                zero.assign(rl, 0.0f);
                src[a] = zero.data();
                continue;
              }
              float* sm = sum.data() + a * rl;
              for (int64_t e = 0; e < rl; e += VecOf<float>::N) {
                Vec<float> acc = loadu(ps[0] + e);
                for (int64_t pi = 1; pi < np; ++pi) acc += loadu(ps[pi] + e);
                storeu(sm + e, acc);
              }
              src[a] = sm;
            }
            for (int a = 0; a < 2; ++a) write_key_row(a == 0 ? DK : DV, src[a], b, hk, y);
          }
        });
        goto reduced;
      }
    }
#endif
    par.for_each(0, BKV * pl.R, 1, [&](int64_t t0, int64_t t1) {
      std::vector<const T*> pk, pv;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bkv = t / pl.R, y = t % pl.R, b = bkv / pl.NKV, hk = bkv % pl.NKV;
        parts(0, bkv, y, pk);
        parts(1, bkv, y, pv);
        const int64_t np = (int64_t)pk.size();
        for (int64_t x = 0; x < pl.W; ++x) {
          scalar_t* okk = DK + (((b * pl.R + y) * pl.W + x) * pl.NKV + hk) * pl.D;
          scalar_t* ovv = DV + (((b * pl.R + y) * pl.W + x) * pl.NKV + hk) * pl.D;
          for (int64_t c = 0; c < pl.D; ++c) {
            T sk = 0, sv = 0;
            for (int64_t pi = 0; pi < np; ++pi) {
              sk += pk[pi][c * pl.Wk + x];
              sv += pv[pi][c * pl.Wk + x];
            }
            okk[c] = static_cast<scalar_t>(sk);
            ovv[c] = static_cast<scalar_t>(sv);
          }
        }
      }
    });
#if NA_X86V3
reduced: __attribute__((unused));
#endif
  }
  if (dbias) {
    const int64_t n = pl.nht * tsize;
    for (int64_t e = 0; e < n; ++e) dbias[e] = T(0);
    for (int64_t t = 0; t < ntasks; ++t)
      for (int64_t e = 0; e < n; ++e) dbias[e] += dB[t * n + e];
  }
}

// ---- entry points ------------------------------------------------------------------------

template <typename scalar_t, typename T>
static void forward_typed(const ForwardArgs& a, const Parallel& par) {
  Plan<T> pl(a.q, a.k, a.win, static_cast<const T*>(a.bias), a.bias_heads);
  scalar_t* out = static_cast<scalar_t*>(a.out);
  T* lse = static_cast<T*>(a.lse);
  if constexpr (std::is_same<scalar_t, float>::value)
    if (forward_fast(a.q, a.k, a.v, out, lse, pl, static_cast<T>(a.scale), par)) return;
  forward_impl<scalar_t, T>(a.q, a.k, a.v, out, lse, pl, static_cast<T>(a.scale), par);
}

void forward(const ForwardArgs& a, const Parallel& par) {
  switch (a.dtype) {
    case DType::Float32: forward_typed<float, float>(a, par); break;
    case DType::Float64: forward_typed<double, double>(a, par); break;
    case DType::BFloat16: forward_typed<BFloat16, float>(a, par); break;
    default: break;  // the binding lets no other dtype through
  }
}

template <typename scalar_t, typename T>
static void backward_typed(const BackwardArgs& a, const Parallel& par) {
  Plan<T> pl(a.q, a.k, a.win, static_cast<const T*>(a.bias), a.bias_heads);
  backward_impl<scalar_t, T>(a.dout, a.q, a.k, a.v, a.out, static_cast<const T*>(a.lse), static_cast<const T*>(a.dlse),
                             static_cast<scalar_t*>(a.dq), static_cast<scalar_t*>(a.dk),
                             static_cast<scalar_t*>(a.dv), static_cast<T*>(a.dbias), pl,
                             static_cast<T>(a.scale), par);
}

void backward(const BackwardArgs& a, const Parallel& par) {
  switch (a.dtype) {
    case DType::Float32: backward_typed<float, float>(a, par); break;
    case DType::Float64: backward_typed<double, double>(a, par); break;
    case DType::BFloat16: backward_typed<BFloat16, float>(a, par); break;
    default: break;
  }
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k{&forward, &backward, &unfused_dot, &unfused_sum, &unfused_scatter};
  return k;
}

}  // namespace neighborhood
}  // namespace alterops
