// CUDA kernels of the N-d neighbourhood attention family (see neighborhood_attention_cuda.h for
// the contract). The algorithm is the one of alterops/kernels/neighborhood_attention_nd.py (Triton):
//
// * Forward (flash style): a block owns a tile of TM queries of one (batch, head) and visits the
//   key tiles of TN keys covering the hull of its queries' windows; logits stay in registers, the
//   softmax is the online one in base 2 (scale and bias folded in); out and the natural-log lse
//   are written at the end.
// * Backward: delta = rowsum(dout * out) - dlse per query; a query-side kernel (dq, and each
//   logit gradient dS at its (query, neighbour slot) entry of a scratch buffer when the bias
//   gradient is wanted); a key-side kernel (dk, dv; it finds the queries whose windows can hold
//   its keys and sums over the query heads of its key/value head); a reduction of the dS
//   scratch per (table head, bias cell), each cell summed by one block in a fixed order. No
//   atomics: every output element is written by one thread, the results are bitwise
//   reproducible.
//
// Dilation: queries and keys are tiled in dilation sub-grids (per axis the positions res + dil*g,
// g = 0..Lg-1): a query's keys lie in its own sub-grid, so a tile of queries of one residue
// needs only keys of that residue, and the window of query g on an axis is an interval
// [lo(g), hi(g)] of sub-grid indices, nondecreasing in g (the hull of a tile is the window of its
// first query to that of its last; the queries that can see a key range are found by binary
// search). "zero" windows keep their out-of-map slots: those keys are loaded as zero vectors (a
// logit of 0 + bias, a value of 0), so they take part in the softmax like any key.
//
// Warp layout: a warp owns 16 rows (queries; keys in the key-side kernel) and holds its logits,
// probabilities and accumulators in the C-fragment layout of mma.m16n8k16 (lane l: rows l/4 and
// l/4 + 8, columns 2 (l%4) and 2 (l%4) + 1 of every 8-column tile). float16 / bfloat16 run both
// products of every step, forward and backward, on the tensor cores (mma.sync m16n8k16 with
// float32 accumulators through csrc/common/cuda_ptx.cuh; operands from shared memory with
// ldmatrix, probabilities and logit gradients packed from the accumulators; tiles brought in with
// cp.async, double-buffered). float32 runs SIMT products of the same layout in exact float32
// arithmetic (no TF32), one stage. The forward's probability x value product leaves out the keys
// outside a query's window exactly (a SIMT product that skips them) for float32 always, and for
// float16 / bfloat16 when a scan of v before the forward found a NaN or an infinity (a flag in the
// workspace): such keys never turn 0 * inf into NaN.
#include "neighborhood_attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/cuda_ptx.cuh"

namespace alterops {
namespace neighborhood_cuda {
namespace {

constexpr int kMaxThreads = 256;  // every kernel's __launch_bounds__
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------
struct AxisP {
  int L;       // length
  int K;       // kernel size
  int dil;     // dilation
  int S;       // stride
  int causal;  // 0 / 1
};

struct Geo {
  AxisP ax[3];
  int border;
  int B, heads, heads_kv, group, hd, dp;  // dp: head_dim padded to a multiple of 16
  int qb[3];      // log2 of the query tile's extents (T, H, W)
  int kb[3];      // log2 of the key tile's extents
  int tiles[3];   // the grid's tiles per residue per axis (query tiles, or key tiles for dk/dv)
  int bm[3];      // bias-cell multipliers ((2kh-1)(2kw-1), 2kw-1, 1)
  int sm[3];      // slot multipliers (kh kw, kw, 1)
  int KK;         // kt kh kw
  int64_t N;      // T H W
  int64_t bh0;    // first (batch, head) pair of this launch
  float scale, scale2;  // scale, scale * log2(e)
  const float* bias;    // nullptr: none
  int64_t bias_hs;      // bias head stride (0: one table for every head)
};

struct Src {
  const void* p;
  int64_t s[6];
};

struct FwdParams {
  Geo c;
  Src q, k, v;
  void* out;
  float* lse;
  const int* flag;  // v holds a non-finite value (float16 / bfloat16 only)
  int vec_q, vec_k, vec_v;
};

struct BwdParams {
  Geo c;
  Src q, k, v, dout;
  const float* lse;
  const float* delta;
  void* dq;
  void* dk;
  void* dv;
  float* ds;  // dq kernel: (B heads N, KK) logit gradients, or nullptr
  int vec_q, vec_k, vec_v, vec_do;
};

struct RowsParams {  // the per-row pre-passes: delta, and the scan of v
  Src a, b;
  int64_t size[5];  // B, T, H, W, heads
  int hd;
  const float* dlse;
  float* delta;
  int* flag;
};

struct DbiasParams {
  Geo c;
  const float* ds;
  float* dbias;
  int cells[3];  // 2k-1 per axis
  int64_t ncells;
  int table_heads;
};

// ---------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kPad = 4;  // row padding of shared tiles (elements): 16 bytes
  __device__ static float to(float v) { return v; }
  __device__ static float from(float v) { return v; }
};
template <>
struct Elem<__half> {
  static constexpr int kPad = 8;
  __device__ static float to(__half v) { return __half2float(v); }
  __device__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kPad = 8;
  __device__ static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Whether a 16-bit float is an infinity or a NaN (exponent all ones).
__device__ __forceinline__ bool nonfinite(__half v) {
  uint16_t u;
  memcpy(&u, &v, 2);
  return (u & 0x7c00u) == 0x7c00u;
}
__device__ __forceinline__ bool nonfinite(__nv_bfloat16 v) {
  uint16_t u;
  memcpy(&u, &v, 2);
  return (u & 0x7f80u) == 0x7f80u;
}

__device__ __forceinline__ bool sign_set(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  return (u >> 31) != 0;
}

// Four (two) consecutive shared elements as floats (8- or 16-byte aligned).
__device__ __forceinline__ void ld4(const float* p, float (&x)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x;
  x[1] = v.y;
  x[2] = v.z;
  x[3] = v.w;
}
template <typename H>
__device__ __forceinline__ void ld4(const H* p, float (&x)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  H h[4];
  memcpy(h, &u, 8);
#pragma unroll
  for (int i = 0; i < 4; ++i) x[i] = Elem<H>::to(h[i]);
}
__device__ __forceinline__ void ld2(const float* p, float (&x)[2]) {
  const float2 v = *reinterpret_cast<const float2*>(p);
  x[0] = v.x;
  x[1] = v.y;
}
template <typename H>
__device__ __forceinline__ void ld2(const H* p, float (&x)[2]) {
  const uint32_t u = *reinterpret_cast<const uint32_t*>(p);
  H h[2];
  memcpy(h, &u, 4);
  x[0] = Elem<H>::to(h[0]);
  x[1] = Elem<H>::to(h[1]);
}

// ---------------------------------------------------------------------------------------
// Windows, one axis at a time (alterops/neighborhood_attention_nd.py, axis_window)
// ---------------------------------------------------------------------------------------
// The window of sub-grid index g (sub-grid of length Lg) as sub-grid indices [start, last]:
// NATTEN's rule for clamp (stride-group leader, inward shift at the end, causal windows ending at
// the query), a centred window for mask / zero (possibly reaching past the map).
__device__ __forceinline__ void axis_window(int g, int Lg, const AxisP& a, int border, int& start, int& last) {
  const int left = a.K / 2, right = a.K / 2 + a.K % 2 - 1;
  if (border == kClamp) {
    if (a.causal) {
      const int leader = imin((g / a.S) * a.S + a.S - 1, Lg - 1);
      start = imax(leader - left - right, 0);
      last = g;
    } else {
      const int leader = imin((g / a.S) * a.S + a.S / 2, Lg - 1);
      start = imax(leader - left, 0);
      if (leader + right >= Lg) start += Lg - right - leader - 1;
      last = start + a.K - 1;
    }
  } else {
    start = g - left;
    last = g + right;
  }
}

// The keys of the window that take part: [lo, hi] (mask: the in-map ones; zero: all, the
// out-of-map ones being zero vectors; clamp windows lie in the map). Nondecreasing in g.
__device__ __forceinline__ void key_range(int g, int Lg, const AxisP& a, int border, int& lo, int& hi) {
  axis_window(g, Lg, a, border, lo, hi);
  if (border == kMask) {
    lo = imax(lo, 0);
    hi = imin(hi, Lg - 1);
  }
}

__device__ __forceinline__ int sub_len(const AxisP& a, int res) { return (a.L - res + a.dil - 1) / a.dil; }

// Local coordinates (t, y, x) of entry r of a tile with log2 extents lb.
__device__ __forceinline__ void split3(int r, const int (&lb)[3], int (&l)[3]) {
  l[2] = r & ((1 << lb[2]) - 1);
  l[1] = (r >> lb[2]) & ((1 << lb[1]) - 1);
  l[0] = r >> (lb[1] + lb[2]);
}

// A tile of the grid: per axis its residue, first sub-grid index and sub-grid length. False when
// the tile holds no position (a residue with a shorter sub-grid).
struct TileGeo {
  int res[3], g0[3], Lg[3];
};

__device__ __forceinline__ bool tile_geo(const Geo& c, int64_t tile, const int (&lb)[3], TileGeo& tg) {
  bool any = true;
#pragma unroll
  for (int a = 2; a >= 0; --a) {
    const int64_t cnt = int64_t(c.ax[a].dil) * c.tiles[a];
    const int i = int(tile % cnt);
    tile /= cnt;
    tg.res[a] = i / c.tiles[a];
    tg.g0[a] = (i % c.tiles[a]) << lb[a];
    tg.Lg[a] = sub_len(c.ax[a], tg.res[a]);
    any = any && tg.g0[a] < tg.Lg[a];
  }
  return any;
}

// ---------------------------------------------------------------------------------------
// Shared-memory tiles
// ---------------------------------------------------------------------------------------
template <bool ASYNC>
__device__ __forceinline__ void copy16(void* dst, const void* src, bool pred) {
  if constexpr (ASYNC) {
    ptx::cp_async_16(dst, src, pred);
  } else {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (pred) v = *reinterpret_cast<const uint4*>(src);
    *reinterpret_cast<uint4*>(dst) = v;
  }
}

// Rows 0..rows-1 of a tile (log2 extents lb, first sub-grid indices org, residues and sub-grid
// lengths of tg) of head `head` of image b into dst (row pitch `pitch` elements, c.dp columns:
// head_dim, then zeros). Rows outside the map are zero vectors. vec: 16-byte copies (unit stride
// along head_dim, aligned rows; cp.async when ASYNC), else element by element. nthreads is a
// multiple of rows.
template <typename T, bool ASYNC>
__device__ __forceinline__ void load_rows(T* dst, int pitch, int rows, const int (&lb)[3], const int (&org)[3],
                                          const TileGeo& tg, const Geo& c, const Src& src, int64_t b, int head,
                                          bool vec, int tid, int nthreads) {
  const int tpr = nthreads / rows;
  const int r = tid / tpr, sub = tid - r * tpr;
  int l[3];
  split3(r, lb, l);
  bool in = true;
  int64_t off = b * src.s[0] + int64_t(head) * src.s[4];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const int g = org[a] + l[a];
    in = in && g >= 0 && g < tg.Lg[a];
    off += (int64_t(tg.res[a]) + int64_t(c.ax[a].dil) * g) * src.s[1 + a];
  }
  T* d = dst + r * pitch;
  const T* s = static_cast<const T*>(src.p);
  if (vec) {
    constexpr int V = 16 / int(sizeof(T));
    for (int ch = sub; ch * V < c.dp; ch += tpr) {
      const bool pred = in && ch * V < c.hd;
      copy16<ASYNC>(d + ch * V, pred ? s + off + ch * V : s, pred);
    }
  } else {
    const int64_t sd = src.s[5];
    for (int e = sub; e < c.dp; e += tpr) d[e] = (in && e < c.hd) ? s[off + e * sd] : Elem<T>::from(0.f);
  }
}

// ---------------------------------------------------------------------------------------
// Warp products in the C-fragment layout (g = lane / 4, t = lane % 4):
// acc[j][i] is row g + 8 (i / 2), column 8 j + 2 t + i % 2.
// ---------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __half>::value) {
    return ptx::pack_half2(lo, hi);
  } else {
    return ptx::pack_bf162(lo, hi);
  }
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, __half>::value) {
    ptx::mma_m16n8k16_f16(d, a, b, d);
  } else {
    ptx::mma_m16n8k16_bf16(d, a, b, d);
  }
}

