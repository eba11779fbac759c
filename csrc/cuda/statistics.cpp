// CUDA bindings of delta_log_amplitude_fwd / feature_variance_fwd (schemas in
// csrc/cpu/statistics.cpp). The list of maps is grouped by dtype; each group goes to the
// kernels in launches of up to kMaxSegments maps (one partial kernel + one finalize kernel per
// launch). Inputs are made contiguous (a channels-last map costs one copy).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "statistics_kernels.h"

namespace alterops {
namespace statistics_cuda_binding {

using alterops::statistics_cuda::DType;
using alterops::statistics_cuda::kMaxSegments;
using alterops::statistics_cuda::Segment;
using alterops::statistics_cuda::SegmentList;

static DType dtype_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, op, " (cuda): supports float32, float64, float16 and bfloat16, got ", t);
  }
}

static at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  static const bool poison = [] {
    const char* v = std::getenv("ALTEROPS_POISON_OUTPUTS");
    return v != nullptr && (std::string(v) == "1" || std::string(v) == "true");
  }();
  if (poison) return at::full(shape, std::numeric_limits<double>::quiet_NaN(), opts);
  return at::empty(shape, opts);
}

static at::ScalarType result_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Runs `launch` over the maps of each dtype, kMaxSegments at a time.
template <typename Prepare, typename Launch>
static std::vector<at::Tensor> run_grouped(at::TensorList xs, bool delta, const char* op, Prepare prepare,
                                           Launch launch) {
  std::vector<at::Tensor> outs(xs.size());
  if (xs.empty()) return outs;
  const at::Device device = xs[0].device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> inputs(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK(x.is_cuda() && x.device() == device, op, ": every map must be on ", device, ", got ", x.device());
    TORCH_CHECK(x.dim() == 4, op, ": every map must be (B, C, H, W), got ", x.sizes());
    dtype_of(x.scalar_type(), op);
    if (delta) {
      TORCH_CHECK(x.size(2) == x.size(3), op, ": maps must be square (H == W), got ", x.sizes());
      TORCH_CHECK(x.size(2) <= statistics_cuda::delta_max_size(dtype_of(x.scalar_type(), op)), op,
                  " (cuda): maps up to ", statistics_cuda::delta_max_size(dtype_of(x.scalar_type(), op)),
                  " x ", statistics_cuda::delta_max_size(dtype_of(x.scalar_type(), op)), " for ", x.scalar_type(),
                  ", got ", x.sizes());
    } else {
      TORCH_CHECK(x.size(2) * x.size(3) >= 2, op, ": needs H * W >= 2, got ", x.sizes());
    }
    inputs[i] = x.contiguous();
    const int64_t k = delta ? x.size(2) - x.size(2) / 2 : 0;
    outs[i] = delta ? new_output({k}, x.options().dtype(result_type(x.scalar_type())))
                    : new_output({}, x.options().dtype(result_type(x.scalar_type())));
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  std::vector<bool> done(xs.size(), false);
  for (;;) {
    // The first map not yet launched; its dtype picks this launch's group.
    size_t first = 0;
    while (first < xs.size() && done[first]) ++first;
    if (first == xs.size()) break;
    const at::ScalarType st = inputs[first].scalar_type();
    const DType dt = dtype_of(st, op);
    SegmentList segs;
    segs.count = 0;
    for (size_t i = first; i < xs.size(); ++i) {
      if (done[i] || inputs[i].scalar_type() != st) continue;
      Segment& s = segs.seg[segs.count++];
      s.x = inputs[i].const_data_ptr();
      s.out = outs[i].mutable_data_ptr();
      s.planes = inputs[i].size(0) * inputs[i].size(1);
      s.size = delta ? inputs[i].size(2) : inputs[i].size(2) * inputs[i].size(3);
      s.first_block = 0;
      s.part_offset = 0;
      done[i] = true;
      if (segs.count == kMaxSegments) break;
    }
    const size_t bytes = prepare(segs, dt);
    at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, inputs[first].options().dtype(at::kByte));
    const cudaError_t err = launch(segs, dt, workspace.mutable_data_ptr(), stream);
    TORCH_CHECK(err == cudaSuccess, op, " (cuda): ", cudaGetErrorString(err));
  }
  return outs;
}

std::vector<at::Tensor> delta_log_amplitude_fwd_cuda(at::TensorList xs, double eps) {
  return run_grouped(
      xs, true, "delta_log_amplitude_fwd",
      [](SegmentList& s, DType dt) { return statistics_cuda::delta_log_amplitude_prepare(s, dt); },
      [eps](const SegmentList& s, DType dt, void* ws, cudaStream_t stream) {
        return statistics_cuda::delta_log_amplitude(s, dt, eps, ws, stream);
      });
}

std::vector<at::Tensor> feature_variance_fwd_cuda(at::TensorList xs) {
  return run_grouped(
      xs, false, "feature_variance_fwd",
      [](SegmentList& s, DType dt) { return statistics_cuda::feature_variance_prepare(s, dt); },
      [](const SegmentList& s, DType dt, void* ws, cudaStream_t stream) {
        return statistics_cuda::feature_variance(s, dt, ws, stream);
      });
}

}  // namespace statistics_cuda_binding
}  // namespace alterops

TORCH_LIBRARY_IMPL(alterops, CUDA, m) {
  m.impl("delta_log_amplitude_fwd", &alterops::statistics_cuda_binding::delta_log_amplitude_fwd_cuda);
  m.impl("feature_variance_fwd", &alterops::statistics_cuda_binding::feature_variance_fwd_cuda);
}
