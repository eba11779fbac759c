// Neighbourhood attention CPU kernels: the forward (any dtype, and the float32 fast path).
// Part of neighborhood_attention_cpu.cpp, the one translation unit that includes it (compiled once
// per instruction-set level; everything here has internal linkage).
#pragma once

#include "neighborhood_cpu_tiles.h"

#include <unistd.h>

namespace alterops {
namespace neighborhood {
namespace {

// The L2 cache of the CPU, in bytes (0 where the system does not say).
static int64_t l2_cache_bytes() {
#ifdef _SC_LEVEL2_CACHE_SIZE
  static const int64_t bytes = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
  return bytes;
#else
  return 0;
#endif
}

// The forward's split: BH (batch, head) pairs in row chunks only when there are fewer of them
// than twice the threads. Every query row is computed the same way whichever task holds it, so
// the forward's results do not depend on the split.
static int64_t row_chunks(int64_t BH, int64_t H, const Parallel& par) {
  const int64_t nthreads = par.num_threads;
  int64_t n = BH >= 2 * nthreads ? 1 : std::min<int64_t>(H, (2 * nthreads + BH - 1) / BH);
  const int64_t per = (H + n - 1) / n;
  return (H + per - 1) / per;
}

// Softmax of one block of query slots over its K2 logits (S[n * stride], n < K2): P = exp(S - m)
// in place, m their maximum, l the sum of P. A function of its own, with the float exp inlined
// into its loop: in forward_f32's body GCC had kept vexp out of line, a call per vector.
template <typename T>
__attribute__((noinline)) static void softmax_block(T* S, int64_t stride, int64_t K2, Vec<T>& m_out,
                                                    Vec<T>& l_out) {
  Vec<T> m = loadu(S);
  for (int64_t n = 1; n < K2; ++n) m = vmax<T>(m, loadu(S + n * stride));
  Vec<T> l = splat<T>(T(0));
  for (int64_t n = 0; n < K2; ++n) {
    Vec<T> p;
    if constexpr (std::is_same<T, float>::value)
      p = vexp_inline(loadu(S + n * stride) - m);
    else
      p = vexp(loadu(S + n * stride) - m);
    storeu(S + n * stride, p);
    l += p;
  }
  m_out = m;
  l_out = l;
}

template <typename scalar_t, typename T>
static void forward_impl(const View6& q, const View6& k, const View6& v, scalar_t* O, T* L, const Plan<T>& pl,
                         T scale, const Parallel& par) {
  constexpr int N = VecOf<T>::N;
  const int64_t BH = pl.B * pl.NH;
  const int64_t nchunks = row_chunks(BH, pl.R, par);
  const int64_t rows_per = (pl.R + nchunks - 1) / nchunks;
  const int64_t K2 = pl.nkr * pl.kw;
  par.for_tasks(BH * nchunks, [&](auto next) {
    KeyPack<T> Kp, Vp;
    Kp.alloc(pl);
    Vp.alloc(pl);
    const int64_t nblk = pl.Ws / N;
    Buf<T> Qp(pl.D * pl.Ws), S(K2 * pl.Ws), Ob(pl.D * pl.Ws), Linv(pl.Ws);
    std::vector<KeyView<T>> views(nblk * pl.nkr);
    std::vector<int64_t> row_i(pl.nkr);
    for (int64_t t; next(t);) {
      const RowTask tk = row_task(pl, t, nchunks, rows_per);
      if (tk.y0 >= tk.y1) continue;
      const int64_t bh = tk.bh, b = tk.b, h = tk.h, ht = tk.ht, y0 = tk.y0, y1 = tk.y1, klo = tk.klo, khi = tk.khi;
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
          Vec<T> m, l;
          softmax_block<T>(S.data() + s0, pl.Ws, K2, m, l);
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


// Calls loop(kern) with the P.V tile kernel of the window's shape: kern(tv, P, V, acc) adds to
// acc[T][DC] (T = decltype(tv)::value <= tmax queries by DC channel vectors) their weights at P
// (neighbour j of query t at P[j * pstride + t]; PS > 0: pstride is PS, a constant of the
// fixed-window kernels) times the value rows from V (xs apart). GCC
// keeps the accumulators in registers only when a single kernel updates them, so the choice is
// made once, outside the caller's tile loop: with the five kernels behind a branch inside it,
// every FMA of the 2-D tiles loaded and stored its accumulator through the stack.
template <int DC, int PS = 0, class Loop>
static inline void with_pv_kernel(const Plan<float>& pl, int64_t pstride, int64_t xs, int tmax, Loop&& loop) {
  if (pl.dw == 1 && pl.kw == 7)
    loop([&](auto tv, const float* P, const float* V, auto& acc) {
      pv_tile_diag<decltype(tv)::value, DC, 7, PS>(P, pstride, V, xs, acc);
    });
  else if (pl.dw == 1 && pl.kw == 5)
    loop([&](auto tv, const float* P, const float* V, auto& acc) {
      pv_tile_diag<decltype(tv)::value, DC, 5, PS>(P, pstride, V, xs, acc);
    });
  else if (pl.dw == 1 && pl.kw == 3)
    loop([&](auto tv, const float* P, const float* V, auto& acc) {
      pv_tile_diag<decltype(tv)::value, DC, 3, PS>(P, pstride, V, xs, acc);
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

// q, k, v and the output O are float32, bfloat16 or float16 tensors (of O's element type: the same
// float32 arithmetic; 16-bit tokens are widened where they are packed, copied or staged, the
// output narrowed where it is stored).
template <int DV>
static void forward_f32(const View6& q, const View6& k, const View6& v, OutPtr O, float* L,
                        const Plan<float>& pl, float scale, const Parallel& par) {
  constexpr int N = VecOf<float>::N;
  const bool kBF = O.e != Elem::F32;  // 16-bit storage
  const int64_t es = elem_bytes(O.e);
  // The interior band's P.V tiles take DB channel vectors at a time (all DV up to 4, then halves:
  // heads of 96 and 128 channels in two passes) and TQ queries: TQ * DB accumulators in registers
  // (the interior band is AVX-512 only). Heads of 96 and 128 took the general forward before (Zen 4, 2 threads,
  // same-process A/B, AVX-512: 1-D L = 4096, k = 65, 4 heads of 128: 51.5 -> 17.8 ms; 2-D 56 x 56,
  // k = 7, one head of 128: 7.5 -> 2.8 ms; AVX2 69.5 -> 24.0 and 6.8 -> 3.5 ms).
  [[maybe_unused]] constexpr int DB = DV > 4 ? DV / 2 : DV;
  [[maybe_unused]] constexpr int TQ = DB >= 4 ? 6 : 8;
  // The border slots' band (AVX-512, and AVX2 for rows without interior blocks): up to kGroupQ
  // queries of one window together, their P.V tiles DBG channel vectors at a time (AVX2's 16
  // registers: 2 queries, 4 vectors).
  [[maybe_unused]] constexpr int kGroupQ = NA_AVX2 ? 2 : kBandQ;
  [[maybe_unused]] constexpr int DBG = NA_AVX2 ? (DV % 4 == 0 ? 4 : 2) : DB;
  // The interior P.V tiles: TQI queries by DC channel vectors (several passes for wider heads), the
  // weights at constant offsets (SS below) and the output written with streaming stores where
  // stream_output says so. AVX-512 had taken all DV vectors for TQ queries, with S's stride in a
  // register and no streaming stores. On Zen 4 (2-D forward, B = 4, 56 x 56, 4 heads, d = 32,
  // k = 7; 2 threads, medians of 3 alternating runs), each left out of the final build: these
  // tiles with the constant stride 3.81 -> 3.27 ms, the streaming stores 3.52 -> 3.27, 12 queries
  // per tile rather than 8 3.37 -> 3.27. (The generic build's 64-byte vectors are four SSE
  // registers each: 12 queries spilled there, 8 are as fast as its former tiles.)
  // (DV is even with AVX2; with 64-byte vectors an odd DV, 1 or 3, is taken in one pass.)
  constexpr int DC = DV % 2 == 0 ? 2 : DV;
#if defined(__AVX512F__)
  constexpr int TQI = DC <= 2 ? 12 : 8;
#else
  constexpr int TQI = NA_AVX2 ? 6 : 8;
#endif
  constexpr int RG = 3;                 // query rows whose logits are formed together
  // Shared-window P.V tiles (the clamped windows at the ends of a row) take DSH channel vectors
  // at a time and up to kShared queries: kShared * DSH accumulators, DSH value vectors and a
  // weight within the registers (32 zmm; 16 ymm, where all DV vectors at once left one
  // accumulator of 3 queries x 4 vectors spilled, a store and reload on every FMA of it).
  // (AVX-512: all DV vectors up to 4, then halves, as the band's DB.)
  constexpr int DSH = NA_AVX2 ? std::min(DV, 2) : DV > 4 ? DV / 2 : DV;
  constexpr int kShared = NA_AVX2 ? 6 : std::max(1, std::min(6, 24 / DSH));
  const int64_t SW = std::min<int64_t>(pl.Ws, kSegmentSlots);
  // S's row stride. The P.V tiles take it as a constant (32, 64 or 128), so that their weights
  // lie at fixed offsets from one pointer: the AVX2 tiles had copied each tile's weights into a
  // buffer of that layout first, and those copies took a fifth of the 2-D forward's tile time;
  // the AVX-512 tiles, with the stride in a register, spent their time on address arithmetic
  // and spills of the general-purpose registers.
  const int64_t SS = SW <= 32 ? 32 : SW <= 64 ? 64 : 128;
  const int64_t D = pl.D;
  const bool seg_pf = pl.Ws > SW;
  // (the head groups below, where taken, set their own row chunks)
  int64_t nchunks = row_chunks(pl.B * pl.NH, pl.R, par);
  int64_t rows_per = (pl.R + nchunks - 1) / nchunks;
  const int64_t K2 = pl.nkr * pl.kw;
  const InPtr qb{static_cast<const char*>(q.data), O.e};
  const InPtr kb{static_cast<const char*>(k.data), O.e};
  const InPtr vb{static_cast<const char*>(v.data), O.e};
  const int64_t *qs = q.stride, *ks = k.stride, *vs = v.stride;
  // Bias columns are all zero without a table, except the -inf column mask of "mask".
  const bool any_bias = pl.any_bias;
  // Rows with one key row (kernel 1 on the outer axes: the 1-D ops), dilation 1 and windows wider
  // than a vector take their all-interior blocks through band_logits (AVX-512 only: 4 * band_nv
  // accumulators need its 32 registers): band_nv key vectors per tile (0: not taken). Their
  // logits rows are kBandCS apart in Cb, window at +32; a bias table's row (the same for every
  // interior slot) is added to each before its softmax.
  int band_nv = 0;
  constexpr int64_t kBandCS = 32 + 16 * kBandMaxNV + 16;
#if defined(__AVX512F__)
  if (pl.nkr == 1 && pl.dw == 1 && pl.kw > N) {
    const int64_t nv = (pl.kw + kBandQ - 1 + N - 1) / N;
    if (nv <= kBandMaxNV && nv * N <= pl.Wk) band_nv = (int)nv;
  }
#elif NA_AVX2
  // AVX2 has no interior band, but rows without interior blocks (strided windows, which make
  // nearly every slot a border slot) take the border slots' band below (band_all), in passes of
  // at most kBandMaxNV vectors. Their gathered border blocks had copied each block's kw key
  // columns for every query of the block: the 1-D forward (B = 4, L = 4096, 8 heads, d = 64,
  // k = 65) took 1506 ms with stride 2 against 25.5 ms with stride 1.
  if (pl.nkr == 1 && pl.dw == 1 && pl.kw > N && pl.n_full == 0) {
    const int64_t nv = (pl.kw + N - 1) / N;
    if (nv <= 2 * kBandMaxNV && nv * N <= pl.Wk) band_nv = (int)nv;
  }
#endif
  // The slots of the border blocks (from block n_full: the clamped windows at both ends of the
  // row, the interior slots of the last partial block, nearly every slot of a strided window) go
  // through the band as well, one query at a time or adjacent queries of one window together,
  // when every one of their windows is kw consecutive keys of the row (the "clamp" border
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
      band_all &= pl.window_is_run(sl);
      bstart.push_back(std::min<int64_t>(pl.kidx[sl], pl.Wk - band_nv * N));
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
  // Rows no longer than a segment have their key and value rows packed a row group at a time
  // (pack_group below), and with a head per task (vpack, below the choice of NHG) the value
  // rows are then copied into a ring beside the keys' when one head's value tokens are not
  // contiguous (several heads per token): P.V reads its tiles from the copies (2-D forward, B = 4,
  // 56 x 56, 4 heads, k = 7: 5.4 -> 4.6 ms; 3-D, 8 x 32 x 32, k = (3, 7, 7): 10.4 -> 8.9 ms on
  // Zen 3, in alternating runs against P.V reading the tokens in place).
  // 16-bit value rows are always copied (widened): whole rows by pack_group, and for longer rows
  // the columns that the task packs keys for (pack_cols) and its border blocks' columns.
  const bool group_pack = !seg_pf;
  // The interior P.V tiles write the output with streaming stores (AVX2, AVX-512) when it is
  // larger than kStreamOutBytes: they skip the read of each output line before its write and leave
  // the cache to the inputs (2-D forward, B = 4, 56 x 56, 4 heads, 6.4 MB of output: 6% faster on
  // Zen 3 at AVX2, 7% on Zen 4 at AVX-512). So do the interior band's P.V tiles (the 1-D forward,
  // B = 4, L = 4096, 8 heads, d = 64, k = 65, 34 MB of output: 20.5 -> 17.3 ms on a Xeon, AVX-512).
  // So do 16-bit outputs where every pass of a tile writes whole 64-byte lines of its queries' rows
  // (in consecutive half-vector stores, which fill each line in the write-combining buffer): rows
  // of whole lines (D a multiple of 32, the output 64-byte aligned), passes of DB (the band) and
  // DC (the 2-D/3-D tiles) vectors of whole lines (AVX-512, except heads of 96). Same-process A/B
  // on a Xeon: 2-D bfloat16 B = 8, 56 x 56, 4 heads, d = 32, k = 7 6.86 -> 6.47 ms; the 1-D
  // bfloat16 / float16 forward (L = 4096, 8 heads, d = 64, k = 65) within noise, 15.9 / 16.6 ms.
  constexpr bool kLinePasses16 = (DB * N * 2) % 64 == 0 && (DC * N * 2) % 64 == 0;
  const bool stream_out = (!kBF || (kLinePasses16 && D % 32 == 0)) &&
                          stream_output(O.p, pl.B * pl.R * pl.W * pl.NH * D * es);
  // Border blocks whose lanes' key columns (every neighbour's) lie within 32 or 64 columns from
  // a 64-byte boundary of the packed row, gperm[g] >= 0 (that boundary's column), take their
  // logits through dot_row_perm, from the packed rows that whole-row packing (group_pack) leaves
  // in place, and have no gathered copies: gidx[g][j][lane] (column - boundary), gmask[g][j] (the
  // lanes that hold a key in the first 32 columns), gmask2[g][j] (in the next 32; gtwo[g]: any
  // span past 32). (3-D forward, 8 x 32 x 32, k = (3, 7, 7): half the blocks of the rows are
  // border blocks; 2-D, 56 x 56, k = 7: a quarter.)
  std::vector<int64_t> gperm(pl.NG, -1);
  std::vector<uint8_t> gtwo(pl.NG, 0);
  std::vector<int32_t> gidx;
  std::vector<uint16_t> gmask, gmask2;
#if defined(__AVX512F__)
  if (group_pack && !band_all && pl.Wk >= 2 * N) {
    gidx.assign(pl.NG * pl.kw * N, 0);
    gmask.assign(pl.NG * pl.kw, 0);
    gmask2.assign(pl.NG * pl.kw, 0);
    for (int64_t g = 0; g < pl.NG; ++g) {
      const int64_t s0 = (pl.n_full + g) * N;
      int64_t lo = pl.W, hi = -1;
      for (int64_t j = 0; j < pl.kw; ++j)
        for (int l = 0; l < N; ++l) {
          const int64_t col = pl.kidx[j * pl.Ws + s0 + l];
          if (col < pl.W) lo = std::min(lo, col), hi = std::max(hi, col);
        }
      if (hi < 0) continue;
      // (the pair, or two pairs, of vectors from the boundary before lo, moved left where they
      // would run past the packed row)
      const bool two = hi >= std::min(lo / N * N, pl.Wk - 2 * N) + 2 * N;
      const int64_t span = (two ? 4 : 2) * N, a = std::min(lo / N * N, pl.Wk - span);
      if (a < 0 || lo < a || hi >= a + span) continue;
      gperm[g] = a;
      gtwo[g] = two;
      for (int64_t j = 0; j < pl.kw; ++j)
        for (int l = 0; l < N; ++l) {
          const int64_t col = pl.kidx[j * pl.Ws + s0 + l];
          if (col >= pl.W) continue;
          gidx[(g * pl.kw + j) * N + l] = (int32_t)((col - a) % (2 * N));
          (col - a < 2 * N ? gmask : gmask2)[g * pl.kw + j] |= (uint16_t)(1u << l);
        }
    }
  }
#endif
  // (the gathered copies only where some border block still reads them: Kp's storage for them is
  // allocated and zeroed per task)
  const bool gathered = !band_all && std::any_of(gperm.begin(), gperm.end(), [](int64_t a) { return a < 0; });
  // Tasks are (batch, head group, row chunk), NHG heads per task (1 or all NH), each row group
  // done for every head of the task in turn. A task per head reads 128 of each token's 512 bytes
  // (4 heads of 32 channels), and the lines of the other heads that the prefetchers fetch with
  // them are gone by the time those heads' tasks run. A task of all the heads of a batch
  // element's rows uses every line fetched. Taken where their packed key rows (with the AVX2
  // build's gathered border copies) fit in half of L2 and the batch elements, in row chunks of
  // their own where there are fewer than twice the threads, give two tasks per thread; P.V then
  // reads the value rows in place. 2-D forward, 56 x 56, 4 heads, d = 32, k = 7, on a Xeon with
  // 2 MB of L2, same-process A/B: B = 4, 3.05 -> 2.68 ms at AVX-512 (300 KB of key rows; 2.87 with
  // the value rows still copied, and 2 heads per task no faster than one), 4.06 -> 3.86 at AVX2
  // (810 KB); in row chunks (each packing its halo rows too), B = 2, 1.84 -> 1.65 ms at AVX-512,
  // 2.19 -> 2.08 at AVX2, B = 1, 1.02 -> 0.97 and 1.19 -> 1.13 (the 3-D forward, B = 1, the
  // same; bench/results/cpu-intel-xeon-avx512-2core/neighborhood/
  // forward-head-groups-row-chunks-ab.json). Before the value rows were read in place, 4 heads
  // per task (550 KB with their copies) had been 7-10% slower than a head per task on Zen 4 (1 MB
  // of L2) at AVX-512 and 8% on Zen 3 (512 KB) at AVX2; Zen 3 keeps a head per task at that size,
  // Zen 4 now takes the 4 heads (not measured there).
  int64_t NHG = 1;
  const int64_t hg_chunks = row_chunks(pl.B, pl.R, par);
  if (!seg_pf && pl.NH > 1 && pl.B * hg_chunks >= 2 * par.num_threads) {
    const int64_t hg_rows = (pl.R + hg_chunks - 1) / hg_chunks;
    const int64_t hg_ring = key_ring(pl, hg_chunks, hg_rows, RG);
    using KP = KeyPack<float>;  // (its rows, the 16-bit value copies beside them)
    const int64_t kv_bytes = KP::ring_rows(pl, hg_ring) *
                             (KP::row_elems(pl) + (gathered ? KP::gathered_elems(pl) : 0) + (kBF ? pl.W * D : 0)) *
                             (int64_t)sizeof(float);
    if (pl.NKV * kv_bytes <= l2_cache_bytes() / 2) {
      NHG = pl.NH;
      nchunks = hg_chunks;
      rows_per = hg_rows;
    }
  }
  // the key rows each task keeps, for the row chunks in force
  const int64_t ring = key_ring(pl, nchunks, rows_per, RG);
  const int64_t ngr = pl.NH / NHG;                    // head groups
  const int64_t NKG = NHG == 1 ? 1 : pl.NKV;          // their key/value heads
  const bool vpack = (group_pack && vs[3] != D && NHG == 1) || kBF;
  const int64_t vxs = vpack ? D : vs[3];
  par.for_tasks(pl.B * ngr * nchunks * ncol, [&](auto next) {
    // per key/value head of the task (one, or every one with NHG = NH): its packed key rows,
    // (vpack) its value rows copied beside them (W tokens of D channels in Kp's ring slots), the
    // last packed row and the packed columns
    struct HeadKeys {
      KeyPack<float> Kp;
      std::vector<float> Vp;
      int64_t packed_hi = 0, packed_cols = 0;
    };
    std::vector<HeadKeys> hks(NKG);
    for (HeadKeys& e : hks) {
      e.Kp.alloc(pl, ring, gathered);
      e.Vp.assign(vpack ? e.Kp.rows * pl.W * D : 0, 0.0f);
    }
    std::vector<float> Cb(band_nv ? (SW + 1) * kBandCS : 0), Mb(band_nv ? pl.Ws : 0);
    std::vector<float> Qp(RG * D * SW), S(RG * K2 * SS), Linv(pl.Ws);
    // (16-bit) a slot block of widened rows for the transposes, and the band's queries of one
    // row of a segment widened, slot sl at (sl - sg) * D
    std::vector<float> Tw(kBF ? N * D : 0), Qs(kBF && band_nv ? SW * D : 0);
    // the band's bias rows (window column j at j, zero past kw): interior slots', a border slot's
    std::vector<float> bint(band_nv && any_bias ? (pl.kw + N - 1) / N * N : 0),
        bbord(band_nv && any_bias ? (pl.kw + N - 1) / N * N : 0);
    // C[0:kw] += B[0:kw] (B padded with zeros to whole vectors)
    auto add_bias_row = [&](float* C, const float* B) {
      for (int64_t e = 0; e < pl.kw; e += N) storeu(C + e, loadu(C + e) + loadu(B + e));
    };
    InPtr rows[16];
    // Rows longer than a segment have the next segment's q, k and v columns prefetched into L2
    // a few tokens at a time while this segment is worked on (a burst of a whole segment's
    // prefetches would stall its loads). Shorter rows are left to the hardware prefetcher:
    // prefetching the rows of the row group two ahead made the 2-D forward 6% and the 3-D
    // forward 10% slower.
    PrefetchQueue pfq;
    int64_t pf_quota = 0;
    const int64_t tok_bytes = D * es;
    auto pf_step = [&](int64_t ntok) {
      if (seg_pf) pfq.step(ntok, tok_bytes);
    };
    std::vector<const float*> vrows(pl.nkr);  // the value rows of the current query row
    std::vector<int32_t> kwin;                 // the group's window rows by key row (below)
    std::vector<int64_t> shift(pl.kw + SW);        // dot_blocks_shared's key shifts
    for (int64_t tc; next(tc);) {
      // t: the (batch, head, row chunk) task; col: the column chunk, slots [s_lo, s_hi)
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
      // band_all: the end of the bands of the border slots among slots [sa, sb) (a stride's
      // windows make nearly every slot a border slot: each chunk packs the columns of its own)
      const int64_t nfN = pl.n_full * N;
      auto band_hi = [&](int64_t sa, int64_t sb) {
        int64_t hi = 0;
        for (int64_t sl = std::max(sa, nfN); sl < sb; ++sl)
          hi = std::max(hi, bstart[sl - nfN] + band_nv * N);
        return std::min(hi, pl.Wk);
      };
      for (HeadKeys& e : hks) {
        e.packed_hi = klo - 1;
        e.packed_cols = seg_pf ? packed_lo : pl.Wk;
      }
      for (int64_t yg = y0; yg < y1; yg += RG) {
        for (int64_t hh = 0; hh < NHG; ++hh) {
          const int64_t h = hg * NHG + hh, bh = b * pl.NH + h, hk = h / pl.G;
          HeadKeys& hkeys = hks[NHG == 1 ? 0 : hk];
          KeyPack<float>& Kp = hkeys.Kp;
          std::vector<float>& Vp = hkeys.Vp;
          int64_t& packed_hi = hkeys.packed_hi;
          int64_t& packed_cols = hkeys.packed_cols;
          const int64_t ht = pl.nht == 1 ? 0 : h;
          auto krow = [&](int64_t y) { return kb + pl.row_off(ks, b, y, hk); };
          auto vcopy = [&](int64_t y) { return Vp.data() + Kp.slot(y) * pl.W * D; };
          auto vsrc = [&](int64_t y) { return vb + pl.row_off(vs, b, y, hk); };
          auto vrow = [&](int64_t y) -> const float* { return vpack ? vcopy(y) : vsrc(y).f32(); };
          // (16-bit rows longer than a segment) value tokens x of row y widened into its copy
          auto widen_v = [&](int64_t y, int64_t x0, int64_t x1) {
            vsrc(y).widen_tokens(vcopy(y), vs[3], x0, x1, D);
          };
          // columns [x0, x0 + N) of key row y (kr) transposed into Kp (columns past W: zeros)
          const InPtr none{nullptr, O.e};
          auto pack_key_block = [&](InPtr kr, int64_t y, int64_t x0) {
            for (int l = 0; l < N; ++l) rows[l] = x0 + l < pl.W ? kr + (x0 + l) * ks[3] : none;
            transpose_blk(rows, D, 1.0f, Kp.trow(pl, y) + x0, pl.Wk, Tw.data());
          };
          // the border blocks' copies of key row y (kr) in Kp (only for the chunk that holds them)
          auto pack_border_blocks = [&](InPtr kr, int64_t y) {
            for (int64_t g = 0; g < pl.NG && s_hi > pl.n_full * N && !band_all; ++g) {
              if (gperm[g] >= 0) continue;
              const int64_t s0 = (pl.n_full + g) * N;
              float* gb = Kp.grow(pl, y, g);
              for (int64_t j = 0; j < pl.kw; ++j) {
                const int32_t* ki = pl.kidx.data() + j * pl.Ws + s0;
                for (int l = 0; l < N; ++l) rows[l] = ki[l] < pl.W ? kr + ki[l] * ks[3] : none;
                transpose_blk(rows, D, 1.0f, gb + j * D * N, N, Tw.data());
                if (kBF && seg_pf)
                  for (int l = 0; l < N; ++l)
                    if (ki[l] < pl.W) widen_v(y, ki[l], ki[l] + 1);
              }
            }
          };
          // group_pack: the key rows up to upto (transposed, and the border blocks' copies) and the
          // value rows (copied when vpack) of the task's key/value head, a slot block of tokens at a
          // time, with the lines of the tokens kPackAhead further on prefetched (running on into the
          // next row), and the query lines of rows [yg, yg + ng) prefetched for the query transposes
          // that follow.
          auto pack_group = [&](int64_t upto, int64_t yg, int64_t ng) {
            const int64_t from = std::max(packed_hi + 1, upto - Kp.rows + 1);
            for (int64_t y = from; y <= upto; ++y) {
              const int64_t yq = yg + (y - from);  // the query row whose lines are prefetched with it
              const InPtr kr = krow(y);
              const InPtr vr = vsrc(y);
              float* vdst = vpack ? vcopy(y) : nullptr;
              for (int64_t x0 = 0; x0 < pl.Wk; x0 += N) {
                prefetch_tokens((kr + (x0 + kPackAhead) * ks[3]).p, ks[3] * es, N, D * es);
                prefetch_tokens((vr + (x0 + kPackAhead) * vs[3]).p, vs[3] * es, N, D * es);
                if (yq < yg + ng && x0 < pl.W)
                  prefetch_tokens((qb + (pl.row_off(qs, b, yq, h) + x0 * qs[3])).p, qs[3] * es,
                                  std::min<int64_t>(N, pl.W - x0), D * es);
                pack_key_block(kr, y, x0);
                if (vpack) vr.widen_tokens(vdst, vs[3], x0, std::min(pl.W, x0 + N), D);
              }
              pack_border_blocks(kr, y);
            }
            packed_hi = std::max(packed_hi, upto);
          };
          // transposed key rows (sink and padding columns zero) and the border blocks' copies,
          // packed just before the first row group that reads them (so they are still in cache)
          // Rows longer than a segment have their columns packed as the segments reach them (the
          // next segment's are prefetched; a whole row packed up front came from memory
          // unprefetched): columns [packed_lo, packed_cols) of every packed row, packed_lo the first
          // one that the task's column chunk reads (the band of its first slot, 0 for the first chunk).
          auto pack_cols = [&](int64_t y, int64_t c0, int64_t c1) {
            for (int64_t x0 = c0; x0 < c1; x0 += N) pack_key_block(krow(y), y, x0);
            if (kBF && seg_pf) widen_v(y, c0, std::min(c1, pl.W));
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
              const InPtr kr = krow(y);
              pack_cols(y, packed_lo, packed_cols);
              // border slots of the chunk through the band: the columns of their bands that lie below
              // the chunk's packed columns
              if (band_all && s_hi > nfN) {
                int64_t c0 = packed_lo, c1 = 0;
                for (int64_t sl = std::max(s_lo, nfN); sl < s_hi; ++sl) {
                  const int64_t st = bstart[sl - nfN];
                  if (st >= 0 && st < packed_lo) {
                    c0 = std::min(c0, st / N * N);
                    c1 = std::max(c1, std::min(packed_lo, st + band_nv * N));
                  }
                }
                if (c0 < c1) pack_cols(y, c0, c1);
              }
              pack_border_blocks(kr, y);
            }
            packed_hi = std::max(packed_hi, upto);
          };
          const int64_t ng = std::min<int64_t>(RG, y1 - yg);
          int64_t kmin, kmax;
          key_rows(pl, yg, yg + ng, kmin, kmax);
          if (group_pack && kmax > packed_hi) pack_group(kmax, yg, ng);
          if (kmax > packed_hi) pack_key_rows(kmax);
          // the group's slots in segments [sg, se) of at most SW (blocks [cb, ce)): a segment's
          // queries and logits stay in cache from the logits to the output
          for (int64_t sg = s_lo; sg < s_hi; sg += SW) {
            const int64_t se = std::min(s_hi, sg + SW), cb = sg / N, ce = se / N;
            // the key columns that this segment's interior blocks read (blocks [cb, ce) read
            // columns xlo + slot + off[j], slot < se), all of them once it reaches the border blocks
            // the segment's all-interior blocks through band_logits (rows with a key row): slots [sg, gend)
            // (and with band_all its border slots too: [iend, gend) one query at a time)
            int64_t gend = sg;
            [[maybe_unused]] int64_t iend = sg;  // (read by the AVX-512 band only)
            if (band_nv > 0) {
              bool rows_ok = true;
              for (int64_t r = 0; r < ng; ++r) rows_ok &= pl.rowvalid[yg + r] != 0;
              if (rows_ok) iend = gend = std::max(sg, std::min(se, pl.n_full * N));
              if (band_all) gend = se;
            }
            const int64_t cg = gend / N;
            if (seg_pf)
              extend_cols(
                  se > nfN && !band_all
                      ? pl.Wk
                      : std::max(std::min(pl.Wk, pl.xlo + std::min(se, pl.n_int) + std::max(pl.off[pl.kw - 1],
                                                                                            pl.off[0] + band_nv * N)),
                                 band_hi(sg, se)));
            if (seg_pf && se < s_hi) {
              // the next segment's query columns and the key/value columns it adds (interior
              // slots: column xlo + slot), spread over this segment's key rows and query rows
              auto col = [&](int64_t x) { return std::min<int64_t>(std::max<int64_t>(x, 0), pl.W); };
              const int64_t ne = std::min(s_hi, se + SW);
              const int64_t qa = col(pl.xlo + se), qe = col(pl.xlo + ne);
              const int64_t ka = col(pl.xlo + se + pl.off[pl.kw - 1]), ke = col(pl.xlo + ne + pl.off[pl.kw - 1]);
              for (int64_t r = 0; r < ng; ++r)
                pfq.add((qb + (pl.row_off(qs, b, yg + r, h) + qa * qs[3])).p, qs[3] * es, qe - qa);
              for (int64_t ky = kmin; ky <= kmax; ++ky) {
                pfq.add((krow(ky) + ka * ks[3]).p, ks[3] * es, ke - ka);
                pfq.add((vsrc(ky) + ka * vs[3]).p, vs[3] * es, ke - ka);
              }
              const int64_t tokens = pfq.pending();
              // steps: one per key row and slot block, per query row and P.V tile
              pf_quota = tokens / ((kmax - kmin + 1) * (ce - cb) + ng * (se - sg) / 6) + 1;
            }
  #if NA_X86V3
            for (int64_t r = 0; r < ng && gend > sg; ++r) {
              const int64_t y = yg + r;
              const int64_t ky = pl.rowpos[y];
              const InPtr qr = qb + pl.row_off(qs, b, y, h);
              // the band's query of slot sl (column slotx[sl]) and the stride between adjacent ones:
              // in place, or (16-bit) widened into Qs first
              if (kBF)
                for (int64_t sl = sg; sl < gend; ++sl)
                  if (pl.slotx[sl] < pl.W)
                    (qr + pl.slotx[sl] * qs[3]).widen_tokens(Qs.data() + (sl - sg) * D, 0, 0, 1, D);
              auto qband = [&](int64_t sl) -> const float* {
                return kBF ? Qs.data() + (sl - sg) * D : (qr + pl.slotx[sl] * qs[3]).f32();
              };
              const int64_t qbs = kBF ? D : qs[3];
              const float* kt = Kp.trow(pl, ky);
              float* Lrow = L + (bh * pl.R + y) * pl.W;
              const OutPtr Orow = O + ((b * pl.R + y) * pl.W * pl.NH + h) * D;
              const int64_t ostr = pl.NH * D;
              auto crow = [&](int64_t sl) { return Cb.data() + (sl - sg) * kBandCS + 32; };
              const float* brow = any_bias ? pl.bias_row(ht, y, 0) : nullptr;
  #if defined(__AVX512F__)  // (the interior slots: AVX-512 only)
              const float* vr0 = vrow(ky) + (pl.xlo + pl.off[0]) * vxs;  // slot 0's first key
              for (int64_t sl = sg; sl < iend; sl += kBandQ) {
                // the band's first column, moved left where the band would run past the packed row
                const int64_t want = pl.xlo + sl + pl.off[0];
                int64_t start = std::min(want, pl.Wk - band_nv * N);
                // The band from the 64-byte boundary at or before that (within the packed columns)
                // where band_nv vectors from there still hold the tile's windows (for k = 65, every
                // tile whose first window starts 0, 4, 8 or 12 floats past one): each key load then
                // lies within one cache line, where an unaligned one reads two.
                const int64_t al = want - floats_past_line(kt + want);
                if (al >= packed_lo && al <= start && want - al + pl.kw + kBandQ - 1 <= band_nv * N) start = al;
                const int64_t wo = want - start;
                const float* qt = qband(sl);
                // (band_nv is 2..kBandMaxNV; dispatch_nc's other instances are never called)
                dispatch_nc(band_nv, [&](auto nvv) {
                  constexpr int NV = decltype(nvv)::value;
                  if constexpr (NV >= 2 && NV <= kBandMaxNV)
                    band_logits<NV>(qt, qbs, D, kt + start, pl.Wk, scale, wo, crow(sl), kBandCS,
                                    sl + 2 * kBandQ < iend);
                });
                if ((sl - sg) % N == 0) pf_step(pf_quota);
              }
              if (pl.int_bias && iend > sg) {  // ("mask" without a table: its -inf only at the borders)
                pl.window_bias(brow, 0, bint.data());
                for (int64_t sl = sg; sl < iend; ++sl) add_bias_row(crow(sl), bint.data());
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
                for (int dc = 0; dc < DV; dc += DB) {
                  Vec<float> acc[T][DB];
                  NA_UNROLL
                  for (int t = 0; t < T; ++t)
                    NA_UNROLL
                    for (int d = 0; d < DB; ++d) acc[t][d] = splat<float>(0.0f);
                  pv_tile_diag_any<T, DB>(crow(sl), 1, vr0 + sl * vxs + dc * N, vxs, pl.kw, acc, kBandCS);
                  NA_UNROLL
                  for (int t = 0; t < T; ++t) {
                    const Vec<float> inv = splat<float>(Linv[sl + t]);
                    const OutPtr o = Orow + ((pl.xlo + sl + t) * ostr + dc * N);
                    NA_UNROLL
                    for (int d = 0; d < DB; ++d) store_out(o + d * N, acc[t][d] * inv, stream_out);
                  }
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
  #endif
              // the border slots: logits of the band at their window, softmax, P.V over the
              // window's kw value tokens, one query at a time or, for up to kGroupQ adjacent
              // columns with one window (a stride group), together (the key and value vectors
              // loaded once for the group). (With this and each chunk packing only its own border
              // slots' bands, the 1-D forward, L = 4096, k = 65, stride 2 / 4, ran 1.8 / 2.3x as
              // fast as with whole rows packed per chunk and one query at a time.)
              const float* vr = vrow(ky);
              for (int64_t sl = iend; sl < gend;) {
                const int64_t x = pl.slotx[sl], st0 = bstart[sl - pl.n_full * N];
                if (x >= pl.W) {  // dummy slot
                  ++sl;
                  continue;
                }
                const int64_t ws = pl.kidx[sl];
                int64_t ng = 1;
                while (ng < kGroupQ && sl + ng < gend && x + ng < pl.W && pl.slotx[sl + ng] == x + ng &&
                       pl.kidx[sl + ng] == ws)
                  ++ng;
                float* C = crow(sl);
                dispatch_nc(ng, [&](auto tv) {
                  constexpr int T = decltype(tv)::value;
                  if constexpr (T <= kGroupQ) {
                    // (AVX2: bands of more than kBandMaxNV vectors in two passes)
                    band_logits_passes<T, 0>(band_nv, qband(sl), qbs, D, kt + st0, pl.Wk, scale, ws - st0, C,
                                             kBandCS, false);
                    float inv[T];
                    for (int t = 0; t < T; ++t) {
                      float* Ct = C + t * kBandCS;
                      if (any_bias) {
                        pl.window_bias(brow, sl + t, bbord.data());
                        add_bias_row(Ct, bbord.data());
                      }
                      float m, l;
                      band_softmax(Ct, pl.kw, m, l);
                      Lrow[x + t] = m + std::log(l);
                      inv[t] = 1.0f / l;
                    }
                    for (int dc = 0; dc < DV; dc += DBG) {
                      Vec<float> acc[T][DBG];
                      NA_UNROLL
                      for (int t = 0; t < T; ++t)
                        NA_UNROLL
                        for (int d = 0; d < DBG; ++d) acc[t][d] = splat<float>(0.0f);
                      pv_tile_shared<T, DBG>(C, 1, vr + ws * vxs + dc * N, vxs, pl.kw, acc, kBandCS);
                      NA_UNROLL
                      for (int t = 0; t < T; ++t) {
                        const Vec<float> iv = splat<float>(inv[t]);
                        NA_UNROLL
                        for (int d = 0; d < DBG; ++d) (Orow + ((x + t) * ostr + (dc + d) * N)).store(acc[t][d] * iv);
                      }
                    }
                  }
                });
                sl += ng;
              }
            }
  #endif
            for (int64_t r = 0; r < ng; ++r) {
              const int64_t y = yg + r;
              const InPtr qr = qb + pl.row_off(qs, b, y, h);
              for (int64_t ci = cg; ci < ce; ++ci) {
                const int32_t* sx = pl.slotx.data() + ci * N;
                for (int l = 0; l < N; ++l) rows[l] = sx[l] < pl.W ? qr + sx[l] * qs[3] : none;
                transpose_blk(rows, D, scale, Qp.data() + r * D * SW + (ci - cb) * N, SW, Tw.data());
              }
              for (int64_t i = 0; i < pl.nkr; ++i) {
                if (pl.rowvalid[y * pl.nkr + i]) continue;
                const float* brow = pl.bias_row(ht, y, i);
                float* Si = S.data() + (r * pl.nkr + i) * pl.kw * SS - sg;
                for (int64_t j = 0; j < pl.kw; ++j)
                  for (int64_t sl = sg; sl < se; ++sl)
                    Si[j * SS + sl] =
                        pl.dead_rows_masked() ? -std::numeric_limits<float>::infinity() : brow[j * pl.Ws + sl];
              }
            }
            // the window row of each row of the group that reads key row ky: kwin[(ky - kmin) * RG
            // + r] (-1: none), found in one pass over the group's window rows (a search of every
            // window row per key row, 27 x 3 x 21 unpredictable branches per 3-D row group, took 9%
            // of the 3-D forward's tile time). A query row reads each key row at most once: the
            // plan's valid window rows of a row are distinct (t, y) positions.
            kwin.assign((kmax - kmin + 1) * RG, -1);
            for (int64_t r = 0; r < ng; ++r)
              for (int64_t i = 0; i < pl.nkr; ++i) {
                const int64_t n = (yg + r) * pl.nkr + i;
                if (pl.rowvalid[n]) kwin[(pl.rowpos[n] - kmin) * RG + r] = (int32_t)i;
              }
            // logits S[r][n][slot - sg], n = i * kw + j: each key row once for all the group's
            // rows that read it (the key vectors are loaded once for up to RG query rows)
            for (int64_t ky = kmin; ky <= kmax; ++ky) {
              int nr = 0;
              const float* A[RG];
              float* So[RG];
              for (int64_t r = 0; r < ng; ++r) {
                const int32_t i = kwin[(ky - kmin) * RG + r];
                if (i < 0) continue;
                A[nr] = Qp.data() + r * D * SW;
                So[nr++] = S.data() + (r * pl.nkr + i) * pl.kw * SS;
              }
              if (nr == 0) continue;
              for (int64_t ci = cg; ci < ce; ++ci) {
                const int64_t nsh = std::min<int64_t>(ce, pl.n_full) - ci;
                if (nr == 1 && pl.dw == 1 && pl.kw > N && nsh >= 2) {
                  dot_blocks_shared(nsh, A[0] + (ci - cb) * N, SW, D, Kp.trow(pl, ky) + pl.xlo + ci * N + pl.off[0],
                                    pl.Wk, pl.kw, So[0] + (ci - cb) * N, SS, shift.data());
                  ci += nsh - 1;
                  pf_step(pf_quota * nsh);
                  continue;
                }
                const float* Ab[RG];
                float* Sb[RG];
                for (int a = 0; a < nr; ++a) {
                  Ab[a] = A[a] + (ci - cb) * N;
                  Sb[a] = So[a] + (ci - cb) * N;
                }
  #if defined(__AVX512F__)
                if (ci >= pl.n_full && gperm[ci - pl.n_full] >= 0) {
                  const int64_t g = ci - pl.n_full;
                  dot_row_perm(nr, Ab, SW, D, Kp.trow(pl, ky) + gperm[g], pl.Wk, pl.kw, gidx.data() + g * pl.kw * N,
                               gmask.data() + g * pl.kw, gtwo[g] ? gmask2.data() + g * pl.kw : nullptr, Sb, SS);
                  pf_step(pf_quota);
                  continue;
                }
  #endif
                dot_row_multi(nr, Ab, SW, D, key_view(pl, Kp, ky, ci), pl.kw, Sb, SS);
                pf_step(pf_quota);
              }
              pf_step(pf_quota);
            }
            // (the all-interior blocks only when a table puts values there: "mask"'s -inf columns
            // lie in the border slots)
            const int64_t bias_lo = pl.int_bias ? gend : std::max(gend, pl.n_full * N);
            if (any_bias && bias_lo < se)
              for (int64_t r = 0; r < ng; ++r)
                for (int64_t i = 0; i < pl.nkr; ++i) {
                  const int64_t y = yg + r;
                  if (!pl.rowvalid[y * pl.nkr + i]) continue;
                  const float* brow = pl.bias_row(ht, y, i);
                  float* Si = S.data() + (r * pl.nkr + i) * pl.kw * SS - sg;
                  for (int64_t j = 0; j < pl.kw; ++j)
                    for (int64_t e = bias_lo; e < se; e += N)  // (the band's slots [sg, gend) add theirs)
                      storeu(Si + j * SS + e, loadu(Si + j * SS + e) + loadu(brow + j * pl.Ws + e));
                }
            for (int64_t r = 0; r < ng; ++r) {
              const int64_t y = yg + r;
              float* Sy = S.data() + r * K2 * SS - sg;  // Sy[n * SS + slot]
              float* Lrow = L + (bh * pl.R + y) * pl.W;
              // softmax per block of N queries (P left unnormalised; 1/l applied to the output)
              for (int64_t ci = cg; ci < ce; ++ci) {
                const int64_t s0 = ci * N;
                Vec<float> m, l;
                softmax_block(Sy + s0, SS, K2, m, l);
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
              const OutPtr Orow = O + ((b * pl.R + y) * pl.W * pl.NH + h) * D;
              const int64_t ostr = pl.NH * D;
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
                  for (int dc = 0; dc < DV; dc += DSH) {
                    Vec<float> acc[NS][DSH];
                    NA_UNROLL
                    for (int t = 0; t < NS; ++t)
                      NA_UNROLL
                      for (int d = 0; d < DSH; ++d) acc[t][d] = splat<float>(0.0f);
                    for (int64_t i = 0; i < pl.nkr; ++i) {
                      if (!pl.rowvalid[y * pl.nkr + i]) continue;
                      const float* P = Sy + i * pl.kw * SS + sl;
                      for (int64_t j = 0; j < pl.kw; ++j) {
                        const int32_t col = pl.kidx[j * pl.Ws + sl];
                        if (col >= pl.W) continue;  // not a key (zero value or masked)
                        Vec<float> vv[DSH];
                        NA_UNROLL
                        for (int d = 0; d < DSH; ++d) {
                          vv[d] = loadu(vrows[i] + col * vxs + (dc + d) * N);
                          pin_register(vv[d]);
                        }
                        NA_UNROLL
                        for (int t = 0; t < NS; ++t) {
                          const Vec<float> p = splat<float>(P[j * SS + t]);
                          NA_UNROLL
                          for (int d = 0; d < DSH; ++d) acc[t][d] += p * vv[d];
                        }
                      }
                    }
                    NA_UNROLL
                    for (int t = 0; t < NS; ++t) {
                      const Vec<float> inv = splat<float>(Linv[sl + t]);
                      const OutPtr o = Orow + (pl.slotx[sl + t] * ostr + dc * N);
                      NA_UNROLL
                      for (int d = 0; d < DSH; ++d) (o + d * N).store(acc[t][d] * inv);
                    }
                  }
                }
              };
              // tiles of TQI queries by DC vectors of channels (TQI * DC accumulators, DC value
              // vectors and a weight within the registers), then tiles of 2 for the rest; one tile
              // kernel per loop (see with_pv_kernel)
              auto pv_tile_run = [&](auto tqv, auto kern) {
                constexpr int TQ2 = decltype(tqv)::value;
                const int64_t x0 = pl.xlo + sl;
                const int64_t kw = pl.kw, nkr = pl.nkr;
                const uint8_t* const valid = pl.rowvalid.data() + y * nkr;
                const float* const* const vr = vrows.data();
                const int64_t vofs = (x0 + pl.off[0]) * vxs;
                for (int dc = 0; dc < DV; dc += DC) {
                  Vec<float> acc[TQ2][DC];
                  NA_UNROLL
                  for (int t = 0; t < TQ2; ++t)
                    NA_UNROLL
                    for (int d = 0; d < DC; ++d) acc[t][d] = splat<float>(0.0f);
                  for (int64_t i = 0; i < nkr; ++i)
                    if (valid[i]) kern(tqv, Sy + i * kw * SS + sl, vr[i] + vofs + dc * N, acc);
                  NA_UNROLL
                  for (int t = 0; t < TQ2; ++t) {
                    const Vec<float> inv = splat<float>(Linv[sl + t]);
                    const OutPtr o = Orow + ((x0 + t) * ostr + dc * N);
                    NA_UNROLL
                    for (int d = 0; d < DC; ++d) store_out(o + d * N, acc[t][d] * inv, stream_out);
                  }
                }
                sl += TQ2;
                pf_step(pf_quota);
              };
              auto pv_tiles = [&](auto tqv) {
                constexpr int TQ2 = decltype(tqv)::value;
                auto run = [&](auto ssv) {
                  constexpr int PS = decltype(ssv)::value;
                  with_pv_kernel<DC, PS>(pl, PS, vxs, TQ2, [&](auto kern) {
                    while (sl + TQ2 <= tile_end) pv_tile_run(tqv, kern);
                  });
                };
                if (SS == 32)
                  run(std::integral_constant<int, 32>{});
                else if (SS == 64)
                  run(std::integral_constant<int, 64>{});
                else
                  run(std::integral_constant<int, 128>{});
              };
              pv_tiles(std::integral_constant<int, TQI>{});
              pv_tiles(std::integral_constant<int, 2>{});
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
    if (stream_out) stream_fence();
  });
}

// The float32 forward (float32, bfloat16 or float16 inputs, head widths of float_fast_width, unit channel stride);
// false: not taken.
static bool forward_fast(const View6& q, const View6& k, const View6& v, OutPtr out, float* lse,
                         const Plan<float>& pl, float scale, const Parallel& par) {
  if (!float_fast_width(pl.D)) return false;
  if (q.stride[5] != 1 || k.stride[5] != 1 || v.stride[5] != 1) return false;
  dispatch_fast_width(pl.D, [&](auto dv) { forward_f32<decltype(dv)::value>(q, k, v, out, lse, pl, scale, par); });
  return true;
}

}  // namespace
}  // namespace neighborhood
}  // namespace alterops
