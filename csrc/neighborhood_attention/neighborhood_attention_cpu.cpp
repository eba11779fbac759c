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
//   neighborhood_cpu_cells.h     float32 maps whose windows are whole cells (dense per cell)
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
// thread count, so its results are the same bits whatever the number of threads. bfloat16 and
// float16 are computed in float: at the fast widths the float32 forward and the band backward read
// and write them themselves (their pointers carry the element type); float64 in double.
// Dilated maps: the forward (and the float32 backward of long 1-D windows) runs once per dilation
// sub-grid, on strided views, as an op of dilation 1 (see "dilation as sub-grids" below).
// Maps whose every window is a whole cell (each dilated axis one window long per sub-grid, or kernel
// 1) run in float32 as dense attention per cell instead, both ways (neighborhood_cpu_cells.h).

#include "neighborhood_attention.h"
#include "neighborhood_cpu_backward.h"
#include "neighborhood_cpu_band_backward.h"
#include "neighborhood_cpu_cells.h"
#include "neighborhood_cpu_forward.h"

#include <array>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>

namespace alterops {
namespace neighborhood {
namespace {

// ---- entry points ------------------------------------------------------------------------

// The storage type of a float32 kernel's tensors of scalar_t (float, BFloat16 or Half).
template <typename scalar_t>
static constexpr Elem elem_of() {
  return std::is_same<scalar_t, float>::value      ? Elem::F32
         : std::is_same<scalar_t, BFloat16>::value ? Elem::BF16
                                                   : Elem::F16;
}
template <typename scalar_t>
static constexpr bool f32_kernels = std::is_same<scalar_t, float>::value || std::is_same<scalar_t, BFloat16>::value ||
                                    std::is_same<scalar_t, Half>::value;

// A plan depends on the shapes, the window and the bias table's values alone, and the same ones
// come back call after call (each step of an inference loop; the dilation sub-grids of one call):
// the last kPlanCacheSize plans (of at most kPlanCacheBytes each) are kept, with a copy of their
// table (compared bit for bit), and shared read-only by the calls that use them. Building the plan
// of a 1-D row of 4096 tokens with k = 65 was 0.6 ms of work on one thread per call, 5% of the
// forward of B = 4, 8 heads of 64 on a 2-core Xeon. alterops.empty_cache() drops them
// (plan_cache_clear).
constexpr size_t kPlanCacheSize = 4;
constexpr int64_t kPlanCacheBytes = int64_t(16) << 20;
template <typename T>
static int64_t plan_bytes(const Plan<T>& p) {
  return (int64_t)((p.slotx.size() + p.kidx.size() + p.bx.size() + p.by.size()) * sizeof(int32_t) +
                   (p.off.size() + p.goff.size() + p.rowpos.size() + p.row_t.size() + p.row_y.size()) * sizeof(int64_t) +
                   p.rowvalid.size() + p.biascol.size() * sizeof(T));
}
using PlanKey = std::array<int64_t, 23>;
template <typename T>
struct PlanCache {
  struct Entry {
    PlanKey key;
    std::vector<T> table;
    std::shared_ptr<const Plan<T>> plan;
  };
  std::mutex mu;
  std::deque<Entry> entries;  // most recent first
  static PlanCache& get() {
    static PlanCache* c = new PlanCache();  // (never destroyed: no destructor order at exit)
    return *c;
  }
  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mu);
    int64_t n = 0;
    for (const Entry& e : entries) n += plan_bytes(*e.plan) + (int64_t)(e.table.size() * sizeof(T));
    return n;
  }
  void clear() {
    std::deque<Entry> gone;
    {
      std::lock_guard<std::mutex> lock(mu);
      gone.swap(entries);
    }
  }
};
static int64_t plan_cache_bytes() { return PlanCache<float>::get().bytes() + PlanCache<double>::get().bytes(); }
static void plan_cache_clear() {
  PlanCache<float>::get().clear();
  PlanCache<double>::get().clear();
}

template <typename T>
static std::shared_ptr<const Plan<T>> make_plan(const View6& q, const View6& k, const Window& win, const T* table,
                                                int64_t bias_heads, bool zero_rows_if = false) {
  const PlanKey key{q.size[0], q.size[1], q.size[2], q.size[3], q.size[4], q.size[5], k.size[4],
                win.kernel[0], win.kernel[1], win.kernel[2], win.dilation[0], win.dilation[1], win.dilation[2],
                win.stride[0], win.stride[1], win.stride[2], win.causal[0], win.causal[1], win.causal[2],
                win.border, zero_rows_if, table != nullptr, table != nullptr ? bias_heads : 0};
  // the table: bias_heads x (2kt - 1) x (2kh - 1) x (2kw - 1), contiguous
  const int64_t tn = table == nullptr ? 0
                                      : bias_heads * (2 * win.kernel[0] - 1) * (2 * win.kernel[1] - 1) *
                                            (2 * win.kernel[2] - 1);
  PlanCache<T>& pc = PlanCache<T>::get();
  {
    std::lock_guard<std::mutex> lock(pc.mu);
    for (auto it = pc.entries.begin(); it != pc.entries.end(); ++it)
      if (it->key == key && (tn == 0 || std::memcmp(table, it->table.data(), tn * sizeof(T)) == 0)) {
        typename PlanCache<T>::Entry e = std::move(*it);
        pc.entries.erase(it);
        pc.entries.push_front(std::move(e));
        return pc.entries.front().plan;
      }
  }
  std::shared_ptr<const Plan<T>> p = std::make_shared<Plan<T>>(q, k, win, table, bias_heads, zero_rows_if);
  if (plan_bytes(*p) + tn * (int64_t)sizeof(T) <= kPlanCacheBytes) {
    std::lock_guard<std::mutex> lock(pc.mu);
    pc.entries.push_front({key, std::vector<T>(table, table + tn), p});
    if (pc.entries.size() > kPlanCacheSize) pc.entries.pop_back();
  }
  return p;
}

template <typename scalar_t, typename T>
static void forward_typed(const ForwardArgs& a, const Parallel& par) {
  const std::shared_ptr<const Plan<T>> plan = make_plan<T>(a.q, a.k, a.win, static_cast<const T*>(a.bias), a.bias_heads);
  const Plan<T>& pl = *plan;
  scalar_t* out = static_cast<scalar_t*>(a.out);
  T* lse = static_cast<T*>(a.lse);
  if constexpr (f32_kernels<scalar_t>)
    if (forward_fast(a.q, a.k, a.v, OutPtr{reinterpret_cast<char*>(out), elem_of<scalar_t>()}, lse, pl,
                     static_cast<T>(a.scale), par))
      return;
  forward_impl<scalar_t, T>(a.q, a.k, a.v, out, lse, pl, static_cast<T>(a.scale), par);
}

void forward_dense(const ForwardArgs& a, const Parallel& par) {
  switch (a.dtype) {
    case DType::Float32: forward_typed<float, float>(a, par); break;
    case DType::Float64: forward_typed<double, double>(a, par); break;
    case DType::BFloat16: forward_typed<BFloat16, float>(a, par); break;
    case DType::Float16: forward_typed<Half, float>(a, par); break;
    default: break;  // the binding lets no other dtype through
  }
}

template <typename scalar_t, typename T>
static void backward_typed(const BackwardArgs& a, const Parallel& par) {
  const T* table = static_cast<const T*>(a.bias);
  auto general = [&](const Plan<T>& pl) {
    backward_impl<scalar_t, T>(a.dout, a.q, a.k, a.v, static_cast<const T*>(a.lse), static_cast<const T*>(a.dlse),
                               static_cast<scalar_t*>(a.dq), static_cast<scalar_t*>(a.dk),
                               static_cast<scalar_t*>(a.dv), static_cast<T*>(a.dbias), pl,
                               static_cast<T>(a.scale), par);
  };
  if constexpr (f32_kernels<scalar_t>)
    if (band_backward_window(a.win)) {
      // the band's plan: "zero"/"mask" border columns as border slots (as the forward's)
      const std::shared_ptr<const Plan<T>> plan = make_plan<T>(a.q, a.k, a.win, table, a.bias_heads);
      const Plan<T>& pl = *plan;
      if (backward_band(a.dout, a.q, a.k, a.v, static_cast<const T*>(a.lse), static_cast<const T*>(a.dlse),
                        OutPtr{static_cast<char*>(a.dq), elem_of<scalar_t>()},
                        OutPtr{static_cast<char*>(a.dk), elem_of<scalar_t>()},
                        OutPtr{static_cast<char*>(a.dv), elem_of<scalar_t>()}, static_cast<T*>(a.dbias), pl,
                        static_cast<T>(a.scale), par))
        return;
      if (a.win.border == kClamp) return general(pl);
    }
  // "zero"/"mask": every column interior, on key rows with zero margins (no border blocks)
  general(*make_plan<T>(a.q, a.k, a.win, table, a.bias_heads, true));
}

void backward_dense(const BackwardArgs& a, const Parallel& par) {
  switch (a.dtype) {
    case DType::Float32: backward_typed<float, float>(a, par); break;
    case DType::Float64: backward_typed<double, double>(a, par); break;
    case DType::BFloat16: backward_typed<BFloat16, float>(a, par); break;
    case DType::Float16: backward_typed<Half, float>(a, par); break;
    default: break;
  }
}

// ---- dilation as sub-grids -----------------------------------------------------------------
// A dilation d on an axis splits it into d sub-grids (the positions congruent modulo d) that
// never read each other's keys. On a sub-grid the neighbourhood is the same rule with dilation 1:
// "clamp" is defined on the sub-grid (with its stride groups and causal windows), the centred
// window of "mask" / "zero" holds the keys i + d (j - left), which are the sub-grid's neighbours
// ig + j - left and in the map exactly when they are in the sub-grid, and the bias index
// (key - query) / d is the sub-grid's key minus query. So a dilated op runs as one op of
// dilation 1 per sub-grid, on strided views of q, k, v (dout), its outputs written to buffers of
// the sub-grid's size and copied into place (dK/dV too: each key belongs to one sub-grid). This
// gives the dilated ops every route of dilation 1 (the forward's and backward's bands, the row
// groups that share key rows); the dilated map otherwise interleaves rows and columns that share
// no keys. dbias is summed over the sub-grids in their order (deterministic).
// An axis of kernel 1 has the query alone for its window whatever its dilation: it is not split.
// Taken where it paid (Zen 4, 2 threads, float32, both builds timed in turns in one process;
// bench/results/cpu-amd-epyc-avx512-2core/neighborhood/dilation-subgrids-ab.json): the forward
// when every split axis's shortest sub-grid (length // dilation) holds a window. AVX-512, before
// -> after: 2-D 56x56, k = 7, dilation 2 / 4 / 8: 6.1 -> 5.5, 7.2 -> 5.6, 10.2 -> 9.1 ms; 3-D
// 8x32x32, k = (3, 7, 7), dilation (1, 2, 2): 9.3 -> 6.3; 1-D L = 4096, k = 65, dilation 2:
// 28.1 -> 26.3; but k = 33, dilation 4: 18.1 -> 19.2 (the output copy). AVX2: 2-D dilation 8:
// 10.6 -> 8.9, 3-D 10.9 -> 8.6, 1-D 35.4 -> 31.8, but 2-D dilation 2: 5.7 -> 6.2 ms. The
// backward only where the sub-grids take the band backward (float32, only the W axis split, a
// window of its width, sub-grids of at least two windows): 1-D k = 65, dilation 2, forward +
// backward 130 -> 101 ms (AVX2 139 -> 122); k = 33, dilation 4: 75 -> 68. Elsewhere the dilated
// backward was as fast or faster than the sub-grids' (2-D 56x56, dilation 2: 10%).
static bool split_axis(const Window& w, int a) { return w.dilation[a] > 1 && w.kernel[a] > 1; }

static bool subgrids_forward(const View6& q, const Window& w) {
  bool any = false;
  for (int a = 0; a < 3; ++a) {
    if (!split_axis(w, a)) continue;
    any = true;
    if (q.size[1 + a] / w.dilation[a] < w.kernel[a]) return false;
  }
  return any;
}

static bool subgrids_backward(const View6& q, const Window& w, DType dtype) {
#if NA_X86V3
  return dtype != DType::Float64 && w.kernel[0] == 1 && w.kernel[1] == 1 && split_axis(w, 2) &&
         band_backward_nv(w.kernel[2]) > 0 && q.size[3] / w.dilation[2] >= 2 * w.kernel[2];
#else
  (void)q, (void)w, (void)dtype;
  return false;
#endif
}

static int64_t elem_size(DType t) { return t == DType::Float64 ? 8 : t == DType::Float32 ? 4 : 2; }
static int64_t acc_size(DType t) { return t == DType::Float64 ? 8 : 4; }

struct SubGrids {
  int64_t d[3], L[3];  // dilation and full length per axis (T, H, W)
  int64_t count() const { return d[0] * d[1] * d[2]; }
  // sub-grid g: residues r and lengths n per axis (n = 0: no position of the map)
  void at(int64_t g, int64_t r[3], int64_t n[3]) const {
    r[2] = g % d[2];
    r[1] = g / d[2] % d[1];
    r[0] = g / (d[2] * d[1]);
    for (int a = 0; a < 3; ++a) n[a] = r[a] < L[a] ? (L[a] - r[a] + d[a] - 1) / d[a] : 0;
  }
};

static SubGrids subgrids(const View6& q, const Window& w) {
  SubGrids s{};
  for (int a = 0; a < 3; ++a) {
    s.d[a] = split_axis(w, a) ? w.dilation[a] : 1;
    s.L[a] = q.size[1 + a];
  }
  return s;
}

static View6 sub_view(const View6& t, const int64_t r[3], const int64_t n[3], const int64_t d[3], int64_t es) {
  View6 s = t;
  int64_t off = 0;
  for (int a = 0; a < 3; ++a) {
    off += r[a] * t.stride[1 + a];
    s.size[1 + a] = n[a];
    s.stride[1 + a] = t.stride[1 + a] * d[a];
  }
  s.data = static_cast<const char*>(t.data) + off * es;
  return s;
}

// s.q, s.k, s.v: the views of sub-grid (r, n) of a's (ForwardArgs or BackwardArgs).
template <class Args>
static void sub_qkv(Args& s, const Args& a, const SubGrids& sg, const int64_t r[3], const int64_t n[3], int64_t es) {
  s.q = sub_view(a.q, r, n, sg.d, es);
  s.k = sub_view(a.k, r, n, sg.d, es);
  s.v = sub_view(a.v, r, n, sg.d, es);
}

// o[e] = p[e] (first) or o[e] + p[e] for e < n.
template <typename T>
static void store_or_add(void* o, const void* p, int64_t n, bool first) {
  T* ot = static_cast<T*>(o);
  const T* pt = static_cast<const T*>(p);
  for (int64_t e = 0; e < n; ++e) ot[e] = first ? pt[e] : ot[e] + pt[e];
}

// f(full, sub) for each position of sub-grid (r, n) in a contiguous (B, T, H, W) map: its index
// there and in the sub-grid's own contiguous (B, n0, n1, n2) map (a (B, T, H, W, heads, D)
// tensor has a token of heads * D elements per position; lse, (B, heads, T, H, W), is such a map
// with B * heads for B and one element per position).
template <class F>
static void for_positions(int64_t B, const SubGrids& sg, const int64_t r[3], const int64_t n[3],
                          const Parallel& par, const F& f) {
  par.for_each(0, B * n[0] * n[1], 16, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t y = row % n[1], t = row / n[1] % n[0], b = row / (n[1] * n[0]);
      const int64_t full = ((b * sg.L[0] + r[0] + t * sg.d[0]) * sg.L[1] + r[1] + y * sg.d[1]) * sg.L[2] + r[2];
      for (int64_t x = 0; x < n[2]; ++x) f(full + x * sg.d[2], row * n[2] + x);
    }
  });
}

