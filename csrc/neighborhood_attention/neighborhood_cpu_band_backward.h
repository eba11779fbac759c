// Neighbourhood attention CPU kernels: the band backward of long windows on one key row (the 1-D
// ops' windows, such as 65 neighbours), float32, AVX-512 and AVX2.
// Part of neighborhood_attention_cpu.cpp, the one translation unit that includes it (compiled once
// per instruction-set level; everything here has internal linkage).
//
// The general backward (neighborhood_cpu_backward.h) forms a block of 16 queries against one
// neighbour at a time: with a single key row per query row every FMA of its logits, dP, dQ and
// key-centric dK/dV sums waits on a load of its own (1-D backward, B = 4, L = 4096, 8 heads,
// d = 64, k = 65: 5x the forward's time). Here the queries of one row go as in the forward's band:
//  * logits S and dP = dO V for 4 queries at a time (AVX-512; 2 with AVX2's 16 registers) against
//    consecutive key (value) vectors (band_logits: no query transpose, each key vector loaded once
//    for the tile's queries);
//  * P = exp(S - lse), dS = P (dP - rowsum(P dP) + dlse), kept per query in a ring of rows
//    (window column j at j);
//  * dQ = dS K and the key-centric dK = dS^T Q, dV = P^T dO as P.V tiles (pv_tile_diag_any: a
//    tile's accumulators in registers over all of its window, the value rows of the tokens read
//    in place). For key x the queries that see it are the interior slots x - xlo - off[kw-1] ..
//    x - xlo - off[0], and its weight from slot u0 + u is column kw - 1 - u of the slot's row:
//    the ring rows read at a constant stride (row stride - 1), so the key-centric sums are the
//    same tiles with other strides.
// Keys seen by border queries (whose clamped windows do not slide with the query) or by fewer
// than all the interior slots of their range (the ends of the row) are the "zones" [0, zl) and
// [zr, W): their dK/dV are summed per query instead, up to kBwdBandQ adjacent border queries that
// share a window (a stride group) together (with strided windows nearly every query is a border
// query and every key a zone key).
// Taken for float32, AVX-512 or AVX2, head widths of float_fast_width, unit channel strides of q, k
// and v (a dout without them, such as the expanded gradient of out.sum(), is copied per row), rows
// whose only key row is their own, dilation 1, kw > 16 (up to 238 with AVX-512, 248 with AVX2: a
// band of at most 256 columns; the AVX2 P.V tiles take 2 channel vectors at a time), rows at least
// kw long, and every border window either kw consecutive keys (the "clamp" rule), or fewer
// followed by slots masked with -inf (causal windows near the start: their logits are formed over
// kw columns and the mask zeroes P and dS), or, with "mask" / "zero", the keys of a centred window
// cut by an end of the row: such a query reads the run of kw keys from its first key or ending at
// the row's end, with -inf on the run's keys outside its window ("zero" non-keys, zero vectors,
// have logit = bias and dP = 0: they count in the saved logsumexp and, as dS = -P coef, in the
// bias gradient only). ("mask" / "zero" had taken the general backward, on key rows with zero
// margins: 1-D forward+backward, B = 4, L = 4096, 8 heads, d = 64, k = 65, "zero" 157 -> 90 ms,
// "mask" 155 -> 85 ms, "clamp" 74 ms; same-process A/B on Zen 4.)
// With or without a bias table and its gradient. Tasks are (batch, key/value head, row); a task
// sums its key/value head's query heads in order (the first stores, the next add), so the result
// does not depend on the thread count.
#pragma once

#include "neighborhood_cpu_backward.h"

