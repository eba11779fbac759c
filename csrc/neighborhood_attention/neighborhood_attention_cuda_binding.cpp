// CUDA implementations of neighborhood_attention_nd_fwd / neighborhood_attention_nd_bwd (schemas in
// neighborhood_attention_binding.cpp, the CPU library), on the LibTorch stable ABI only. The same
// argument checks as the CPU binding; q, k, v, dout and out are passed with their strides (no
// copies); out, lse, dq, dk, dv and dbias are new contiguous tensors. bias and dlse are used in
// float32. Kernels run on the current CUDA stream of q's device, under a guard for that device,
// with a workspace tensor (the launchers' *_workspace_bytes) from torch's caching allocator.
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
#include "neighborhood_attention_cuda.h"
#include "neighborhood_window_binding.h"

#ifndef USE_CUDA
#error "neighborhood_attention_cuda_binding.cpp needs -DUSE_CUDA (the CUDA entry points of torch's C shim)"
#endif

namespace alterops {
namespace neighborhood_cuda_binding {

using alterops::neighborhood_cuda::DType;
using alterops::neighborhood_cuda::Tensor6;
using alterops::neighborhood_cuda::Window;
using binding::shape_str;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

constexpr const char* kOp = "neighborhood_attention_nd";

const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

DType dtype_of(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default: break;
  }
  STD_TORCH_CHECK(false, kOp, " (cuda): q must be float32, float16 or bfloat16, got ", dtype_name(t));
  return DType::kFloat32;
}

// The launch error as a message (with what to do when the device has too little shared memory).
void check_launch(cudaError_t err, const char* which) {
  STD_TORCH_CHECK(err != cudaErrorLaunchOutOfResources, kOp, which, " (cuda): ", cudaGetErrorString(err),
                  ": the kernels for this dtype and head_dim need more shared memory per block than this GPU "
                  "allows (up to 99 KiB); use backend='triton' or 'reference'");
  STD_TORCH_CHECK(err == cudaSuccess, kOp, which, " (cuda): ", cudaGetErrorString(err));
}

cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

// A CUDA tensor on q's device.
void check_device(const Tensor& t, const Tensor& q, const char* name) {
  STD_TORCH_CHECK(t.is_cuda(), kOp, " (cuda): ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == q.get_device_index(), kOp, " (cuda): ", name, " is on cuda:",
                  t.get_device_index(), " but q is on cuda:", q.get_device_index());
}

// A tensor of q's dtype on q's device, shaped like q except (for k and v) the heads.
void check_like_q(const Tensor& t, const Tensor& q, const char* name, bool any_heads) {
  check_device(t, q, name);
  bool same = t.dim() == q.dim();
  const int64_t head_axis = q.dim() - 2;
  for (int64_t d = 0; same && d < q.dim(); ++d) same = t.size(d) == q.size(d) || (any_heads && d == head_axis);
  STD_TORCH_CHECK(same, kOp, ": ", name, " has shape ", shape_str(t), " but q has shape ", shape_str(q),
                  any_heads ? " (only the heads may differ)" : "");
  STD_TORCH_CHECK(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " has dtype ", dtype_name(t.scalar_type()),
                  " but q has dtype ", dtype_name(q.scalar_type()));
}

void check_float(const Tensor& t, const char* name) {
  const ScalarType s = t.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Float || s == ScalarType::Double || s == ScalarType::Half ||
                      s == ScalarType::BFloat16,
                  kOp, ": ", name, " must be a floating tensor, got ", dtype_name(s));
}

// Checks q, k, v, the window and the bias (as the CPU binding does); the kernels' element type.
DType check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Window& w,
                   const std::optional<Tensor>& bias) {
  STD_TORCH_CHECK(q.dim() == 6, kOp, ": q must be (B, T, H, W, heads, head_dim), got shape ", shape_str(q));
  STD_TORCH_CHECK(q.is_cuda(), kOp, " (cuda): q must be a CUDA tensor");
  const DType dt = dtype_of(q.scalar_type());
  check_like_q(k, q, "k", true);
  check_like_q(v, q, "v", true);
  neighborhood::check_heads(q, k, v, kOp);
  STD_TORCH_CHECK(q.size(5) <= neighborhood_cuda::kMaxHeadDim, kOp, " (cuda): head_dim must be <= ",
                  neighborhood_cuda::kMaxHeadDim, ", got ", q.size(5));
  neighborhood::check_window(q, w, kOp);
  if (bias.has_value()) {
    check_device(*bias, q, "bias");
    neighborhood::check_bias_shape(*bias, q, w, kOp);
    check_float(*bias, "bias");
  }
  return dt;
}

// t as float32, contiguous.
Tensor float_contiguous(const Tensor& t) {
  return binding::contiguous(t.scalar_type() == ScalarType::Float ? t : torch::stable::to(t, ScalarType::Float));
}

Tensor6 tensor6(const Tensor& t) {
  Tensor6 v;
  v.data = t.const_data_ptr();
  for (int d = 0; d < 6; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  return v;
}

std::vector<int64_t> sizes_of(const Tensor& t) { return std::vector<int64_t>(t.sizes().begin(), t.sizes().end()); }

// lse's shape for q: (B, heads, T, H, W).
std::vector<int64_t> lse_sizes(const Tensor& q) { return {q.size(0), q.size(4), q.size(1), q.size(2), q.size(3)}; }

// A (B, heads, T, H, W) tensor like lse on q's device, checked, as float32, contiguous.
Tensor lse_like(const Tensor& t, const Tensor& q, const char* name) {
  check_device(t, q, name);
  STD_TORCH_CHECK(sizes_of(t) == lse_sizes(q), kOp, ": ", name, " must be (B, heads, T, H, W), got ", shape_str(t),
                  " for q of shape ", shape_str(q));
  check_float(t, name);
  return float_contiguous(t);
}

Tensor workspace(size_t bytes, const Tensor& q) {
  return torch::stable::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, ScalarType::Byte, std::nullopt,
                              q.device());
}