// acc (16 x 8 NT) += A B^T over the first dp columns: A = 16 rows at `a`, B = 8 NT rows at `b`
// (both row-major in shared memory, pitch elements apart). Tensor cores.
template <typename T, int NT, int DMAX>
__device__ __forceinline__ void mma_nt(float (&acc)[NT][4], const T* a, const T* b, int pitch, int dp, int lane) {
  static_assert(NT % 2 == 0, "pairs of 8-column tiles");
  const T* arow = a + (lane & 15) * pitch + (lane >> 4) * 8;
  const T* brow = b + ((lane & 7) + ((lane >> 4) << 3)) * pitch + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < DMAX / 16; ++kk) {
    if (kk * 16 < dp) {
      uint32_t af[4];
      ptx::ldmatrix_x4(af, arow + kk * 16);
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        uint32_t bf[4];
        ptx::ldmatrix_x4(bf, brow + 16 * j * pitch + kk * 16);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        mma16816<T>(acc[2 * j], af, b0);
        mma16816<T>(acc[2 * j + 1], af, b1);
      }
    }
  }
}

// SIMT form of mma_nt: exact float32 products, each sum in column order.
template <typename T, int NT>
__device__ __forceinline__ void simt_nt(float (&acc)[NT][4], const T* a, const T* b, int pitch, int dp, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const T* a0 = a + g * pitch;
  const T* a1 = a0 + 8 * pitch;
  const T* b0 = b + 2 * t * pitch;
  for (int k = 0; k < dp; k += 4) {
    float x0[4], x1[4];
    ld4(a0 + k, x0);
    ld4(a1 + k, x1);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float y[4];
        ld4(b0 + (8 * j + e) * pitch + k, y);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[j][e] = fmaf(x0[i], y[i], acc[j][e]);
          acc[j][2 + e] = fmaf(x1[i], y[i], acc[j][2 + e]);
        }
      }
    }
  }
}

template <typename T, bool MMA, int NT, int DMAX>
__device__ __forceinline__ void gemm_nt(float (&acc)[NT][4], const T* a, const T* b, int pitch, int dp, int lane) {
  if constexpr (MMA) {
    mma_nt<T, NT, DMAX>(acc, a, b, pitch, dp, lane);
  } else {
    simt_nt<T, NT>(acc, a, b, pitch, dp, lane);
  }
}

// acc (16 x 8 NTO) += P B over the first dp columns of B: P (16 x 8 NTK) in registers in the
// C-fragment layout, B = 8 NTK rows at `b` (row-major, pitch elements apart). Tensor cores (P
// rounded to T).
template <typename T, int NTK, int NTO>
__device__ __forceinline__ void mma_rn(float (&acc)[NTO][4], const float (&p)[NTK][4], const T* b, int pitch, int dp,
                                       int lane) {
  static_assert(NTK % 2 == 0 && NTO % 2 == 0, "pairs of 8-column tiles");
  const T* brow = b + (lane & 15) * pitch + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < NTK / 2; ++kk) {
    const uint32_t af[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                            pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                            pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int n2 = 0; n2 < NTO / 2; ++n2) {
      if (n2 * 16 < dp) {
        uint32_t bf[4];
        ptx::ldmatrix_x4_trans(bf, brow + kk * 16 * pitch + n2 * 16);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        mma16816<T>(acc[2 * n2], af, b0);
        mma16816<T>(acc[2 * n2 + 1], af, b1);
      }
    }
  }
}

