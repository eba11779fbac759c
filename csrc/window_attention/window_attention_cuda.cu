// CUDA kernels of window_attention2d (see window_attention_cuda.h for the contract).
//
// Work decomposition. A block (128 threads, 4 warps) takes one tile of rows of one window of one
// head of one image: query rows for the forward and the dq kernel, key rows for the dk/dv
// kernel. Block ids run over (head, image, window, tile), tile fastest; a launch covers up to
// 2^30 blocks and larger problems take several launches with a block offset. The window's
// geometry is computed per block into shared memory from index arithmetic: for each of its
// wh*ww tokens the original (y, x) = (rolled padded coordinate + shift) mod the padded size,
// whether it is present (inside the H x W map), its shift region and its position code for the
// bias table, so q, k, v, grad_out and out are read in place with their own element strides and
// results are written to their final places (no rolled, padded or partitioned copies). The
// head's bias table (at most 31 x 31 floats) is staged in shared memory too.
//
// Masking. Token code = (region << 16) | (iy * (2ww-1) + ix) for present tokens, -1 for absent
// ones (padding, and rows past the window's end). Query q may attend to key k when both codes
// are >= 0 and their regions agree; the bias of the pair is table[code_k - code_q + center]
// (low 16 bits; key minus query). A key outside the query's allowed set takes no part at all:
// its logit is replaced (not added to) by -inf and it is skipped in the value sums, so a NaN or
// inf in another region's k or v never reaches the query.
//
// Forward: flash-style online softmax over chunks of keys; the logsumexp of each query is
// saved, so memory is linear in the number of queries. Backward: a query-major kernel (recomputes
// P from the logsumexp, delta = rowsum(dO * O), dP = dO V^T, dS = P (dP - delta), dq = scale dS K,
// and the bias gradient's per-block partial sums), then a key-major kernel (dv = P^T dO, dk = scale
// dS^T Q), then a fixed-order reduction of the partials into the table gradient. Nothing is
// accumulated with atomics: every output element has exactly one writer and every sum has a fixed
// order, so results are bitwise reproducible.
//
// SIMT path (float32 takes it; float16 / bfloat16 where the tensor cores do not apply): 32 rows
// per block (8 per warp), chunks of 32 keys (one per lane). Operands are widened to float32 in
// shared memory; a lane computes its key's logit for the warp's 8 rows (a dot product over
// head_dim read from shared memory, conflict-free thanks to an odd row stride), the row
// statistics go through warp shuffles, and the value sums run with lanes over head_dim columns
// (C = ceil(head_dim / 32) columns per lane, a template parameter: 1, 2, 4 or 8).
//
// Tensor-core path (float16 / bfloat16 with head_dim <= 128 on sm_80+): the same decomposition
// with 64-row tiles and mma.sync m16n8k16 products; see its section below.
#include "window_attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/cuda_convert.cuh"
#include "../common/cuda_ptx.cuh"

namespace alterops {
namespace window_cuda {
namespace {

constexpr int kThreads = 128;  // every kernel: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxTable = 961;                                 // (2*16-1)^2: the largest table of a <= 256-token window
constexpr int kOwned = (kMaxTable + kThreads - 1) / kThreads;  // bias offsets per thread
constexpr int64_t kMaxGrid = int64_t(1) << 30;                 // blocks per launch

// SIMT tiles
constexpr int kSimtRows = 8;                   // rows per warp
constexpr int kSimtTile = kWarps * kSimtRows;  // rows per block
constexpr int kSimtChunk = 32;                 // keys (forward, dq) or queries (dk/dv) per chunk: one per lane
static_assert(kSimtChunk == 32, "one chunk column per lane");

// ---- element types ------------------------------------------------------------------------
using cuda_util::from_float;
using cuda_util::to_float;

// ---- geometry -----------------------------------------------------------------------------
// Element strides of a (B, H, W, heads, head_dim) tensor and of a (B, H, W, heads) one.
struct S5 {
  int64_t b, y, x, h, c;
};
struct S4 {
  int64_t b, y, x, h;
};

// What every kernel needs about the problem (built by the launcher).
struct Geo {
  int64_t batch;
  int H, W, heads, d;
  int wh, ww, sh, sw;
  int Hp, Wp, nWx;
  int64_t nWin;      // windows per image
  int N;             // tokens per window
  int tile;          // rows per block
  int n_tiles;       // tiles per window
  int tw, T, center; // table row length 2ww-1, table size, index of offset (0, 0)
  int table_heads;
  float scale;
};

// Where a block works: image, head, window (wy, wx), tile; id = its linear block id.
struct Pos {
  int64_t b, id;
  int h, tile, wy, wx;
};

__device__ __forceinline__ Pos block_pos(const Geo& g, int64_t id) {
  Pos p;
  p.id = id;
  p.tile = int(id % g.n_tiles);
  id /= g.n_tiles;
  const int64_t win = id % g.nWin;
  id /= g.nWin;
  p.b = id % g.batch;
  p.h = int(id / g.batch);
  p.wy = int(win / g.nWx);
  p.wx = int(win % g.nWx);
  return p;
}

// Token codes and original coordinates of the window's N tokens, and the head's bias table.
__device__ __forceinline__ void setup_window(const Geo& g, const Pos& p, const float* __restrict__ table, int* tok, int* ty, int* tx,
                             float* tbl) {
  for (int j = int(threadIdx.x); j < g.N; j += kThreads) {
    const int iy = j / g.ww, ix = j - iy * g.ww;
    const int r = p.wy * g.wh + iy, c = p.wx * g.ww + ix;  // rolled padded coordinates
    int y = r + g.sh, x = c + g.sw;
    if (y >= g.Hp) y -= g.Hp;
    if (x >= g.Wp) x -= g.Wp;
    const int ry = int(r >= g.Hp - g.wh) + int(g.sh > 0 && r >= g.Hp - g.sh);
    const int rx = int(c >= g.Wp - g.ww) + int(g.sw > 0 && c >= g.Wp - g.sw);
    tok[j] = (y < g.H && x < g.W) ? (((ry * 3 + rx) << 16) | (iy * g.tw + ix)) : -1;
    ty[j] = y;
    tx[j] = x;
  }
  if (table != nullptr) {
    const float* src = table + int64_t(g.table_heads == 1 ? 0 : p.h) * g.T;
    for (int i = int(threadIdx.x); i < g.T; i += kThreads) tbl[i] = src[i];
  }
}

__device__ __forceinline__ int code_of(const int* tok, int j, int N) { return j < N ? tok[j] : -1; }

__device__ __forceinline__ bool allowed(int qc, int kc) { return (qc | kc) >= 0 && (qc >> 16) == (kc >> 16); }

__device__ __forceinline__ int bias_index(int qc, int kc, int center) { return (kc & 0xffff) - (qc & 0xffff) + center; }

__device__ __forceinline__ int64_t in_offset(const S5& s, int64_t b, int y, int x, int h) {
  return b * s.b + int64_t(y) * s.y + int64_t(x) * s.x + int64_t(h) * s.h;
}

// Row index of token (y, x) of image b, head h in the contiguous (B, H, W, heads) layout.
__device__ __forceinline__ int64_t out_row(const Geo& g, int64_t b, int y, int x, int h) {
  return ((b * g.H + y) * int64_t(g.W) + x) * g.heads + h;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// ---- shared-memory plans (the launcher sizes the launch with the same function) ---------------
__host__ __device__ inline size_t align16(size_t n) { return (n + 15) & ~size_t(15); }

// Offsets (bytes) of the parts of a kernel's dynamic shared memory: `tiles` row tiles of
// tile_bytes each, then `extra` bytes, the bias table (T floats) and three int arrays of N.
struct Plan {
  size_t tile_bytes, extra, tbl, tok, ty, tx, total;
};

__host__ __device__ inline Plan make_plan(int tiles, size_t tile_bytes, size_t extra, int T, int N) {
  Plan p;
  p.tile_bytes = align16(tile_bytes);
  p.extra = p.tile_bytes * size_t(tiles);
  p.tbl = p.extra + align16(extra);
  p.tok = p.tbl + align16(size_t(T) * sizeof(float));
  p.ty = p.tok + align16(size_t(N) * sizeof(int));
  p.tx = p.ty + align16(size_t(N) * sizeof(int));
  p.total = p.tx + align16(size_t(N) * sizeof(int));
  return p;
}

// SIMT: row tiles of kSimtTile (= kSimtChunk) rows of 32*C + 1 floats.
__host__ __device__ inline int simt_ld(int C) { return 32 * C + 1; }

enum Kind : int { kForward = 0, kDq = 1, kDkdv = 2 };

__host__ __device__ inline Plan simt_plan(int kind, int C, int T, int N) {
  const size_t tile = size_t(kSimtTile) * size_t(simt_ld(C)) * sizeof(float);
  const size_t pw = size_t(kWarps) * kSimtRows * kSimtChunk * sizeof(float);  // one float per (row, chunk column)
  if (kind == kForward) return make_plan(3, tile, pw, T, N);                    // Q, K, V; P
  if (kind == kDq) return make_plan(4, tile, pw, T, N);                         // Q, dO, K, V; dS
  return make_plan(4, tile, 2 * pw + 2 * kSimtChunk * sizeof(float), T, N);     // K, V, Q, dO; P, dS, lse, delta
}

// Loads rows row0 .. row0 + kSimtTile - 1 of the window (token index) into a float tile of
// row stride ld, columns 0 .. width-1; absent tokens, rows past the window and columns past
// head_dim are zeros.
template <typename T>
__device__ __forceinline__ void load_rows_f32(float* dst, int ld, int width, const T* __restrict__ src, const S5& s, int64_t b, int h,
                              int row0, const int* tok, const int* ty, const int* tx, int N, int d) {
  for (int i = int(threadIdx.x); i < kSimtTile * width; i += kThreads) {
    const int r = i / width, c = i - r * width;
    const int j = row0 + r;
    float val = 0.f;
    if (c < d && j < N && tok[j] >= 0) val = to_float(src[in_offset(s, b, ty[j], tx[j], h) + int64_t(c) * s.c]);
    dst[r * ld + c] = val;
  }
}

// ---- the bias gradient's per-block partial sums ---------------------------------------------
// Adds to acc[i] (offset o = threadIdx.x + i * kThreads of the table) the dS of the pairs
// (query q, key q + delta(o)) with q in [q0, q0 + nrows) and the key in [k0, k0 + ncols):
// ds[(q - q0) * ldds + (key - k0)]. Each thread owns its offsets and sums in a fixed order
// (chunks in order, queries ascending), so the result does not depend on scheduling. Pairs that
// are not allowed hold dS = 0.
__device__ __forceinline__ void bias_partials(float (&acc)[kOwned], const float* ds, int ldds, int q0, int nrows, int k0, int ncols,
                              const Geo& g) {
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    const int o = int(threadIdx.x) + i * kThreads;
    if (o >= g.T) break;
    const int oy = o / g.tw - (g.wh - 1), ox = o - (o / g.tw) * g.tw - (g.ww - 1);
    const int delta = oy * g.ww + ox;
    int lo = q0 > k0 - delta ? q0 : k0 - delta;
    if (lo < 0) lo = 0;
    if (lo < -delta) lo = -delta;
    int hi = q0 + nrows < k0 + ncols - delta ? q0 + nrows : k0 + ncols - delta;
    if (hi > g.N) hi = g.N;
    if (hi > g.N - delta) hi = g.N - delta;
    float a = acc[i];
    int qx = lo >= 0 ? lo % g.ww : 0;
    for (int q = lo; q < hi; ++q) {
      const int kx = qx + ox;
      if (kx >= 0 && kx < g.ww) a += ds[(q - q0) * ldds + (q + delta - k0)];
      if (++qx == g.ww) qx = 0;
    }
    acc[i] = a;
  }
}

__device__ __forceinline__ void store_partials(const float (&acc)[kOwned], float* __restrict__ part, const Geo& g, int64_t id) {
#pragma unroll
  for (int i = 0; i < kOwned; ++i) {
    const int o = int(threadIdx.x) + i * kThreads;
    if (o < g.T) part[id * g.T + o] = acc[i];
  }
}

// dtable[t, o] = sum over the partials of table head t (blocks [t * per, (t + 1) * per)) of
// part[block, o]: 8 groups of threads sum strided subsets in order, then one thread adds the 8
// group sums in order. Grid (ceil(T / 32), table heads t0 .. t0 + gridDim.y - 1), block (32, 8).
__global__ void __launch_bounds__(256) bias_reduce_kernel(const float* __restrict__ part, float* __restrict__ dtable,
                                                          int T, int64_t per, int64_t t0) {
  __shared__ float sums[8][32];
  const int lane = int(threadIdx.x), grp = int(threadIdx.y);
  const int o = int(blockIdx.x) * 32 + lane;
  const int64_t t = t0 + int64_t(blockIdx.y);
  const int64_t first = t * per;
  float a = 0.f;
  if (o < T)
    for (int64_t p = grp; p < per; p += 8) a += part[(first + p) * T + o];
  sums[grp][lane] = a;
  __syncthreads();
  if (grp == 0 && o < T) {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += sums[i][lane];
    dtable[t * T + o] = sum;
  }
}

// ---- SIMT forward ---------------------------------------------------------------------------
// Work item: kSimtTile query rows of one window / head / image; warp w owns rows w*8 .. w*8+7.
// The block takes items base + blockIdx.x, + gridDim.x, ... below `end` (one item per block in
// the plain launch). only_if: when not null, the block returns at once unless *only_if != 0: the
// fix-up launch after the tensor-core forward, which sets the flag when a window's v holds NaN
// or inf; it runs on a small grid that then loops over every item, so that it costs next to
// nothing when the flag is clear.
template <typename T, int C>
__device__ __forceinline__ void fwd_simt_item(const Geo& g, const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v, const S5& sq, const S5& sk, const S5& sv,
                                              const float* __restrict__ table, T* __restrict__ out,
                                              float* __restrict__ lse, int64_t id) {
  extern __shared__ __align__(16) unsigned char wa_smem[];
  constexpr int LD = 32 * C + 1;
  const Plan pl = simt_plan(kForward, C, g.T, g.N);
  float* Qs = reinterpret_cast<float*>(wa_smem);
  float* Ks = reinterpret_cast<float*>(wa_smem + pl.tile_bytes);
  float* Vs = reinterpret_cast<float*>(wa_smem + 2 * pl.tile_bytes);
  float* Ps = reinterpret_cast<float*>(wa_smem + pl.extra);
  float* tbl = reinterpret_cast<float*>(wa_smem + pl.tbl);
  int* tok = reinterpret_cast<int*>(wa_smem + pl.tok);
  int* ty = reinterpret_cast<int*>(wa_smem + pl.ty);
  int* tx = reinterpret_cast<int*>(wa_smem + pl.tx);

  const Pos p = block_pos(g, id);
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int q0 = p.tile * kSimtTile;
  const bool has_bias = table != nullptr;
  setup_window(g, p, table, tok, ty, tx, tbl);
  __syncthreads();
  load_rows_f32(Qs, LD, 32 * C, q, sq, p.b, p.h, q0, tok, ty, tx, g.N, g.d);

  int qc[kSimtRows];
  float m[kSimtRows], l[kSimtRows], acc[kSimtRows][C];
#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) {
    qc[i] = code_of(tok, q0 + warp * kSimtRows + i, g.N);
    m[i] = -INFINITY;
    l[i] = 0.f;  // this lane's part of the row sum
#pragma unroll
    for (int c = 0; c < C; ++c) acc[i][c] = 0.f;
  }
  float* P = Ps + warp * kSimtRows * kSimtChunk;
  const float* Qw = Qs + warp * kSimtRows * LD;

