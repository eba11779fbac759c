// CUDA kernels of the feature-map statistics (see statistics_cuda.h for the contract).
//
// Both kernels give every block kPlanesPerBlock consecutive planes of one segment and every
// warp one plane at a time (planes w, w + 8, ... of the block's range).
//
// delta: the warp stages rows of its plane into its own shared buffer with coalesced loads
// (converted to the accumulation type), lane s then accumulates the anti-diagonal sum
// a_s += buf[r][(s - y) mod n] over the staged rows (fixed order: deterministic), and lane k
// forms bin k = sum_s a_s (cos - i sin)(2π k s / n) from a per-block cos/sin table (the index
// k*s mod n is carried incrementally) and adds log(|F| + eps) to the warp's running sum for k.
// The block sums its warps in warp order into one partial row; a finalize kernel sums the
// partial rows of a segment in block order.
//
// variance: lanes stride over the plane (coalesced), accumulating shifted sums d = x - x[0],
// d^2; a butterfly shuffle reduction (deterministic) gives M2 = S2 - S1^2 / hw; lane 0 keeps
// the warp's running sum of M2 / (hw - 1); then the same block / finalize reductions.
#include "statistics_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace alterops {
namespace statistics_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPlanesPerBlock = 64;

template <typename Acc>
struct Cap {
  static constexpr int value = 512;  // staged elements per warp (float: 2 KiB)
};
template <>
struct Cap<double> {
  static constexpr int value = 256;  // (double: 2 KiB)
};

template <typename T, typename Acc>
__device__ __forceinline__ Acc to_acc(T v) {
  return static_cast<Acc>(v);
}
template <>
__device__ __forceinline__ float to_acc<__half, float>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16, float>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }
__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }
__device__ __forceinline__ void sincospi_acc(float v, float* s, float* c) { sincospif(v, s, c); }
__device__ __forceinline__ void sincospi_acc(double v, double* s, double* c) { sincospi(v, s, c); }

// The segment that block b belongs to (segments with no blocks are skipped).
__device__ __forceinline__ int segment_of(const SegmentList& segs, int64_t b) {
  int si = 0;
  while (si + 1 < segs.count && b >= segs.seg[si + 1].first_block) ++si;
  return si;
}

// ---------------------------------------------------------------------------------------
// delta_log_amplitude
// ---------------------------------------------------------------------------------------
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) delta_partial_kernel(const __grid_constant__ SegmentList segs, int nmax,
                                                                 Acc eps, Acc* __restrict__ partials) {
  constexpr int kCap = Cap<Acc>::value;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);
  const int kmax = nmax - nmax / 2;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;

  const int si = segment_of(segs, blockIdx.x);
  const Segment& sg = segs.seg[si];
  const int n = static_cast<int>(sg.size);
  const int K = n - n / 2;
  const int64_t local_block = static_cast<int64_t>(blockIdx.x) - sg.first_block;

  Acc* cos_t = smem;
  Acc* sin_t = smem + nmax;
  Acc* buf = smem + 2 * nmax + warp * (kCap + nmax + kmax);
  Acc* a = buf + kCap;
  Acc* lacc = a + nmax;

  for (int i = static_cast<int>(threadIdx.x); i < n; i += kThreads) {
    Acc s, c;
    sincospi_acc(static_cast<Acc>(2 * i) / static_cast<Acc>(n), &s, &c);
    cos_t[i] = c;
    sin_t[i] = s;
  }
  for (int k = lane; k < K; k += 32) lacc[k] = Acc(0);
  __syncthreads();

  const T* x = static_cast<const T*>(sg.x);
  const int64_t p_begin = local_block * kPlanesPerBlock;
  const int64_t p_end = (sg.planes - p_begin < kPlanesPerBlock) ? sg.planes : p_begin + kPlanesPerBlock;
  const int rows_per_chunk = kCap / n;  // >= 1 (n <= kCap is checked by the launcher)

  for (int64_t p = p_begin + warp; p < p_end; p += kWarps) {
    const T* plane = x + p * static_cast<int64_t>(n) * n;
    for (int s = lane; s < n; s += 32) a[s] = Acc(0);
    for (int y0 = 0; y0 < n; y0 += rows_per_chunk) {
      const int rows = (n - y0 < rows_per_chunk) ? (n - y0) : rows_per_chunk;
      const int count = rows * n;
      const T* src = plane + static_cast<int64_t>(y0) * n;
      __syncwarp();
#pragma unroll 4
      for (int i = lane; i < count; i += 32) buf[i] = to_acc<T, Acc>(src[i]);
      __syncwarp();
      for (int s = lane; s < n; s += 32) {
        Acc acc = a[s];
        int col = s - y0 % n;  // (s - y) mod n for y = y0, then decremented per row
        if (col < 0) col += n;
        for (int r = 0; r < rows; ++r) {
          acc += buf[r * n + col];
          col = (col == 0) ? n - 1 : col - 1;
        }
        a[s] = acc;
      }
    }
    __syncwarp();
    for (int k = lane; k < K; k += 32) {
      Acc re = Acc(0), im = Acc(0);
      int idx = 0;  // k * s mod n
      for (int s = 0; s < n; ++s) {
        const Acc as = a[s];
        re += as * cos_t[idx];
        im -= as * sin_t[idx];
        idx += k;
        if (idx >= n) idx -= n;
      }
      lacc[k] += log_acc(sqrt_acc(re * re + im * im) + eps);
    }
    __syncwarp();
  }
  __syncthreads();
  // Block partial: warps summed in order.
  const int stride = kCap + nmax + kmax;
  Acc* lacc0 = smem + 2 * nmax + kCap + nmax;
  for (int k = static_cast<int>(threadIdx.x); k < K; k += kThreads) {
    Acc total = Acc(0);
    for (int w = 0; w < kWarps; ++w) total += lacc0[w * stride + k];
    partials[sg.part_offset + local_block * K + k] = total;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) delta_finalize_kernel(const __grid_constant__ SegmentList segs,
                                                                  const Acc* __restrict__ partials) {
  const Segment& sg = segs.seg[blockIdx.x];
  const int n = static_cast<int>(sg.size);
  const int K = n - n / 2;
  const int64_t blocks = (sg.planes + kPlanesPerBlock - 1) / kPlanesPerBlock;
  Acc* out = static_cast<Acc*>(sg.out);
  for (int k = static_cast<int>(threadIdx.x); k < K; k += kThreads) {
    if (blocks == 0) {
      out[k] = static_cast<Acc>(NAN);
      continue;
    }
    Acc sum_k = Acc(0), sum_0 = Acc(0);
    for (int64_t b = 0; b < blocks; ++b) {
      sum_k += partials[sg.part_offset + b * K + k];
      sum_0 += partials[sg.part_offset + b * K];
    }
    out[k] = (sum_k - sum_0) / static_cast<Acc>(sg.planes);
  }
}