// SIMT form of mma_rn, exact float32 products, every sum in row order of B. SKIP (P holds
// probabilities, >= 0): an entry with its sign bit set (-0.0: a pair outside the window) is left
// out, whatever the B row holds.
template <typename T, int NTK, int NTO, bool SKIP>
__device__ __forceinline__ void simt_rn(float (&acc)[NTO][4], const float (&p)[NTK][4], const T* b, int pitch,
                                        int dp, int lane) {
  const int t = lane & 3, quad = lane & ~3;
#pragma unroll
  for (int j = 0; j < NTK; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll 1
      for (int src = 0; src < 4; ++src) {
        const float p0 = __shfl_sync(kFull, p[j][e], quad | src);
        const float p1 = __shfl_sync(kFull, p[j][2 + e], quad | src);
        const bool in0 = !SKIP || !sign_set(p0), in1 = !SKIP || !sign_set(p1);
        const T* brow = b + (8 * j + 2 * src + e) * pitch + 2 * t;
#pragma unroll
        for (int n = 0; n < NTO; ++n) {
          if (n * 8 < dp) {
            float y[2];
            ld2(brow + 8 * n, y);
            if (in0) {
              acc[n][0] = fmaf(p0, y[0], acc[n][0]);
              acc[n][1] = fmaf(p0, y[1], acc[n][1]);
            }
            if (in1) {
              acc[n][2] = fmaf(p1, y[0], acc[n][2]);
              acc[n][3] = fmaf(p1, y[1], acc[n][3]);
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Query rows (forward, dq): the window of each row as key ranges, and the parts of its bias
// cells and neighbour slots
// ---------------------------------------------------------------------------------------
struct RowInfo {
  int lo[3], hi[3];  // keys [lo, hi] per axis (sub-grid indices); lo > hi for a row outside the map
  unsigned sq;       // sum of window starts * slot multipliers
  unsigned bq;       // sum of (g - k + 1) * bias multipliers
  long long q;       // flat query position (t H + y) W + x, -1 outside the map
};

__device__ __forceinline__ RowInfo make_row(int r, const Geo& c, const TileGeo& tg) {
  RowInfo ri;
  int l[3];
  split3(r, c.qb, l);
  bool in = true;
  long long q = 0;
  ri.sq = 0u;
  ri.bq = 0u;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const AxisP& ax = c.ax[a];
    const int g = tg.g0[a] + l[a];
    in = in && g < tg.Lg[a];
    int start, last;
    axis_window(g, tg.Lg[a], ax, c.border, start, last);
    key_range(g, tg.Lg[a], ax, c.border, ri.lo[a], ri.hi[a]);
    ri.sq += unsigned(start) * unsigned(c.sm[a]);
    ri.bq += unsigned(g - ax.K + 1) * unsigned(c.bm[a]);
    q = q * ax.L + (tg.res[a] + int64_t(ax.dil) * g);
  }
  if (!in) {
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      ri.lo[a] = 1;
      ri.hi[a] = 0;
    }
    q = -1;
  }
  ri.q = q;
  return ri;
}

// A row against the key tile at ko: its key ranges in tile coordinates and the row parts of the
// bias cell and the neighbour slot of a pair (cell = brow + column part, slot = srow + column
// part; unsigned arithmetic, exact for the pairs of the window).
struct RowTile {
  int lo[3], hi[3];
  unsigned brow, srow;
};

__device__ __forceinline__ RowTile row_tile(const RowInfo& ri, const int (&ko)[3], const Geo& c) {
  RowTile rt;
  unsigned kbias = 0u, kslot = 0u;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    rt.lo[a] = ri.lo[a] - ko[a];
    rt.hi[a] = ri.hi[a] - ko[a];
    kbias += unsigned(ko[a]) * unsigned(c.bm[a]);
    kslot += unsigned(ko[a]) * unsigned(c.sm[a]);
  }
  rt.brow = kbias - ri.bq;
  rt.srow = kslot - ri.sq;
  return rt;
}

__device__ __forceinline__ bool inside(const int (&l)[3], const RowTile& rt) {
  return l[0] >= rt.lo[0] && l[0] <= rt.hi[0] && l[1] >= rt.lo[1] && l[1] <= rt.hi[1] && l[2] >= rt.lo[2] &&
         l[2] <= rt.hi[2];
}

// A column (key) of the key tile: its local coordinates (t | y << 8 | x << 16; extents <= 64) and
// the column parts of the bias cell and of the neighbour slot. Kept in shared memory (the values
// depend only on the column: registers would hold them for the whole tile loop).
struct ColInfo {
  int l;
  unsigned bcol, scol;
  int pad;
};

__device__ __forceinline__ ColInfo make_col(int cidx, const Geo& c) {
  int l[3];
  split3(cidx, c.kb, l);
  ColInfo ci;
  ci.l = l[0] | (l[1] << 8) | (l[2] << 16);
  ci.bcol = unsigned(l[0] * c.bm[0] + l[1] * c.bm[1] + l[2] * c.bm[2]);
  ci.scol = unsigned(l[0] * c.sm[0] + l[1] * c.sm[1] + l[2] * c.sm[2]);
  ci.pad = 0;
  return ci;
}

__device__ __forceinline__ void unpack_col(int packed, int (&l)[3]) {
  l[0] = packed & 255;
  l[1] = (packed >> 8) & 255;
  l[2] = packed >> 16;
}

// The hull of a query tile's windows per axis and the number of key tiles covering it.
struct Hull {
  int lo[3];
  int n[3];
  int total;
};

__device__ __forceinline__ Hull query_hull(const Geo& c, const TileGeo& tg) {
  Hull hl;
  hl.total = 1;
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    const int first = tg.g0[a], last = imin(tg.g0[a] + (1 << c.qb[a]) - 1, tg.Lg[a] - 1);
    int lo, hi, lo2, hi2;
    key_range(first, tg.Lg[a], c.ax[a], c.border, lo, hi);
    key_range(last, tg.Lg[a], c.ax[a], c.border, lo2, hi2);
    hl.lo[a] = lo;
    hl.n[a] = (hi2 - lo + (1 << c.kb[a])) >> c.kb[a];
    hl.total *= hl.n[a];
  }
  return hl;
}

__device__ __forceinline__ void hull_tile(const Hull& hl, const Geo& c, int j, int (&ko)[3]) {
  const int iw = j % hl.n[2];
  j /= hl.n[2];
  const int ih = j % hl.n[1];
  const int it = j / hl.n[1];
  ko[0] = hl.lo[0] + (it << c.kb[0]);
  ko[1] = hl.lo[1] + (ih << c.kb[1]);
  ko[2] = hl.lo[2] + (iw << c.kb[2]);
}

// Row max / sum over the four lanes of a quad (the lanes holding one row).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFull, v, 1));
  return fmaxf(v, __shfl_xor_sync(kFull, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(kFull, v, 1);
  return v + __shfl_xor_sync(kFull, v, 2);
}

// Two consecutive elements (aligned to their pair).
__device__ __forceinline__ void store2(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
template <typename H>
__device__ __forceinline__ void store2(H* p, float a, float b) {
  const H h[2] = {Elem<H>::from(a), Elem<H>::from(b)};
  uint32_t u;
  memcpy(&u, h, 4);
  *reinterpret_cast<uint32_t*>(p) = u;
}

// The 16 rows of a warp's accumulator (times mul[i] for rows g + 8 i) to the contiguous rows at
// element offsets row_off[i] (multiples of hd; negative: not stored), columns < hd; pairs of
// columns at once when hd is even.
template <typename T, int NTO>
__device__ __forceinline__ void store_rows(T* out, const float (&acc)[NTO][4], const int64_t (&row_off)[2],
                                           const float (&mul)[2], int hd, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (row_off[i] < 0) continue;
    T* o = out + row_off[i];
#pragma unroll
    for (int n = 0; n < NTO; ++n) {
      const int col = 8 * n + 2 * t;
      if (hd % 2 == 0) {
        if (col < hd) store2(o + col, acc[n][2 * i] * mul[i], acc[n][2 * i + 1] * mul[i]);
      } else {
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (col + e < hd) o[col + e] = Elem<T>::from(acc[n][2 * i + e] * mul[i]);
      }
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero_frag(float (&a)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) a[n][0] = a[n][1] = a[n][2] = a[n][3] = 0.f;
}

// acc += P B: tensor cores for float16 / bfloat16 unless `exact` (then, and for float32, SIMT).
// SKIP: see simt_rn (the forward's probabilities).
template <typename T, bool MMA, bool SKIP, int NTK, int NTO>
__device__ __forceinline__ void gemm_rn(float (&acc)[NTO][4], const float (&p)[NTK][4], const T* b, int pitch, int dp,
                                        int lane, bool exact) {
  if constexpr (MMA) {
    if (!exact) {
      mma_rn<T, NTK, NTO>(acc, p, b, pitch, dp, lane);
      return;
    }
  }
  simt_rn<T, NTK, NTO, SKIP>(acc, p, b, pitch, dp, lane);
}

// The tile loop shared by the kernels: issue(j) loads tile j into buffer j % STAGES (and commits
// its cp.async group), compute(j) uses it. Two stages: tile j + 1 is in flight while j is used.
template <bool ASYNC, int STAGES, typename Issue, typename Compute>
__device__ __forceinline__ void tile_loop(int total, Issue&& issue, Compute&& compute) {
  if (STAGES == 2 && total > 0) issue(0);
  for (int j = 0; j < total; ++j) {
    const bool ahead = STAGES == 2 && j + 1 < total;
    if (STAGES == 1) {
      issue(j);
    } else if (ahead) {
      issue(j + 1);
    }
    if constexpr (ASYNC) {
      if (ahead) {
        ptx::cp_async_wait<1>();
      } else {
        ptx::cp_async_wait<0>();
      }
    }
    __syncthreads();
    compute(j);
    __syncthreads();
  }
}

// The forward's and dq's issue(j): the keys and values of hull tile j into stage j % STAGES of
// sK and sV (TN rows each), of key/value head hk (P: FwdParams or BwdParams).
template <typename T, bool ASYNC, int TN, int STAGES, typename P>
__device__ __forceinline__ void issue_kv_tile(int j, const Hull& hl, const Geo& c, const TileGeo& tg, const P& p,
                                              T* sK, T* sV, int pitch, int64_t b, int hk, int tid, int nthreads) {
  int ko[3];
  hull_tile(hl, c, j, ko);
  T* kb = sK + (j % STAGES) * TN * pitch;
  T* vb = sV + (j % STAGES) * TN * pitch;
  load_rows<T, ASYNC>(kb, pitch, TN, c.kb, ko, tg, c, p.k, b, hk, p.vec_k != 0, tid, nthreads);
  load_rows<T, ASYNC>(vb, pitch, TN, c.kb, ko, tg, c, p.v, b, hk, p.vec_v != 0, tid, nthreads);
  if constexpr (ASYNC) ptx::cp_async_commit();
}

// Offset of query q's output row (head h of image b; -1 for a padding row q < 0).
__device__ __forceinline__ int64_t query_row_offset(long long q, int64_t b, int h, const Geo& c) {
  return q < 0 ? -1 : ((b * c.N + q) * c.heads + h) * c.hd;
}

// ---------------------------------------------------------------------------------------
// Forward: a tile of TM = 16 RG queries of one (batch, head) per block, RG warps of 16 rows
// ---------------------------------------------------------------------------------------
template <typename T, bool MMA, int DMAX, int RG, int TN, int STAGES>
__global__ void __launch_bounds__(kMaxThreads) na_fwd_kernel(const FwdParams p) {
  constexpr int TM = 16 * RG, NT = TN / 8, NTO = DMAX / 8, NTHREADS = 32 * RG;
  constexpr bool ASYNC = MMA;
  extern __shared__ __align__(16) unsigned char na_smem[];
  const Geo& c = p.c;
  const int pitch = c.dp + Elem<T>::kPad;
  T* sQ = reinterpret_cast<T*>(na_smem);
  T* sK = sQ + TM * pitch;
  T* sV = sK + STAGES * TN * pitch;
  RowInfo* sRow = reinterpret_cast<RowInfo*>(sV + STAGES * TN * pitch);
  ColInfo* sCol = reinterpret_cast<ColInfo*>(sRow + TM);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bh = c.bh0 + blockIdx.y;
  const int64_t b = bh / c.heads;
  const int h = int(bh % c.heads), hk = h / c.group;
  TileGeo tg;
  if (!tile_geo(c, blockIdx.x, c.qb, tg)) return;
  const Hull hl = query_hull(c, tg);
  const bool exact = MMA ? (*p.flag != 0) : true;

  load_rows<T, ASYNC>(sQ, pitch, TM, c.qb, tg.g0, tg, c, p.q, b, h, p.vec_q != 0, tid, NTHREADS);
  if (tid < TM) sRow[tid] = make_row(tid, c, tg);
  if (tid < TN) sCol[tid] = make_col(tid, c);

  const int g = lane >> 2, t = lane & 3;
  const int r0 = 16 * warp + g;
  const float* bias_h = c.bias != nullptr ? c.bias + h * c.bias_hs : nullptr;
  float m[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.f, 0.f};
  float o[NTO][4];
  zero_frag(o);

  auto issue = [&](int j) {
    issue_kv_tile<T, ASYNC, TN, STAGES>(j, hl, c, tg, p, sK, sV, pitch, b, hk, tid, NTHREADS);
  };
  auto compute = [&](int j) {
    const T* kb = sK + (j % STAGES) * TN * pitch;
    const T* vb = sV + (j % STAGES) * TN * pitch;
    int ko[3];
    hull_tile(hl, c, j, ko);
    float s[NT][4];
    zero_frag(s);
    gemm_nt<T, MMA, NT, DMAX>(s, sQ + 16 * warp * pitch, kb, pitch, c.dp, lane);

    const RowTile rt[2] = {row_tile(sRow[r0], ko, c), row_tile(sRow[r0 + 8], ko, c)};
    unsigned okbits = 0u;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const ColInfo ci = sCol[8 * n + 2 * t + e];
        int l[3];
        unpack_col(ci.l, l);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const bool ok = inside(l, rt[i]);
          float x = s[n][2 * i + e] * c.scale2;
          if (bias_h != nullptr && ok) x = fmaf(bias_h[rt[i].brow + ci.bcol], kLog2e, x);
          x = ok ? x : -INFINITY;
          s[n][2 * i + e] = x;
          okbits |= unsigned(ok) << (4 * n + 2 * i + e);
          mx[i] = fmaxf(mx[i], x);
        }
      }
    }
    float muse[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float mnew = fmaxf(m[i], quad_max(mx[i]));
      // a row without a key so far keeps m = -inf: shift by 0 instead
      muse[i] = mnew == -INFINITY ? 0.f : mnew;
      const float alpha = exp2f(m[i] - muse[i]);
      m[i] = mnew;
      lsum[i] *= alpha;
#pragma unroll
      for (int n = 0; n < NTO; ++n) {
        o[n][2 * i] *= alpha;
        o[n][2 * i + 1] *= alpha;
      }
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        // a pair outside the window: -0.0 (no weight; left out of the exact product)
        const float pv = ((okbits >> (4 * n + k)) & 1u) ? exp2f(s[n][k] - muse[k >> 1]) : -0.f;
        s[n][k] = pv;
        lsum[k >> 1] += pv;
      }
    }
    gemm_rn<T, MMA, true, NT, NTO>(o, s, vb, pitch, c.dp, lane, exact);
  };
  tile_loop<ASYNC, STAGES>(hl.total, issue, compute);

  int64_t off[2];
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = quad_sum(lsum[i]);
    const long long q = sRow[r0 + 8 * i].q;
    off[i] = query_row_offset(q, b, h, c);
    inv[i] = 1.f / l;  // l = 0 (no key had weight) or NaN: the row is NaN, as the softmax's
    if (t == 0 && q >= 0) p.lse[bh * c.N + q] = (m[i] + log2f(l)) * kLn2;
  }
  store_rows<T, NTO>(static_cast<T*>(p.out), o, off, inv, c.hd, lane);
}