std::tuple<Tensor, Tensor> na_nd_fwd(const Tensor& q, const Tensor& k, const Tensor& v, std::vector<int64_t> kernel,
                                     std::vector<int64_t> dilation, std::vector<int64_t> stride,
                                     std::vector<int64_t> causal, const std::string& border,
                                     const std::optional<Tensor>& bias, double scale) {
  const Window win = neighborhood::window_nd(kernel, dilation, stride, causal, border, kOp);
  const DType dt = check_inputs(q, k, v, win, bias);
  const int32_t device = q.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  Tensor out = binding::new_device_output(sizes_of(q), q.scalar_type(), q.device());
  Tensor lse = binding::new_device_output(lse_sizes(q), ScalarType::Float, q.device());
  if (out.numel() == 0) return {out, lse};
  const Tensor table = bias.has_value() ? float_contiguous(*bias) : Tensor();

  neighborhood_cuda::ForwardArgs a{};
  a.dtype = dt;
  a.q = tensor6(q);
  a.k = tensor6(k);
  a.v = tensor6(v);
  a.out = out.mutable_data_ptr();
  a.lse = static_cast<float*>(lse.mutable_data_ptr());
  a.bias = table.defined() ? static_cast<const float*>(table.const_data_ptr()) : nullptr;
  a.bias_heads = table.defined() ? table.size(0) : 1;
  a.win = win;
  a.scale = scale;
  Tensor ws = workspace(neighborhood_cuda::forward_workspace_bytes(a), q);
  check_launch(neighborhood_cuda::forward(a, ws.mutable_data_ptr(), current_stream(device)), "_fwd");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> na_nd_bwd(const Tensor& dout_in, const Tensor& q, const Tensor& k,
                                                     const Tensor& v, const Tensor& out, const Tensor& lse_in,
                                                     const std::optional<Tensor>& dlse_in, std::vector<int64_t> kernel,
                                                     std::vector<int64_t> dilation, std::vector<int64_t> stride,
                                                     std::vector<int64_t> causal, const std::string& border,
                                                     const std::optional<Tensor>& bias, double scale, bool bias_grad) {
  const Window win = neighborhood::window_nd(kernel, dilation, stride, causal, border, kOp);
  const DType dt = check_inputs(q, k, v, win, bias);
  check_device(dout_in, q, "dout");
  STD_TORCH_CHECK(binding::same_sizes(dout_in, q), kOp, ": dout has shape ", shape_str(dout_in),
                  " but q has shape ", shape_str(q));
  check_float(dout_in, "dout");
  check_like_q(out, q, "out", false);
  const int32_t device = q.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const Tensor dout = dout_in.scalar_type() == q.scalar_type() ? dout_in : torch::stable::to(dout_in, q.scalar_type());
  const Tensor lse = lse_like(lse_in, q, "lse");
  const Tensor dlse = dlse_in.has_value() ? lse_like(*dlse_in, q, "dlse") : Tensor();

  Tensor dq = binding::new_device_output(sizes_of(q), q.scalar_type(), q.device());
  Tensor dk = binding::new_device_output(sizes_of(k), q.scalar_type(), q.device());
  Tensor dv = binding::new_device_output(sizes_of(v), q.scalar_type(), q.device());
  const bool want_db = bias_grad && bias.has_value();
  const Tensor table = bias.has_value() ? float_contiguous(*bias) : Tensor();
  Tensor dbias = binding::new_device_output(want_db ? sizes_of(table) : std::vector<int64_t>{0}, ScalarType::Float,
                                            q.device());
  if (q.numel() == 0) {
    torch::stable::zero_(dq);
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
    if (want_db) torch::stable::zero_(dbias);
    return {dq, dk, dv, dbias};
  }

  neighborhood_cuda::BackwardArgs a{};
  a.dtype = dt;
  a.dout = tensor6(dout);
  a.q = tensor6(q);
  a.k = tensor6(k);
  a.v = tensor6(v);
  a.out = tensor6(out);
  a.lse = static_cast<const float*>(lse.const_data_ptr());
  a.dlse = dlse.defined() ? static_cast<const float*>(dlse.const_data_ptr()) : nullptr;
  a.bias = table.defined() ? static_cast<const float*>(table.const_data_ptr()) : nullptr;
  a.bias_heads = table.defined() ? table.size(0) : 1;
  a.dq = dq.mutable_data_ptr();
  a.dk = dk.mutable_data_ptr();
  a.dv = dv.mutable_data_ptr();
  a.dbias = want_db ? static_cast<float*>(dbias.mutable_data_ptr()) : nullptr;
  a.win = win;
  a.scale = scale;
  Tensor ws = workspace(neighborhood_cuda::backward_workspace_bytes(a), q);
  check_launch(neighborhood_cuda::backward(a, ws.mutable_data_ptr(), current_stream(device)), "_bwd");
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace neighborhood_cuda_binding
}  // namespace alterops

STABLE_TORCH_LIBRARY_IMPL(alterops, CUDA, m) {
  m.impl("neighborhood_attention_nd_fwd", TORCH_BOX(&alterops::neighborhood_cuda_binding::na_nd_fwd));
  m.impl("neighborhood_attention_nd_bwd", TORCH_BOX(&alterops::neighborhood_cuda_binding::na_nd_bwd));
}