namespace alterops {
namespace neighborhood {
namespace {

#if NA_X86V3
// Queries per band tile and the widest band (vectors) of the band backward: 4 queries (kBandQ, as
// the forward) on AVX-512, in passes of at most 6 zmm (kBandMaxNV); on AVX2 2 queries, in passes
// of at most 6 ymm (12 accumulators of the 16 ymm registers). One query a tile, the whole band in
// one pass, loads a key vector per FMA: the 1-D forward+backward (B = 4, L = 4096, 8 heads,
// d = 64, k = 65) took 0.78 of its time with the general backward, against 0.70 with two (same-
// process A/Bs against the general backward's build on Zen 4). (Packing the key and value rows
// a few blocks ahead of the band, rather than whole before it, was no faster.)
// Bands of up to 256 columns (16 zmm, 32 ymm) are formed in passes of at most kBandMaxNV vectors
// (band_logits_passes): windows of up to 238 (AVX-512) or 248 (AVX2) keys. (Windows wider than 93
// keys had taken the general backward: 1-D forward+backward, B = 4, L = 4096, 8 heads, d = 64,
// k = 127, 272 -> 152 ms, k = 201 404 -> 200 ms; AVX2 314 -> 189 and 443 -> 283 ms; same-process
// A/B on Zen 4.)
constexpr int kBwdBandQ = NA_AVX2 ? 2 : kBandQ;
constexpr int kBwdBandMaxNV = 256 / VecOf<float>::N;

// x with the lanes from n on (0 < n <= V) set to +0 (by their bits: NaN and inf lanes too)
static inline Vec<float> first_lanes(Vec<float> x, int64_t n) {
#if defined(__AVX512F__)
  return (Vec<float>)_mm512_maskz_mov_ps((__mmask16)((1u << n) - 1u), (__m512)x);
#else
  typedef int32_t VI __attribute__((vector_size(NA_VEC_BYTES)));
  const VI lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return (Vec<float>)((VI)x & (VI)(lane < (int32_t)n));
#endif
}

// Key vectors per band tile for a window of kw keys, 0 where the band backward does not take that
// width (the other conditions are in band_backward_plan).
static int band_backward_nv(int64_t kw) {
  constexpr int N = VecOf<float>::N;
  const int64_t nv = (kw + kBwdBandQ - 1 + N - 1) / N;
  return kw > N && nv <= kBwdBandMaxNV ? (int)nv : 0;
}

// The shapes' facts of the band backward; nv == 0: not taken.
struct BandBackward {
  int nv = 0;           // key vectors per band tile
  int64_t zl = 0, zr = 0;  // zones: keys [0, zl) and [zr, W) summed per query
  std::vector<int64_t> ws;  // [Ws - n_int]: border slot sl's window lies in the kw keys from ws[sl - n_int]
};

static BandBackward band_backward_plan(const View6& dout, const View6& q, const View6& k, const View6& v,
                                       const Plan<float>& pl) {
  constexpr int N = VecOf<float>::N;
  BandBackward bb;
  if (!float_fast_width(pl.D)) return bb;
  if (q.stride[5] != 1 || k.stride[5] != 1 || v.stride[5] != 1) return bb;  // (dout: copied when not)
  const int nv = band_backward_nv(pl.kw);
  if (pl.nkr != 1 || pl.dw != 1 || nv == 0 || nv * N > pl.Wk || pl.W < pl.kw) return bb;
  // (a zero_rows plan's windows read key columns outside the row, which the band, reading the
  // tokens in place, does not have: its "zero"/"mask" plan has border slots, as the forward's)
  if (pl.zero_rows) return bb;
  for (int64_t y = 0; y < pl.R; ++y)
    if (!pl.rowvalid[y] || pl.rowpos[y] != y) return bb;
  // keys whose seeing slots are all interior: [xlo + off[kw-1], xlo + n_int + off[0])
  int64_t zl = pl.xlo + pl.off[pl.kw - 1], zr = pl.xlo + pl.n_int + pl.off[0];
  bb.ws.assign(pl.Ws - pl.n_int, 0);
  for (int64_t sl = pl.n_int; sl < pl.Ws; ++sl) {
    const int64_t x = pl.slotx[sl];
    if (x >= pl.W) continue;  // dummy slot
    int64_t st;
    if (pl.border == kClamp) {
      if (!pl.window_is_run(sl, true)) return bb;
      st = pl.kidx[sl];
    } else {
      // "zero"/"mask" (centred, stride 1): the window's keys are a run cut by an end of the row;
      // the run of kw keys from the first of them, or ending at the row's end, holds them (the
      // other keys of that run leave the slot's softmax through a -inf bias, its "zero" non-keys
      // only count in the gradient of the bias table: see border_row)
      int64_t first = -1, n = 0;
      for (int64_t j = 0; j < pl.kw; ++j) {
        const int64_t key = pl.kidx[j * pl.Ws + sl];
        if (key == pl.W) continue;
        if (first < 0) first = key;
        if (key != first + n++) return bb;
      }
      if (first < 0) return bb;
      st = std::min(first, pl.W - pl.kw);
    }
    bb.ws[sl - pl.n_int] = st;
    if (x < pl.xlo)
      zl = std::max(zl, st + pl.kw);
    else
      zr = std::min(zr, st);
  }
  if (zl >= zr) zl = zr = pl.W;  // no key in the middle: one zone holds the row
  bb.nv = nv;
  bb.zl = zl;
  bb.zr = zr;
  return bb;
}

// dout, q, k, v and the gradients are float32, bfloat16 or float16 tensors (of DQ's element type:
// the same float32 arithmetic; with 16-bit ones a task widens its key and value rows, and each query
// head's q and dout rows, into buffers, and forms dq, dk and dv rows in float32 buffers that it
// narrows when they are whole).
template <int DV>
static void backward_band_f32(const View6& dout, const View6& q, const View6& k, const View6& v, const float* L,
                              const float* dlse, OutPtr DQ, OutPtr DK, OutPtr DVo, float* dbias,
                              const Plan<float>& pl, const BandBackward& bb, float scale, const Parallel& par) {
  constexpr int N = VecOf<float>::N;
  const bool kBF = DQ.e != Elem::F32;  // 16-bit storage
  constexpr int MQ = kBwdBandQ;
  // P.V tiles: TQ queries (keys) by DC channel vectors (TQ * DC accumulators), DV / DC passes
  // (AVX-512: all DV vectors up to 4, then halves, for heads of 96 and 128 channels, which took the
  // general backward before: 1-D forward+backward, L = 4096, k = 65, 4 heads of 128, 123 -> 70 ms,
  // AVX2 128 -> 93 ms; same-process A/B on Zen 4)
  constexpr int DC = NA_AVX2 ? 2 : DV > 4 ? DV / 2 : DV;
  constexpr int TQ = NA_AVX2 ? 6 : DC >= 4 ? 6 : 8;
  // Border queries (up to MQ sharing a window): dq in tiles of DG channel vectors (MQ * DG
  // accumulators), the zone sums DZ at a time (2 * MQ * DZ query and dout vectors in registers)
  constexpr int DG = NA_AVX2 ? (DV % 4 == 0 ? 4 : 2) : DC;
  constexpr int DZ = DV % 2 == 0 ? 2 : 1;
  constexpr int64_t SEG = 8 * TQ;  // slots whose rows are formed before their tiles run
  constexpr int64_t CS = 32 + N * kBwdBandMaxNV + 16;  // band scratch row stride
  const int64_t D = pl.D, W = pl.W, kw = pl.kw, Wk = pl.Wk, nv = bb.nv, zl = bb.zl, zr = bb.zr;
  const int64_t cw = (kw + N - 1) / N * N;  // ring row width
  // Ring of P and dS rows by interior slot: a key tile reads TQ + kw - 1 consecutive rows, so the
  // first HIST rows are mirrored past the end (any such run is contiguous); it holds the rows of
  // the segment being formed and of the key tiles still waiting for them.
  const int64_t HIST = kw + TQ;
  int64_t ring = 64;
  while (ring < SEG + kw + 2 * TQ + 8) ring *= 2;
  const int64_t n4 = pl.n_full * N;  // interior slots in whole blocks: band tiles of MQ
  const int64_t nzone = zl + (W - zr);
  const int64_t off0 = pl.off[0], offe = pl.off[kw - 1];
  const InPtr qb{static_cast<const char*>(q.data), DQ.e}, gb{static_cast<const char*>(dout.data), DQ.e};
  const InPtr kb{static_cast<const char*>(k.data), DQ.e}, vb{static_cast<const char*>(v.data), DQ.e};
  // dout whose channels are not contiguous (the expanded gradient of out.sum() or out.mean()) is
  // copied a row at a time into a buffer of the task (16-bit: every row widened)
  const bool g_copy = dout.stride[5] != 1 || kBF;
  const int64_t qxs = kBF ? D : q.stride[3], gxs = g_copy ? D : dout.stride[3], kxs = kBF ? D : k.stride[3],
                vxs = kBF ? D : v.stride[3];
  // Bias table: its values join the logits (an interior query's neighbour j at table column
  // bx[j][0] for every interior slot; a border slot's at bx[j][slot]); its gradient is summed per
  // task (interior queries per neighbour first) into dB[task][table head][column], then over the
  // tasks in order.
  const bool has_bias = pl.any_bias;
  // "zero"/"mask" border queries read their windows from a run of kw keys (bb.ws) with a bias row
  // of their own (border_row) even without a table
  const bool remap = pl.border != kClamp, border_bias = has_bias || remap;
  // Tasks: (batch, key/value head, row), each summing its query heads' dK/dV in turn (the first
  // stores, the next add). With grouped heads and fewer such tasks than kBackwardTasks (1-D maps
  // with few key/value heads: B = 4, 2 of them, 8 tasks), one task per query head instead, each
  // storing its dK/dV into its own slice of DKs/DVs ([G][B][R][W][NKV][D]), summed over the slices
  // in order afterwards (the additions one task summing them would make, in the same order).
  // (Those shapes had taken the general backward: 1-D, B = 4, L = 4096, 8 heads on 2 key/value
  // heads, d = 64, k = 65, forward+backward 150 ms against 86 ms for 8 key/value heads.) The split
  // depends on the shapes only.
  const bool split = pl.G > 1 && pl.B * pl.NKV * pl.R < kBackwardTasks;
  // token strides of the dq rows and the dK/dV rows written (16-bit: the task's float32 rows,
  // or the float32 slices of split)
  const int64_t qts = kBF ? D : pl.NH * D, kts = kBF && !split ? D : pl.NKV * D;
  const int64_t ntasks = pl.B * (split ? pl.NH : pl.NKV) * pl.R, tc = 2 * kw - 1, tsize = pl.nht * tc;
  const int64_t kv_elems = pl.B * pl.R * W * pl.NKV * D;  // of dk (and dv)
  RawBuf<float> DKs(split ? pl.G * kv_elems : 1), DVs(split ? pl.G * kv_elems : 1);
  // float32 dq of 4 MiB and more, and dK and dV of 4 MiB and more where each task writes its own
  // once (one query head per key/value head), are written with streaming stores, as the general
  // backward's: they skip the read of each line before its write (1-D, B = 4, L = 4096, 8 heads,
  // d = 64, k = 65: three outputs of 34 MB).
  const bool stream_dq = !kBF && stream_output(DQ.p, pl.B * pl.R * W * pl.NH * D * (int64_t)sizeof(float));
  const bool stream_kv = !kBF && !split && pl.G == 1 && stream_output(DK.p, kv_elems * (int64_t)sizeof(float)) &&
                         stream_output(DVo.p, kv_elems * (int64_t)sizeof(float));
  Buf<float> dB(dbias ? ntasks * tsize : 0, 0.0f);
  par.for_tasks(ntasks, [&](auto next) {
    RawBuf<float> Kt(D * Wk), Vt(D * Wk), Gt(g_copy ? W * D : 1);  // (only tokens 0..W-1 are read)
    // (16-bit) the widened q, k and v rows, the dq row and (without split) the dK/dV rows
    RawBuf<float> Qw(kBF ? W * D : 1), Kw(kBF ? W * D : 1), Vw(kBF ? W * D : 1), DQw(kBF ? W * D : 1),
        DKw(kBF && !split ? W * D : 1), DVw(kBF && !split ? W * D : 1);
    // W tokens of src (token stride xs, channel stride cs) as float32 rows of D channels at dst
    auto widen_row = [&](float* dst, InPtr src, int64_t xs, int64_t cs) {
      if (cs == 1)
        src.widen_tokens(dst, xs, 0, W, D);
      else
        for (int64_t x = 0; x < W; ++x)
          for (int64_t c = 0; c < D; ++c) dst[x * D + c] = (src + (x * xs + c * cs)).get();
      return static_cast<const float*>(dst);
    };
    // the float32 rows of D channels at src narrowed into W tokens at dst (token stride xs)
    auto narrow_row = [&](OutPtr dst, const float* src, int64_t xs) {
      for (int64_t x = 0; x < W; ++x)
        for (int64_t c = 0; c < D; c += N) (dst + (x * xs + c)).store(loadu(src + x * D + c));
    };
    Buf<float> ringP((ring + HIST) * cw, 0.0f), ringS((ring + HIST) * cw, 0.0f);
    Buf<float> CSb((MQ + 1) * CS, 0.0f), CDb((MQ + 1) * CS, 0.0f);
    Buf<float> bP(MQ * cw, 0.0f), bS(MQ * cw, 0.0f);  // the border queries' rows
    Buf<float> zK(std::max<int64_t>(1, nzone * D)), zV(std::max<int64_t>(1, nzone * D));
    // the interior queries' bias row and sum of dS, a border query's bias row (window column j at j)
    Buf<float> bint(cw, 0.0f), dsum(cw, 0.0f), bbord(cw, 0.0f);
    std::vector<int32_t> bcol(kw);  // a border query's table column per window column (-1: none)
    const float* rows[16];
    for (int64_t t; next(t);) {
      const int64_t y = t % pl.R;
      int64_t b, hk, g0 = 0, g1 = pl.G;
      if (split) {
        const int64_t bh = t / pl.R, h = bh % pl.NH;
        b = bh / pl.NH;
        hk = h / pl.G;
        g0 = h % pl.G;
        g1 = g0 + 1;
      } else {
        b = t / pl.R / pl.NKV;
        hk = t / pl.R % pl.NKV;
      }
      const InPtr kin = kb + pl.row_off(k.stride, b, y, hk), vin = vb + pl.row_off(v.stride, b, y, hk);
      const float* const kr = kBF ? widen_row(Kw.data(), kin, k.stride[3], 1) : kin.f32();
      const float* const vr = kBF ? widen_row(Vw.data(), vin, v.stride[3], 1) : vin.f32();
      // the key and value rows transposed (channel-major, columns W.. zero) for the band logits
      for (int64_t x0 = 0; x0 < Wk; x0 += N) {
        for (int l = 0; l < N; ++l) rows[l] = x0 + l < W ? kr + (x0 + l) * kxs : nullptr;
        NA_TRANSPOSE_BLK(rows, D, 1.0f, Kt.data() + x0, Wk);
        for (int l = 0; l < N; ++l) rows[l] = x0 + l < W ? vr + (x0 + l) * vxs : nullptr;
        NA_TRANSPOSE_BLK(rows, D, 1.0f, Vt.data() + x0, Wk);
      }
      const int64_t kv_row = ((b * pl.R + y) * W * pl.NKV + hk) * D;
      float* const dk_row = split ? DKs.data() + g0 * kv_elems + kv_row : kBF ? DKw.data() : (DK + kv_row).f32();
      float* const dv_row = split ? DVs.data() + g0 * kv_elems + kv_row : kBF ? DVw.data() : (DVo + kv_row).f32();
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t h = hk * pl.G + g, bh = b * pl.NH + h;
        const bool first = g == g0;
        const InPtr qin = qb + pl.row_off(q.stride, b, y, h), gin = gb + pl.row_off(dout.stride, b, y, h);
        const float* const qr = kBF ? widen_row(Qw.data(), qin, q.stride[3], 1) : qin.f32();
        const float* const gr = g_copy ? widen_row(Gt.data(), gin, dout.stride[3], dout.stride[5]) : gin.f32();
        const float* const Lr = L + (bh * pl.R + y) * W;
        const float* const dlr = dlse ? dlse + (bh * pl.R + y) * W : nullptr;
        const OutPtr dq_out = DQ + ((b * pl.R + y) * W * pl.NH + h) * D;
        float* const dq_row = kBF ? DQw.data() : dq_out.f32();
        const int64_t ht = pl.nht == 1 ? 0 : h;
        const float* const brow = pl.bias_row(ht, y, 0);  // [kw][Ws]
        float* const dBt = dbias ? dB.data() + t * tsize + ht * tc : nullptr;
        if (has_bias && pl.n_int > 0) pl.window_bias(brow, 0, bint.data());
        const float* const Bint = has_bias ? bint.data() : nullptr;
        if (dBt) std::fill(dsum.begin(), dsum.end(), 0.0f);
        std::fill(zK.begin(), zK.end(), 0.0f);
        std::fill(zV.begin(), zV.end(), 0.0f);
        auto zone_at = [&](int64_t x) { return (x < zl ? x : zl + x - zr) * D; };
        // out[0:D] = acc * mul (the first query head) or += (the others)
        auto put = [&](float* o, const auto& acc, float mul) {
          constexpr int n = (int)(sizeof(acc) / sizeof(acc[0]));
          const Vec<float> m = splat<float>(mul);
          // (stream_kv: one query head, always the first)
          NA_UNROLL
          for (int d = 0; d < n; ++d)
            store_out(o + d * N, first ? acc[d] * m : loadu(o + d * N) + acc[d] * m, stream_kv);
        };
        // P and dS of the query at column x from its logits S (plus the bias row Bj, unless null)
        // and dP (window column j at j): P = exp(S - lse), dS = P (dP - coef), coef =
        // rowsum(P dP) - dlse (returned); lanes past kw are zero. An interior query's dS is added
        // to dsum for the table's gradient.
        auto form_rows = [&](int64_t x, const float* S, const float* dP, float* P_out, float* dS_out,
                             const float* Bj, bool interior) -> float {
          const Vec<float> lv = splat<float>(Lr[x]);
          Vec<float> p[kBwdBandMaxNV], dp[kBwdBandMaxNV];
          Vec<float> acc = splat<float>(0.0f);
          const int64_t nc = cw / N;
          for (int64_t e = 0; e < nc; ++e) {
            Vec<float> sv = loadu(S + e * N);
            if (Bj) sv += loadu(Bj + e * N);
            p[e] = vexp(sv - lv);
            dp[e] = loadu(dP + e * N);
            if (e * N + N > kw) {
              p[e] = first_lanes(p[e], kw - e * N);
              dp[e] = first_lanes(dp[e], kw - e * N);
            }
            acc += p[e] * dp[e];
          }
          const float coef = lane_sum(acc) - (dlr ? dlr[x] : 0.0f);
          const Vec<float> cv = splat<float>(coef);
          for (int64_t e = 0; e < nc; ++e) {
            const Vec<float> ds = p[e] * (dp[e] - cv);
            storeu(P_out + e * N, p[e]);
            storeu(dS_out + e * N, ds);
            if (dBt && interior) storeu(dsum.data() + e * N, loadu(dsum.data() + e * N) + ds);
          }
          return coef;
        };
        // Border slot sl's bias row over the run of kw keys from ws (key ws + c at column c; -inf
        // where that key is not in the window) into bbord, its table columns (-1: none) into bcol.
        // "clamp": the window is that run (a causal one's tail already -inf).
        auto border_row = [&](int64_t sl, int64_t ws) {
          if (!remap) {
            pl.window_bias(brow, sl, bbord.data());
            for (int64_t j = 0; j < kw; ++j) bcol[j] = pl.bx[j * pl.Ws + sl];
            return;
          }
          std::fill(bbord.begin(), bbord.begin() + kw, -std::numeric_limits<float>::infinity());
          std::fill(bcol.begin(), bcol.end(), -1);
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t key = pl.kidx[j * pl.Ws + sl];
            if (key == W) continue;
            bbord[key - ws] = brow[j * pl.Ws + sl];
            bcol[key - ws] = pl.bx[j * pl.Ws + sl];
          }
        };
        // the zones' dK/dV of the T queries at columns x.. whose window starts at ws (query t's P and
        // dS rows at P + t * rs, dS + t * rs): per zone key, the queries' terms summed in registers,
        // DZ channel vectors at a time
        auto zone_sum = [&](auto tv, int64_t x, int64_t ws, const float* P, const float* dS, int64_t rs) {
          constexpr int T = decltype(tv)::value;
          if (ws >= zl && ws + kw <= zr) return;
          for (int c0 = 0; c0 < DV; c0 += DZ) {
            Vec<float> qv[T][DZ], gv[T][DZ];
            NA_UNROLL
            for (int t = 0; t < T; ++t)
              NA_UNROLL
              for (int d = 0; d < DZ; ++d) {
                qv[t][d] = loadu(qr + (x + t) * qxs + (c0 + d) * N);
                gv[t][d] = loadu(gr + (x + t) * gxs + (c0 + d) * N);
              }
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t key = ws + j;
              if (key >= zl && key < zr) continue;
              float* zk = zK.data() + zone_at(key) + c0 * N;
              float* zv = zV.data() + zone_at(key) + c0 * N;
              Vec<float> ak[DZ], av[DZ];
              NA_UNROLL
              for (int d = 0; d < DZ; ++d) {
                ak[d] = loadu(zk + d * N);
                av[d] = loadu(zv + d * N);
              }
              NA_UNROLL
              for (int t = 0; t < T; ++t) {
                const Vec<float> ds = splat<float>(dS[t * rs + j]), p = splat<float>(P[t * rs + j]);
                NA_UNROLL
                for (int d = 0; d < DZ; ++d) {
                  ak[d] += ds * qv[t][d];
                  av[d] += p * gv[t][d];
                }
              }
              NA_UNROLL
              for (int d = 0; d < DZ; ++d) {
                storeu(zk + d * N, ak[d]);
                storeu(zv + d * N, av[d]);
              }
            }
          }
        };
        auto ring_row = [&](float* base, int64_t sl) { return base + (sl & (ring - 1)) * cw; };
        // the row of slot sl is written at its ring place and, in the first HIST, mirrored
        auto mirror = [&](int64_t sl) {
          const int64_t pos = sl & (ring - 1);
          if (pos < HIST) {
            std::memcpy(ringP.data() + (pos + ring) * cw, ringP.data() + pos * cw, cw * sizeof(float));
            std::memcpy(ringS.data() + (pos + ring) * cw, ringS.data() + pos * cw, cw * sizeof(float));
          }
        };
        // S (scaled) and dP of Q queries from q/dout token x (the first one's window at band column
        // wo from start) into rows 0..Q-1 of CSb / CDb: the band in passes of at most kBandMaxNV
        // vectors (AVX2: two)
        auto logits = [&](auto qv, int64_t x, int64_t start, int64_t wo, bool pf, auto stepv) {
          constexpr int Q = decltype(qv)::value, STEP = decltype(stepv)::value;
          band_logits_passes<Q, STEP>(nv, qr + x * qxs, qxs, D, Kt.data() + start, Wk, scale, wo, CSb.data() + 32, CS,
                                      pf);
          band_logits_passes<Q, STEP>(nv, gr + x * gxs, gxs, D, Vt.data() + start, Wk, 1.0f, wo, CDb.data() + 32, CS,
                                      pf);
        };
        // T adjacent queries from column x sharing one window at ws (anywhere in the band; T = 1:
        // one query) into rows 0..T-1 of CSb/CDb
        auto shared_logits = [&](auto tv, int64_t x, int64_t ws) {
          const int64_t st0 = std::min(ws, Wk - nv * N);
          logits(tv, x, st0, ws - st0, false, std::integral_constant<int, 0>{});
        };
        // dq of T interior slots from sl: dS . K (the key tokens read in place)
        auto dq_tile = [&](auto tv, int64_t sl) {
          constexpr int T = decltype(tv)::value;
          const Vec<float> sv = splat<float>(scale);
          for (int c0 = 0; c0 < DV; c0 += DC) {
            Vec<float> acc[T][DC];
            NA_UNROLL
            for (int i = 0; i < T; ++i)
              NA_UNROLL
              for (int d = 0; d < DC; ++d) acc[i][d] = splat<float>(0.0f);
            pv_tile_diag_any<T, DC>(ring_row(ringS.data(), sl), 1, kr + (pl.xlo + sl + off0) * kxs + c0 * N, kxs, kw,
                                    acc, cw);
            NA_UNROLL
            for (int i = 0; i < T; ++i)
              NA_UNROLL
              for (int d = 0; d < DC; ++d)
                store_out(dq_row + (pl.xlo + sl + i) * qts + (c0 + d) * N, acc[i][d] * sv, stream_dq);
          }
        };
        // dK, dV of T keys from x0 (all in [zl, zr)): the rows of slots u0.., read at column
        // kw - 1 - u of row u0 + t + u
        auto key_tile = [&](auto tv, int64_t x0) {
          constexpr int T = decltype(tv)::value;
          const int64_t u0 = x0 - pl.xlo - offe;
          Vec<float> acc[T][DC];
          for (int pass = 0; pass < 2; ++pass)
            for (int c0 = 0; c0 < DV; c0 += DC) {
              NA_UNROLL
              for (int i = 0; i < T; ++i)
                NA_UNROLL
                for (int d = 0; d < DC; ++d) acc[i][d] = splat<float>(0.0f);
              const float* Wt = ring_row(pass == 0 ? ringS.data() : ringP.data(), u0) + kw - 1;
              const float* A = (pass == 0 ? qr + (pl.xlo + u0) * qxs : gr + (pl.xlo + u0) * gxs) + c0 * N;
              pv_tile_diag_any<T, DC>(Wt, cw - 1, A, pass == 0 ? qxs : gxs, kw, acc, cw);
              float* o = (pass == 0 ? dk_row : dv_row) + c0 * N;
              NA_UNROLL
              for (int i = 0; i < T; ++i) put(o + (x0 + i) * kts, acc[i], pass == 0 ? scale : 1.0f);
            }
        };
        int64_t kx = zl;  // the next key of the middle without its dK/dV
        for (int64_t sa = 0; sa < pl.n_int; sa += SEG) {
          const int64_t sb = std::min(pl.n_int, sa + SEG);
          // the segment's rows: band tiles of MQ slots, then single slots
          int64_t sl = sa;
          for (; sl + MQ <= std::min(sb, n4); sl += MQ) {
            const int64_t want = pl.xlo + sl + off0;
            const int64_t start = std::min(want, Wk - nv * N), wo = want - start;
            logits(std::integral_constant<int, MQ>{}, pl.xlo + sl, start, wo, sl + 2 * MQ < n4,
                   std::integral_constant<int, 1>{});
            for (int i = 0; i < MQ; ++i) {
              form_rows(pl.xlo + sl + i, CSb.data() + 32 + i * CS, CDb.data() + 32 + i * CS,
                        ring_row(ringP.data(), sl + i), ring_row(ringS.data(), sl + i), Bint, true);
              mirror(sl + i);
            }
          }
          for (; sl < sb; ++sl) {
            shared_logits(std::integral_constant<int, 1>{}, pl.xlo + sl, pl.xlo + sl + off0);
            form_rows(pl.xlo + sl, CSb.data() + 32, CDb.data() + 32, ring_row(ringP.data(), sl),
                      ring_row(ringS.data(), sl), Bint, true);
            mirror(sl);
          }
          for (sl = sa; sl < sb; ++sl)
            zone_sum(std::integral_constant<int, 1>{}, pl.xlo + sl, pl.xlo + sl + off0, ring_row(ringP.data(), sl),
                     ring_row(ringS.data(), sl), 0);
          // dq of the segment
          for (sl = sa; sl + TQ <= sb; sl += TQ) dq_tile(std::integral_constant<int, TQ>{}, sl);
          if (sl < sb)
            dispatch_nc(sb - sl, [&](auto tv) {
              if constexpr (decltype(tv)::value < TQ) dq_tile(tv, sl);
            });
          // the middle keys whose last seeing slot is formed: x - xlo - off[0] < sb
          const int64_t xe = std::min(zr, sb + pl.xlo + off0);
          for (; kx + TQ <= xe; kx += TQ) key_tile(std::integral_constant<int, TQ>{}, kx);
          if (sb == pl.n_int)
            for (; kx < xe; kx += TQ)
              dispatch_nc(std::min<int64_t>(TQ, xe - kx), [&](auto tv) {
                if constexpr (decltype(tv)::value <= TQ) key_tile(tv, kx);
              });
        }
        // border queries: rows, dq, and their dK/dV (all in the zones), up to MQ adjacent queries
        // that share one window (a stride group) together: their logits against each key vector
        // loaded once, dq as a shared-window P.V tile, each zone key's dK/dV loaded and stored once
        for (int64_t sl = pl.n_int; sl < pl.Ws;) {
          const int64_t x = pl.slotx[sl];
          if (x >= W) {  // dummy slot
            ++sl;
            continue;
          }
          const int64_t ws = bb.ws[sl - pl.n_int];
          int64_t ng = 1;
          while (ng < MQ && sl + ng < pl.Ws && x + ng < W && pl.slotx[sl + ng] == x + ng &&
                 bb.ws[sl + ng - pl.n_int] == ws)
            ++ng;
          dispatch_nc(ng, [&](auto tv) {
            constexpr int T = decltype(tv)::value;
            if constexpr (T <= MQ) {
              shared_logits(tv, x, ws);
              for (int t = 0; t < T; ++t) {
                if (border_bias || dBt) border_row(sl + t, ws);
                float* const St = bS.data() + t * cw;
                const float coef = form_rows(x + t, CSb.data() + 32 + t * CS, CDb.data() + 32 + t * CS,
                                             bP.data() + t * cw, St, border_bias ? bbord.data() : nullptr, false);
                if (dBt) {
                  for (int64_t j = 0; j < kw; ++j)
                    if (bcol[j] >= 0) dBt[bcol[j]] += St[j];
                  // a "zero" non-key: logit = its bias, dP = 0 (a zero value), so dS = -P coef
                  if (pl.border == kZero)
                    for (int64_t j = 0; j < kw; ++j)
                      if (pl.kidx[j * pl.Ws + sl + t] == W)
                        dBt[pl.bx[j * pl.Ws + sl + t]] -= std::exp(brow[j * pl.Ws + sl + t] - Lr[x + t]) * coef;
                }
              }
              const Vec<float> sv = splat<float>(scale);
              for (int c0 = 0; c0 < DV; c0 += DG) {
                Vec<float> acc[T][DG];
                NA_UNROLL
                for (int t = 0; t < T; ++t)
                  NA_UNROLL
                  for (int d = 0; d < DG; ++d) acc[t][d] = splat<float>(0.0f);
                pv_tile_shared<T, DG>(bS.data(), 1, kr + ws * kxs + c0 * N, kxs, kw, acc, cw);
                NA_UNROLL
                for (int t = 0; t < T; ++t)
                  NA_UNROLL
                  for (int d = 0; d < DG; ++d) storeu(dq_row + (x + t) * qts + (c0 + d) * N, acc[t][d] * sv);
              }
              zone_sum(tv, x, ws, bP.data(), bS.data(), cw);
            }
          });
          sl += ng;
        }
        if (dBt && pl.n_int > 0)
          for (int64_t j = 0; j < kw; ++j) dBt[pl.bx[j * pl.Ws]] += dsum[j];
        // the zones' keys
        for (int64_t x = 0; x < W; ++x) {
          if (x == zl) x = zr;
          if (x >= W) break;
          Vec<float> a[DV];
          NA_UNROLL
          for (int d = 0; d < DV; ++d) a[d] = loadu(zK.data() + zone_at(x) + d * N);
          put(dk_row + x * kts, a, scale);
          NA_UNROLL
          for (int d = 0; d < DV; ++d) a[d] = loadu(zV.data() + zone_at(x) + d * N);
          put(dv_row + x * kts, a, 1.0f);
        }
        if (kBF) narrow_row(dq_out, dq_row, pl.NH * D);
      }
      if (kBF && !split) {
        narrow_row(DK + kv_row, dk_row, pl.NKV * D);
        narrow_row(DVo + kv_row, dv_row, pl.NKV * D);
      }
    }
    if (stream_dq || stream_kv) stream_fence();
  });
  if (split)  // dK = slice 0 + slice 1 + ... (each element's sum in slice order)
    par.for_each(0, kv_elems / N, 1024, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo * N; e < hi * N; e += N) {
        Vec<float> a = loadu(DKs.data() + e), c = loadu(DVs.data() + e);
        for (int64_t g = 1; g < pl.G; ++g) {
          a += loadu(DKs.data() + g * kv_elems + e);
          c += loadu(DVs.data() + g * kv_elems + e);
        }
        (DK + e).store(a);
        (DVo + e).store(c);
      }
    });
  if (dbias)
    for (int64_t e = 0; e < tsize; ++e) {
      float s = 0.0f;
      for (int64_t t = 0; t < ntasks; ++t) s += dB[t * tsize + e];
      dbias[e] = s;
    }
}
#endif

