// Neighbourhood attention CPU kernels: the backward (recomputes P from the saved logsumexp).
// Part of neighborhood_attention_cpu.cpp, the one translation unit that includes it (compiled once
// per instruction-set level; everything here has internal linkage).
#pragma once

#include "neighborhood_cpu_tiles.h"

namespace alterops {
namespace neighborhood {
namespace {

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

// A border query's term of one key column: its Q / dO at qt + q (lane * D), its P / dS at
// w within the window row's [kw][V] block (j * V + lane).
struct BorderTerm {
  int32_t q, w;
};
struct BorderCol {
  int32_t e, t0, nt;  // the column's index in bcols; its terms [t0, t0 + nt)
};

// kv[0:D] += sum_t dS[w_t] * qt[q_t + 0:D] and kv[D:2D] += sum_t P[w_t] * gt[q_t + 0:D]: up to
// 4 vectors of channels of each held in registers over the terms.
template <typename T>
static void border_column_sum(const BorderTerm* tm, int64_t nt, const T* dS, const T* P, const T* qt, const T* gt,
                              int64_t D, T* kv) {
  constexpr int N = VecOf<T>::N;
  T* const dk = kv;
  T* const dv = kv + D;
  int64_t c0 = 0;
  for (; c0 + 4 * N <= D; c0 += 4 * N) {
    Vec<T> ak[4], av[4];
    NA_UNROLL
    for (int u = 0; u < 4; ++u) {
      ak[u] = loadu(dk + c0 + u * N);
      av[u] = loadu(dv + c0 + u * N);
    }
    for (int64_t t = 0; t < nt; ++t) {
      const Vec<T> ds = splat<T>(dS[tm[t].w]), p = splat<T>(P[tm[t].w]);
      const T* a = qt + tm[t].q + c0;
      const T* b = gt + tm[t].q + c0;
      NA_UNROLL
      for (int u = 0; u < 4; ++u) {
        ak[u] += ds * loadu(a + u * N);
        av[u] += p * loadu(b + u * N);
      }
    }
    NA_UNROLL
    for (int u = 0; u < 4; ++u) {
      storeu(dk + c0 + u * N, ak[u]);
      storeu(dv + c0 + u * N, av[u]);
    }
  }
  for (; c0 + N <= D; c0 += N) {
    Vec<T> ak = loadu(dk + c0), av = loadu(dv + c0);
    for (int64_t t = 0; t < nt; ++t) {
      ak += splat<T>(dS[tm[t].w]) * loadu(qt + tm[t].q + c0);
      av += splat<T>(P[tm[t].w]) * loadu(gt + tm[t].q + c0);
    }
    storeu(dk + c0, ak);
    storeu(dv + c0, av);
  }
  for (; c0 < D; ++c0) {
    T sk = dk[c0], sv = dv[c0];
    for (int64_t t = 0; t < nt; ++t) {
      sk += dS[tm[t].w] * qt[tm[t].q + c0];
      sv += P[tm[t].w] * gt[tm[t].q + c0];
    }
    dk[c0] = sk;
    dv[c0] = sv;
  }
}

template <typename scalar_t, typename T>
static void backward_impl(const View6& dout, const View6& q, const View6& k, const View6& v,
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
  // The AVX2 and AVX-512 builds write dq, and dk and dv, when they are at least kStreamOutBytes
  // (and aligned), with streaming stores where they transpose 8 tokens at a time: their lines are
  // then not read from memory before they are written, nor kept in cache in place of the inputs
  // (2-D backward, B = 4, 56 x 56, 4 heads, d = 32, 6.4 MB each: 1.5-2% faster on Zen 3 at AVX2;
  // on Zen 4 at AVX-512, forward+backward 18.0 -> 16.7 ms with the forward's streaming stores, medians
  // of 4 alternating runs).
  const int64_t row_bytes = pl.B * pl.R * pl.W * pl.D * (int64_t)sizeof(float);  // per head
  const bool stream_base = std::is_same<scalar_t, float>::value && pl.D % 8 == 0;
  const bool stream_dq = stream_base && stream_output(DQ, row_bytes * pl.NH);
  const bool stream_dkv = stream_base && stream_output(DK, row_bytes * pl.NKV) && stream_output(DV, row_bytes * pl.NKV);
  // dst[b, y, :, hk, :] = the transposed key row src[c][x] (contiguous (B, T, H, W, heads_kv, D))
  auto write_key_row = [&](scalar_t* dst, const T* src, int64_t b, int64_t hk, int64_t y) {
    scalar_t* orow = dst + ((b * pl.R + y) * pl.W * pl.NKV + hk) * pl.D;
    const int64_t ts = pl.NKV * pl.D;
#if NA_X86V3
    if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
      if (pl.D % 8 == 0) {
        // 8 channels by 8 columns transposed in registers (AVX-512: 16 by 16 first, so that
        // every store is a whole 64-byte line of a token; transpose8's 32-byte stores wrote each
        // line in two halves, one channel block apart, and a streamed half line costs nearly a
        // whole line's write: 2-D forward+backward, B = 4, 56 x 56, 4 heads, d = 32, k = 7, on a
        // Xeon, same-process A/B with this and the dq rows' 16 x 16 transposes below: 15.9 ->
        // 13.8 ms; with plain stores rather than streamed ones the rows took half as long again.
        // AVX2, and the tokens left over: 8 tokens by 16 channels, each line's halves written
        // one after the other, transpose16x8_to)
        int64_t x0 = 0;
#if defined(__AVX512F__)
        if (pl.D % 16 == 0)
          for (; x0 + 16 <= pl.W; x0 += 16)
            store_token_block<16>(stream_dkv, src + x0, pl.Wk, pl.D, 1.0f, orow + x0 * ts, ts);
#endif
        for (; x0 + 8 <= pl.W; x0 += 8)
          store_token_block<8>(stream_dkv, src + x0, pl.Wk, pl.D, 1.0f, orow + x0 * ts, ts);
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
  // The same per column: bcol_of[g] the columns that block g's border queries read, each with
  // its (lane, window column) terms in bterm[g], so that a column's dK/dV vectors are read and
  // written once for all its terms (three per column at the 2-D case's borders) rather than once each.
  std::vector<std::vector<BorderCol>> bcol_of(pl.NG);
  std::vector<std::vector<BorderTerm>> bterm(pl.NG);
  for (int64_t g = 0; g < pl.NG; ++g) {
    std::vector<std::vector<BorderTerm>> per(NB);
    for (const int l : blanes[g])
      for (int64_t j = 0; j < pl.kw; ++j) {
        const int32_t col = pl.kidx[j * pl.Ws + (pl.n_full + g) * N + l];
        if (col < pl.W) per[colmap[col]].push_back({l * (int32_t)pl.D, (int32_t)(j * N + l)});
      }
    for (int64_t e = 0; e < NB; ++e)
      if (!per[e].empty()) {
        bcol_of[g].push_back({(int32_t)e, (int32_t)bterm[g].size(), (int32_t)per[e].size()});
        bterm[g].insert(bterm[g].end(), per[e].begin(), per[e].end());
      }
  }
  // Lanes of the first border block that hold interior slots (their dK/dV go key-centric).
  Buf<T> imask(N);
  for (int l = 0; l < N; ++l) imask[l] = pl.n_full * N + l < pl.n_int ? T(1) : T(0);
  // how far an interior query's keys reach right and left of it
  const int64_t rreach = std::max<int64_t>(pl.off[pl.kw - 1], 0), lreach = std::max<int64_t>(-pl.off[0], 0);
  // left margin of the row buffers (P and dS at key columns down to xlo - lreach, Q and dO at
  // slots down to -rreach)
  const int64_t LP = (std::max(pl.xlo + rreach, lreach - pl.xlo) + N - 1) / N * N;
  // row stride with both margins; P and dS of neighbour j are kept at their key columns
  // (query slot + xlo + off[j]), up to rreach + xlo past the last slot
  const int64_t qs = LP + std::max(pl.Wk + (lreach + 1 + N - 1) / N * N, pl.Ws + LP);

  // Query rows in groups of RG (float, AVX2 and AVX-512): a key row's key and value vectors are
  // loaded once for all the group's rows that read it, in the logits, dP and dQ (one row at a
  // time, every FMA waited on its own unaligned key load).
  constexpr bool grouped = NA_X86V3 && std::is_same<T, float>::value;
  constexpr int RG = grouped ? kSharedRows : 1;
#if NA_X86V3
  // the dq rows with 8x8 transposes; run8[s0 / 8]: whether slots [s0, s0 + 8) are 8 consecutive
  // tokens of the row (then transposed straight into dq)
  const bool vec_rows = std::is_same<scalar_t, float>::value && std::is_same<T, float>::value && pl.D % 8 == 0;
  std::vector<uint8_t> run8(vec_rows ? pl.Ws / 8 : 0);
  for (int64_t s0 = 0; s0 + 8 <= pl.Ws && vec_rows; s0 += 8) {
    bool run = pl.slotx[s0 + 7] < pl.W;
    for (int l = 1; l < 8; ++l) run &= pl.slotx[s0 + l] == pl.slotx[s0] + l;
    run8[s0 / 8] = run;
  }
#endif
  const int64_t ring = key_ring(pl, nchunks, rows_per, RG);
  par.for_tasks(ntasks, [&](auto next) {
    KeyPack<T> Kp, Vp;
    Kp.alloc(pl, ring);
    Vp.alloc(pl, ring);
    // The border queries' dK/dV of key row ky: bsize elements at bKV + ky * bsize.
    Buf<T> bKV(std::max<int64_t>(1, pl.R * bsize));
    std::vector<T> qt(N * pl.D), gt(N * pl.D);  // border lanes' Q and dO, [lane][channel]
    // Per row of a group: query-row buffers with zero margins (so that key-centric sums can read
    // shifted windows), P and dS of the interior blocks, a block's P and dS, dQ, lse and -dlse
    // (zero without dlse; delta adds rowsum(P dP) to it).
    Buf<T> Qbuf(RG * pl.D * qs, T(0)), Gbuf(RG * pl.D * qs, T(0)), Prow_g(RG * K2 * qs, T(0)),
        dSrow_g(RG * K2 * qs, T(0));
    auto Qrow = [&](int64_t r) { return Qbuf.data() + r * pl.D * qs + LP; };
    auto Grow = [&](int64_t r) { return Gbuf.data() + r * pl.D * qs + LP; };
    Buf<T> Sg(RG * K2 * N), dSg(RG * K2 * N), dQg(RG * pl.D * pl.Ws);
    Buf<T> lse_g(RG * pl.Ws), ndlse_g(RG * pl.Ws);
#if NA_X86V3
    Buf<T> dq8(8 * pl.D);  // 8 dq tokens
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
    // (The next rows' q, dout, k and v rows are left to the hardware prefetcher: software
    // prefetches of them, a few tokens at a time, made the backward 5-8% slower.)
    for (int64_t t; next(t);) {
      const RowTask tk = row_task(pl, t, nchunks, rows_per);
      if (tk.y0 >= tk.y1) continue;
      const int64_t bh = tk.bh, b = tk.b, h = tk.h, ht = tk.ht, chunk = tk.chunk, y0 = tk.y0, y1 = tk.y1;
      const int64_t klo = tk.klo, khi = tk.khi;
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
          T* const ndlse_s = ndlse_g.data() + r * pl.Ws;
          pack_row<scalar_t, T>(q, b, y, h, pl, scale, Qp, qs);
          pack_row<scalar_t, T>(dout, b, y, h, pl, T(1), Gp, qs);
          // lse and -dlse: dS = P (dP - delta + dlse), delta = rowsum(P dP) added with the
          // block's P
          for (int64_t sl = 0; sl < pl.Ws; ++sl) {
            const int64_t x = pl.slotx[sl];
            lse_s[sl] = x < pl.W ? L[(bh * pl.R + y) * pl.W + x] : T(0);
            ndlse_s[sl] = x < pl.W && dlse ? -dlse[(bh * pl.R + y) * pl.W + x] : T(0);
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
          // P = exp(S - lse); delta = rowsum(P dP), which equals rowsum(out * dout) (out = P V,
          // dP = dO . V) without reading out; dS = P (dP - delta)
          for (int64_t r = 0; r < ng; ++r) {
            T* S = Sg.data() + r * K2 * N;
            T* dS = dSg.data() + r * K2 * N;
            const Vec<T> lv = loadu(lse_g.data() + r * pl.Ws + s0);
            Vec<T> a0 = splat<T>(T(0)), a1 = splat<T>(T(0));  // two chains
            int64_t n = 0;
            for (; n + 2 <= K2; n += 2) {
              const Vec<T> p0 = vexp(loadu(S + n * N) - lv), p1 = vexp(loadu(S + (n + 1) * N) - lv);
              storeu(S + n * N, p0);
              storeu(S + (n + 1) * N, p1);
              a0 += p0 * loadu(dS + n * N);
              a1 += p1 * loadu(dS + (n + 1) * N);
            }
            if (n < K2) {
              const Vec<T> p0 = vexp(loadu(S + n * N) - lv);
              storeu(S + n * N, p0);
              a0 += p0 * loadu(dS + n * N);
            }
            const Vec<T> dl = (a0 + a1) + loadu(ndlse_g.data() + r * pl.Ws + s0);
            for (n = 0; n < K2; ++n) storeu(dS + n * N, loadu(S + n * N) * (loadu(dS + n * N) - dl));
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
            // P and dS of neighbour n = i * kw + j at its key columns: n * qs + base + off[j]
            // (window rows and neighbours in nested loops with the bounds and offsets in locals:
            // with n % kw and the plan's fields re-read after every store, a 64-bit division per
            // neighbour set the pace of these copies, 8% of the 2-D backward at AVX2)
            const int64_t kw = pl.kw, nkr = pl.nkr, base = LP + pl.xlo + s0;
            const int64_t* const off = pl.off.data();
            if (contiguous) {
              // interior block: keep P and dS for the key-centric dK/dV sums after the row (the
              // dummy lanes of a zero_rows plan's last block, with zero Q and dO and zero bias,
              // have S = 0, P finite and dS = 0: their terms there are zero; a "mask" slot's
              // columns outside the map have P = dS = 0)
              for (int64_t i = 0; i < nkr; ++i)
                for (int64_t j = 0; j < kw; ++j) {
                  const int64_t n = i * kw + j, e = n * qs + base + off[j];
                  storeu(Prow + e, loadu(S + n * N));
                  storeu(dSrow + e, loadu(dS + n * N));
                }
            } else {
              // border block. Its interior slots: P and dS kept for the key-centric sums as above
              // (zero in the other lanes).
              if (s0 < pl.n_int) {
                const Vec<T> m = loadu(imask.data());
                for (int64_t i = 0; i < nkr; ++i)
                  for (int64_t j = 0; j < kw; ++j) {
                    const int64_t n = i * kw + j, e = n * qs + base + off[j];
                    storeu(Prow + e, loadu(S + n * N) * m);
                    storeu(dSrow + e, loadu(dS + n * N) * m);
                  }
              }
              // Its border queries: dK[col] += dS * Qscaled, dV[col] += P * dO per key column
              // col, across the channels (their Q and dO transposed to channels contiguous).
              const int64_t g = ci - pl.n_full;
              const T* Qp = Qrow(r);
              const T* Gp = Grow(r);
              for (const int l : blanes[g])
                for (int64_t c = 0; c < pl.D; ++c) {
                  qt[l * pl.D + c] = Qp[c * qs + s0 + l];
                  gt[l * pl.D + c] = Gp[c * qs + s0 + l];
                }
              for (int64_t rr = 0; rr < nrows; ++rr) {
                const int64_t i = row_i[rr], ky = pl.rowpos[y * pl.nkr + i];
                T* bk = bKV.data() + ky * bsize;
                for (const BorderCol& bc : bcol_of[g])
                  border_column_sum<T>(bterm[g].data() + bc.t0, bc.nt, dS + i * pl.kw * N, S + i * pl.kw * N,
                                       qt.data(), gt.data(), pl.D, bk + bc.e * 2 * pl.D);
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
          if (vec_rows) {  // the dq rows, transposed in registers (8 or 16 tokens by 8 or 16 channels)
            if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
              const float* rows[8];
              float* const dq_row = DQ + ((b * pl.R + y) * pl.W * pl.NH + h) * pl.D;
              for (int64_t s0 = 0; s0 < pl.Ws; s0 += 8) {
#if defined(__AVX512F__)
                // 16 consecutive tokens (AVX-512): 16 channels by 16 tokens, whole lines (as
                // write_key_row's)
                if (pl.D % 16 == 0 && s0 % 16 == 0 && s0 + 16 <= pl.Ws && run8[s0 / 8] && run8[s0 / 8 + 1] &&
                    pl.slotx[s0 + 8] == pl.slotx[s0] + 8) {
                  store_token_block<16>(stream_dq, dQb + s0, pl.Ws, pl.D, scale,
                                        dq_row + pl.slotx[s0] * pl.NH * pl.D, pl.NH * pl.D);
                  s0 += 8;
                  continue;
                }
#endif
                if (run8[s0 / 8]) {  // 8 consecutive tokens: straight into dq
                  store_token_block<8>(stream_dq, dQb + s0, pl.Ws, pl.D, scale,
                                       dq_row + pl.slotx[s0] * pl.NH * pl.D, pl.NH * pl.D);
                  continue;
                }
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
    if (stream_dq || stream_dkv) stream_fence();
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
        par.for_tasks(BKV * pl.R, [&](auto next) {
          Buf<float> sum(2 * rl), zero;
          std::vector<const float*> ps;
          for (int64_t t; next(t);) {
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
          if (stream_dkv) stream_fence();
        });
        goto reduced;
      }
    }
#endif
    par.for_tasks(BKV * pl.R, [&](auto next) {
      std::vector<const T*> pk, pv;
      for (int64_t t; next(t);) {
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

}  // namespace
}  // namespace neighborhood
}  // namespace alterops
