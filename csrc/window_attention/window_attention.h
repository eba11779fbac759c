// Raw-pointer API of the window_attention2d CPU kernels (no torch types): argument structs and
// the table of entry points one instruction-set build provides (see csrc/common/kernel_table.h).
//
// Layouts. q, k, v, grad_out and the saved out are (B, H, W, heads, head_dim) with any element
// strides (views into a fused qkv are read in place); lse is (B, H, W, heads) with any strides.
// Outputs (out, lse of the forward; dq, dk, dv of the backward) are contiguous. The bias table
// is contiguous (table_heads, 2*window_h-1, 2*window_w-1) in the accumulation type (float64 for
// float64, float32 otherwise), as is its gradient.
//
// Element types: Float32 and Float64. bfloat16 and float16 reach the kernels as float32 copies made by the
// binding (the same float32 arithmetic; the float32 kernels are the fast ones).
//
// The binding checks every argument first; kernels assume valid arguments.
#pragma once

#include <cstdint>

#include "../common/parallel.h"
#include "../common/scalar.h"

namespace alterops {
namespace window {

// A tensor of up to 5 dimensions: data pointer and element strides.
struct Strided {
  const void* data = nullptr;
  int64_t stride[5] = {0, 0, 0, 0, 0};
  template <class T>
  const T* as() const {
    return static_cast<const T*>(data);
  }
};

// What forward and backward share.
struct Problem {
  DType dtype = DType::Float32;  // of q, k, v, out, grad_out, dq, dk, dv
  int64_t batch = 0, height = 0, width = 0, heads = 0, head_dim = 0;
  int64_t window_h = 1, window_w = 1;  // window size
  int64_t shift_h = 0, shift_w = 0;    // cyclic shift, in [0, window)
  double scale = 1.0;                  // logits = scale * q.k (+ bias)
  const void* table = nullptr;         // relative position bias table or nullptr
  int64_t table_heads = 0;             // 1 (shared by the heads) or heads
};

struct ForwardArgs {
  Problem p;
  Strided q, k, v;
  void* out = nullptr;  // contiguous (B, H, W, heads, head_dim), dtype
  void* lse = nullptr;  // contiguous (B, H, W, heads), accumulation type: natural-log logsumexp
};

struct BackwardArgs {
  Problem p;
  Strided grad_out, q, k, v, out;
  Strided lse;             // (B, H, W, heads), accumulation type, as the forward returned it
  void* dq = nullptr;      // contiguous, dtype
  void* dk = nullptr;
  void* dv = nullptr;
  void* dtable = nullptr;  // contiguous like the table (written whole), or nullptr: no bias gradient
};

struct Kernels {
  void (*forward)(const ForwardArgs&, const Parallel&);
  void (*backward)(const BackwardArgs&, const Parallel&);
};

// The entry points of this build's level (defined in window_attention_cpu.cpp).
const Kernels& kernels();

}  // namespace window
}  // namespace alterops