  for (int k0 = 0; k0 < g.N; k0 += kSimtChunk) {
    __syncthreads();  // the previous chunk's K / V are no longer read
    load_rows_f32(Ks, LD, 32 * C, k, sk, p.b, p.h, k0, tok, ty, tx, g.N, g.d);
    load_rows_f32(Vs, LD, 32 * C, v, sv, p.b, p.h, k0, tok, ty, tx, g.N, g.d);
    __syncthreads();
    const int kc = code_of(tok, k0 + lane, g.N);
    float s[kSimtRows];
#pragma unroll
    for (int i = 0; i < kSimtRows; ++i) s[i] = 0.f;
    for (int c = 0; c < g.d; ++c) {
      const float kv = Ks[lane * LD + c];
#pragma unroll
      for (int i = 0; i < kSimtRows; ++i) s[i] = fmaf(Qw[i * LD + c], kv, s[i]);
    }
    unsigned amask[kSimtRows];
#pragma unroll
    for (int i = 0; i < kSimtRows; ++i) {
      const bool ok = allowed(qc[i], kc);
      float x = -INFINITY;
      if (ok) x = s[i] * g.scale + (has_bias ? tbl[bias_index(qc[i], kc, g.center)] : 0.f);
      const float m_new = fmaxf(m[i], warp_max(x));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float pv = ok ? expf(x - m_use) : 0.f;
      const float alpha = expf(m[i] - m_use);
      l[i] = l[i] * alpha + pv;
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < C; ++c) acc[i][c] *= alpha;
      P[i * kSimtChunk + lane] = pv;
      amask[i] = __ballot_sync(kFull, ok);
    }
    __syncwarp();
    const int nj = g.N - k0 < kSimtChunk ? g.N - k0 : kSimtChunk;
    for (int j = 0; j < nj; ++j) {
      float vv[C];
#pragma unroll
      for (int c = 0; c < C; ++c) vv[c] = Vs[j * LD + lane + 32 * c];
#pragma unroll
      for (int i = 0; i < kSimtRows; ++i) {
        if ((amask[i] >> j) & 1u) {  // only the allowed keys: no 0 * inf from an excluded value
          const float pij = P[i * kSimtChunk + j];
#pragma unroll
          for (int c = 0; c < C; ++c) acc[i][c] = fmaf(pij, vv[c], acc[i][c]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) {
    const float lt = warp_sum(l[i]);
    if (qc[i] < 0) continue;
    const int j = q0 + warp * kSimtRows + i;
    const int64_t row = out_row(g, p.b, ty[j], tx[j], p.h);
    const float inv = 1.f / lt;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int col = lane + 32 * c;
      if (col < g.d) out[row * g.d + col] = from_float<T>(acc[i][c] * inv);
    }
    if (lane == 0) lse[row] = m[i] + logf(lt);
  }
}

template <typename T, int C>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_simt_kernel(Geo g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, S5 sq, S5 sk,
                    S5 sv, const float* __restrict__ table, T* __restrict__ out, float* __restrict__ lse,
                    const int* __restrict__ only_if, int64_t base, int64_t end) {
  if (only_if != nullptr && *only_if == 0) return;
  for (int64_t id = base + int64_t(blockIdx.x); id < end; id += int64_t(gridDim.x)) {
    __syncthreads();  // the previous item's shared memory is no longer read
    fwd_simt_item<T, C>(g, q, k, v, sq, sk, sv, table, out, lse, id);
  }
}

// ---- SIMT backward, query-major: delta, dq, bias partials -----------------------------------
template <typename T, int C>
__global__ void __launch_bounds__(kThreads, 1)
    dq_simt_kernel(Geo g, const T* __restrict__ go, const T* __restrict__ q, const T* __restrict__ k,
                   const T* __restrict__ v, const T* __restrict__ o, S5 sgo, S5 sq, S5 sk, S5 sv, S5 so,
                   const float* __restrict__ lse, S4 sl, const float* __restrict__ table, float* __restrict__ delta_ws,
                   T* __restrict__ dq, float* __restrict__ part, int64_t base) {
  extern __shared__ __align__(16) unsigned char wa_smem[];
  constexpr int LD = 32 * C + 1;
  const Plan pl = simt_plan(kDq, C, g.T, g.N);
  float* Qs = reinterpret_cast<float*>(wa_smem);
  float* Gs = reinterpret_cast<float*>(wa_smem + pl.tile_bytes);
  float* Ks = reinterpret_cast<float*>(wa_smem + 2 * pl.tile_bytes);
  float* Vs = reinterpret_cast<float*>(wa_smem + 3 * pl.tile_bytes);
  float* DS = reinterpret_cast<float*>(wa_smem + pl.extra);  // [kSimtTile][kSimtChunk]
  float* tbl = reinterpret_cast<float*>(wa_smem + pl.tbl);
  int* tok = reinterpret_cast<int*>(wa_smem + pl.tok);
  int* ty = reinterpret_cast<int*>(wa_smem + pl.ty);
  int* tx = reinterpret_cast<int*>(wa_smem + pl.tx);

  const Pos p = block_pos(g, base + int64_t(blockIdx.x));
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int q0 = p.tile * kSimtTile;
  const bool has_bias = table != nullptr;
  setup_window(g, p, table, tok, ty, tx, tbl);
  __syncthreads();
  load_rows_f32(Qs, LD, 32 * C, q, sq, p.b, p.h, q0, tok, ty, tx, g.N, g.d);
  load_rows_f32(Gs, LD, 32 * C, go, sgo, p.b, p.h, q0, tok, ty, tx, g.N, g.d);
  __syncthreads();

  int qc[kSimtRows];
  float ls[kSimtRows], dl[kSimtRows], acc[kSimtRows][C];
  const float* Qw = Qs + warp * kSimtRows * LD;
  const float* Gw = Gs + warp * kSimtRows * LD;
#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) {
    const int j = q0 + warp * kSimtRows + i;
    qc[i] = code_of(tok, j, g.N);
    float part_sum = 0.f;
    ls[i] = 0.f;
    if (qc[i] >= 0) {
      const int64_t oo = in_offset(so, p.b, ty[j], tx[j], p.h);
      for (int c = lane; c < g.d; c += 32) part_sum += Gw[i * LD + c] * to_float(o[oo + int64_t(c) * so.c]);
      ls[i] = lse[p.b * sl.b + int64_t(ty[j]) * sl.y + int64_t(tx[j]) * sl.x + int64_t(p.h) * sl.h];
    }
    dl[i] = warp_sum(part_sum);  // delta = rowsum(dO * O)
    if (qc[i] >= 0 && lane == 0) delta_ws[out_row(g, p.b, ty[j], tx[j], p.h)] = dl[i];
#pragma unroll
    for (int c = 0; c < C; ++c) acc[i][c] = 0.f;
  }
  float bacc[kOwned];
#pragma unroll
  for (int i = 0; i < kOwned; ++i) bacc[i] = 0.f;
  float* DSw = DS + warp * kSimtRows * kSimtChunk;

  for (int k0 = 0; k0 < g.N; k0 += kSimtChunk) {
    __syncthreads();  // the previous chunk's K / V / dS are no longer read
    load_rows_f32(Ks, LD, 32 * C, k, sk, p.b, p.h, k0, tok, ty, tx, g.N, g.d);
    load_rows_f32(Vs, LD, 32 * C, v, sv, p.b, p.h, k0, tok, ty, tx, g.N, g.d);
    __syncthreads();
    const int kc = code_of(tok, k0 + lane, g.N);
    float s[kSimtRows], dp[kSimtRows];
#pragma unroll
    for (int i = 0; i < kSimtRows; ++i) s[i] = dp[i] = 0.f;
    for (int c = 0; c < g.d; ++c) {
      const float kv = Ks[lane * LD + c], vv = Vs[lane * LD + c];
#pragma unroll
      for (int i = 0; i < kSimtRows; ++i) {
        s[i] = fmaf(Qw[i * LD + c], kv, s[i]);
        dp[i] = fmaf(Gw[i * LD + c], vv, dp[i]);
      }
    }
    unsigned amask[kSimtRows];
#pragma unroll
    for (int i = 0; i < kSimtRows; ++i) {
      const bool ok = allowed(qc[i], kc);
      float ds = 0.f;
      if (ok) {
        const float x = s[i] * g.scale + (has_bias ? tbl[bias_index(qc[i], kc, g.center)] : 0.f);
        ds = expf(x - ls[i]) * (dp[i] - dl[i]);
      }
      DSw[i * kSimtChunk + lane] = ds;
      amask[i] = __ballot_sync(kFull, ok);
    }
    __syncwarp();
    const int nj = g.N - k0 < kSimtChunk ? g.N - k0 : kSimtChunk;
    for (int j = 0; j < nj; ++j) {
      float kv[C];
#pragma unroll
      for (int c = 0; c < C; ++c) kv[c] = Ks[j * LD + lane + 32 * c];
#pragma unroll
      for (int i = 0; i < kSimtRows; ++i) {
        if ((amask[i] >> j) & 1u) {
          const float dsij = DSw[i * kSimtChunk + j];
#pragma unroll
          for (int c = 0; c < C; ++c) acc[i][c] = fmaf(dsij, kv[c], acc[i][c]);
        }
      }
    }
    if (part != nullptr) {
      __syncthreads();  // every warp's dS rows are in place
      bias_partials(bacc, DS, kSimtChunk, q0, kSimtTile, k0, kSimtChunk, g);
    }
  }

#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) {
    if (qc[i] < 0) continue;
    const int j = q0 + warp * kSimtRows + i;
    const int64_t row = out_row(g, p.b, ty[j], tx[j], p.h);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int col = lane + 32 * c;
      if (col < g.d) dq[row * g.d + col] = from_float<T>(acc[i][c] * g.scale);
    }
  }
  if (part != nullptr) store_partials(bacc, part, g, p.id);
}

// ---- SIMT backward, key-major: dk, dv -------------------------------------------------------
// Block: kSimtTile key rows; chunks of 32 queries (one per lane).
template <typename T, int C>
__global__ void __launch_bounds__(kThreads, 1)
    dkdv_simt_kernel(Geo g, const T* __restrict__ go, const T* __restrict__ q, const T* __restrict__ k,
                     const T* __restrict__ v, S5 sgo, S5 sq, S5 sk, S5 sv, const float* __restrict__ lse, S4 sl,
                     const float* __restrict__ table, const float* __restrict__ delta_ws, T* __restrict__ dk,
                     T* __restrict__ dv, int64_t base) {
  extern __shared__ __align__(16) unsigned char wa_smem[];
  constexpr int LD = 32 * C + 1;
  const Plan pl = simt_plan(kDkdv, C, g.T, g.N);
  float* Ks = reinterpret_cast<float*>(wa_smem);
  float* Vs = reinterpret_cast<float*>(wa_smem + pl.tile_bytes);
  float* Qs = reinterpret_cast<float*>(wa_smem + 2 * pl.tile_bytes);
  float* Gs = reinterpret_cast<float*>(wa_smem + 3 * pl.tile_bytes);
  float* Ps = reinterpret_cast<float*>(wa_smem + pl.extra);
  float* DS = Ps + kWarps * kSimtRows * kSimtChunk;
  float* Ls = DS + kWarps * kSimtRows * kSimtChunk;  // lse of the chunk's queries
  float* Dl = Ls + kSimtChunk;                        // delta of the chunk's queries
  float* tbl = reinterpret_cast<float*>(wa_smem + pl.tbl);
  int* tok = reinterpret_cast<int*>(wa_smem + pl.tok);
  int* ty = reinterpret_cast<int*>(wa_smem + pl.ty);
  int* tx = reinterpret_cast<int*>(wa_smem + pl.tx);

  const Pos p = block_pos(g, base + int64_t(blockIdx.x));
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int r0 = p.tile * kSimtTile;  // first key row
  const bool has_bias = table != nullptr;
  setup_window(g, p, table, tok, ty, tx, tbl);
  __syncthreads();
  load_rows_f32(Ks, LD, 32 * C, k, sk, p.b, p.h, r0, tok, ty, tx, g.N, g.d);
  load_rows_f32(Vs, LD, 32 * C, v, sv, p.b, p.h, r0, tok, ty, tx, g.N, g.d);

  int kc[kSimtRows];
  float adk[kSimtRows][C], adv[kSimtRows][C];
#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) {
    kc[i] = code_of(tok, r0 + warp * kSimtRows + i, g.N);
#pragma unroll
    for (int c = 0; c < C; ++c) adk[i][c] = adv[i][c] = 0.f;
  }
  const float* Kw = Ks + warp * kSimtRows * LD;
  const float* Vw = Vs + warp * kSimtRows * LD;
  float* Pw = Ps + warp * kSimtRows * kSimtChunk;
  float* DSw = DS + warp * kSimtRows * kSimtChunk;

