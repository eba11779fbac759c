// CUDA kernels of window_attention2d (Swin shifted-window MSA with relative position bias) behind
// raw-pointer launchers (no torch headers). The semantics are those of the CPU op
// (window_attention.h, docs/semantics.md): pad the map at the bottom/right to whole windows with
// absent tokens, roll by -shift, partition into wh x ww windows, attend within a window to the
// present keys of the query's shift region, logit = scale * q.k + table[h, dy + wh-1, dx + ww-1]
// with (dy, dx) = key minus query in window coordinates, softmax, roll back, crop.
//
// Layouts. q, k, v, grad_out and the saved out are (B, H, W, heads, head_dim) with any element
// strides (views into a fused qkv are read in place); lse is (B, H, W, heads) float32 with any
// strides in the backward. Outputs (out, lse of the forward; dq, dk, dv of the backward) are
// contiguous. The bias table is contiguous float32 (table_heads, 2wh-1, 2ww-1), table_heads 1 or
// heads, as is its gradient (written whole).
//
// Element types float32, float16, bfloat16; softmax and accumulation in float32.
//
// Limits: windows of up to kMaxTokens tokens, head_dim up to kMaxHeadDim (`unsupported` says
// why a problem is refused). The launchers assume the arguments passed that check (the binding
// checks shapes, dtypes and devices first).
//
// Kernels (window_attention_cuda.cu): a SIMT path (every dtype; the one float32 takes) and a
// tensor-core path (float16 / bfloat16, head_dim <= kMaxTensorCoreHeadDim, sm_80+: mma.sync
// m16n8k16 with float32 accumulators). `Path::kAuto` picks the tensor cores where they apply.
// The backward's bias gradient is deterministic: per-block partial sums in the workspace,
// reduced in a fixed order by a second kernel (no atomics anywhere).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace alterops {
namespace window_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Which kernels run: kAuto = tensor cores for float16 / bfloat16 when head_dim allows and the
// device is sm_80 or newer, else SIMT. kSimt forces the SIMT kernels (any dtype); kTensorCore
// requires the tensor-core kernels (an error where they do not apply).
enum class Path : int { kAuto = 0, kSimt = 1, kTensorCore = 2 };

constexpr int kMaxTokens = 256;              // wh * ww
constexpr int kMaxHeadDim = 256;
constexpr int kMaxTensorCoreHeadDim = 128;

// A (B, H, W, heads, head_dim) tensor: data pointer and element strides.
struct Tensor5 {
  const void* data = nullptr;
  int64_t stride[5] = {0, 0, 0, 0, 0};
};

// A (B, H, W, heads) float32 tensor: data pointer and element strides.
struct Tensor4 {
  const float* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

struct Problem {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, height = 0, width = 0, heads = 0, head_dim = 0;
  int64_t window_h = 1, window_w = 1;  // window size
  int64_t shift_h = 0, shift_w = 0;    // cyclic shift, in [0, window)
  double scale = 1.0;                  // logits = scale * q.k (+ bias)
  const float* table = nullptr;        // relative position bias table or nullptr
  int64_t table_heads = 0;             // 1 (shared by the heads) or heads
};

// nullptr when the launchers take `p` on `path`, else the reason (a static string).
const char* unsupported(const Problem& p, Path path);

// The path `requested` resolves to for `p` on the current device.
Path resolve_path(const Problem& p, Path requested);

// Bytes of device workspace the forward needs (16-byte aligned start; contents need not be
// initialised).
size_t forward_workspace_bytes(const Problem& p, Path path);

// out (contiguous, dtype) and lse (contiguous float32, natural-log logsumexp of each query's
// scaled, biased logits). Returns the launch error (cudaSuccess when fine).
cudaError_t forward(const Problem& p, const Tensor5& q, const Tensor5& k, const Tensor5& v, void* out, float* lse,
                    void* workspace, Path path, cudaStream_t stream);

// Bytes of device workspace the backward needs (with or without the bias gradient).
size_t backward_workspace_bytes(const Problem& p, bool bias_grad, Path path);

// dq, dk, dv (contiguous, dtype) and, when dtable is not null, the gradient of the bias table
// (contiguous float32 like the table, written whole; needs p.table). lse as the forward wrote it.
cudaError_t backward(const Problem& p, const Tensor5& grad_out, const Tensor5& q, const Tensor5& k, const Tensor5& v,
                     const Tensor5& out, const Tensor4& lse, void* dq, void* dk, void* dv, float* dtable,
                     void* workspace, Path path, cudaStream_t stream);

}  // namespace window_cuda
}  // namespace alterops
