// CUDA bindings of delta_log_amplitude_fwd / feature_variance_fwd (schemas in
// statistics_binding.cpp, the CPU library), on the LibTorch stable ABI only. The list of maps is
// grouped by dtype; each group goes to the kernels in launches of up to kMaxSegments maps (one
// partial kernel + one finalize kernel per launch). Inputs are made contiguous (a channels-last
// map costs one copy). Kernels run on the current CUDA stream of the maps' device, under a
// guard for that device.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "../common/tensor_util.h"
#include "statistics_cuda.h"

#ifndef USE_CUDA
#error "statistics_cuda_binding.cpp needs -DUSE_CUDA (the CUDA entry points of torch's C shim)"
#endif

namespace alterops {
namespace statistics_cuda_binding {

using alterops::statistics_cuda::DType;
using alterops::statistics_cuda::kMaxSegments;
using alterops::statistics_cuda::Segment;
using alterops::statistics_cuda::SegmentList;
using torch::headeronly::DeviceType;
using torch::headeronly::ScalarType;
using torch::stable::Device;
using torch::stable::Tensor;

namespace {

DType dtype_of(ScalarType t, const char* op) {
  switch (t) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    case ScalarType::Double: return DType::kFloat64;
    default: break;
  }
  STD_TORCH_CHECK(false, op, " (cuda): supports float32, float64, float16 and bfloat16, got ",
                  torch::headeronly::toString(t));
  return DType::kFloat32;
}

std::string device_str(const Device& d) {
  std::string s = d.type() == DeviceType::CUDA ? "cuda" : d.type() == DeviceType::CPU ? "cpu" : "device type " + std::to_string(int(d.type()));
  if (d.has_index()) s += ":" + std::to_string(int(d.index()));
  return s;
}

ScalarType result_type(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

// Runs `launch` over the maps of each dtype, kMaxSegments at a time.
template <typename Prepare, typename Launch>
std::vector<Tensor> run_grouped(const std::vector<Tensor>& xs, bool delta, const char* op, Prepare prepare,
                                Launch launch) {
  std::vector<Tensor> outs(xs.size());
  if (xs.empty()) return outs;
  const Device device = xs[0].device();
  STD_TORCH_CHECK(device.is_cuda(), op, ": every map must be a CUDA tensor, got ", device_str(device));
  torch::stable::accelerator::DeviceGuard guard(device.index());
  std::vector<Tensor> inputs(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const Tensor& x = xs[i];
    STD_TORCH_CHECK(x.is_cuda() && x.device() == device, op, ": every map must be on ", device_str(device), ", got ",
                    device_str(x.device()));
    STD_TORCH_CHECK(x.dim() == 4, op, ": every map must be (B, C, H, W), got ", binding::shape_str(x));
    const DType dt = dtype_of(x.scalar_type(), op);
    if (delta) {
      const int max_n = statistics_cuda::delta_max_size(dt);
      STD_TORCH_CHECK(x.size(2) == x.size(3), op, ": maps must be square (H == W), got ", binding::shape_str(x));
      STD_TORCH_CHECK(x.size(2) <= max_n, op, " (cuda): maps up to ", max_n, " x ", max_n, " for ",
                      torch::headeronly::toString(x.scalar_type()), ", got ", binding::shape_str(x));
    } else {
      STD_TORCH_CHECK(x.size(2) * x.size(3) >= 2, op, ": needs H * W >= 2, got ", binding::shape_str(x));
    }
    inputs[i] = binding::contiguous(x);
    const int64_t k = delta ? x.size(2) - x.size(2) / 2 : 0;
    outs[i] = delta ? binding::new_device_output({k}, result_type(x.scalar_type()), device)
                    : binding::new_device_output({}, result_type(x.scalar_type()), device);
  }
  cudaStream_t stream = current_stream(device.index());
  std::vector<bool> done(xs.size(), false);
  for (;;) {
    // The first map not yet launched; its dtype picks this launch's group.
    size_t first = 0;
    while (first < xs.size() && done[first]) ++first;
    if (first == xs.size()) break;
    const ScalarType st = inputs[first].scalar_type();
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
    Tensor workspace = torch::stable::empty({static_cast<int64_t>(bytes)}, ScalarType::Byte, std::nullopt, device);
    const cudaError_t err = launch(segs, dt, workspace.mutable_data_ptr(), stream);
    STD_TORCH_CHECK(err == cudaSuccess, op, " (cuda): ", cudaGetErrorString(err));
  }
  return outs;
}

}  // namespace

std::vector<Tensor> delta_log_amplitude_fwd_cuda(std::vector<Tensor> xs, double eps) {
  return run_grouped(
      xs, true, "delta_log_amplitude_fwd",
      [](SegmentList& s, DType dt) { return statistics_cuda::delta_log_amplitude_prepare(s, dt); },
      [eps](const SegmentList& s, DType dt, void* ws, cudaStream_t stream) {
        return statistics_cuda::delta_log_amplitude(s, dt, eps, ws, stream);
      });
}

std::vector<Tensor> feature_variance_fwd_cuda(std::vector<Tensor> xs) {
  return run_grouped(
      xs, false, "feature_variance_fwd",
      [](SegmentList& s, DType dt) { return statistics_cuda::feature_variance_prepare(s, dt); },
      [](const SegmentList& s, DType dt, void* ws, cudaStream_t stream) {
        return statistics_cuda::feature_variance(s, dt, ws, stream);
      });
}

}  // namespace statistics_cuda_binding
}  // namespace alterops

STABLE_TORCH_LIBRARY_IMPL(alterops, CUDA, m) {
  m.impl("delta_log_amplitude_fwd", TORCH_BOX(&alterops::statistics_cuda_binding::delta_log_amplitude_fwd_cuda));
  m.impl("feature_variance_fwd", TORCH_BOX(&alterops::statistics_cuda_binding::feature_variance_fwd_cuda));
}