  for (int c0 = 0; c0 < g.N; c0 += kSimtChunk) {
    __syncthreads();  // the previous chunk's Q / dO / lse / delta are no longer read
    load_rows_f32(Qs, LD, 32 * C, q, sq, p.b, p.h, c0, tok, ty, tx, g.N, g.d);
    load_rows_f32(Gs, LD, 32 * C, go, sgo, p.b, p.h, c0, tok, ty, tx, g.N, g.d);
    if (threadIdx.x < kSimtChunk) {
      const int j = c0 + int(threadIdx.x);
      float lv = 0.f, dv_ = 0.f;
      if (code_of(tok, j, g.N) >= 0) {
        lv = lse[p.b * sl.b + int64_t(ty[j]) * sl.y + int64_t(tx[j]) * sl.x + int64_t(p.h) * sl.h];
        dv_ = delta_ws[out_row(g, p.b, ty[j], tx[j], p.h)];
      }
      Ls[threadIdx.x] = lv;
      Dl[threadIdx.x] = dv_;
    }
    __syncthreads();
    const int qcl = code_of(tok, c0 + lane, g.N);  // this lane's query
    float s[kSimtRows], dp[kSimtRows];
#pragma unroll
    for (int i = 0; i < kSimtRows; ++i) s[i] = dp[i] = 0.f;
    for (int c = 0; c < g.d; ++c) {
      const float qv = Qs[lane * LD + c], gv = Gs[lane * LD + c];
#pragma unroll
      for (int i = 0; i < kSimtRows; ++i) {
        s[i] = fmaf(Kw[i * LD + c], qv, s[i]);
        dp[i] = fmaf(Vw[i * LD + c], gv, dp[i]);
      }
    }
    const float lq = Ls[lane], dq_ = Dl[lane];
    unsigned amask[kSimtRows];
#pragma unroll
    for (int i = 0; i < kSimtRows; ++i) {
      const bool ok = allowed(qcl, kc[i]);
      float pv = 0.f, ds = 0.f;
      if (ok) {
        const float x = s[i] * g.scale + (has_bias ? tbl[bias_index(qcl, kc[i], g.center)] : 0.f);
        pv = expf(x - lq);
        ds = pv * (dp[i] - dq_);
      }
      Pw[i * kSimtChunk + lane] = pv;
      DSw[i * kSimtChunk + lane] = ds;
      amask[i] = __ballot_sync(kFull, ok);
    }
    __syncwarp();
    const int nj = g.N - c0 < kSimtChunk ? g.N - c0 : kSimtChunk;
    for (int j = 0; j < nj; ++j) {
      float gv[C], qv[C];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        gv[c] = Gs[j * LD + lane + 32 * c];
        qv[c] = Qs[j * LD + lane + 32 * c];
      }
#pragma unroll
      for (int i = 0; i < kSimtRows; ++i) {
        if ((amask[i] >> j) & 1u) {
          const float pij = Pw[i * kSimtChunk + j], dsij = DSw[i * kSimtChunk + j];
#pragma unroll
          for (int c = 0; c < C; ++c) {
            adv[i][c] = fmaf(pij, gv[c], adv[i][c]);
            adk[i][c] = fmaf(dsij, qv[c], adk[i][c]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kSimtRows; ++i) {
    if (kc[i] < 0) continue;
    const int j = r0 + warp * kSimtRows + i;
    const int64_t row = out_row(g, p.b, ty[j], tx[j], p.h);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int col = lane + 32 * c;
      if (col < g.d) {
        dk[row * g.d + col] = from_float<T>(adk[i][c] * g.scale);
        dv[row * g.d + col] = from_float<T>(adv[i][c]);
      }
    }
  }
}

// ---- tensor-core path (float16 / bfloat16, sm_80+) --------------------------------------------
// 64 rows per block (16 per warp: one m16 tile), chunks of 64 keys in the forward and 32 keys /
// queries in the backward. Operands stay 16-bit in shared memory (rows of DMAX + 8 elements: 16-byte
// aligned for ldmatrix, and the 16-byte skew spreads the 8 rows of an 8x8 matrix over distinct
// bank groups), filled by cp.async (16-byte copies when a tensor's rows allow: unit head_dim
// stride, head_dim % 8 == 0, 16-byte aligned rows) or by plain loads otherwise; absent tokens,
// rows past the window and columns past head_dim (up to a multiple of 16) are zeros. Chunks are
// double-buffered: the copies of chunk i+1 are in flight while chunk i is computed. The products
// run as mma.sync m16n8k16 (PTX wrappers of common/cuda_ptx.cuh) with float32 accumulators:
// S = Q K^T with K as the column-major B operand (ldmatrix from [key][d] rows), O += P V with V
// through ldmatrix .trans; P (and dS in the backward) goes from the accumulator fragments to A
// fragments in registers, rounded to the input dtype. Masking, bias and the online softmax work
// on the accumulator fragments (rows g and g + 8 of the warp's tile, columns 2t, 2t + 1 of each
// n8 tile; row statistics over the 4 lanes of a group).
//
// A key of another shift region gets P = 0, but a 0 * inf in the P V product would still turn a
// query NaN: the forward checks the v values it stages and, when one is NaN or inf, sets a flag
// in the workspace; the SIMT forward then recomputes everything (it skips excluded keys exactly).
// That path is for inputs that are not finite; finite ones never take it.
constexpr int kTcTile = 64;
constexpr int kTcFwdChunk = 64;
constexpr int kTcBwdChunk = 32;

template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  static constexpr uint32_t kExp = 0x7c00u;  // exponent bits: all ones for inf and NaN
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const uint32_t b[2] = {b0, b1};
    ptx::mma_m16n8k16_f16(d, a, b, d);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return ptx::pack_half2(lo, hi); }
};
template <>
struct Mma<__nv_bfloat16> {
  static constexpr uint32_t kExp = 0x7f80u;
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const uint32_t b[2] = {b0, b1};
    ptx::mma_m16n8k16_bf16(d, a, b, d);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return ptx::pack_bf162(lo, hi); }
};

