// Raw-pointer API of the blur CPU kernels (no torch types): argument structs and the table of
// entry points one instruction-set build provides (see csrc/common/kernel_table.h).
//
// One op pair serves box_blur2d and tanh_blur2d on (B, C, H, W) maps, each plane independent:
// act (identity, tau*tanh(x/tau), relu(tau*tanh(x/tau))) applied before padding, padding
// (top, bottom, left, right) filled per pad mode, and a kh x kw mean with stride (sh, sw) that
// always divides by kh*kw (count_include_pad). The binding checks the geometry and fills in
// Ho, Wo; kernels assume checked arguments and contiguous NCHW tensors.
#pragma once

#include <cstdint>

#include "../common/parallel.h"
#include "../common/scalar.h"

namespace alterops {
namespace blur {

enum PadMode : int64_t { kZeros = 0, kReplicate = 1, kReflect = 2 };
enum Act : int64_t { kIdentity = 0, kTanh = 1, kTanhRelu = 2 };

// Plane geometry: input H x W, output Ho x Wo, kernel kh x kw, stride sh x sw, padding pt/pb/pl/pr
// (reflect padding < the input size), mode a PadMode.
struct Geometry {
  int64_t H, W, Ho, Wo, kh, kw, sh, sw, pt, pb, pl, pr, mode;
};

// out (planes, Ho, Wo) = blur(act(x (planes, H, W))); x and out of element type dtype
// (float32 or float64; the binding widens bfloat16 and float16 to float32 copies).
struct ForwardArgs {
  const void* x;
  void* out;
  DType dtype;
  int64_t planes;
  Geometry g;
  int64_t act;  // an Act
  double tau;   // > 0
};

// grad_in (planes, H, W) from grad_out (planes, Ho, Wo); x (planes, H, W) is read only when
// act != kIdentity (nullptr otherwise). All of element type dtype.
struct BackwardArgs {
  const void* grad_out;
  const void* x;
  void* grad_in;
  DType dtype;
  int64_t planes;
  Geometry g;
  int64_t act;
  double tau;
};

struct Kernels {
  void (*forward)(const ForwardArgs&, const Parallel&);
  void (*backward)(const BackwardArgs&, const Parallel&);
};

// The entry points of this build's level (defined in blur_cpu.cpp).
const Kernels& kernels();

}  // namespace blur
}  // namespace alterops
