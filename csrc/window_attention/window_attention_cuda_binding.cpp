// CUDA bindings of window_attention2d_fwd / window_attention2d_bwd (schemas in
// window_attention_binding.cpp, the CPU library), on the LibTorch stable ABI only. The same
// argument checks as the CPU op; q, k, v, grad_out and out are read in place with their strides
// (views into a fused qkv cost no copy), lse with its strides; outputs are contiguous, the
// workspace is a byte tensor of the size the launchers ask for. Kernels run on the current CUDA
// stream of the inputs' device, under a guard for that device.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/tensor_util.h"
#include "window_attention_args_binding.h"
#include "window_attention_cuda.h"

#ifndef USE_CUDA
#error "window_attention_cuda_binding.cpp needs -DUSE_CUDA (the CUDA entry points of torch's C shim)"
#endif

namespace alterops {
namespace window_cuda_binding {

using alterops::window::check_bias_shape;
using alterops::window::check_qkv;
using alterops::window::check_window_shift;
using alterops::window_cuda::DType;
using alterops::window_cuda::Path;
using alterops::window_cuda::Problem;
using alterops::window_cuda::Tensor4;
using alterops::window_cuda::Tensor5;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

Tensor5 tensor5(const Tensor& t) {
  Tensor5 s;
  s.data = t.const_data_ptr();
  for (int64_t i = 0; i < 5; ++i) s.stride[i] = t.stride(i);
  return s;
}

Tensor4 tensor4(const Tensor& t) {
  Tensor4 s;
  s.data = static_cast<const float*>(t.const_data_ptr());
  for (int64_t i = 0; i < 4; ++i) s.stride[i] = t.stride(i);
  return s;
}

std::vector<int64_t> sizes_of(const Tensor& t) { return std::vector<int64_t>(t.sizes().begin(), t.sizes().end()); }

void check_on(const Tensor& t, const Tensor& q, const char* name) {
  STD_TORCH_CHECK(t.is_cuda(), "window_attention2d: ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == q.get_device_index(), "window_attention2d: ", name, " is on cuda:",
                  int(t.get_device_index()), " but q is on cuda:", int(q.get_device_index()));
}

DType dtype_of(ScalarType st) {
  switch (st) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default: break;
  }
  STD_TORCH_CHECK(false, "window_attention2d: q must be float32, float16 or bfloat16 on CUDA, got ", dtype_name(st));
  return DType::kFloat32;
}

// The checks both ops share; returns q's element type.
DType check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& bias,
                   const std::vector<int64_t>& window, const std::vector<int64_t>& shift) {
  STD_TORCH_CHECK(q.is_cuda(), "window_attention2d: q must be a CUDA tensor");
  check_on(k, q, "k");
  check_on(v, q, "v");
  check_qkv(q, k, v);
  const DType dt = dtype_of(q.scalar_type());
  check_window_shift(window, shift);
  if (bias.has_value()) {
    const Tensor& t = *bias;
    check_on(t, q, "rel_pos_bias");
    check_bias_shape(t, q, window);
    STD_TORCH_CHECK(t.scalar_type() == ScalarType::Float, "window_attention2d: rel_pos_bias must be float32, got ",
                    dtype_name(t.scalar_type()));
  }
  return dt;
}

Problem problem(const Tensor& q, const std::vector<int64_t>& window, const std::vector<int64_t>& shift, double scale,
                DType dtype, const std::optional<Tensor>& table) {
  Problem p;
  p.dtype = dtype;
  p.batch = q.size(0);
  p.height = q.size(1);
  p.width = q.size(2);
  p.heads = q.size(3);
  p.head_dim = q.size(4);
  p.window_h = window[0];
  p.window_w = window[1];
  p.shift_h = shift[0];
  p.shift_w = shift[1];
  p.scale = scale;
  p.table = table.has_value() ? static_cast<const float*>(table->const_data_ptr()) : nullptr;
  p.table_heads = table.has_value() ? table->size(0) : 0;
  return p;
}

// The launchers' own limits (window tokens, head_dim, sizes), as an error naming them.
void check_supported(const Problem& p) {
  const char* why = window_cuda::unsupported(p, window_cuda::resolve_path(p, Path::kAuto));
  STD_TORCH_CHECK(why == nullptr, "window_attention2d (cuda): ", why ? why : "", "; got window_size (", p.window_h,
                  ", ", p.window_w, ") and head_dim ", p.head_dim);
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return torch::stable::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, ScalarType::Byte, std::nullopt,
                              like.device());
}