// Shared memory of the tensor-core kernels: the block's kTcTile-row operand tiles (Q; Q and dO;
// K and V), then `stages` chunk buffers (K and V chunks; Q and dO chunks with their lse and
// delta), then the dq kernel's float dS tile, then the table and token arrays (make_plan).
struct TcPlan {
  Plan base;
  size_t stage0, stage_bytes, chunk_bytes, extra_at;
};

__host__ __device__ inline TcPlan tc_plan(int kind, int dmax, int T, int N, int stages) {
  const size_t row = size_t(dmax + 8) * 2;
  const size_t tile = row * kTcTile;
  TcPlan p;
  if (kind == kForward) {
    p.chunk_bytes = row * kTcFwdChunk;
    p.stage_bytes = 2 * p.chunk_bytes;  // K, V
    p.base = make_plan(1, tile, p.stage_bytes * stages, T, N);
  } else if (kind == kDq) {
    p.chunk_bytes = row * kTcBwdChunk;
    p.stage_bytes = 2 * p.chunk_bytes;  // K, V
    const size_t ds = size_t(kTcTile) * (kTcBwdChunk + 4) * sizeof(float);
    p.base = make_plan(2, tile, p.stage_bytes * stages + ds, T, N);
  } else {
    p.chunk_bytes = row * kTcBwdChunk;
    p.stage_bytes = 2 * p.chunk_bytes + 2 * kTcBwdChunk * sizeof(float);  // Q, dO, lse, delta
    p.base = make_plan(2, tile, p.stage_bytes * stages, T, N);
  }
  p.stage0 = p.base.extra;
  p.extra_at = p.base.extra + p.stage_bytes * stages;
  return p;
}

// Rows row0 .. row0 + nrows - 1 of the window (token index) into dst (row stride LD elements),
// columns 0 .. dk - 1 (dk = head_dim rounded up to 16): cp.async copies of 16 bytes when `vec`,
// else plain 16-bit loads and stores. Zeros for absent tokens, rows past the window, columns past
// head_dim. The caller commits and waits (cp.async) and synchronises.
template <int LD>
__device__ __forceinline__ void load_rows_16(uint16_t* dst, int nrows, const uint16_t* __restrict__ src, const S5& s,
                                             int64_t b, int h, int row0, const int* tok, const int* ty, const int* tx,
                                             int N, int d, int dk, bool vec) {
  if (vec) {
    const int cpr = dk >> 3;
    for (int i = int(threadIdx.x); i < nrows * cpr; i += kThreads) {
      const int r = i / cpr, c = (i - r * cpr) << 3;
      const int j = row0 + r;
      const bool ok = c < d && j < N && tok[j] >= 0;
      const uint16_t* from = ok ? src + in_offset(s, b, ty[j], tx[j], h) + c : src;
      ptx::cp_async_16(dst + r * LD + c, from, ok);
    }
  } else {
    for (int i = int(threadIdx.x); i < nrows * dk; i += kThreads) {
      const int r = i / dk, c = i - r * dk;
      const int j = row0 + r;
      uint16_t val = 0;
      if (c < d && j < N && tok[j] >= 0) val = src[in_offset(s, b, ty[j], tx[j], h) + int64_t(c) * s.c];
      dst[r * LD + c] = val;
    }
  }
}

