// CUDA kernels of the N-d neighbourhood attention family behind raw-pointer launchers (no torch
// headers). The same ops as the CPU kernels (neighborhood_attention.h documents them):
//
//   forward:  (q, k, v, bias?) -> (out, lse)
//   backward: (dout, q, k, v, out, lse, dlse?, bias?) -> (dq, dk, dv, dbias?)
//
// q, dout, out: (B, T, H, W, heads, D); k, v: (B, T, H, W, heads_kv, D), heads % heads_kv == 0,
// query head h reads key/value head h / (heads / heads_kv). Any element strides for q, k, v,
// dout and out (views into a fused qkv work without copies); out, dq, dk, dv are written
// contiguous. lse, dlse: (B, heads, T, H, W) float32 contiguous, natural log. bias:
// (bias_heads, 2kt-1, 2kh-1, 2kw-1) float32 contiguous, bias_heads = heads or 1; dbias is written
// (not accumulated into), deterministically (no atomics anywhere). Element types float32,
// float16, bfloat16 (float32 accumulation); head_dim 1..kMaxHeadDim.
//
// Three spatial axes (T, H, W): 1-D and 2-D inputs arrive with size-1 leading axes. The window of
// a query on each axis follows alterops/neighborhood_attention_nd.py (NATTEN's rule for "clamp",
// with stride, causal windows and even kernels; a centred window for "mask" and "zero", which
// come with stride 1 and no causal axis). The arguments are those the binding has checked; the
// launchers refuse (cudaErrorInvalidValue) what the kernels cannot index: head_dim outside
// [1, kMaxHeadDim], an axis of 2**30 or more positions, more query tiles than a grid holds. A
// block takes at most 99 KiB of shared memory (the opt-in limit of sm_86 / sm_89; sm_80 and sm_90
// allow more); on a device that allows less the launch returns cudaErrorLaunchOutOfResources.
// The float16 / bfloat16 kernels use mma.sync m16n8k16 (sm_80 and later).
//
// Each launch needs a device workspace of *_workspace_bytes (may be 0; then any pointer, null
// included), not shared between concurrent launches.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "neighborhood_window.h"

namespace alterops {
namespace neighborhood_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The argument types shared with the CPU kernels (neighborhood_window.h).
using neighborhood::Border;
using neighborhood::kClamp;
using neighborhood::kMask;
using neighborhood::kZero;
using neighborhood::Window;
using Tensor6 = neighborhood::View6;  // a (B, T, H, W, heads, D) tensor: data, sizes, element strides

constexpr int kMaxHeadDim = 256;

struct ForwardArgs {
  DType dtype;          // of q, k, v and out
  Tensor6 q, k, v;      // k, v: heads_kv heads, otherwise q's sizes
  void* out;            // (B, T, H, W, heads, D) contiguous, dtype
  float* lse;           // (B, heads, T, H, W) contiguous
  const float* bias;    // (bias_heads, 2kt-1, 2kh-1, 2kw-1) contiguous; nullptr: none
  int64_t bias_heads;   // heads or 1
  Window win;
  double scale;
};

struct BackwardArgs {
  DType dtype;                  // of dout, q, k, v, out, dq, dk, dv
  Tensor6 dout, q, k, v, out;   // dout, out: q's sizes
  const float* lse;             // (B, heads, T, H, W) contiguous
  const float* dlse;            // like lse; nullptr: zero
  const float* bias;            // as in ForwardArgs
  int64_t bias_heads;
  void* dq;                     // like q, contiguous
  void* dk;                     // like k, contiguous
  void* dv;                     // like v, contiguous
  float* dbias;                 // like bias; nullptr: not wanted
  Window win;
  double scale;
};

// Workspace bytes of a launch with these arguments (the pointers are not read).
size_t forward_workspace_bytes(const ForwardArgs& a);
size_t backward_workspace_bytes(const BackwardArgs& a);

// Launch on `stream`; return the launch error (cudaSuccess when fine).
cudaError_t forward(const ForwardArgs& a, void* workspace, cudaStream_t stream);
cudaError_t backward(const BackwardArgs& a, void* workspace, cudaStream_t stream);

}  // namespace neighborhood_cuda
}  // namespace alterops
