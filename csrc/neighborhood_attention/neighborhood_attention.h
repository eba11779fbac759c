// Raw-pointer API of the neighborhood attention 2D CPU kernels (no torch types): argument
// structs and the table of entry points one instruction-set build provides (see
// csrc/common/kernel_table.h). The binding (neighborhood_attention_binding.cpp) checks every
// argument first; the kernels assume checked arguments.
//
//   forward:  (q, k, v, bias?) -> (out, lse)
//   backward: (dout, q, k, v, out, lse, bias?) -> (dq, dk, dv, dbias?)
//
// q, k, v, dout, out: (B, H, W, heads, D) with any element strides (views into a fused qkv
// work without copies). Outputs are contiguous. lse: (B, heads, H, W) contiguous, natural-log
// logsumexp per query in the accumulation type (float32; float64 for float64). bias:
// (bias_heads, 2kh-1, 2kw-1) contiguous in the accumulation type, bias_heads = heads or 1.
#pragma once

#include <cstdint>

#include "../common/parallel.h"
#include "../common/scalar.h"

namespace alterops {
namespace neighborhood {

// Border rule (see alterops/neighborhood_attention.py).
enum Border : int32_t { kClamp = 0, kMask = 1, kZero = 2 };

// A (B, H, W, heads, D) tensor: data pointer, sizes and element strides.
struct View5 {
  const void* data;
  int64_t size[5];
  int64_t stride[5];
};

// Head widths for which float32 has a dedicated forward (D a multiple of 16, up to 64); the
// binding runs bfloat16 forwards of these widths as float32 on float32 copies.
inline bool float_fast_width(int64_t D) { return D % 16 == 0 && D <= 64; }

struct ForwardArgs {
  DType dtype;            // of q, k, v and out: Float32, Float64 or BFloat16
  View5 q, k, v;          // same sizes
  void* out;              // (B, H, W, heads, D) contiguous, dtype
  void* lse;              // (B, heads, H, W) contiguous, accumulation type
  const void* bias;       // (bias_heads, 2kh-1, 2kw-1) contiguous, accumulation type; nullptr: none
  int64_t bias_heads;     // heads or 1
  int64_t kh, kw, dh, dw; // odd kernel sizes >= 1, dilations >= 1
  int32_t border;         // Border
  double scale;
};

struct BackwardArgs {
  DType dtype;                 // of dout, q, k, v, out, dq, dk, dv
  View5 dout, q, k, v, out;    // same sizes
  const void* lse;             // (B, heads, H, W) contiguous, accumulation type
  const void* bias;            // as in ForwardArgs
  int64_t bias_heads;
  void* dq;                    // (B, H, W, heads, D) contiguous each
  void* dk;
  void* dv;
  void* dbias;                 // like bias (written, not accumulated into); nullptr: not wanted
  int64_t kh, kw, dh, dw;
  int32_t border;
  double scale;
};

struct Kernels {
  void (*forward)(const ForwardArgs&, const Parallel&);
  void (*backward)(const BackwardArgs&, const Parallel&);
};

// The entry points of this build's level (defined in neighborhood_attention_cpu.cpp).
const Kernels& kernels();

}  // namespace neighborhood
}  // namespace alterops