// Lane addresses of ldmatrix: an A fragment (16 x 16 at rows r0.., columns c0.. of a row-major
// tile); two B fragments (n8 tiles n0, n0 + 8; k16 at c0) from an [n][k] tile (non-transposed) or
// from a [k][n] tile (k16 at r0, n8 tiles c0, c0 + 8; .trans).
template <int LD>
__device__ __forceinline__ const uint16_t* a_rows(const uint16_t* t, int r0, int c0, int lane) {
  return t + (r0 + (lane & 15)) * LD + c0 + ((lane >> 4) << 3);
}
template <int LD>
__device__ __forceinline__ const uint16_t* b_nk(const uint16_t* t, int n0, int c0, int lane) {
  return t + (n0 + (lane & 7) + ((lane >> 4) << 3)) * LD + c0 + (((lane >> 3) & 1) << 3);
}
template <int LD>
__device__ __forceinline__ const uint16_t* b_kn(const uint16_t* t, int r0, int c0, int lane) {
  return t + (r0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * LD + c0 + ((lane >> 4) << 3);
}

// acc[NT][4] += A B^T over head_dim: A the 16 rows r0.. of tile `at`, B the [n][k] tile `bt`
// (rows = the chunk's keys or queries), n8 tiles in pairs np < nkt, k16 steps kk < nk.
template <typename T, int LD, int DMAX, int NT>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const uint16_t* at, int r0, const uint16_t* bt, int nk,
                                        int nkt, int lane) {
#pragma unroll
  for (int kk = 0; kk < DMAX / 16; ++kk) {
    if (kk >= nk) break;
    uint32_t a[4];
    ptx::ldmatrix_x4(a, a_rows<LD>(at, r0, kk * 16, lane));
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      if (np >= nkt) break;
      uint32_t b[4];
      ptx::ldmatrix_x4(b, b_nk<LD>(bt, np * 16, kk * 16, lane));
      Mma<T>::run(acc[2 * np], a, b[0], b[1]);
      Mma<T>::run(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[DT][4] += P B: P (16 x 16 * nkt) in accumulator fragments p[NT][4] (rounded to T), B the
// [k][n] tile bt (k = the chunk's rows), n8 tiles over head_dim (pairs np < nk).
template <typename T, int LD, int DMAX, int NT>
__device__ __forceinline__ void mma_pb(float (&acc)[DMAX / 8][4], const float (&pf)[NT][4], const uint16_t* bt,
                                       int nk, int nkt, int lane) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    if (kk >= nkt) break;
    const uint32_t a[4] = {Mma<T>::pack(pf[2 * kk][0], pf[2 * kk][1]), Mma<T>::pack(pf[2 * kk][2], pf[2 * kk][3]),
                           Mma<T>::pack(pf[2 * kk + 1][0], pf[2 * kk + 1][1]),
                           Mma<T>::pack(pf[2 * kk + 1][2], pf[2 * kk + 1][3])};
#pragma unroll
    for (int np = 0; np < DMAX / 16; ++np) {
      if (np >= nk) break;
      uint32_t b[4];
      ptx::ldmatrix_x4_trans(b, b_kn<LD>(bt, kk * 16, np * 16, lane));
      Mma<T>::run(acc[2 * np], a, b[0], b[1]);
      Mma<T>::run(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Writes a 16 x head_dim accumulator tile (rows g, g + 8 of the warp: tokens ja, jb) times `mul`
// to the contiguous output.
template <typename T, int DT>
__device__ __forceinline__ void store_rows(T* __restrict__ dst, const float (&acc)[DT][4], const Geo& g, const Pos& p,
                                           const int* tok, const int* ty, const int* tx, int ja, int jb, float mul0,
                                           float mul1, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = half ? jb : ja;
    if (code_of(tok, j, g.N) < 0) continue;
    const float mul = half ? mul1 : mul0;
    T* row = dst + out_row(g, p.b, ty[j], tx[j], p.h) * g.d;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int col = dt * 8 + 2 * (lane & 3);
      if (col < g.d) row[col] = from_float<T>(acc[dt][2 * half] * mul);
      if (col + 1 < g.d) row[col + 1] = from_float<T>(acc[dt][2 * half + 1] * mul);
    }
  }
}

// Element e of accumulator tile nt: row half e >> 1 (g or g + 8), column nt * 8 + 2t + (e & 1).
__device__ __forceinline__ int frag_col(int nt, int e, int lane) { return nt * 8 + 2 * (lane & 3) + (e & 1); }

// ---- tensor-core forward ----------------------------------------------------------------------
// vec: bit 0 q, bit 1 k, bit 2 v take 16-byte cp.async copies.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_tc_kernel(Geo g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, S5 sq, S5 sk,
                  S5 sv, int vec, const float* __restrict__ table, T* __restrict__ out, float* __restrict__ lse,
                  int* __restrict__ nonfinite, int64_t base) {
  constexpr int LD = DMAX + 8, KC = kTcFwdChunk, NT = KC / 8, DT = DMAX / 8;
  extern __shared__ __align__(16) unsigned char wa_smem[];
  const int nc = (g.N + KC - 1) / KC;
  const TcPlan pl = tc_plan(kForward, DMAX, g.T, g.N, nc > 1 ? 2 : 1);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(wa_smem);
  float* tbl = reinterpret_cast<float*>(wa_smem + pl.base.tbl);
  int* tok = reinterpret_cast<int*>(wa_smem + pl.base.tok);
  int* ty = reinterpret_cast<int*>(wa_smem + pl.base.ty);
  int* tx = reinterpret_cast<int*>(wa_smem + pl.base.tx);

  const Pos p = block_pos(g, base + int64_t(blockIdx.x));
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int q0 = p.tile * kTcTile;
  const int dk = (g.d + 15) & ~15, nk = dk >> 4;
  const bool has_bias = table != nullptr;
  const uint16_t* qb = reinterpret_cast<const uint16_t*>(q);
  const uint16_t* kb = reinterpret_cast<const uint16_t*>(k);
  const uint16_t* vb = reinterpret_cast<const uint16_t*>(v);
  setup_window(g, p, table, tok, ty, tx, tbl);
  __syncthreads();
  auto load_chunk = [&](int ci) {
    uint16_t* st = reinterpret_cast<uint16_t*>(wa_smem + pl.stage0 + (ci & 1) * pl.stage_bytes);
    load_rows_16<LD>(st, KC, kb, sk, p.b, p.h, ci * KC, tok, ty, tx, g.N, g.d, dk, (vec & 2) != 0);
    load_rows_16<LD>(st + KC * LD, KC, vb, sv, p.b, p.h, ci * KC, tok, ty, tx, g.N, g.d, dk, (vec & 4) != 0);
  };
  load_rows_16<LD>(Qs, kTcTile, qb, sq, p.b, p.h, q0, tok, ty, tx, g.N, g.d, dk, (vec & 1) != 0);
  load_chunk(0);
  ptx::cp_async_commit();

  const int ja = q0 + warp * 16 + (lane >> 2), jb = ja + 8;  // this lane's rows
  const int qca = code_of(tok, ja, g.N), qcb = code_of(tok, jb, g.N);
  const bool active = q0 + warp * 16 < g.N;  // the warp has rows in the window
  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float ma = -INFINITY, mb = -INFINITY, la = 0.f, lb = 0.f;  // l: this lane's part of the row sums
  bool bad = false;

  for (int ci = 0; ci < nc; ++ci) {
    const int k0 = ci * KC;
    if (ci + 1 < nc) load_chunk(ci + 1);
    ptx::cp_async_commit();  // possibly empty: one group per iteration keeps wait<1> right
    ptx::cp_async_wait<1>();
    __syncthreads();
    const uint16_t* Ks = reinterpret_cast<const uint16_t*>(wa_smem + pl.stage0 + (ci & 1) * pl.stage_bytes);
    const uint16_t* Vs = Ks + KC * LD;
    const int nkeys = g.N - k0 < KC ? g.N - k0 : KC;
    {  // NaN / inf among the staged values (see above)
      const uint32_t* w = reinterpret_cast<const uint32_t*>(Vs);
      const int wpr = dk >> 1;
      for (int i = int(threadIdx.x); i < nkeys * wpr; i += kThreads) {
        const int r = i / wpr;
        const uint32_t x = w[r * (LD / 2) + (i - r * wpr)];
        bad |= (x & Mma<T>::kExp) == Mma<T>::kExp || ((x >> 16) & Mma<T>::kExp) == Mma<T>::kExp;
      }
    }
    if (active) {
      const int nkt = (nkeys + 15) >> 4;  // 16-key groups holding keys
      float s[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      mma_abt<T, LD, DMAX, NT>(s, Qs, warp * 16, Ks, nk, nkt, lane);
      float mxa = -INFINITY, mxb = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kc = code_of(tok, k0 + frag_col(nt, e, lane), g.N);
          const int qc = e < 2 ? qca : qcb;
          float x = -INFINITY;
          if (allowed(qc, kc)) x = s[nt][e] * g.scale + (has_bias ? tbl[bias_index(qc, kc, g.center)] : 0.f);
          s[nt][e] = x;
          if (e < 2)
            mxa = fmaxf(mxa, x);
          else
            mxb = fmaxf(mxb, x);
        }
      }
#pragma unroll
      for (int o_ = 1; o_ <= 2; o_ <<= 1) {
        mxa = fmaxf(mxa, __shfl_xor_sync(kFull, mxa, o_));
        mxb = fmaxf(mxb, __shfl_xor_sync(kFull, mxb, o_));
      }
      const float na = fmaxf(ma, mxa), nb = fmaxf(mb, mxb);
      const float ua = na == -INFINITY ? 0.f : na, ub = nb == -INFINITY ? 0.f : nb;
      const float aa = expf(ma - ua), ab = expf(mb - ub);
      ma = na;
      mb = nb;
      la *= aa;
      lb *= ab;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][0] *= aa;
        o[dt][1] *= aa;
        o[dt][2] *= ab;
        o[dt][3] *= ab;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pv = expf(s[nt][e] - (e < 2 ? ua : ub));  // 0 for excluded keys (-inf)
          s[nt][e] = pv;
          if (e < 2)
            la += pv;
          else
            lb += pv;
        }
      }
      mma_pb<T, LD, DMAX, NT>(o, s, Vs, nk, nkt, lane);
    }
    __syncthreads();  // this stage is refilled by the next iteration's copies
  }

  if (active) {
#pragma unroll
    for (int o_ = 1; o_ <= 2; o_ <<= 1) {
      la += __shfl_xor_sync(kFull, la, o_);
      lb += __shfl_xor_sync(kFull, lb, o_);
    }
    store_rows<T, DT>(out, o, g, p, tok, ty, tx, ja, jb, 1.f / la, 1.f / lb, lane);
    if ((lane & 3) == 0) {
      if (qca >= 0) lse[out_row(g, p.b, ty[ja], tx[ja], p.h)] = ma + logf(la);
      if (qcb >= 0) lse[out_row(g, p.b, ty[jb], tx[jb], p.h)] = mb + logf(lb);
    }
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *nonfinite = 1;
}