// ---------------------------------------------------------------------------------------
// Backward, query side: dq (and dS per (query, slot)); TM = 16 RG queries per block
// ---------------------------------------------------------------------------------------
template <typename T, bool MMA, int DMAX, int RG, int TN, int STAGES>
__global__ void __launch_bounds__(kMaxThreads) na_dq_kernel(const BwdParams p) {
  constexpr int TM = 16 * RG, NT = TN / 8, NTO = DMAX / 8, NTHREADS = 32 * RG;
  constexpr bool ASYNC = MMA;
  extern __shared__ __align__(16) unsigned char na_smem[];
  const Geo& c = p.c;
  const int pitch = c.dp + Elem<T>::kPad;
  T* sQ = reinterpret_cast<T*>(na_smem);
  T* sDO = sQ + TM * pitch;
  T* sK = sDO + TM * pitch;
  T* sV = sK + STAGES * TN * pitch;
  RowInfo* sRow = reinterpret_cast<RowInfo*>(sV + STAGES * TN * pitch);
  ColInfo* sCol = reinterpret_cast<ColInfo*>(sRow + TM);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bh = c.bh0 + blockIdx.y;
  const int64_t b = bh / c.heads;
  const int h = int(bh % c.heads), hk = h / c.group;
  TileGeo tg;
  if (!tile_geo(c, blockIdx.x, c.qb, tg)) return;
  const Hull hl = query_hull(c, tg);

  load_rows<T, ASYNC>(sQ, pitch, TM, c.qb, tg.g0, tg, c, p.q, b, h, p.vec_q != 0, tid, NTHREADS);
  load_rows<T, ASYNC>(sDO, pitch, TM, c.qb, tg.g0, tg, c, p.dout, b, h, p.vec_do != 0, tid, NTHREADS);
  if (tid < TM) sRow[tid] = make_row(tid, c, tg);
  if (tid < TN) sCol[tid] = make_col(tid, c);

  const int g = lane >> 2, t = lane & 3;
  const int r0 = 16 * warp + g;
  const float* bias_h = c.bias != nullptr ? c.bias + h * c.bias_hs : nullptr;
  float lse2[2] = {0.f, 0.f}, delta[2] = {0.f, 0.f};
  int64_t dsrow[2] = {0, 0};
  float dq[NTO][4];
  zero_frag(dq);

  auto issue = [&](int j) {
    issue_kv_tile<T, ASYNC, TN, STAGES>(j, hl, c, tg, p, sK, sV, pitch, b, hk, tid, NTHREADS);
  };
  auto compute = [&](int j) {
    if (j == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const long long q = sRow[r0 + 8 * i].q;
        if (q >= 0) {
          lse2[i] = p.lse[bh * c.N + q] * kLog2e;
          delta[i] = p.delta[bh * c.N + q];
          dsrow[i] = (bh * c.N + q) * c.KK;
        }
      }
    }
    const T* kb = sK + (j % STAGES) * TN * pitch;
    const T* vb = sV + (j % STAGES) * TN * pitch;
    int ko[3];
    hull_tile(hl, c, j, ko);
    float s[NT][4], dpm[NT][4];
    zero_frag(s);
    zero_frag(dpm);
    gemm_nt<T, MMA, NT, DMAX>(s, sQ + 16 * warp * pitch, kb, pitch, c.dp, lane);
    gemm_nt<T, MMA, NT, DMAX>(dpm, sDO + 16 * warp * pitch, vb, pitch, c.dp, lane);
    const RowTile rt[2] = {row_tile(sRow[r0], ko, c), row_tile(sRow[r0 + 8], ko, c)};
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const ColInfo ci = sCol[8 * n + 2 * t + e];
        int l[3];
        unpack_col(ci.l, l);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int k = 2 * i + e;
          const bool ok = inside(l, rt[i]);
          float x = s[n][k] * c.scale2;
          if (bias_h != nullptr && ok) x = fmaf(bias_h[rt[i].brow + ci.bcol], kLog2e, x);
          const float pv = exp2f(x - lse2[i]);
          const float ds = ok ? pv * (dpm[n][k] - delta[i]) : 0.f;
          s[n][k] = ds;
          if (p.ds != nullptr && ok) p.ds[dsrow[i] + (rt[i].srow + ci.scol)] = ds;
        }
      }
    }
    gemm_rn<T, MMA, false, NT, NTO>(dq, s, kb, pitch, c.dp, lane, false);
  };
  tile_loop<ASYNC, STAGES>(hl.total, issue, compute);

  int64_t off[2];
  const float mul[2] = {c.scale, c.scale};
