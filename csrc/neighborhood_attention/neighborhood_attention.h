// Raw-pointer API of the neighborhood attention CPU kernels (no torch types): argument structs
// and the table of entry points one instruction-set build provides (see
// csrc/common/kernel_table.h). The binding (neighborhood_attention_binding.cpp) checks every
// argument first; the kernels assume checked arguments. One kernel serves the N-d ops (three
// spatial axes T, H, W; 1-D and 2-D inputs arrive with size-1 leading axes) and the 2D ops
// (T = 1).
//
//   forward:  (q, k, v, bias?) -> (out, lse)
//   backward: (dout, q, k, v, lse, dlse?, bias?) -> (dq, dk, dv, dbias?) (the op's backward
//             also takes out, which the binding checks; the kernels never read it)
//
// q, dout, out: (B, T, H, W, heads, D); k, v: (B, T, H, W, heads_kv, D), heads % heads_kv == 0,
// query head h reads key/value head h / (heads / heads_kv). Any element strides (views into a
// fused qkv work without copies). Outputs are contiguous. lse, dlse: (B, heads, T, H, W)
// contiguous, natural-log logsumexp per query in the accumulation type (float32; float64 for
// float64). bias: (bias_heads, 2kt-1, 2kh-1, 2kw-1) contiguous in the accumulation type,
// bias_heads = heads or 1.
//
// The window of a query on each axis follows alterops/neighborhood_attention_nd.py
// (NATTEN's rule for "clamp", with stride, causal windows and even kernels; a centred window
// for "mask" and "zero", which come with stride 1 and no causal axis only).
#pragma once

#include <cstdint>

#include "../common/parallel.h"
#include "../common/scalar.h"
#include "neighborhood_window.h"