// ---- tensor-core backward, query-major: delta, dq, bias partials --------------------------------
// vec: bit 0 grad_out, bit 1 q, bit 2 k, bit 3 v.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads, 1)
    dq_tc_kernel(Geo g, const T* __restrict__ go, const T* __restrict__ q, const T* __restrict__ k,
                 const T* __restrict__ v, const T* __restrict__ o, S5 sgo, S5 sq, S5 sk, S5 sv, S5 so, int vec,
                 const float* __restrict__ lse, S4 sl, const float* __restrict__ table, float* __restrict__ delta_ws,
                 T* __restrict__ dq, float* __restrict__ part, int64_t base) {
  constexpr int LD = DMAX + 8, KC = kTcBwdChunk, NT = KC / 8, DT = DMAX / 8, LDS = KC + 4;
  extern __shared__ __align__(16) unsigned char wa_smem[];
  const int nc = (g.N + KC - 1) / KC;
  const TcPlan pl = tc_plan(kDq, DMAX, g.T, g.N, nc > 1 ? 2 : 1);
  uint16_t* Qs = reinterpret_cast<uint16_t*>(wa_smem);
  uint16_t* Gs = reinterpret_cast<uint16_t*>(wa_smem + pl.base.tile_bytes);
  float* DS = reinterpret_cast<float*>(wa_smem + pl.extra_at);  // [kTcTile][LDS]
  float* tbl = reinterpret_cast<float*>(wa_smem + pl.base.tbl);
  int* tok = reinterpret_cast<int*>(wa_smem + pl.base.tok);
  int* ty = reinterpret_cast<int*>(wa_smem + pl.base.ty);
  int* tx = reinterpret_cast<int*>(wa_smem + pl.base.tx);

  const Pos p = block_pos(g, base + int64_t(blockIdx.x));
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int q0 = p.tile * kTcTile;
  const int dk = (g.d + 15) & ~15, nk = dk >> 4;
  const bool has_bias = table != nullptr;
  const uint16_t* kb = reinterpret_cast<const uint16_t*>(k);
  const uint16_t* vb = reinterpret_cast<const uint16_t*>(v);
  setup_window(g, p, table, tok, ty, tx, tbl);
  __syncthreads();
  auto load_chunk = [&](int ci) {
    uint16_t* st = reinterpret_cast<uint16_t*>(wa_smem + pl.stage0 + (ci & 1) * pl.stage_bytes);
    load_rows_16<LD>(st, KC, kb, sk, p.b, p.h, ci * KC, tok, ty, tx, g.N, g.d, dk, (vec & 4) != 0);
    load_rows_16<LD>(st + KC * LD, KC, vb, sv, p.b, p.h, ci * KC, tok, ty, tx, g.N, g.d, dk, (vec & 8) != 0);
  };
  load_rows_16<LD>(Qs, kTcTile, reinterpret_cast<const uint16_t*>(q), sq, p.b, p.h, q0, tok, ty, tx, g.N, g.d, dk,
                   (vec & 2) != 0);
  load_rows_16<LD>(Gs, kTcTile, reinterpret_cast<const uint16_t*>(go), sgo, p.b, p.h, q0, tok, ty, tx, g.N, g.d, dk,
                   (vec & 1) != 0);
  load_chunk(0);
  ptx::cp_async_commit();

  const int ja = q0 + warp * 16 + (lane >> 2), jb = ja + 8;
  const int qca = code_of(tok, ja, g.N), qcb = code_of(tok, jb, g.N);
  const bool active = q0 + warp * 16 < g.N;
  // delta = rowsum(dO * O) and lse of the warp's 16 rows (from global memory, while the copies fly)
  float dla = 0.f, dlb = 0.f, lsa = 0.f, lsb = 0.f;
  if (active) {
    for (int r = 0; r < 16; ++r) {
      const int j = q0 + warp * 16 + r;
      const bool present = code_of(tok, j, g.N) >= 0;
      float sum = 0.f;
      if (present) {
        const int64_t go_at = in_offset(sgo, p.b, ty[j], tx[j], p.h), o_at = in_offset(so, p.b, ty[j], tx[j], p.h);
        for (int c = lane; c < g.d; c += 32)
          sum += to_float(go[go_at + int64_t(c) * sgo.c]) * to_float(o[o_at + int64_t(c) * so.c]);
      }
      sum = warp_sum(sum);
      if (present && lane == 0) delta_ws[out_row(g, p.b, ty[j], tx[j], p.h)] = sum;
      if (r == (lane >> 2)) dla = sum;
      if (r == (lane >> 2) + 8) dlb = sum;
    }
    if (qca >= 0) lsa = lse[p.b * sl.b + int64_t(ty[ja]) * sl.y + int64_t(tx[ja]) * sl.x + int64_t(p.h) * sl.h];
    if (qcb >= 0) lsb = lse[p.b * sl.b + int64_t(ty[jb]) * sl.y + int64_t(tx[jb]) * sl.x + int64_t(p.h) * sl.h];
  }
  float acc[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
  float bacc[kOwned];
#pragma unroll
  for (int i = 0; i < kOwned; ++i) bacc[i] = 0.f;

  for (int ci = 0; ci < nc; ++ci) {
    const int k0 = ci * KC;
    if (ci + 1 < nc) load_chunk(ci + 1);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();
    __syncthreads();
    const uint16_t* Ks = reinterpret_cast<const uint16_t*>(wa_smem + pl.stage0 + (ci & 1) * pl.stage_bytes);
    const uint16_t* Vs = Ks + KC * LD;
    const int nkeys = g.N - k0 < KC ? g.N - k0 : KC;
    if (active) {
      const int nkt = (nkeys + 15) >> 4;
      float s[NT][4], dp[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
      }
      mma_abt<T, LD, DMAX, NT>(s, Qs, warp * 16, Ks, nk, nkt, lane);
      mma_abt<T, LD, DMAX, NT>(dp, Gs, warp * 16, Vs, nk, nkt, lane);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kc = code_of(tok, k0 + frag_col(nt, e, lane), g.N);
          const int qc = e < 2 ? qca : qcb;
          float ds = 0.f;
          if (allowed(qc, kc)) {
            const float x = s[nt][e] * g.scale + (has_bias ? tbl[bias_index(qc, kc, g.center)] : 0.f);
            ds = expf(x - (e < 2 ? lsa : lsb)) * (dp[nt][e] - (e < 2 ? dla : dlb));
          }
          s[nt][e] = ds;
          if (part != nullptr) DS[(warp * 16 + (lane >> 2) + 8 * (e >> 1)) * LDS + frag_col(nt, e, lane)] = ds;
        }
      }
      mma_pb<T, LD, DMAX, NT>(acc, s, Ks, nk, nkt, lane);  // dq += dS K
    }
    if (part != nullptr) {
      __syncthreads();  // every warp's dS rows are in place
      bias_partials(bacc, DS, LDS, q0, kTcTile, k0, KC, g);
    }
    __syncthreads();
  }
  if (active) store_rows<T, DT>(dq, acc, g, p, tok, ty, tx, ja, jb, g.scale, g.scale, lane);
  if (part != nullptr) store_partials(bacc, part, g, p.id);
}

// ---- tensor-core backward, key-major: dk, dv ----------------------------------------------------
// 64 key rows per block; chunks of 32 queries. S^T = K Q^T and dP^T = V dO^T (Q, dO as [n][k]
// B operands), dv += P^T dO and dk += dS^T Q (dO, Q through ldmatrix .trans).
template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads, 1)
    dkdv_tc_kernel(Geo g, const T* __restrict__ go, const T* __restrict__ q, const T* __restrict__ k,
                   const T* __restrict__ v, S5 sgo, S5 sq, S5 sk, S5 sv, int vec, const float* __restrict__ lse, S4 sl,
                   const float* __restrict__ table, const float* __restrict__ delta_ws, T* __restrict__ dk,
                   T* __restrict__ dv, int64_t base) {
  constexpr int LD = DMAX + 8, QC = kTcBwdChunk, NT = QC / 8, DT = DMAX / 8;
  extern __shared__ __align__(16) unsigned char wa_smem[];
  const int nc = (g.N + QC - 1) / QC;
  const TcPlan pl = tc_plan(kDkdv, DMAX, g.T, g.N, nc > 1 ? 2 : 1);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(wa_smem);
  uint16_t* Vs = reinterpret_cast<uint16_t*>(wa_smem + pl.base.tile_bytes);
  float* tbl = reinterpret_cast<float*>(wa_smem + pl.base.tbl);
  int* tok = reinterpret_cast<int*>(wa_smem + pl.base.tok);
  int* ty = reinterpret_cast<int*>(wa_smem + pl.base.ty);
  int* tx = reinterpret_cast<int*>(wa_smem + pl.base.tx);

  const Pos p = block_pos(g, base + int64_t(blockIdx.x));
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int r0 = p.tile * kTcTile;
  const int dkc = (g.d + 15) & ~15, nk = dkc >> 4;
  const bool has_bias = table != nullptr;
  const uint16_t* qb = reinterpret_cast<const uint16_t*>(q);
  const uint16_t* gb = reinterpret_cast<const uint16_t*>(go);
  setup_window(g, p, table, tok, ty, tx, tbl);
  __syncthreads();
  auto load_chunk = [&](int ci) {
    unsigned char* st = wa_smem + pl.stage0 + (ci & 1) * pl.stage_bytes;
    uint16_t* qs = reinterpret_cast<uint16_t*>(st);
    load_rows_16<LD>(qs, QC, qb, sq, p.b, p.h, ci * QC, tok, ty, tx, g.N, g.d, dkc, (vec & 2) != 0);
    load_rows_16<LD>(qs + QC * LD, QC, gb, sgo, p.b, p.h, ci * QC, tok, ty, tx, g.N, g.d, dkc, (vec & 1) != 0);
    float* ls = reinterpret_cast<float*>(st + 2 * pl.chunk_bytes);
    if (threadIdx.x < QC) {
      const int j = ci * QC + int(threadIdx.x);
      float lv = 0.f, dv_ = 0.f;
      if (code_of(tok, j, g.N) >= 0) {
        lv = lse[p.b * sl.b + int64_t(ty[j]) * sl.y + int64_t(tx[j]) * sl.x + int64_t(p.h) * sl.h];
        dv_ = delta_ws[out_row(g, p.b, ty[j], tx[j], p.h)];
      }
      ls[threadIdx.x] = lv;
      ls[QC + threadIdx.x] = dv_;
    }
  };
  load_rows_16<LD>(Ks, kTcTile, reinterpret_cast<const uint16_t*>(k), sk, p.b, p.h, r0, tok, ty, tx, g.N, g.d, dkc,
                   (vec & 4) != 0);
  load_rows_16<LD>(Vs, kTcTile, reinterpret_cast<const uint16_t*>(v), sv, p.b, p.h, r0, tok, ty, tx, g.N, g.d, dkc,
                   (vec & 8) != 0);
  load_chunk(0);
  ptx::cp_async_commit();

  const int ja = r0 + warp * 16 + (lane >> 2), jb = ja + 8;  // this lane's key rows
  const int kca = code_of(tok, ja, g.N), kcb = code_of(tok, jb, g.N);
  const bool active = r0 + warp * 16 < g.N;
  float adk[DT][4], adv[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    adk[dt][0] = adk[dt][1] = adk[dt][2] = adk[dt][3] = 0.f;
    adv[dt][0] = adv[dt][1] = adv[dt][2] = adv[dt][3] = 0.f;
  }

  for (int ci = 0; ci < nc; ++ci) {
    const int c0 = ci * QC;
    if (ci + 1 < nc) load_chunk(ci + 1);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();
    __syncthreads();
    const unsigned char* st = wa_smem + pl.stage0 + (ci & 1) * pl.stage_bytes;
    const uint16_t* Qc = reinterpret_cast<const uint16_t*>(st);
    const uint16_t* Gc = Qc + QC * LD;
    const float* Lc = reinterpret_cast<const float*>(st + 2 * pl.chunk_bytes);
    const float* Dc = Lc + QC;
    const int nq = g.N - c0 < QC ? g.N - c0 : QC;
    if (active) {
      const int nqt = (nq + 15) >> 4;
      float s[NT][4], dp[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
      }
      mma_abt<T, LD, DMAX, NT>(s, Ks, warp * 16, Qc, nk, nqt, lane);   // S^T
      mma_abt<T, LD, DMAX, NT>(dp, Vs, warp * 16, Gc, nk, nqt, lane);  // dP^T
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int jj = frag_col(nt, e, lane);
          const int qc = code_of(tok, c0 + jj, g.N);
          const int kc = e < 2 ? kca : kcb;
          float pv = 0.f, ds = 0.f;
          if (allowed(qc, kc)) {
            const float x = s[nt][e] * g.scale + (has_bias ? tbl[bias_index(qc, kc, g.center)] : 0.f);
            pv = expf(x - Lc[jj]);
            ds = pv * (dp[nt][e] - Dc[jj]);
          }
          s[nt][e] = pv;
          dp[nt][e] = ds;
        }
      }
      mma_pb<T, LD, DMAX, NT>(adv, s, Gc, nk, nqt, lane);   // dv += P^T dO
      mma_pb<T, LD, DMAX, NT>(adk, dp, Qc, nk, nqt, lane);  // dk += dS^T Q
    }
    __syncthreads();
  }
  if (active) {
    store_rows<T, DT>(dk, adk, g, p, tok, ty, tx, ja, jb, g.scale, g.scale, lane);
    store_rows<T, DT>(dv, adv, g, p, tok, ty, tx, ja, jb, 1.f, 1.f, lane);
  }
}

// ---- launchers ------------------------------------------------------------------------------
S5 strides5(const Tensor5& t) { return S5{t.stride[0], t.stride[1], t.stride[2], t.stride[3], t.stride[4]}; }
S4 strides4(const Tensor4& t) { return S4{t.stride[0], t.stride[1], t.stride[2], t.stride[3]}; }

