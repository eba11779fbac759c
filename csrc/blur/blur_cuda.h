// CUDA kernels of box_blur2d / tanh_blur2d behind raw-pointer launchers (no torch headers).
//
// Layout: x is (planes, H, W) contiguous, out is (planes, Ho, Wo) contiguous, planes = B*C.
// padding = (pt, pb, pl, pr) >= 0; mode 0 zeros, 1 replicate, 2 reflect (reflect padding <
// the size on its axis). act 0: identity, 1: tau*tanh(x/tau), 2: relu(tau*tanh(x/tau)),
// applied before padding. The mean divides by kh*kw. Accumulation in float32.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace alterops {
namespace blur_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Geometry {
  int64_t planes;
  int H, W, Ho, Wo;
  int kh, kw, sh, sw;
  int pt, pb, pl, pr;
  int mode;
};

// out = blur(act(x)). Returns the launch error (cudaSuccess when fine).
cudaError_t blur2d_forward(const void* x, void* out, DType dtype, const Geometry& g, int act, float tau,
                           cudaStream_t stream);

// grad_in = d blur(act(x)) / dx applied to grad_out. x may be null when act == 0.
cudaError_t blur2d_backward(const void* grad_out, const void* x, void* grad_in, DType dtype, const Geometry& g,
                            int act, float tau, cudaStream_t stream);

}  // namespace blur_cuda
}  // namespace alterops
