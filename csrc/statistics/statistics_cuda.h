// CUDA kernels of the feature-map statistics behind raw-pointer launchers (no torch headers).
//
// One launch handles a list of maps ("segments") of one dtype: segment i is a contiguous
// (planes, n, n) map for delta_log_amplitude, or (planes, hw) for feature_variance, with its
// own output. Per-block partial sums go to a workspace and a second small kernel reduces them
// in block order (deterministic: no atomics, no dependence on the number of SMs).
//
// delta_log_amplitude: out[k] = mean_planes log(|F[k,k]| + eps) - mean_planes log(|F[0,0]| + eps)
// for k < n - n/2, with F[k,k] = sum_s a_s exp(-2πi k s / n) and a_s the anti-diagonal sums
// sum_{(y+x) mod n = s} x[y, x]. feature_variance: out[0] = mean over planes of the unbiased
// variance (shifted sums, shift = the plane's first element). Accumulation in float32 for
// float32/float16/bfloat16 (out is float*), in float64 for float64 (out is double*). A segment
// without planes gets NaN.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace alterops {
namespace statistics_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

constexpr int kMaxSegments = 32;

struct Segment {
  const void* x;        // input planes, contiguous
  void* out;            // float* (double* for kFloat64): K values (delta) or 1 value (variance)
  int64_t planes;       // B * C
  int64_t size;         // n (delta: the map is n x n) or hw (variance)
  int64_t first_block;  // filled by the launcher
  int64_t part_offset;  // filled by the launcher
};

struct SegmentList {
  int count;
  Segment seg[kMaxSegments];
};

// Largest n the delta kernel accepts for a dtype (its per-warp shared buffers).
int delta_max_size(DType dtype);

// Workspace bytes the launch needs (call before the launch; it also fills the offsets).
size_t delta_log_amplitude_prepare(SegmentList& segs, DType dtype);
size_t feature_variance_prepare(SegmentList& segs, DType dtype);

// Launches (after *_prepare on the same list). Return the launch error (cudaSuccess when fine).
cudaError_t delta_log_amplitude(const SegmentList& segs, DType dtype, double eps, void* workspace,
                                cudaStream_t stream);
cudaError_t feature_variance(const SegmentList& segs, DType dtype, void* workspace, cudaStream_t stream);

}  // namespace statistics_cuda
}  // namespace alterops
