// CUDA kernels of box_blur2d / tanh_blur2d (see blur_cuda.h for the contract).
//
// Forward: one thread per output element (consecutive threads -> consecutive output columns,
// so loads of a window row are coalesced and neighbouring windows share cache lines); it
// gathers its kh x kw window through the padded->source index map, applies the pointwise op
// per tap and accumulates in float32. Backward: one thread per input element; it sums the
// gradient of every output whose window covers a padded position that maps to it (the direct
// position, plus border positions under replicate/reflect), then applies the pointwise
// derivative. No shared memory, no local arrays: the kernels are bandwidth-bound gathers.
#include "blur_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/cuda_convert.cuh"

namespace alterops {
namespace blur_cuda {
namespace {

constexpr int kThreads = 256;

using cuda_util::from_float;
using cuda_util::to_float;

// Source index of padded-relative coordinate p; -1 means zero padding.
__device__ __forceinline__ int map_index(int p, int n, int mode) {
  if (p >= 0 && p < n) return p;
  if (mode == 0) return -1;
  if (mode == 1) return p < 0 ? 0 : n - 1;
  return p < 0 ? -p : 2 * (n - 1) - p;
}

// tanh as a rational minimax approximation (max abs error ~3.5e-7; the coefficients of Eigen's
// float tanh, the same as the CPU kernels). Not tanhf: the extension is built with
// --use_fast_math, under which tanhf may become the tanh.approx instruction (~5e-4 error).
__device__ __forceinline__ float tanh_rational(float x) {
  const float xc = fminf(fmaxf(x, -7.90531110763549805f), 7.90531110763549805f);
  const float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = fmaf(p, x2, 2.00018790482477e-13f);
  p = fmaf(p, x2, -8.60467152213735e-11f);
  p = fmaf(p, x2, 5.12229709037114e-08f);
  p = fmaf(p, x2, 1.48572235717979e-05f);
  p = fmaf(p, x2, 6.37261928875436e-04f);
  p = fmaf(p, x2, 4.89352455891786e-03f);
  p *= xc;
  float q = 1.19825839466702e-06f;
  q = fmaf(q, x2, 1.18534705686654e-04f);
  q = fmaf(q, x2, 2.26843463243900e-03f);
  q = fmaf(q, x2, 4.89352518554385e-03f);
  return (fabsf(x) < 0.0004f || x != x) ? x : p / q;  // NaN stays NaN (fmaxf above drops it)
}

template <int ACT>
__device__ __forceinline__ float pointwise(float v, float tau, float inv_tau) {
  if (ACT == 0) return v;
  float t = tau * tanh_rational(v * inv_tau);
  if (ACT == 2) t = t < 0.f ? 0.f : t;  // NaN stays NaN (as torch.relu; fmaxf would drop it)
  return t;
}

template <int ACT>
__device__ __forceinline__ float pointwise_grad(float v, float inv_tau) {
  if (ACT == 0) return 1.f;
  float t = tanh_rational(v * inv_tau);
  float d = 1.f - t * t;
  if (ACT == 2 && !(t > 0.f)) d = 0.f;
  return d;
}

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads) blur2d_forward_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                                   Geometry g, float tau, float inv_tau,
                                                                   float scale) {
  const int64_t total = g.planes * g.Ho * g.Wo;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int ow = int(idx % g.Wo);
    const int64_t t = idx / g.Wo;
    const int oh = int(t % g.Ho);
    const int64_t plane = t / g.Ho;
    const T* __restrict__ xp = x + plane * g.H * g.W;
    float acc = 0.f;
    for (int a = 0; a < g.kh; ++a) {
      const int r = map_index(oh * g.sh + a - g.pt, g.H, g.mode);
      if (r < 0) continue;
      const T* __restrict__ xr = xp + int64_t(r) * g.W;
      for (int e = 0; e < g.kw; ++e) {
        const int c = map_index(ow * g.sw + e - g.pl, g.W, g.mode);
        if (c < 0) continue;
        acc += pointwise<ACT>(to_float(xr[c]), tau, inv_tau);
      }
    }
    out[idx] = from_float<T>(acc * scale);
  }
}

