// Stable-ABI binding of the statistics CPU kernels (statistics_cpu.cpp):
//   delta_log_amplitude_fwd(Tensor[] xs, float eps) -> Tensor[]   each (H - H//2,)
//   feature_variance_fwd(Tensor[] xs) -> Tensor[]                 each a 0-dim tensor
// Checks every map, makes it contiguous (a channels-last or strided input costs one copy) and
// runs the whole list in one kernel call. The kernels write float64; results are float32
// (float64 for float64 input), rounded from those. The schemas are defined here for the CUDA
// implementations too.
#include "statistics.h"

#include "../common/binding.h"

namespace alterops {
namespace statistics {
namespace {

using binding::ScalarType;
using binding::Tensor;

DType check_map(const Tensor& x, const char* op, size_t index, bool square) {
  STD_TORCH_CHECK(x.is_cpu(), op, ": expected CPU tensors, xs[", index, "] is not");
  STD_TORCH_CHECK(x.dim() == 4, op, ": every map must be (B, C, H, W), xs[", index, "] has shape ",
                  binding::shape_str(x));
  const std::string what = std::string(op) + ": xs[" + std::to_string(index) + "]";
  const DType dt = binding::dtype_of(x.scalar_type(), what.c_str());
  if (square) {
    STD_TORCH_CHECK(x.size(2) == x.size(3), op, ": maps must be square (H == W), xs[", index, "] has shape ",
                    binding::shape_str(x));
  } else {
    STD_TORCH_CHECK(x.size(2) * x.size(3) >= 2, op, ": needs H * W >= 2, xs[", index, "] has shape ",
                    binding::shape_str(x));
  }
  return dt;
}

ScalarType result_type(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// Each map's float64 values (sizes[i] of them, at offsets[i] in `values`) as a new tensor of
// shape shapes[i] in the map's result dtype (the same rounding as a dtype conversion in torch).
std::vector<Tensor> results(const std::vector<double>& values, const std::vector<size_t>& offsets,
                            const std::vector<std::vector<int64_t>>& shapes, const std::vector<Tensor>& xs) {
  std::vector<Tensor> outs;
  outs.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const ScalarType rt = result_type(xs[i].scalar_type());
    Tensor out = binding::new_output(shapes[i], rt);
    const double* v = values.data() + offsets[i];
    const int64_t n = out.numel();
    if (rt == ScalarType::Double) {
      double* o = binding::mptr<double>(out);
      for (int64_t k = 0; k < n; ++k) o[k] = v[k];
    } else {
      float* o = binding::mptr<float>(out);
      for (int64_t k = 0; k < n; ++k) o[k] = static_cast<float>(v[k]);
    }
    outs.push_back(out);
  }
  return outs;
}

std::vector<Tensor> delta_log_amplitude_fwd(std::vector<Tensor> xs, double eps) {
  const char* op = "delta_log_amplitude_fwd";
  std::vector<Tensor> inputs;
  std::vector<Map> maps(xs.size());
  std::vector<size_t> offsets(xs.size());
  std::vector<std::vector<int64_t>> shapes(xs.size());
  size_t total = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const DType dt = check_map(xs[i], op, i, true);
    inputs.push_back(binding::contiguous(xs[i]));
    const int64_t n = xs[i].size(2);
    Map& m = maps[i];
    m.data = inputs.back().const_data_ptr();
    m.dtype = dt;
    m.planes = xs[i].size(0) * xs[i].size(1);
    m.h = n;
    m.w = n;
    offsets[i] = total;
    shapes[i] = {n - n / 2};
    total += size_t(n - n / 2);
  }
  std::vector<double> values(total);
  for (size_t i = 0; i < maps.size(); ++i) maps[i].out = values.data() + offsets[i];
  DeltaArgs a;
  a.maps = maps.data();
  a.num_maps = int64_t(maps.size());
  a.eps = eps;
  if (!maps.empty()) binding::cpu_kernels().statistics->delta_log_amplitude(a, binding::cpu_parallel());
  return results(values, offsets, shapes, xs);
}

std::vector<Tensor> feature_variance_fwd(std::vector<Tensor> xs) {
  const char* op = "feature_variance_fwd";
  std::vector<Tensor> inputs;
  std::vector<Map> maps(xs.size());
  std::vector<size_t> offsets(xs.size());
  std::vector<double> values(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const DType dt = check_map(xs[i], op, i, false);
    inputs.push_back(binding::contiguous(xs[i]));
    Map& m = maps[i];
    m.data = inputs.back().const_data_ptr();
    m.dtype = dt;
    m.planes = xs[i].size(0) * xs[i].size(1);
    m.h = xs[i].size(2);
    m.w = xs[i].size(3);
    m.out = values.data() + i;
    offsets[i] = i;
  }
  VarianceArgs a;
  a.maps = maps.data();
  a.num_maps = int64_t(maps.size());
  if (!maps.empty()) binding::cpu_kernels().statistics->feature_variance(a, binding::cpu_parallel());
  return results(values, offsets, std::vector<std::vector<int64_t>>(xs.size()), xs);
}

}  // namespace
}  // namespace statistics
}  // namespace alterops

STABLE_TORCH_LIBRARY_FRAGMENT(alterops, m) {
  m.def("delta_log_amplitude_fwd(Tensor[] xs, float eps) -> Tensor[]");
  m.def("feature_variance_fwd(Tensor[] xs) -> Tensor[]");
}

STABLE_TORCH_LIBRARY_IMPL(alterops, CPU, m) {
  m.impl("delta_log_amplitude_fwd", TORCH_BOX(&alterops::statistics::delta_log_amplitude_fwd));
  m.impl("feature_variance_fwd", TORCH_BOX(&alterops::statistics::feature_variance_fwd));
}