// ---------------------------------------------------------------------------------------
// feature_variance
// ---------------------------------------------------------------------------------------
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) variance_partial_kernel(const __grid_constant__ SegmentList segs,
                                                                    Acc* __restrict__ partials) {
  __shared__ Acc warp_sums[kWarps];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int si = segment_of(segs, blockIdx.x);
  const Segment& sg = segs.seg[si];
  const int64_t hw = sg.size;
  const int64_t local_block = static_cast<int64_t>(blockIdx.x) - sg.first_block;
  const T* x = static_cast<const T*>(sg.x);
  const int64_t p_begin = local_block * kPlanesPerBlock;
  const int64_t p_end = (sg.planes - p_begin < kPlanesPerBlock) ? sg.planes : p_begin + kPlanesPerBlock;

  Acc warp_total = Acc(0);
  for (int64_t p = p_begin + warp; p < p_end; p += kWarps) {
    const T* plane = x + p * hw;
    const Acc shift = to_acc<T, Acc>(plane[0]);
    Acc s1 = Acc(0), s2 = Acc(0);
#pragma unroll 4
    for (int64_t i = lane; i < hw; i += 32) {
      const Acc d = to_acc<T, Acc>(plane[i]) - shift;
      s1 += d;
      s2 += d * d;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      s1 += __shfl_xor_sync(0xffffffffu, s1, off);
      s2 += __shfl_xor_sync(0xffffffffu, s2, off);
    }
    Acc m2 = s2 - s1 * s1 / static_cast<Acc>(hw);
    m2 = m2 > Acc(0) ? m2 : Acc(0);
    warp_total += m2 / static_cast<Acc>(hw - 1);
  }
  if (lane == 0) warp_sums[warp] = warp_total;
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc total = Acc(0);
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    partials[sg.part_offset + local_block] = total;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) variance_finalize_kernel(const __grid_constant__ SegmentList segs,
                                                                     const Acc* __restrict__ partials) {
  __shared__ Acc sums[kThreads];
  const Segment& sg = segs.seg[blockIdx.x];
  const int64_t blocks = (sg.planes + kPlanesPerBlock - 1) / kPlanesPerBlock;
  Acc total = Acc(0);
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) total += partials[sg.part_offset + b];
  sums[threadIdx.x] = total;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {  // fixed tree: deterministic
    if (static_cast<int>(threadIdx.x) < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    Acc* out = static_cast<Acc*>(sg.out);
    out[0] = blocks == 0 ? static_cast<Acc>(NAN) : sums[0] / static_cast<Acc>(sg.planes);
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------
size_t elem_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// Fills first_block / part_offset; returns (blocks, partial elements).
void assign_blocks(SegmentList& segs, bool delta, int64_t* blocks, int64_t* parts) {
  int64_t b = 0, off = 0;
  for (int i = 0; i < segs.count; ++i) {
    Segment& s = segs.seg[i];
    const int64_t nb = (s.planes + kPlanesPerBlock - 1) / kPlanesPerBlock;
    const int64_t per = delta ? (s.size - s.size / 2) : 1;
    s.first_block = b;
    s.part_offset = off;
    b += nb;
    off += nb * per;
  }
  *blocks = b;
  *parts = off;
}

int max_n(const SegmentList& segs) {
  int64_t m = 1;
  for (int i = 0; i < segs.count; ++i) m = segs.seg[i].size > m ? segs.seg[i].size : m;
  return static_cast<int>(m);
}

template <typename T, typename Acc>
cudaError_t launch_delta(const SegmentList& segs, double eps, void* workspace, cudaStream_t stream) {
  int64_t blocks = 0, parts = 0;
  SegmentList copy = segs;
  assign_blocks(copy, true, &blocks, &parts);
  const int nmax = max_n(copy);
  const int kmax = nmax - nmax / 2;
  const size_t smem = sizeof(Acc) * static_cast<size_t>(2 * nmax + kWarps * (Cap<Acc>::value + nmax + kmax));
  Acc* partials = static_cast<Acc*>(workspace);
  if (blocks > 0) {
    delta_partial_kernel<T, Acc><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        copy, nmax, static_cast<Acc>(eps), partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  delta_finalize_kernel<Acc><<<static_cast<unsigned>(copy.count), kThreads, 0, stream>>>(copy, partials);
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t launch_variance(const SegmentList& segs, void* workspace, cudaStream_t stream) {
  int64_t blocks = 0, parts = 0;
  SegmentList copy = segs;
  assign_blocks(copy, false, &blocks, &parts);
  Acc* partials = static_cast<Acc*>(workspace);
  if (blocks > 0) {
    variance_partial_kernel<T, Acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(copy, partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  variance_finalize_kernel<Acc><<<static_cast<unsigned>(copy.count), kThreads, 0, stream>>>(copy, partials);
  return cudaGetLastError();
}

}  // namespace

int delta_max_size(DType dtype) { return dtype == DType::kFloat64 ? Cap<double>::value : Cap<float>::value; }

size_t delta_log_amplitude_prepare(SegmentList& segs, DType dtype) {
  int64_t blocks = 0, parts = 0;
  assign_blocks(segs, true, &blocks, &parts);
  return static_cast<size_t>(parts > 0 ? parts : 1) * elem_size(dtype);
}

size_t feature_variance_prepare(SegmentList& segs, DType dtype) {
  int64_t blocks = 0, parts = 0;
  assign_blocks(segs, false, &blocks, &parts);
  return static_cast<size_t>(parts > 0 ? parts : 1) * elem_size(dtype);
}

cudaError_t delta_log_amplitude(const SegmentList& segs, DType dtype, double eps, void* workspace,
                                cudaStream_t stream) {
  if (segs.count <= 0) return cudaSuccess;
  if (segs.count > kMaxSegments) return cudaErrorInvalidValue;
  if (max_n(segs) > delta_max_size(dtype)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch_delta<float, float>(segs, eps, workspace, stream);
    case DType::kFloat16:
      return launch_delta<__half, float>(segs, eps, workspace, stream);
    case DType::kBFloat16:
      return launch_delta<__nv_bfloat16, float>(segs, eps, workspace, stream);
    case DType::kFloat64:
      return launch_delta<double, double>(segs, eps, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t feature_variance(const SegmentList& segs, DType dtype, void* workspace, cudaStream_t stream) {
  if (segs.count <= 0) return cudaSuccess;
  if (segs.count > kMaxSegments) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch_variance<float, float>(segs, workspace, stream);
    case DType::kFloat16:
      return launch_variance<__half, float>(segs, workspace, stream);
    case DType::kBFloat16:
      return launch_variance<__nv_bfloat16, float>(segs, workspace, stream);
    case DType::kFloat64:
      return launch_variance<double, double>(segs, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace statistics_cuda
}  // namespace alterops