namespace alterops {
namespace neighborhood {

// Head widths for which float32 has a dedicated forward and band backward: multiples of 16 up to
// 64, and 96 and 128 (their P.V tiles in passes of half the channels); the binding runs bfloat16
// forwards of these widths as float32 on float32 copies.
inline bool float_fast_width(int64_t D) { return D % 16 == 0 && (D <= 64 || D == 96 || D == 128); }

// The fast width the binding pads a head of D channels to (zero channels give the same logits,
// outputs and gradients) for the float32 kernels, 0 where it does not: D between 16 and 128, not a
// fast width, padded by at most a third (24 -> 32, 40 -> 48, 72 -> 96, 80 -> 96, 112 -> 128).
// Heads of other widths take the general routes, 2.5-3.4x slower per FLOP than the fast ones in the
// 1-D and 2-D forwards (Zen 4: 1-D, B = 4, L = 4096, k = 65, 6 heads of 80: 63-73 ms, of 96: 22-24).
inline int64_t padded_fast_width(int64_t D) {
  if (D <= 16 || D >= 128 || float_fast_width(D)) return 0;
  const int64_t w = D <= 64 ? (D + 15) / 16 * 16 : D <= 96 ? 96 : 128;
  return 3 * w <= 4 * D ? w : 0;
}

// Whether the map (T, H, W lengths L) falls apart into cells whose every query's window is the
// whole cell: every axis has kernel 1, or the "clamp" border, no causal window and length ==
// kernel * dilation (each dilation sub-grid one window long), at least one axis of the second
// kind, and at most 512 positions per cell. The float32 kernels run such maps as dense attention
// per cell (neighborhood_cpu_cells.h); the binding widens bfloat16 to them.
inline bool whole_window_cells(const int64_t L[3], const Window& w) {
  if (w.border != kClamp) return false;
  int64_t n = 1;
  for (int a = 0; a < 3; ++a) {
    if (w.kernel[a] == 1) continue;
    if (w.causal[a] || L[a] != w.kernel[a] * w.dilation[a]) return false;
    n *= w.kernel[a];
  }
  return n > 1 && n <= 512;
}

struct ForwardArgs {
  DType dtype;            // of q, k, v and out: Float32, Float64 or BFloat16
  View6 q, k, v;          // k, v: heads_kv heads, otherwise q's sizes
  void* out;              // (B, T, H, W, heads, D) contiguous, dtype
  void* lse;              // (B, heads, T, H, W) contiguous, accumulation type
  const void* bias;       // (bias_heads, 2kt-1, 2kh-1, 2kw-1) contiguous, accumulation type; nullptr: none
  int64_t bias_heads;     // heads or 1
  Window win;
  double scale;
};

struct BackwardArgs {
  DType dtype;                 // of dout, q, k, v, dq, dk, dv
  View6 dout, q, k, v;         // dout: q's sizes (out is not needed: delta = rowsum(P dP))
  const void* lse;             // (B, heads, T, H, W) contiguous, accumulation type
  const void* dlse;            // like lse; nullptr: zero
  const void* bias;            // as in ForwardArgs
  int64_t bias_heads;
  void* dq;                    // like q, contiguous
  void* dk;                    // like k, contiguous
  void* dv;                    // like v, contiguous
  void* dbias;                 // like bias (written, not accumulated into); nullptr: not wanted
  Window win;
  double scale;
};

// ---- Unfused ops (neighborhood_unfused_cpu.cpp; alterops/_na_unfused.py) ----------------
// NATTEN's separate qk / av operations as gathers over precomputed neighbour tables. Tensors are
// heads-first with the spatial axes flattened: (B, heads, N, D) rows, (B, heads, N, K) slots
// (K neighbour slots per query). Float32 or Float64, accumulated in that type.

// A (B, heads, N, D|K) tensor: data pointer, sizes and element strides.
struct View4 {
  const void* data;
  int64_t size[4];
  int64_t stride[4];
};

// out[b,h,p,c] = x[b,h,p] . y[b,h,nb[c,p]] + table[h, cell[c,p]], `fill` where ok[c,p] == 0.
struct UnfusedDotArgs {
  DType dtype;
  View4 x, y;             // (B, heads, N, D)
  const int32_t* nb;      // (K, N), every entry in [0, N)
  const uint8_t* ok;      // (K, N) or nullptr (every slot holds a key)
  const void* table;      // (heads, table_cells) contiguous, dtype; nullptr: none
  int64_t table_cells;
  const int32_t* cell;    // (K, N), entries in [0, table_cells); read only with a table
  int64_t K;
  double fill;
  void* out;              // (B, heads, N, K) contiguous
};

// out[b,h,p] = sum over c with ok[c,p] of w[b,h,p,c] * y[b,h,nb[c,p]] (slot order); slots
// without a key contribute nothing, whatever their weight.
struct UnfusedSumArgs {
  DType dtype;
  View4 w;                // (B, heads, N, K)
  View4 y;                // (B, heads, N, D)
  const int32_t* nb;
  const uint8_t* ok;
  void* out;              // (B, heads, N, D) contiguous
};

// out[b,h,j] = sum over e in [rowptr[j], rowptr[j+1]) of w[b,h,p,c] * x[b,h,p], p*K + c =
// entries[e] (entry order: one thread sums each output row, deterministic).
struct UnfusedScatterArgs {
  DType dtype;
  View4 w;                // (B, heads, N, K)
  View4 x;                // (B, heads, N, D)
  const void* rowptr;     // (N+1,) int32 or int64 (index64)
  const void* entries;    // (E,) same type
  int32_t index64;
  int64_t K;
  void* out;              // (B, heads, N, D) contiguous
};

void unfused_dot(const UnfusedDotArgs&, const Parallel&);
void unfused_sum(const UnfusedSumArgs&, const Parallel&);
void unfused_scatter(const UnfusedScatterArgs&, const Parallel&);

struct Kernels {
  void (*forward)(const ForwardArgs&, const Parallel&);
  void (*backward)(const BackwardArgs&, const Parallel&);
  void (*unfused_dot)(const UnfusedDotArgs&, const Parallel&);
  void (*unfused_sum)(const UnfusedSumArgs&, const Parallel&);
  void (*unfused_scatter)(const UnfusedScatterArgs&, const Parallel&);
  // The window plans kept for repeated calls (see make_plan): their bytes, and dropping them
  // (plans in use by a running call stay alive until it returns).
  int64_t (*plan_cache_bytes)();
  void (*plan_cache_clear)();
};

// The entry points of this build's level (defined in neighborhood_attention_cpu.cpp).
const Kernels& kernels();

}  // namespace neighborhood
}  // namespace alterops