// The sub-grid's tensor of `bytes` per position into its places in the full one, or the full
// one's values at the sub-grid into the sub-grid's tensor.
static void scatter(void* full, const void* sub, int64_t B, const SubGrids& sg, const int64_t r[3],
                    const int64_t n[3], int64_t bytes, const Parallel& par) {
  char* fb = static_cast<char*>(full);
  const char* sb = static_cast<const char*>(sub);
  for_positions(B, sg, r, n, par, [&](int64_t f, int64_t s) { std::memcpy(fb + f * bytes, sb + s * bytes, bytes); });
}
static void gather(const void* full, void* sub, int64_t B, const SubGrids& sg, const int64_t r[3],
                   const int64_t n[3], int64_t bytes, const Parallel& par) {
  const char* fb = static_cast<const char*>(full);
  char* sb = static_cast<char*>(sub);
  for_positions(B, sg, r, n, par, [&](int64_t f, int64_t s) { std::memcpy(sb + s * bytes, fb + f * bytes, bytes); });
}

void forward(const ForwardArgs& a, const Parallel& par) {
  if (a.dtype == DType::Float32 && cells_route(a.q, a.k, a.v, nullptr, a.win)) return forward_cells(a, par);
  if (!subgrids_forward(a.q, a.win)) return forward_dense(a, par);
  const SubGrids sg = subgrids(a.q, a.win);
  const int64_t B = a.q.size[0], NH = a.q.size[4], D = a.q.size[5];
  const int64_t es = elem_size(a.dtype), as = acc_size(a.dtype);
  int64_t r[3], n[3];
  sg.at(0, r, n);  // the largest sub-grid
  const int64_t most = n[0] * n[1] * n[2];
  RawBuf<char> out(B * most * NH * D * es), lse(B * NH * most * as);
  ForwardArgs s = a;
  for (int a2 = 0; a2 < 3; ++a2) s.win.dilation[a2] = 1;
  s.out = out.data();
  s.lse = lse.data();
  for (int64_t g = 0; g < sg.count(); ++g) {
    sg.at(g, r, n);
    if (n[0] * n[1] * n[2] == 0) continue;
    sub_qkv(s, a, sg, r, n, es);
    forward_dense(s, par);
    scatter(a.out, out.data(), B, sg, r, n, NH * D * es, par);
    scatter(a.lse, lse.data(), B * NH, sg, r, n, as, par);
  }
}