// Whether the band backward may take a window (the checks that need no plan; the others are in
// band_backward_plan): one key row per query row, dilation 1 (dilated ones as sub-grids), a width
// it takes.
static bool band_backward_window(const Window& w) {
#if NA_X86V3
  return w.kernel[0] == 1 && w.kernel[1] == 1 && w.dilation[2] == 1 && band_backward_nv(w.kernel[2]) > 0;
#else
  (void)w;
  return false;
#endif
}

// The float32 band backward (float32, bfloat16 or float16 tensors) where it applies (see above); false: not taken.
static bool backward_band(const View6& dout, const View6& q, const View6& k, const View6& v, const float* L,
                          const float* dlse, OutPtr DQ, OutPtr DK, OutPtr DV, float* dbias, const Plan<float>& pl,
                          float scale, const Parallel& par) {
#if NA_X86V3
  const BandBackward bb = band_backward_plan(dout, q, k, v, pl);
  if (bb.nv == 0) return false;
  dispatch_fast_width(pl.D, [&](auto dv) {
    backward_band_f32<decltype(dv)::value>(dout, q, k, v, L, dlse, DQ, DK, DV, dbias, pl, bb, scale, par);
  });
  return true;
#else
  (void)dout, (void)q, (void)k, (void)v, (void)L, (void)dlse, (void)DQ, (void)DK, (void)DV, (void)dbias, (void)pl,
      (void)scale, (void)par;
  return false;
#endif
}

}  // namespace
}  // namespace neighborhood
}  // namespace alterops