#pragma unroll
  for (int i = 0; i < 2; ++i) off[i] = query_row_offset(sRow[r0 + 8 * i].q, b, h, c);
  store_rows<T, NTO>(static_cast<T*>(p.dq), dq, off, mul, c.hd, lane);
}

// ---------------------------------------------------------------------------------------
// Backward, key side: dk and dv of a tile of TN = 16 RG keys of one (batch, key/value head),
// summed over the group's query heads and the query tiles whose windows can hold these keys.
// 2 RG warps: warp w owns key rows 16 (w % RG) .. + 15; warps w < RG accumulate dv, the others
// dk (each computes the logits of its rows).
// ---------------------------------------------------------------------------------------
// First sub-grid index whose key range ends at or after k0 (Lg if none), last one whose range
// starts at or before k1 (-1 if none): the queries whose windows can hold a key in [k0, k1].
__device__ __forceinline__ int first_query(int k0, int Lg, const AxisP& a, int border) {
  int lo = 0, hi = Lg;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    int s, e;
    key_range(mid, Lg, a, border, s, e);
    if (e >= k0) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

__device__ __forceinline__ int last_query(int k1, int Lg, const AxisP& a, int border) {
  int lo = -1, hi = Lg - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    int s, e;
    key_range(mid, Lg, a, border, s, e);
    if (s <= k1) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Query tile j of a key tile's loop: head h (of the group of key/value head hk) and first sub-grid
// indices qo (per_head = nq[0] nq[1] nq[2] tiles per head, from qlo on).
__device__ __forceinline__ void query_tile(int j, int per_head, const int (&nq)[3], const int (&qlo)[3], int hk,
                                           const Geo& c, int& h, int (&qo)[3]) {
  h = hk * c.group + j / per_head;
  int r = j % per_head;
  const int iw = r % nq[2];
  r /= nq[2];
  qo[0] = qlo[0] + ((r / nq[1]) << c.qb[0]);
  qo[1] = qlo[1] + ((r % nq[1]) << c.qb[1]);
  qo[2] = qlo[2] + (iw << c.qb[2]);
}

template <typename T, bool MMA, int DMAX, int RG, int TM, int STAGES>
__global__ void __launch_bounds__(kMaxThreads) na_dkdv_kernel(const BwdParams p) {
  constexpr int TN = 16 * RG, NT = TM / 8, NTO = DMAX / 8, NTHREADS = 64 * RG;
  constexpr bool ASYNC = MMA;
  constexpr int kInfo = 9 * TM;  // per query: lo[3], hi[3], bias part, lse * log2(e), delta
  extern __shared__ __align__(16) unsigned char na_smem[];
  const Geo& c = p.c;
  const int pitch = c.dp + Elem<T>::kPad;
  T* sK = reinterpret_cast<T*>(na_smem);
  T* sV = sK + TN * pitch;
  T* sQ = sV + TN * pitch;
  T* sDO = sQ + STAGES * TM * pitch;
  int* sInfo = reinterpret_cast<int*>(sDO + STAGES * TM * pitch);
  int* sRange = sInfo + STAGES * kInfo;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bhk = c.bh0 + blockIdx.y;
  const int64_t b = bhk / c.heads_kv;
  const int hk = int(bhk % c.heads_kv);
  TileGeo tg;
  if (!tile_geo(c, blockIdx.x, c.kb, tg)) return;

  load_rows<T, ASYNC>(sK, pitch, TN, c.kb, tg.g0, tg, c, p.k, b, hk, p.vec_k != 0, tid, NTHREADS);
  load_rows<T, ASYNC>(sV, pitch, TN, c.kb, tg.g0, tg, c, p.v, b, hk, p.vec_v != 0, tid, NTHREADS);
  if (tid < 6) {
    // (selects, not a dynamic index: tg stays in registers)
    const int a = tid >> 1;
    const int g0 = a == 0 ? tg.g0[0] : (a == 1 ? tg.g0[1] : tg.g0[2]);
    const int Lg = a == 0 ? tg.Lg[0] : (a == 1 ? tg.Lg[1] : tg.Lg[2]);
    const int ext = 1 << (a == 0 ? c.kb[0] : (a == 1 ? c.kb[1] : c.kb[2]));
    sRange[tid] = (tid & 1) ? last_query(imin(g0 + ext - 1, Lg - 1), Lg, c.ax[a], c.border)
                            : first_query(g0, Lg, c.ax[a], c.border);
  }
  if constexpr (ASYNC) {
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
  }
  __syncthreads();
  int qlo[3], qhi[3], nq[3];
#pragma unroll
  for (int a = 0; a < 3; ++a) {
    qlo[a] = sRange[2 * a];
    qhi[a] = sRange[2 * a + 1];
    nq[a] = qhi[a] >= qlo[a] ? (qhi[a] - qlo[a] + (1 << c.qb[a])) >> c.qb[a] : 0;
  }
  const int per_head = nq[0] * nq[1] * nq[2];
  const int total = per_head * c.group;

  const int g = lane >> 2, t = lane & 3;
  const int rg = warp % RG, role = warp / RG;  // role 0: dv, 1: dk
  const int r0 = 16 * rg + g;
  int gk[2][3];
  unsigned bkey[2];
  bool kin[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    int l[3];
    split3(r0 + 8 * i, c.kb, l);
    bkey[i] = 0u;
    kin[i] = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      gk[i][a] = tg.g0[a] + l[a];
      kin[i] = kin[i] && gk[i][a] < tg.Lg[a];
      bkey[i] += unsigned(gk[i][a]) * unsigned(c.bm[a]);
    }
  }
  float acc[NTO][4];
  zero_frag(acc);

  auto issue = [&](int j) {
    int h, qo[3];
    query_tile(j, per_head, nq, qlo, hk, c, h, qo);
    T* qb = sQ + (j % STAGES) * TM * pitch;
    T* db = sDO + (j % STAGES) * TM * pitch;
    load_rows<T, ASYNC>(qb, pitch, TM, c.qb, qo, tg, c, p.q, b, h, p.vec_q != 0, tid, NTHREADS);
    load_rows<T, ASYNC>(db, pitch, TM, c.qb, qo, tg, c, p.dout, b, h, p.vec_do != 0, tid, NTHREADS);
    if (tid < TM) {
      int* info = sInfo + (j % STAGES) * kInfo;
      int l[3];
      split3(tid, c.qb, l);
      bool in = true;
      long long q = 0;
      unsigned bq = 0u;
      int lo[3], hi[3];
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        const int gq = qo[a] + l[a];
        in = in && gq <= qhi[a];
        key_range(gq, tg.Lg[a], c.ax[a], c.border, lo[a], hi[a]);
        bq += unsigned(gq - c.ax[a].K + 1) * unsigned(c.bm[a]);
        q = q * c.ax[a].L + (tg.res[a] + int64_t(c.ax[a].dil) * gq);
      }
      float lse2 = 0.f, delta = 0.f;
      if (in) {
        const int64_t row = (b * c.heads + h) * c.N + q;
        lse2 = p.lse[row] * kLog2e;
        delta = p.delta[row];
      }
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        info[a * TM + tid] = in ? lo[a] : 1;
        info[(3 + a) * TM + tid] = in ? hi[a] : 0;
      }
      info[6 * TM + tid] = int(bq);
      reinterpret_cast<float*>(info)[7 * TM + tid] = lse2;
      reinterpret_cast<float*>(info)[8 * TM + tid] = delta;
    }
    if constexpr (ASYNC) ptx::cp_async_commit();
  };
  auto compute = [&](int j) {
    int h, qo[3];
    query_tile(j, per_head, nq, qlo, hk, c, h, qo);
    const T* qb = sQ + (j % STAGES) * TM * pitch;
    const T* db = sDO + (j % STAGES) * TM * pitch;
    const int* info = sInfo + (j % STAGES) * kInfo;
    const float* bias_h = c.bias != nullptr ? c.bias + h * c.bias_hs : nullptr;
    float s[NT][4], dpm[NT][4];
    zero_frag(s);
    zero_frag(dpm);
    gemm_nt<T, MMA, NT, DMAX>(s, sK + 16 * rg * pitch, qb, pitch, c.dp, lane);
    if (role == 1) gemm_nt<T, MMA, NT, DMAX>(dpm, sV + 16 * rg * pitch, db, pitch, c.dp, lane);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * n + 2 * t + e;
        int lo[3], hi[3];
#pragma unroll
        for (int a = 0; a < 3; ++a) {
          lo[a] = info[a * TM + col];
          hi[a] = info[(3 + a) * TM + col];
        }
        const unsigned bq = unsigned(info[6 * TM + col]);
        const float lse2 = reinterpret_cast<const float*>(info)[7 * TM + col];
        const float delta = reinterpret_cast<const float*>(info)[8 * TM + col];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int k = 2 * i + e;
          const bool ok = gk[i][0] >= lo[0] && gk[i][0] <= hi[0] && gk[i][1] >= lo[1] && gk[i][1] <= hi[1] &&
                          gk[i][2] >= lo[2] && gk[i][2] <= hi[2];
          float x = s[n][k] * c.scale2;
          if (bias_h != nullptr && ok) x = fmaf(bias_h[bkey[i] - bq], kLog2e, x);
          const float pv = exp2f(x - lse2);
          s[n][k] = !ok ? 0.f : (role == 0 ? pv : pv * (dpm[n][k] - delta));
        }
      }
    }
    gemm_rn<T, MMA, false, NT, NTO>(acc, s, role == 0 ? db : qb, pitch, c.dp, lane, false);
  };
  tile_loop<ASYNC, STAGES>(total, issue, compute);

  int64_t off[2];
  const float mul[2] = {role == 0 ? 1.f : c.scale, role == 0 ? 1.f : c.scale};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    long long kq = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) kq = kq * c.ax[a].L + (tg.res[a] + int64_t(c.ax[a].dil) * gk[i][a]);
    off[i] = kin[i] ? ((b * c.N + kq) * c.heads_kv + hk) * c.hd : -1;
  }
  store_rows<T, NTO>(static_cast<T*>(role == 0 ? p.dv : p.dk), acc, off, mul, c.hd, lane);
}