Geo make_geo(const Problem& pr, int tile) {
  Geo g;
  g.batch = pr.batch;
  g.H = int(pr.height);
  g.W = int(pr.width);
  g.heads = int(pr.heads);
  g.d = int(pr.head_dim);
  g.wh = int(pr.window_h);
  g.ww = int(pr.window_w);
  g.sh = int(pr.shift_h);
  g.sw = int(pr.shift_w);
  g.Hp = int((pr.height + pr.window_h - 1) / pr.window_h * pr.window_h);
  g.Wp = int((pr.width + pr.window_w - 1) / pr.window_w * pr.window_w);
  g.nWx = g.Wp / g.ww;
  g.nWin = int64_t(g.Hp / g.wh) * g.nWx;
  g.N = g.wh * g.ww;
  g.tile = tile;
  g.n_tiles = (g.N + tile - 1) / tile;
  g.tw = 2 * g.ww - 1;
  g.T = (2 * g.wh - 1) * g.tw;
  g.center = (g.wh - 1) * g.tw + (g.ww - 1);
  g.table_heads = int(pr.table_heads);
  g.scale = float(pr.scale);
  return g;
}

int64_t n_blocks(const Geo& g) { return int64_t(g.heads) * g.batch * g.nWin * g.n_tiles; }

int simt_cols(int64_t d) { return d <= 32 ? 1 : d <= 64 ? 2 : d <= 128 ? 4 : 8; }

// Opts in to more than 48 KiB of dynamic shared memory when needed.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

unsigned grid_of(int64_t total, int64_t base) {
  const int64_t n = total - base < kMaxGrid ? total - base : kMaxGrid;
  return unsigned(n);
}

// only_if == nullptr: one block per work item. Else the fix-up after the tensor-core forward: a
// grid of at most kFixupGrid blocks that return at once unless *only_if != 0, and then loop over
// every item.
constexpr int64_t kFixupGrid = 1024;

template <typename T, int C>
cudaError_t forward_simt(const Problem& pr, const Tensor5& q, const Tensor5& k, const Tensor5& v, void* out, float* lse,
                         const int* only_if, cudaStream_t stream) {
  const Geo g = make_geo(pr, kSimtTile);
  const size_t smem = simt_plan(kForward, C, g.T, g.N).total;
  cudaError_t err = allow_smem(fwd_simt_kernel<T, C>, smem);
  if (err != cudaSuccess) return err;
  const int64_t total = n_blocks(g);
  const int64_t step = only_if != nullptr ? kFixupGrid : kMaxGrid;
  for (int64_t base = 0; base < total; base += step) {
    const unsigned grid = unsigned(total - base < step ? total - base : step);
    fwd_simt_kernel<T, C><<<grid, kThreads, smem, stream>>>(
        g, static_cast<const T*>(q.data), static_cast<const T*>(k.data), static_cast<const T*>(v.data), strides5(q),
        strides5(k), strides5(v), pr.table, static_cast<T*>(out), lse, only_if, base,
        only_if != nullptr ? total : base + grid);
    err = cudaGetLastError();
    if (err != cudaSuccess || only_if != nullptr) return err;
  }
  return cudaSuccess;
}