void backward(const BackwardArgs& a, const Parallel& par) {
  if (a.dtype == DType::Float32 && cells_route(a.q, a.k, a.v, &a.dout, a.win)) return backward_cells(a, par);
  if (!subgrids_backward(a.q, a.win, a.dtype)) return backward_dense(a, par);
  const SubGrids sg = subgrids(a.q, a.win);
  const int64_t B = a.q.size[0], NH = a.q.size[4], NKV = a.k.size[4], D = a.q.size[5];
  const int64_t es = elem_size(a.dtype), as = acc_size(a.dtype);
  int64_t r[3], n[3];
  sg.at(0, r, n);
  const int64_t most = n[0] * n[1] * n[2];
  int64_t table = 0;  // elements of the bias table
  if (a.dbias) {
    table = a.bias_heads;
    for (int a2 = 0; a2 < 3; ++a2) table *= 2 * a.win.kernel[a2] - 1;
  }
  RawBuf<char> dq(B * most * NH * D * es), dk(B * most * NKV * D * es), dv(B * most * NKV * D * es);
  RawBuf<char> lse(B * NH * most * as), dlse(a.dlse ? B * NH * most * as : 1), db(table * as);
  BackwardArgs s = a;
  for (int a2 = 0; a2 < 3; ++a2) s.win.dilation[a2] = 1;
  s.dq = dq.data();
  s.dk = dk.data();
  s.dv = dv.data();
  s.lse = lse.data();
  s.dlse = a.dlse ? dlse.data() : nullptr;
  s.dbias = a.dbias ? db.data() : nullptr;
  bool first = true;
  for (int64_t g = 0; g < sg.count(); ++g) {
    sg.at(g, r, n);
    if (n[0] * n[1] * n[2] == 0) continue;
    s.dout = sub_view(a.dout, r, n, sg.d, es);
    sub_qkv(s, a, sg, r, n, es);
    gather(a.lse, lse.data(), B * NH, sg, r, n, as, par);
    if (a.dlse) gather(a.dlse, dlse.data(), B * NH, sg, r, n, as, par);
    backward_dense(s, par);
    scatter(a.dq, dq.data(), B, sg, r, n, NH * D * es, par);
    scatter(a.dk, dk.data(), B, sg, r, n, NKV * D * es, par);
    scatter(a.dv, dv.data(), B, sg, r, n, NKV * D * es, par);
    if (a.dbias) {
      if (as == 8)
        store_or_add<double>(a.dbias, db.data(), table, first);
      else
        store_or_add<float>(a.dbias, db.data(), table, first);
    }
    first = false;
  }
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k{&forward, &backward, &unfused_dot, &unfused_sum, &unfused_scatter, &plan_cache_bytes,
                         &plan_cache_clear};
  return k;
}

}  // namespace neighborhood
}  // namespace alterops