// ---------------------------------------------------------------------------------------
// Per-row pre-passes, one warp per (b, t, y, x, head) row: delta = rowsum(dout * out) - dlse
// (stored at (b, head, t, y, x)), and the scan of v for NaN / inf
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ void row_coords(int64_t row, const int64_t (&size)[5], int64_t (&ix)[5]) {
#pragma unroll
  for (int d = 4; d > 0; --d) {
    ix[d] = row % size[d];
    row /= size[d];
  }
  ix[0] = row;
}

__device__ __forceinline__ int64_t row_offset(const Src& s, const int64_t (&ix)[5]) {
  return ix[0] * s.s[0] + ix[1] * s.s[1] + ix[2] * s.s[2] + ix[3] * s.s[3] + ix[4] * s.s[4];
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) na_delta_kernel(const RowsParams p) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int64_t rows = p.size[0] * p.size[1] * p.size[2] * p.size[3] * p.size[4];
  const int64_t N = p.size[1] * p.size[2] * p.size[3];
  const T* A = static_cast<const T*>(p.a.p);
  const T* B = static_cast<const T*>(p.b.p);
  for (int64_t row = int64_t(blockIdx.x) * warps + (threadIdx.x >> 5); row < rows;
       row += int64_t(gridDim.x) * warps) {
    int64_t ix[5];
    row_coords(row, p.size, ix);
    const int64_t oa = row_offset(p.a, ix), ob = row_offset(p.b, ix);
    float acc = 0.f;
    for (int d = lane; d < p.hd; d += 32)
      acc = fmaf(Elem<T>::to(A[oa + d * p.a.s[5]]), Elem<T>::to(B[ob + d * p.b.s[5]]), acc);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
    if (lane == 0) {
      const int64_t at = (ix[0] * p.size[4] + ix[4]) * N + (ix[1] * p.size[2] + ix[2]) * p.size[3] + ix[3];
      p.delta[at] = acc - (p.dlse != nullptr ? p.dlse[at] : 0.f);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) na_scan_kernel(const RowsParams p) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int64_t rows = p.size[0] * p.size[1] * p.size[2] * p.size[3] * p.size[4];
  const T* A = static_cast<const T*>(p.a.p);
  for (int64_t row = int64_t(blockIdx.x) * warps + (threadIdx.x >> 5); row < rows;
       row += int64_t(gridDim.x) * warps) {
    int64_t ix[5];
    row_coords(row, p.size, ix);
    const int64_t oa = row_offset(p.a, ix);
    bool bad = false;
    for (int d = lane; d < p.hd; d += 32) bad = bad || nonfinite(A[oa + d * p.a.s[5]]);
    if (__any_sync(kFull, bad) && lane == 0) *p.flag = 1;  // (every writer stores the same value)
  }
}

// ---------------------------------------------------------------------------------------
// Bias gradient: block (table head, cell) sums, in a fixed order, dS over every (batch, head,
// query, slot) whose pair has that cell
// ---------------------------------------------------------------------------------------
// The slot index on one axis of the pair (query at position pos, cell index `cell` on that axis),
// or -1 when no slot of the query's window has that cell.
__device__ __forceinline__ int axis_slot(int pos, int cell, const AxisP& a, int border) {
  const int res = pos % a.dil, g = pos / a.dil, Lg = sub_len(a, res);
  int start, last;
  axis_window(g, Lg, a, border, start, last);
  const int j = cell - (a.K - 1) + g - start;
  if (j < 0 || j >= a.K) return -1;
  const int key = start + j;
  if (border == kClamp && key > last) return -1;  // past the end of a short causal window
  if (border == kMask && (key < 0 || key >= Lg)) return -1;
  return j;
}

