// Neighborhood attention on the CPU (three spatial axes T, H, W; the 2D ops run it with T = 1):
// forward and backward, fused (no attention matrix in memory beyond the logits of one query
// row per thread). Raw pointers and strides only (the arguments are described in
// neighborhood_attention.h); compiled once per instruction-set level, which selects the
// AVX-512, AVX2 + FMA or generic paths. This file holds the design notes and the entry points;
// the code is in the headers it includes, each built on the one before:
//   neighborhood_cpu_simd.h      vector type of the level, exp/log, aligned buffers, transposes
//   neighborhood_cpu_plan.h      windows and slot order (the Plan), key views, packed key rows
//   neighborhood_cpu_tiles.h     register-blocked tiles of the logits, P.V, dS.K and dK/dV sums
//   neighborhood_cpu_forward.h   forward: any dtype, and the float32 fast path
//   neighborhood_cpu_backward.h  backward
//   neighborhood_cpu_band_backward.h  float32 backward of long 1-D windows (AVX-512, AVX2)
//
// Layout trick. A "row" is one (t, y) pair. The keys of query (t, y, x) lie on kt*kh key rows
// (the product of its T and H windows) that depend only on (t, y), and in each row at columns
// that depend only on x; causal, strided and even windows only change which rows and columns
// those are (a causal window near the start holds fewer: the missing slots get -inf). For the
// "interior" columns x (every neighbour a key at x + off_j, off_j = (j - k/2) dw, or
// (j - k + 1) dw when causal, which holds where the window is centred or ends at x, inside the
// image, with stride 1) the column of neighbour j is a fixed shift; strided windows and the
// border columns take the gathered path described next.
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
// queries sum theirs per key column across the channels. With AVX-512 or AVX2, rows whose only
// key row is their own and windows wider than a vector (the 1-D ops) take the band backward
// instead: logits and dP as the forward's band, dQ and the key-centric dK/dV as P.V tiles over a
// ring of P and dS rows. Key rows are packed just before the first query row (group) that reads
// them; only rows longer than a segment prefetch (the next segment's inputs), the others are left
// to the hardware prefetcher.
// Work is split over (batch, head) pairs, and over row chunks of each pair when there are
// fewer pairs than twice the threads; each task packs the key rows of its key/value head
// (heads / heads_kv query heads share one; nothing is copied to expand them). The float32
// forward forms a long row's logits in segments of kSegmentSlots queries, and splits a map of
// one long row (1-D) into column chunks taken heads innermost (batch, chunk, head), so that the
// heads' passes over a chunk share its tokens' cache lines in L2. The backward's
// tasks have private dK/dV/dbias accumulators reduced afterwards in a fixed order (the query
// heads of a key/value head, then the row chunks; a task that is the only one of its key/value
// head writes its dK/dV rows out itself); its split depends on the shapes only, never on the
// thread count, so its results are the same bits whatever the number of threads. bfloat16 is computed in float, float64 in double.

#include "neighborhood_attention.h"
#include "neighborhood_cpu_backward.h"
#include "neighborhood_cpu_band_backward.h"
#include "neighborhood_cpu_forward.h"

namespace alterops {
namespace neighborhood {
namespace {

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
  if constexpr (std::is_same<scalar_t, float>::value)
    if (backward_band(a.dout, a.q, a.k, a.v, static_cast<const T*>(a.lse), static_cast<const T*>(a.dlse),
                      static_cast<T*>(a.dq), static_cast<T*>(a.dk), static_cast<T*>(a.dv), static_cast<T*>(a.dbias),
                      pl, static_cast<T>(a.scale), par))
      return;
  backward_impl<scalar_t, T>(a.dout, a.q, a.k, a.v, static_cast<const T*>(a.lse), static_cast<const T*>(a.dlse),
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