template <typename T, int C>
cudaError_t backward_simt(const Problem& pr, const Tensor5& go, const Tensor5& q, const Tensor5& k, const Tensor5& v,
                          const Tensor5& o, const Tensor4& lse, void* dq, void* dk, void* dv, float* delta_ws,
                          float* part, cudaStream_t stream) {
  const Geo g = make_geo(pr, kSimtTile);
  const int64_t total = n_blocks(g);
  {
    const size_t smem = simt_plan(kDq, C, g.T, g.N).total;
    cudaError_t err = allow_smem(dq_simt_kernel<T, C>, smem);
    if (err != cudaSuccess) return err;
    for (int64_t base = 0; base < total; base += kMaxGrid) {
      dq_simt_kernel<T, C><<<grid_of(total, base), kThreads, smem, stream>>>(
          g, static_cast<const T*>(go.data), static_cast<const T*>(q.data), static_cast<const T*>(k.data),
          static_cast<const T*>(v.data), static_cast<const T*>(o.data), strides5(go), strides5(q), strides5(k),
          strides5(v), strides5(o), lse.data, strides4(lse), pr.table, delta_ws, static_cast<T*>(dq), part, base);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  {
    const size_t smem = simt_plan(kDkdv, C, g.T, g.N).total;
    cudaError_t err = allow_smem(dkdv_simt_kernel<T, C>, smem);
    if (err != cudaSuccess) return err;
    for (int64_t base = 0; base < total; base += kMaxGrid) {
      dkdv_simt_kernel<T, C><<<grid_of(total, base), kThreads, smem, stream>>>(
          g, static_cast<const T*>(go.data), static_cast<const T*>(q.data), static_cast<const T*>(k.data),
          static_cast<const T*>(v.data), strides5(go), strides5(q), strides5(k), strides5(v), lse.data, strides4(lse),
          pr.table, delta_ws, static_cast<T*>(dk), static_cast<T*>(dv), base);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t forward_simt_cols(const Problem& pr, const Tensor5& q, const Tensor5& k, const Tensor5& v, void* out,
                              float* lse, const int* only_if, cudaStream_t stream) {
  switch (simt_cols(pr.head_dim)) {
    case 1: return forward_simt<T, 1>(pr, q, k, v, out, lse, only_if, stream);
    case 2: return forward_simt<T, 2>(pr, q, k, v, out, lse, only_if, stream);
    case 4: return forward_simt<T, 4>(pr, q, k, v, out, lse, only_if, stream);
    default: return forward_simt<T, 8>(pr, q, k, v, out, lse, only_if, stream);
  }
}

template <typename T>
cudaError_t backward_simt_cols(const Problem& pr, const Tensor5& go, const Tensor5& q, const Tensor5& k,
                               const Tensor5& v, const Tensor5& o, const Tensor4& lse, void* dq, void* dk, void* dv,
                               float* delta_ws, float* part, cudaStream_t stream) {
  switch (simt_cols(pr.head_dim)) {
    case 1: return backward_simt<T, 1>(pr, go, q, k, v, o, lse, dq, dk, dv, delta_ws, part, stream);
    case 2: return backward_simt<T, 2>(pr, go, q, k, v, o, lse, dq, dk, dv, delta_ws, part, stream);
    case 4: return backward_simt<T, 4>(pr, go, q, k, v, o, lse, dq, dk, dv, delta_ws, part, stream);
    default: return backward_simt<T, 8>(pr, go, q, k, v, o, lse, dq, dk, dv, delta_ws, part, stream);
  }
}

// Whether 16-byte cp.async copies can stage t's rows: unit head_dim stride, head_dim a multiple
// of 8, and every row start 16-byte aligned.
bool rows_copyable(const Tensor5& t, int64_t d) {
  if (d % 8 != 0 || t.stride[4] != 1 || reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  for (int i = 0; i < 4; ++i)
    if (t.stride[i] % 8 != 0) return false;
  return true;
}

int tc_dmax(int64_t d) { return d <= 64 ? 64 : 128; }

template <typename T, int DMAX>
cudaError_t forward_tc(const Problem& pr, const Tensor5& q, const Tensor5& k, const Tensor5& v, void* out, float* lse,
                       int* flag, cudaStream_t stream) {
  const Geo g = make_geo(pr, kTcTile);
  const int nc = (g.N + kTcFwdChunk - 1) / kTcFwdChunk;
  const size_t smem = tc_plan(kForward, DMAX, g.T, g.N, nc > 1 ? 2 : 1).base.total;
  cudaError_t err = allow_smem(fwd_tc_kernel<T, DMAX>, smem);
  if (err != cudaSuccess) return err;
  const int vec = int(rows_copyable(q, pr.head_dim)) | int(rows_copyable(k, pr.head_dim)) << 1 |
                  int(rows_copyable(v, pr.head_dim)) << 2;
  const int64_t total = n_blocks(g);
  for (int64_t base = 0; base < total; base += kMaxGrid) {
    fwd_tc_kernel<T, DMAX><<<grid_of(total, base), kThreads, smem, stream>>>(
        g, static_cast<const T*>(q.data), static_cast<const T*>(k.data), static_cast<const T*>(v.data), strides5(q),
        strides5(k), strides5(v), vec, pr.table, static_cast<T*>(out), lse, flag, base);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, int DMAX>
cudaError_t backward_tc(const Problem& pr, const Tensor5& go, const Tensor5& q, const Tensor5& k, const Tensor5& v,
                        const Tensor5& o, const Tensor4& lse, void* dq, void* dk, void* dv, float* delta_ws,
                        float* part, cudaStream_t stream) {
  const Geo g = make_geo(pr, kTcTile);
  const int64_t d = pr.head_dim;
  const int vec = int(rows_copyable(go, d)) | int(rows_copyable(q, d)) << 1 | int(rows_copyable(k, d)) << 2 |
                  int(rows_copyable(v, d)) << 3;
  const int nc = (g.N + kTcBwdChunk - 1) / kTcBwdChunk;
  const int stages = nc > 1 ? 2 : 1;
  const int64_t total = n_blocks(g);
  {
    const size_t smem = tc_plan(kDq, DMAX, g.T, g.N, stages).base.total;
    cudaError_t err = allow_smem(dq_tc_kernel<T, DMAX>, smem);
    if (err != cudaSuccess) return err;
    for (int64_t base = 0; base < total; base += kMaxGrid) {
      dq_tc_kernel<T, DMAX><<<grid_of(total, base), kThreads, smem, stream>>>(
          g, static_cast<const T*>(go.data), static_cast<const T*>(q.data), static_cast<const T*>(k.data),
          static_cast<const T*>(v.data), static_cast<const T*>(o.data), strides5(go), strides5(q), strides5(k),
          strides5(v), strides5(o), vec, lse.data, strides4(lse), pr.table, delta_ws, static_cast<T*>(dq), part,
          base);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  {
    const size_t smem = tc_plan(kDkdv, DMAX, g.T, g.N, stages).base.total;
    cudaError_t err = allow_smem(dkdv_tc_kernel<T, DMAX>, smem);
    if (err != cudaSuccess) return err;
    for (int64_t base = 0; base < total; base += kMaxGrid) {
      dkdv_tc_kernel<T, DMAX><<<grid_of(total, base), kThreads, smem, stream>>>(
          g, static_cast<const T*>(go.data), static_cast<const T*>(q.data), static_cast<const T*>(k.data),
          static_cast<const T*>(v.data), strides5(go), strides5(q), strides5(k), strides5(v), vec, lse.data,
          strides4(lse), pr.table, delta_ws, static_cast<T*>(dk), static_cast<T*>(dv), base);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

// The tensor-core forward, then the SIMT fix-up that recomputes everything when a staged v value
// was NaN or inf (a flag in the workspace, cleared first; no host synchronisation).
template <typename T>
cudaError_t forward_tc_dispatch(const Problem& pr, const Tensor5& q, const Tensor5& k, const Tensor5& v, void* out,
                                float* lse, void* workspace, cudaStream_t stream) {
  int* flag = static_cast<int*>(workspace);
  cudaError_t err = cudaMemsetAsync(flag, 0, sizeof(int), stream);
  if (err != cudaSuccess) return err;
  err = tc_dmax(pr.head_dim) == 64 ? forward_tc<T, 64>(pr, q, k, v, out, lse, flag, stream)
                                   : forward_tc<T, 128>(pr, q, k, v, out, lse, flag, stream);
  if (err != cudaSuccess) return err;
  return forward_simt_cols<T>(pr, q, k, v, out, lse, flag, stream);
}

// Workspace of the backward: delta (one float per query row) then the bias partials.
struct BwdWorkspace {
  size_t delta, part, total;
};

int tile_of(Path path) { return path == Path::kTensorCore ? kTcTile : kSimtTile; }

BwdWorkspace bwd_workspace(const Problem& pr, bool bias_grad, Path path) {
  const Geo g = make_geo(pr, tile_of(path));
  BwdWorkspace w;
  w.delta = 0;
  const size_t rows = size_t(pr.batch) * size_t(pr.height) * size_t(pr.width) * size_t(pr.heads);
  w.part = (rows * sizeof(float) + 255) & ~size_t(255);
  w.total = w.part + (bias_grad ? size_t(n_blocks(g)) * size_t(g.T) * sizeof(float) : 0);
  return w;
}

cudaError_t reduce_bias(const Problem& pr, Path path, const float* part, float* dtable, cudaStream_t stream) {
  const Geo g = make_geo(pr, tile_of(path));
  const int64_t per = n_blocks(g) / g.table_heads;
  constexpr int64_t kMaxY = 65535;  // grid y limit
  for (int64_t t0 = 0; t0 < g.table_heads; t0 += kMaxY) {
    const int64_t n = g.table_heads - t0 < kMaxY ? g.table_heads - t0 : kMaxY;
    const dim3 grid(unsigned((g.T + 31) / 32), unsigned(n));
    bias_reduce_kernel<<<grid, dim3(32, 8), 0, stream>>>(part, dtable, g.T, per, t0);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The most dynamic shared memory one of the path's kernels takes for `p`.
size_t smem_needed(const Problem& p, Path path) {
  const int T = int((2 * p.window_h - 1) * (2 * p.window_w - 1)), N = int(p.window_h * p.window_w);
  if (path == Path::kTensorCore) {
    const int dmax = tc_dmax(p.head_dim);
    const int s_fwd = N > kTcFwdChunk ? 2 : 1, s_bwd = N > kTcBwdChunk ? 2 : 1;
    size_t m = tc_plan(kForward, dmax, T, N, s_fwd).base.total;
    const size_t dq = tc_plan(kDq, dmax, T, N, s_bwd).base.total, dkdv = tc_plan(kDkdv, dmax, T, N, s_bwd).base.total;
    m = m > dq ? m : dq;
    m = m > dkdv ? m : dkdv;
    // the forward's SIMT fix-up
    const size_t fix = simt_plan(kForward, simt_cols(p.head_dim), T, N).total;
    return m > fix ? m : fix;
  }
  const int C = simt_cols(p.head_dim);
  size_t m = simt_plan(kForward, C, T, N).total;
  const size_t dq = simt_plan(kDq, C, T, N).total, dkdv = simt_plan(kDkdv, C, T, N).total;
  m = m > dq ? m : dq;
  return m > dkdv ? m : dkdv;
}

bool empty(const Problem& p) { return p.batch == 0 || p.height == 0 || p.width == 0 || p.heads == 0; }

}  // namespace

const char* unsupported(const Problem& p, Path path) {
  if (p.batch < 0 || p.height < 0 || p.width < 0 || p.heads < 0 || p.head_dim < 0) return "negative sizes";
  if (p.window_h < 1 || p.window_w < 1) return "window_size must be >= 1";
  if (p.window_h * p.window_w > kMaxTokens) return "windows of up to 256 tokens (wh * ww <= 256)";
  if (p.head_dim > kMaxHeadDim) return "head_dim up to 256";
  if (p.shift_h < 0 || p.shift_h >= p.window_h || p.shift_w < 0 || p.shift_w >= p.window_w)
    return "shift must be in [0, window_size)";
  if (p.height + p.window_h >= (int64_t(1) << 30) || p.width + p.window_w >= (int64_t(1) << 30))
    return "H and W must be below 2^30";
  if (p.heads >= (int64_t(1) << 30)) return "heads must be below 2^30";
  if (p.table != nullptr && p.table_heads != 1 && p.table_heads != p.heads)
    return "the bias table must have 1 or heads heads";
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "dtype must be float32, float16 or bfloat16";
  if (path == Path::kTensorCore) {
    if (p.dtype == DType::kFloat32) return "the tensor-core kernels take float16 and bfloat16";
    if (p.head_dim > kMaxTensorCoreHeadDim) return "the tensor-core kernels take head_dim up to 128";
    if (p.head_dim < 1) return "the tensor-core kernels take head_dim >= 1";
  }
  // Shared memory: up to ~150 KiB (the SIMT backward at head_dim > 128), within sm_80's and
  // sm_90's opt-in limits (163 / 227 KiB) but not sm_86's or sm_89's (99 KiB).
  int device = 0, limit = 0;
  if (cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess) {
    if (smem_needed(p, path == Path::kAuto ? resolve_path(p, path) : path) > size_t(limit))
      return "this head_dim needs more shared memory per block than this GPU offers (head_dim up to 128 on GPUs "
             "with less than 160 KiB per block)";
  } else {
    (void)cudaGetLastError();
  }
  return nullptr;
}

Path resolve_path(const Problem& p, Path requested) {
  if (requested != Path::kAuto) return requested;
  if (p.dtype == DType::kFloat32 || p.head_dim < 1 || p.head_dim > kMaxTensorCoreHeadDim) return Path::kSimt;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return Path::kSimt;
  }
  return major >= 8 ? Path::kTensorCore : Path::kSimt;  // mma.sync m16n8k16: sm_80 and later
}

size_t forward_workspace_bytes(const Problem& p, Path path) {
  (void)p;
  (void)path;
  return 16;  // the tensor-core forward's non-finite flag
}

cudaError_t forward(const Problem& p, const Tensor5& q, const Tensor5& k, const Tensor5& v, void* out, float* lse,
                    void* workspace, Path path, cudaStream_t stream) {
  path = resolve_path(p, path);
  if (unsupported(p, path) != nullptr) return cudaErrorInvalidValue;
  if (empty(p)) return cudaSuccess;
  if (path == Path::kTensorCore) {
    if (p.dtype == DType::kFloat16) return forward_tc_dispatch<__half>(p, q, k, v, out, lse, workspace, stream);
    return forward_tc_dispatch<__nv_bfloat16>(p, q, k, v, out, lse, workspace, stream);
  }
  switch (p.dtype) {
    case DType::kFloat32: return forward_simt_cols<float>(p, q, k, v, out, lse, nullptr, stream);
    case DType::kFloat16: return forward_simt_cols<__half>(p, q, k, v, out, lse, nullptr, stream);
    case DType::kBFloat16: return forward_simt_cols<__nv_bfloat16>(p, q, k, v, out, lse, nullptr, stream);
  }
  return cudaErrorInvalidValue;
}

size_t backward_workspace_bytes(const Problem& p, bool bias_grad, Path path) {
  return bwd_workspace(p, bias_grad, resolve_path(p, path)).total;
}

cudaError_t backward(const Problem& p, const Tensor5& grad_out, const Tensor5& q, const Tensor5& k, const Tensor5& v,
                     const Tensor5& out, const Tensor4& lse, void* dq, void* dk, void* dv, float* dtable,
                     void* workspace, Path path, cudaStream_t stream) {
  path = resolve_path(p, path);
  if (unsupported(p, path) != nullptr) return cudaErrorInvalidValue;
  if (dtable != nullptr && p.table == nullptr) return cudaErrorInvalidValue;
  if (empty(p)) return cudaSuccess;
  const BwdWorkspace w = bwd_workspace(p, dtable != nullptr, path);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  float* delta_ws = reinterpret_cast<float*>(ws + w.delta);
  float* part = dtable != nullptr ? reinterpret_cast<float*>(ws + w.part) : nullptr;
  cudaError_t err = cudaErrorInvalidValue;
  if (path == Path::kTensorCore) {
    const bool wide = tc_dmax(p.head_dim) == 128;
    if (p.dtype == DType::kFloat16)
      err = wide ? backward_tc<__half, 128>(p, grad_out, q, k, v, out, lse, dq, dk, dv, delta_ws, part, stream)
                 : backward_tc<__half, 64>(p, grad_out, q, k, v, out, lse, dq, dk, dv, delta_ws, part, stream);
    else
      err = wide ? backward_tc<__nv_bfloat16, 128>(p, grad_out, q, k, v, out, lse, dq, dk, dv, delta_ws, part, stream)
                 : backward_tc<__nv_bfloat16, 64>(p, grad_out, q, k, v, out, lse, dq, dk, dv, delta_ws, part, stream);
  } else {
    switch (p.dtype) {
      case DType::kFloat32:
        err = backward_simt_cols<float>(p, grad_out, q, k, v, out, lse, dq, dk, dv, delta_ws, part, stream);
        break;
      case DType::kFloat16:
        err = backward_simt_cols<__half>(p, grad_out, q, k, v, out, lse, dq, dk, dv, delta_ws, part, stream);
        break;
      case DType::kBFloat16:
        err = backward_simt_cols<__nv_bfloat16>(p, grad_out, q, k, v, out, lse, dq, dk, dv, delta_ws, part, stream);
        break;
    }
  }
  if (err != cudaSuccess || dtable == nullptr) return err;
  return reduce_bias(p, path, part, dtable, stream);
}

}  // namespace window_cuda
}  // namespace alterops