__global__ void __launch_bounds__(kMaxThreads) na_dbias_kernel(const DbiasParams p) {
  const Geo& c = p.c;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t cell = int64_t(blockIdx.x) % p.ncells;
  const int hb = int(int64_t(blockIdx.x) / p.ncells);
  const int cw = int(cell % p.cells[2]);
  const int ch = int((cell / p.cells[2]) % p.cells[1]);
  const int ct = int(cell / (int64_t(p.cells[1]) * p.cells[2]));
  const int h0 = p.table_heads == 1 ? 0 : hb;
  const int nh = p.table_heads == 1 ? c.heads : 1;
  const int T = c.ax[0].L, H = c.ax[1].L, W = c.ax[2].L;
  const int KH = c.ax[1].K, KW = c.ax[2].K;
  const int64_t count = int64_t(c.B) * nh * W;
  float acc = 0.f;
  for (int pt = 0; pt < T; ++pt) {
    const int jt = axis_slot(pt, ct, c.ax[0], c.border);
    if (jt < 0) continue;
    for (int py = 0; py < H; ++py) {
      const int jy = axis_slot(py, ch, c.ax[1], c.border);
      if (jy < 0) continue;
      const int64_t row0 = int64_t(pt * int64_t(H) + py) * W;
      for (int64_t i = tid; i < count; i += blockDim.x) {
        const int x = int(i % W);
        const int64_t r = i / W;
        const int jx = axis_slot(x, cw, c.ax[2], c.border);
        if (jx < 0) continue;
        const int64_t bhq = (r / nh) * c.heads + h0 + r % nh;
        acc += p.ds[((bhq * c.N) + row0 + x) * c.KK + (jt * KH + jy) * KW + jx];
      }
    }
  }
  __shared__ float red[kMaxThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  if (tid == 0) {
    float sum = 0.f;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) sum += red[w];
    p.dbias[int64_t(hb) * p.ncells + cell] = sum;
  }
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------
constexpr int64_t kIntMax = 2147483647;
constexpr int64_t kGridYMax = 65535;
constexpr size_t kAlign = 256;

// Kernel configurations. float16 / bfloat16: tensor cores, cp.async double buffering; float32:
// SIMT, one stage (its tiles take twice the bytes). DMAX: head_dim 1..128 -> 128, 129..256 -> 256.
// A block has RG row groups of 16 rows (queries; keys in the dk/dv kernel); the streamed tiles
// (keys of the forward and dq kernels, queries of the dk/dv kernel) hold 32 or 16 rows. Every
// configuration fits in 99 KiB of shared memory (sm_86 / sm_89 allow that much per block; at
// head_dim 128, 16-bit: 54 / 71 / 69 KiB for the forward / dq / dk-dv kernels, so two or three
// blocks share an sm_80 SM); small windows also waste fewer keys of their hull with short tiles.
template <typename T>
struct Cfg {
  static constexpr bool kF32 = sizeof(T) == 4;
  static constexpr bool kMma = !kF32;
  static constexpr int kStages = kMma ? 2 : 1;
  // forward: 16 RG queries x TN keys
  template <int DMAX>
  static constexpr int fwd_rg() { return kF32 && DMAX == 256 ? 2 : 4; }
  template <int DMAX>
  static constexpr int fwd_tn() { return DMAX == 256 ? 16 : 32; }
  // dq: 16 RG queries x TN keys
  template <int DMAX>
  static constexpr int dq_rg() { return DMAX == 256 ? 2 : 4; }
  template <int DMAX>
  static constexpr int dq_tn() { return DMAX == 256 || kF32 ? 16 : 32; }
  // dk / dv: 16 RG keys (2 RG warps) x TM queries
  template <int DMAX>
  static constexpr int kv_rg() { return DMAX == 256 ? 2 : 4; }
  template <int DMAX>
  static constexpr int kv_tm() { return DMAX == 256 || kF32 ? 16 : 32; }
};

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int log2_of(int v) {
  int r = 0;
  while ((1 << r) < v) ++r;
  return r;
}

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// A tile of 2^total positions (log2 extents lb): each doubling goes to the axis of smallest extent
// among those whose sub-grids (length n) it does not cover yet (W first on ties; W when all are).
void choose_tile(int total, const int (&n)[3], int (&lb)[3]) {
  lb[0] = lb[1] = lb[2] = 0;
  for (int s = 0; s < total; ++s) {
    int best = -1;
    for (int a = 2; a >= 0; --a)
      if ((1 << lb[a]) < n[a] && (best < 0 || lb[a] < lb[best])) best = a;
    ++lb[best < 0 ? 2 : best];
  }
}

// The launch's grid tiles of 2^log2_rows positions: fills c.tiles (and lb); the tile count, or
// -1 when it exceeds a grid's x dimension.
int64_t grid_tiles(Geo& c, int log2_rows, int (&lb)[3]) {
  int n[3];
  for (int a = 0; a < 3; ++a) n[a] = int(cdiv(c.ax[a].L, c.ax[a].dil));
  choose_tile(log2_rows, n, lb);
  int64_t tiles = 1;
  for (int a = 0; a < 3; ++a) {
    c.tiles[a] = int(cdiv(n[a], int64_t(1) << lb[a]));
    tiles *= int64_t(c.ax[a].dil) * c.tiles[a];
    if (tiles > kIntMax) return -1;
  }
  return tiles;
}

void tile_shape(const Geo& c, int log2_rows, int (&lb)[3]) {
  int n[3];
  for (int a = 0; a < 3; ++a) n[a] = int(cdiv(c.ax[a].L, c.ax[a].dil));
  choose_tile(log2_rows, n, lb);
}

Src src_of(const Tensor6& t) {
  Src s;
  s.p = t.data;
  for (int d = 0; d < 6; ++d) s.s[d] = t.stride[d];
  return s;
}

// 16-byte row copies: unit stride along head_dim, head_dim and every row stride a multiple of 16
// bytes, an aligned start.
int vec_ok(const Tensor6& t, int elem) {
  const int64_t V = 16 / elem;
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0 || t.size[5] % V != 0) return 0;
  if (t.size[5] > 1 && t.stride[5] != 1) return 0;
  for (int d = 0; d < 5; ++d)
    if (t.size[d] > 1 && t.stride[d] % V != 0) return 0;
  return 1;
}

int64_t numel_rows(const Tensor6& q) { return q.size[0] * q.size[1] * q.size[2] * q.size[3] * q.size[4]; }

// The shared part of the kernels' parameters; false for arguments the kernels cannot index.
bool setup(const Tensor6& q, const Tensor6& k, const Window& w, const float* bias, int64_t bias_heads, double scale,
           Geo& c) {
  c = Geo{};
  const int64_t B = q.size[0], heads = q.size[4], heads_kv = k.size[4], hd = q.size[5];
  if (hd < 1 || hd > kMaxHeadDim || heads_kv < 1 || heads % heads_kv != 0 || B > kIntMax || heads > kIntMax)
    return false;
  if (w.border != kClamp && w.border != kMask && w.border != kZero) return false;
  int64_t cells = 1, kk = 1, n = 1;
  for (int a = 0; a < 3; ++a) {
    const int64_t L = q.size[1 + a], K = w.kernel[a], d = w.dilation[a], s = w.stride[a];
    if (L < 1 || L > kIntMax / 2 || K < 1 || K > kIntMax / 4 || d < 1 || d > kIntMax || s < 1 || s > K) return false;
    if (w.causal[a] != 0 && w.causal[a] != 1) return false;
    c.ax[a] = AxisP{int(L), int(K), int(d), int(s), int(w.causal[a])};
    cells *= 2 * K - 1;
    kk *= K;
    n *= L;
    if (cells > kIntMax || kk > kIntMax) return false;
  }
  c.border = w.border;
  c.B = int(B);
  c.heads = int(heads);
  c.heads_kv = int(heads_kv);
  c.group = int(heads / heads_kv);
  c.hd = int(hd);
  c.dp = int((hd + 15) / 16 * 16);
  c.bm[2] = 1;
  c.bm[1] = 2 * c.ax[2].K - 1;
  c.bm[0] = c.bm[1] * (2 * c.ax[1].K - 1);
  c.sm[2] = 1;
  c.sm[1] = c.ax[2].K;
  c.sm[0] = c.ax[1].K * c.ax[2].K;
  c.KK = int(kk);
  c.N = n;
  c.bh0 = 0;
  c.scale = float(scale);
  c.scale2 = float(scale) * kLog2e;
  c.bias = bias;
  c.bias_hs = bias_heads == 1 ? 0 : cells;
  return true;
}

// Lets `kernel` take `bytes` of dynamic shared memory; cudaErrorLaunchOutOfResources when the
// current device allows less per block.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (bytes > size_t(optin)) return cudaErrorLaunchOutOfResources;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

unsigned int rows_grid(int64_t rows) {
  int64_t blocks = cdiv(rows, kMaxThreads / 32);
  if (blocks > (int64_t(1) << 20)) blocks = int64_t(1) << 20;  // grid-stride loops cover the rest
  return unsigned(blocks < 1 ? 1 : blocks);
}

RowsParams rows_params(const Tensor6& a, const Tensor6* b, int64_t heads) {
  RowsParams r{};
  r.a = src_of(a);
  if (b != nullptr) r.b = src_of(*b);
  for (int d = 0; d < 4; ++d) r.size[d] = a.size[d];
  r.size[4] = heads;
  r.hd = int(a.size[5]);
  return r;
}