std::tuple<Tensor, Tensor> fwd(Tensor q, Tensor k, Tensor v, std::optional<Tensor> rel_pos_bias,
                               std::vector<int64_t> window_size, std::vector<int64_t> shift, double scale) {
  const DType dt = check_inputs(q, k, v, rel_pos_bias, window_size, shift);
  const int32_t device = q.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const std::vector<int64_t> sizes = sizes_of(q);
  Tensor out = binding::new_device_output(sizes, q.scalar_type(), q.device());
  Tensor lse = binding::new_device_output({sizes[0], sizes[1], sizes[2], sizes[3]}, ScalarType::Float, q.device());
  std::optional<Tensor> table;
  if (rel_pos_bias.has_value()) table = binding::contiguous(*rel_pos_bias);
  const Problem p = problem(q, window_size, shift, scale, dt, table);
  check_supported(p);
  if (q.numel() == 0) return {out, lse};
  Tensor ws = workspace(window_cuda::forward_workspace_bytes(p, Path::kAuto), q);
  const cudaError_t err = window_cuda::forward(p, tensor5(q), tensor5(k), tensor5(v), out.mutable_data_ptr(),
                                               static_cast<float*>(lse.mutable_data_ptr()), ws.mutable_data_ptr(),
                                               Path::kAuto, current_stream(device));
  STD_TORCH_CHECK(err == cudaSuccess, "window_attention2d_fwd (cuda): ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                               std::optional<Tensor> rel_pos_bias, std::vector<int64_t> window_size,
                                               std::vector<int64_t> shift, double scale, bool bias_grad) {
  const DType dt = check_inputs(q, k, v, rel_pos_bias, window_size, shift);
  const ScalarType st = q.scalar_type();
  check_on(grad_out, q, "grad_out");
  check_on(out, q, "out");
  check_on(lse, q, "lse");
  STD_TORCH_CHECK(binding::same_sizes(grad_out, q) && binding::same_sizes(out, q),
                  "window_attention2d: grad_out and out must have q's shape ", binding::shape_str(q), ", got ",
                  binding::shape_str(grad_out), " and ", binding::shape_str(out));
  STD_TORCH_CHECK(grad_out.scalar_type() == st && out.scalar_type() == st,
                  "window_attention2d: grad_out and out must have q's dtype ", dtype_name(st), ", got ",
                  dtype_name(grad_out.scalar_type()), " and ", dtype_name(out.scalar_type()));
  STD_TORCH_CHECK(lse.dim() == 4 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2) &&
                      lse.size(3) == q.size(3),
                  "window_attention2d: lse must be (B, H, W, heads) = (", q.size(0), ", ", q.size(1), ", ", q.size(2),
                  ", ", q.size(3), "), got shape ", binding::shape_str(lse));
  STD_TORCH_CHECK(lse.scalar_type() == ScalarType::Float, "window_attention2d: lse must be float32, got ",
                  dtype_name(lse.scalar_type()));
  const int32_t device = q.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const std::vector<int64_t> sizes = sizes_of(q);
  Tensor dq = binding::new_device_output(sizes, st, q.device());
  Tensor dk = binding::new_device_output(sizes, st, q.device());
  Tensor dv = binding::new_device_output(sizes, st, q.device());
  const bool want_db = bias_grad && rel_pos_bias.has_value();
  std::optional<Tensor> table;
  if (rel_pos_bias.has_value()) table = binding::contiguous(*rel_pos_bias);
  const Problem p = problem(q, window_size, shift, scale, dt, table);
  check_supported(p);
  Tensor db = want_db ? binding::new_device_output(sizes_of(*rel_pos_bias), ScalarType::Float, q.device())
                      : binding::new_device_output({0}, ScalarType::Float, q.device());
  if (q.numel() == 0) {
    if (want_db) torch::stable::zero_(db);
    return {dq, dk, dv, db};
  }
  Tensor ws = workspace(window_cuda::backward_workspace_bytes(p, want_db, Path::kAuto), q);
  const cudaError_t err = window_cuda::backward(
      p, tensor5(grad_out), tensor5(q), tensor5(k), tensor5(v), tensor5(out), tensor4(lse), dq.mutable_data_ptr(),
      dk.mutable_data_ptr(), dv.mutable_data_ptr(), want_db ? static_cast<float*>(db.mutable_data_ptr()) : nullptr,
      ws.mutable_data_ptr(), Path::kAuto, current_stream(device));
  STD_TORCH_CHECK(err == cudaSuccess, "window_attention2d_bwd (cuda): ", cudaGetErrorString(err));
  return {dq, dk, dv, db};
}

}  // namespace
}  // namespace window_cuda_binding
}  // namespace alterops

STABLE_TORCH_LIBRARY_IMPL(alterops, CUDA, m) {
  m.impl("window_attention2d_fwd", TORCH_BOX(&alterops::window_cuda_binding::fwd));
  m.impl("window_attention2d_bwd", TORCH_BOX(&alterops::window_cuda_binding::bwd));
}