// Sum of grad_out over the outputs (along one axis) whose window covers padded position p:
// the o with o*s <= p < o*s + k, 0 <= o < n_out.
__device__ __forceinline__ void covering(int p, int k, int s, int n_out, int& lo, int& hi) {
  const int first = p - k + 1;
  lo = first <= 0 ? 0 : (first + s - 1) / s;
  hi = p / s;
  if (hi > n_out - 1) hi = n_out - 1;
}

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads) blur2d_backward_kernel(const T* __restrict__ gout,
                                                                    const T* __restrict__ x,
                                                                    T* __restrict__ gin, Geometry g,
                                                                    float inv_tau, float scale) {
  const int64_t total = g.planes * g.H * g.W;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  // Candidate padded positions per axis: the direct one, then (replicate/reflect) the borders.
  const int nr = g.mode == 0 ? 1 : 1 + g.pt + g.pb;
  const int nc = g.mode == 0 ? 1 : 1 + g.pl + g.pr;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int w = int(idx % g.W);
    const int64_t t = idx / g.W;
    const int h = int(t % g.H);
    const int64_t plane = t / g.H;
    const T* __restrict__ gp = gout + plane * g.Ho * g.Wo;
    float acc = 0.f;
    for (int tr = 0; tr < nr; ++tr) {
      const int r = tr == 0 ? h + g.pt : (tr <= g.pt ? tr - 1 : g.H + tr - 1);
      if (tr > 0 && map_index(r - g.pt, g.H, g.mode) != h) continue;
      int oh_lo, oh_hi;
      covering(r, g.kh, g.sh, g.Ho, oh_lo, oh_hi);
      for (int tc = 0; tc < nc; ++tc) {
        const int c = tc == 0 ? w + g.pl : (tc <= g.pl ? tc - 1 : g.W + tc - 1);
        if (tc > 0 && map_index(c - g.pl, g.W, g.mode) != w) continue;
        int ow_lo, ow_hi;
        covering(c, g.kw, g.sw, g.Wo, ow_lo, ow_hi);
        for (int oh = oh_lo; oh <= oh_hi; ++oh) {
          const T* __restrict__ grow = gp + int64_t(oh) * g.Wo;
          for (int ow = ow_lo; ow <= ow_hi; ++ow) acc += to_float(grow[ow]);
        }
      }
    }
    acc *= scale;
    if (ACT != 0) acc *= pointwise_grad<ACT>(to_float(x[idx]), inv_tau);
    gin[idx] = from_float<T>(acc);
  }
}

inline unsigned int grid_for(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(1) << 20;  // grid-stride loops cover the rest
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks);
}

template <typename T>
cudaError_t forward_typed(const void* x, void* out, const Geometry& g, int act, float tau, cudaStream_t stream) {
  const int64_t total = g.planes * g.Ho * g.Wo;
  if (total == 0) return cudaSuccess;
  const float inv_tau = 1.f / tau, scale = 1.f / float(g.kh * g.kw);
  const T* xp = static_cast<const T*>(x);
  T* op = static_cast<T*>(out);
  const unsigned int grid = grid_for(total);
  if (act == 0)
    blur2d_forward_kernel<T, 0><<<grid, kThreads, 0, stream>>>(xp, op, g, tau, inv_tau, scale);
  else if (act == 1)
    blur2d_forward_kernel<T, 1><<<grid, kThreads, 0, stream>>>(xp, op, g, tau, inv_tau, scale);
  else
    blur2d_forward_kernel<T, 2><<<grid, kThreads, 0, stream>>>(xp, op, g, tau, inv_tau, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const void* gout, const void* x, void* gin, const Geometry& g, int act, float tau,
                           cudaStream_t stream) {
  const int64_t total = g.planes * g.H * g.W;
  if (total == 0) return cudaSuccess;
  const float inv_tau = 1.f / tau, scale = 1.f / float(g.kh * g.kw);
  const T* gp = static_cast<const T*>(gout);
  const T* xp = static_cast<const T*>(x);
  T* ip = static_cast<T*>(gin);
  const unsigned int grid = grid_for(total);
  if (act == 0)
    blur2d_backward_kernel<T, 0><<<grid, kThreads, 0, stream>>>(gp, xp, ip, g, inv_tau, scale);
  else if (act == 1)
    blur2d_backward_kernel<T, 1><<<grid, kThreads, 0, stream>>>(gp, xp, ip, g, inv_tau, scale);
  else
    blur2d_backward_kernel<T, 2><<<grid, kThreads, 0, stream>>>(gp, xp, ip, g, inv_tau, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t blur2d_forward(const void* x, void* out, DType dtype, const Geometry& g, int act, float tau,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(x, out, g, act, tau, stream);
    case DType::kFloat16:
      return forward_typed<__half>(x, out, g, act, tau, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(x, out, g, act, tau, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t blur2d_backward(const void* grad_out, const void* x, void* grad_in, DType dtype, const Geometry& g,
                            int act, float tau, cudaStream_t stream) {
  if (act != 0 && x == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(grad_out, x, grad_in, g, act, tau, stream);
    case DType::kFloat16:
      return backward_typed<__half>(grad_out, x, grad_in, g, act, tau, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(grad_out, x, grad_in, g, act, tau, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace blur_cuda
}  // namespace alterops