template <typename T, int DMAX>
cudaError_t forward_typed(const ForwardArgs& a, Geo c, void* workspace, cudaStream_t stream) {
  using C = Cfg<T>;
  constexpr bool MMA = C::kMma;
  constexpr int RG = C::template fwd_rg<DMAX>(), TM = 16 * RG, TN = C::template fwd_tn<DMAX>();
  constexpr int STAGES = C::kStages;
  const int64_t tiles = grid_tiles(c, log2_of(TM), c.qb);
  if (tiles < 0) return cudaErrorInvalidValue;
  tile_shape(c, log2_of(TN), c.kb);
  FwdParams p{};
  p.c = c;
  p.q = src_of(a.q);
  p.k = src_of(a.k);
  p.v = src_of(a.v);
  p.out = a.out;
  p.lse = a.lse;
  p.flag = static_cast<const int*>(workspace);
  p.vec_q = vec_ok(a.q, sizeof(T));
  p.vec_k = vec_ok(a.k, sizeof(T));
  p.vec_v = vec_ok(a.v, sizeof(T));
  const size_t pitch = size_t(c.dp) + Elem<T>::kPad;
  const size_t smem = (TM + 2 * STAGES * TN) * pitch * sizeof(T) + TM * sizeof(RowInfo) + TN * sizeof(ColInfo);
  cudaError_t err = allow_smem(na_fwd_kernel<T, MMA, DMAX, RG, TN, STAGES>, smem);
  if (err != cudaSuccess) return err;
  if constexpr (MMA) {  // the flag of the exact product: v holds a NaN or an infinity
    RowsParams r = rows_params(a.v, nullptr, a.v.size[4]);
    r.flag = static_cast<int*>(workspace);
    err = cudaMemsetAsync(workspace, 0, sizeof(int), stream);
    if (err != cudaSuccess) return err;
    na_scan_kernel<T><<<rows_grid(numel_rows(a.v)), kMaxThreads, 0, stream>>>(r);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t pairs = int64_t(c.B) * c.heads;
  for (int64_t bh0 = 0; bh0 < pairs; bh0 += kGridYMax) {
    p.c.bh0 = bh0;
    const dim3 grid(unsigned(tiles), unsigned(pairs - bh0 < kGridYMax ? pairs - bh0 : kGridYMax));
    na_fwd_kernel<T, MMA, DMAX, RG, TN, STAGES><<<grid, 32 * RG, smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, int DMAX>
cudaError_t backward_typed(const BackwardArgs& a, Geo c, void* workspace, cudaStream_t stream) {
  using C = Cfg<T>;
  constexpr bool MMA = C::kMma;
  constexpr int STAGES = C::kStages;
  constexpr int QRG = C::template dq_rg<DMAX>(), QTN = C::template dq_tn<DMAX>();
  constexpr int KRG = C::template kv_rg<DMAX>(), KTM = C::template kv_tm<DMAX>();
  const int64_t rows = numel_rows(a.q);
  float* delta = static_cast<float*>(workspace);
  float* ds = a.dbias != nullptr ? reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                                            align_up(size_t(rows) * sizeof(float)))
                                 : nullptr;
  const size_t pitch = size_t(c.dp) + Elem<T>::kPad;
  const int64_t pairs = int64_t(c.B) * c.heads, pairs_kv = int64_t(c.B) * c.heads_kv;

  // dq (and dS)
  Geo cq = c;
  const int64_t qtiles = grid_tiles(cq, log2_of(16 * QRG), cq.qb);
  tile_shape(cq, log2_of(QTN), cq.kb);
  // dk, dv
  Geo ck = c;
  const int64_t ktiles = grid_tiles(ck, log2_of(16 * KRG), ck.kb);
  tile_shape(ck, log2_of(KTM), ck.qb);
  if (qtiles < 0 || ktiles < 0) return cudaErrorInvalidValue;
  const size_t smem_q = (2 * 16 * QRG + 2 * STAGES * QTN) * pitch * sizeof(T) + 16 * QRG * sizeof(RowInfo) +
                        QTN * sizeof(ColInfo);
  const size_t smem_k = (2 * 16 * KRG + 2 * STAGES * KTM) * pitch * sizeof(T) + STAGES * 9 * KTM * sizeof(int) +
                        8 * sizeof(int);
  cudaError_t err = allow_smem(na_dq_kernel<T, MMA, DMAX, QRG, QTN, STAGES>, smem_q);
  if (err != cudaSuccess) return err;
  err = allow_smem(na_dkdv_kernel<T, MMA, DMAX, KRG, KTM, STAGES>, smem_k);
  if (err != cudaSuccess) return err;

  // delta = rowsum(dout * out) - dlse
  RowsParams r = rows_params(a.dout, &a.out, c.heads);
  r.dlse = a.dlse;
  r.delta = delta;
  na_delta_kernel<T><<<rows_grid(rows), kMaxThreads, 0, stream>>>(r);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  BwdParams p{};
  p.q = src_of(a.q);
  p.k = src_of(a.k);
  p.v = src_of(a.v);
  p.dout = src_of(a.dout);
  p.lse = a.lse;
  p.delta = delta;
  p.dq = a.dq;
  p.dk = a.dk;
  p.dv = a.dv;
  p.ds = ds;
  p.vec_q = vec_ok(a.q, sizeof(T));
  p.vec_k = vec_ok(a.k, sizeof(T));
  p.vec_v = vec_ok(a.v, sizeof(T));
  p.vec_do = vec_ok(a.dout, sizeof(T));
  p.c = cq;
  for (int64_t bh0 = 0; bh0 < pairs; bh0 += kGridYMax) {
    p.c.bh0 = bh0;
    const dim3 grid(unsigned(qtiles), unsigned(pairs - bh0 < kGridYMax ? pairs - bh0 : kGridYMax));
    na_dq_kernel<T, MMA, DMAX, QRG, QTN, STAGES><<<grid, 32 * QRG, smem_q, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  p.c = ck;
  for (int64_t bh0 = 0; bh0 < pairs_kv; bh0 += kGridYMax) {
    p.c.bh0 = bh0;
    const dim3 grid(unsigned(ktiles), unsigned(pairs_kv - bh0 < kGridYMax ? pairs_kv - bh0 : kGridYMax));
    na_dkdv_kernel<T, MMA, DMAX, KRG, KTM, STAGES><<<grid, 64 * KRG, smem_k, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.dbias != nullptr) {
    DbiasParams d{};
    d.c = c;
    d.ds = ds;
    d.dbias = a.dbias;
    d.ncells = 1;
    for (int ax = 0; ax < 3; ++ax) {
      d.cells[ax] = 2 * c.ax[ax].K - 1;
      d.ncells *= d.cells[ax];
    }
    d.table_heads = c.bias_hs == 0 ? 1 : c.heads;
    const int64_t blocks = d.ncells * d.table_heads;
    if (blocks > kIntMax) return cudaErrorInvalidValue;
    na_dbias_kernel<<<unsigned(blocks), kMaxThreads, 0, stream>>>(d);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

int dmax_of(int hd) { return hd <= 128 ? 128 : 256; }

template <typename T>
cudaError_t forward_dispatch(const ForwardArgs& a, const Geo& c, void* ws, cudaStream_t stream) {
  return dmax_of(c.hd) == 128 ? forward_typed<T, 128>(a, c, ws, stream) : forward_typed<T, 256>(a, c, ws, stream);
}

template <typename T>
cudaError_t backward_dispatch(const BackwardArgs& a, const Geo& c, void* ws, cudaStream_t stream) {
  return dmax_of(c.hd) == 128 ? backward_typed<T, 128>(a, c, ws, stream) : backward_typed<T, 256>(a, c, ws, stream);
}

}  // namespace

size_t forward_workspace_bytes(const ForwardArgs& a) {
  return a.dtype == DType::kFloat32 ? 0 : kAlign;  // the flag of the scan of v
}

size_t backward_workspace_bytes(const BackwardArgs& a) {
  const int64_t rows = numel_rows(a.q);
  size_t bytes = align_up(size_t(rows) * sizeof(float));  // delta
  if (a.dbias != nullptr) {
    int64_t kk = 1;
    for (int ax = 0; ax < 3; ++ax) kk *= a.win.kernel[ax];
    bytes += align_up(size_t(rows) * size_t(kk) * sizeof(float));  // dS per (query, slot)
  }
  return bytes;
}

cudaError_t forward(const ForwardArgs& a, void* workspace, cudaStream_t stream) {
  if (numel_rows(a.q) == 0 || a.q.size[5] == 0) return cudaSuccess;
  Geo c;
  if (!setup(a.q, a.k, a.win, a.bias, a.bias_heads, a.scale, c)) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return forward_dispatch<float>(a, c, workspace, stream);
    case DType::kFloat16: return forward_dispatch<__half>(a, c, workspace, stream);
    case DType::kBFloat16: return forward_dispatch<__nv_bfloat16>(a, c, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(const BackwardArgs& a, void* workspace, cudaStream_t stream) {
  if (numel_rows(a.q) == 0 || a.q.size[5] == 0) {
    if (a.dbias == nullptr) return cudaSuccess;
    int64_t cells = a.bias_heads;
    for (int ax = 0; ax < 3; ++ax) cells *= 2 * a.win.kernel[ax] - 1;
    return cudaMemsetAsync(a.dbias, 0, size_t(cells) * sizeof(float), stream);
  }
  Geo c;
  if (!setup(a.q, a.k, a.win, a.bias, a.bias_heads, a.scale, c)) return cudaErrorInvalidValue;
  if (a.dbias != nullptr && a.bias == nullptr) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return backward_dispatch<float>(a, c, workspace, stream);
    case DType::kFloat16: return backward_dispatch<__half>(a, c, workspace, stream);
    case DType::kBFloat16: return backward_dispatch<__nv_bfloat16>(a, c, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace neighborhood_cuda
}  // namespace alterops
