// CUDA bindings of blur2d_forward / blur2d_backward (schemas in blur_binding.cpp, the CPU
// library), on the LibTorch stable ABI only. Inputs are made contiguous (a channels-last x costs
// one copy); outputs are contiguous NCHW. Kernels run on the current CUDA stream of the input's
// device, under a guard for that device.
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
#include "blur_cuda.h"

#ifndef USE_CUDA
#error "blur_cuda_binding.cpp needs -DUSE_CUDA (the CUDA entry points of torch's C shim)"
#endif

namespace alterops {
namespace blur_cuda_binding {

using alterops::blur_cuda::DType;
using alterops::blur_cuda::Geometry;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default: break;
  }
  STD_TORCH_CHECK(false, "blur2d (cuda): supports float32, float16 and bfloat16, got ",
                  torch::headeronly::toString(t.scalar_type()));
  return DType::kFloat32;
}


cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

Geometry make_geometry(int64_t planes, int64_t H, int64_t W, const std::vector<int64_t>& kernel_size,
                       const std::vector<int64_t>& stride, const std::vector<int64_t>& padding, int64_t pad_mode) {
  STD_TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 4,
                  "blur2d: kernel_size and stride must have 2 entries, padding 4 (top, bottom, left, right)");
  STD_TORCH_CHECK(pad_mode >= 0 && pad_mode <= 2, "blur2d: pad_mode must be 0, 1 or 2");
  STD_TORCH_CHECK(H >= 1 && W >= 1, "blur2d: the spatial size must be at least 1x1");
  STD_TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1 && stride[0] >= 1 && stride[1] >= 1,
                  "blur2d: kernel_size and stride must be >= 1");
  STD_TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0,
                  "blur2d: padding must be >= 0");
  if (pad_mode == 2) {
    STD_TORCH_CHECK(padding[0] < H && padding[1] < H && padding[2] < W && padding[3] < W,
                    "blur2d: reflect padding must be < the input size");
  }
  STD_TORCH_CHECK(H + padding[0] + padding[1] >= kernel_size[0] && W + padding[2] + padding[3] >= kernel_size[1],
                  "blur2d: kernel_size larger than the padded input");
  const int64_t Hp = H + padding[0] + padding[1], Wp = W + padding[2] + padding[3];
  STD_TORCH_CHECK(Hp < (int64_t(1) << 30) && Wp < (int64_t(1) << 30), "blur2d: spatial size too large");
  Geometry g;
  g.planes = planes;
  g.H = int(H);
  g.W = int(W);
  g.kh = int(kernel_size[0]);
  g.kw = int(kernel_size[1]);
  g.sh = int(stride[0]);
  g.sw = int(stride[1]);
  g.pt = int(padding[0]);
  g.pb = int(padding[1]);
  g.pl = int(padding[2]);
  g.pr = int(padding[3]);
  g.mode = int(pad_mode);
  g.Ho = int((Hp - g.kh) / g.sh + 1);
  g.Wo = int((Wp - g.kw) / g.sw + 1);
  return g;
}

}  // namespace

Tensor blur2d_forward_cuda(Tensor x_in, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                           std::vector<int64_t> padding, int64_t pad_mode, int64_t act, double tau) {
  STD_TORCH_CHECK(x_in.dim() == 4, "blur2d_forward: x must be (B, C, H, W), got ", binding::shape_str(x_in));
  STD_TORCH_CHECK(x_in.is_cuda(), "blur2d_forward: x must be a CUDA tensor");
  STD_TORCH_CHECK(act >= 0 && act <= 2, "blur2d_forward: act must be 0, 1 or 2");
  STD_TORCH_CHECK(tau > 0, "blur2d_forward: tau must be > 0");
  const int32_t device = x_in.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const Tensor x = binding::contiguous(x_in);
  const Geometry g = make_geometry(x.size(0) * x.size(1), x.size(2), x.size(3), kernel_size, stride, padding, pad_mode);
  Tensor out = binding::new_device_output({x.size(0), x.size(1), g.Ho, g.Wo}, x.scalar_type(), x.device());
  if (out.numel() == 0) return out;
  const DType dt = dtype_of(x);
  const cudaError_t err = blur_cuda::blur2d_forward(x.const_data_ptr(), out.mutable_data_ptr(), dt, g, int(act),
                                                    float(tau), current_stream(device));
  STD_TORCH_CHECK(err == cudaSuccess, "blur2d_forward (cuda): ", cudaGetErrorString(err));
  return out;
}

Tensor blur2d_backward_cuda(Tensor grad_out_in, std::optional<Tensor> x_opt, std::vector<int64_t> input_hw,
                            std::vector<int64_t> kernel_size, std::vector<int64_t> stride, std::vector<int64_t> padding,
                            int64_t pad_mode, int64_t act, double tau) {
  STD_TORCH_CHECK(grad_out_in.dim() == 4, "blur2d_backward: grad_out must be (B, C, Ho, Wo)");
  STD_TORCH_CHECK(grad_out_in.is_cuda(), "blur2d_backward: grad_out must be a CUDA tensor");
  STD_TORCH_CHECK(input_hw.size() == 2, "blur2d_backward: input_hw must have 2 entries");
  STD_TORCH_CHECK(act >= 0 && act <= 2, "blur2d_backward: act must be 0, 1 or 2");
  STD_TORCH_CHECK(tau > 0, "blur2d_backward: tau must be > 0");
  const int32_t device = grad_out_in.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const int64_t B = grad_out_in.size(0), C = grad_out_in.size(1);
  const Geometry g = make_geometry(B * C, input_hw[0], input_hw[1], kernel_size, stride, padding, pad_mode);
  STD_TORCH_CHECK(grad_out_in.size(2) == g.Ho && grad_out_in.size(3) == g.Wo, "blur2d_backward: grad_out has spatial size ",
                  binding::shape_str(grad_out_in), " but the geometry gives ", g.Ho, "x", g.Wo);
  const Tensor gout = binding::contiguous(grad_out_in);
  Tensor x;
  if (act != 0) {
    STD_TORCH_CHECK(x_opt.has_value() && x_opt->defined(), "blur2d_backward: x is needed when act != 0");
    x = binding::contiguous(*x_opt);
    STD_TORCH_CHECK(x.dim() == 4 && x.size(0) == B && x.size(1) == C && x.size(2) == g.H && x.size(3) == g.W,
                    "blur2d_backward: x has the wrong shape");
    STD_TORCH_CHECK(x.scalar_type() == gout.scalar_type() && x.device() == gout.device(),
                    "blur2d_backward: x and grad_out differ in dtype or device");
  }
  Tensor gin = binding::new_device_output({B, C, g.H, g.W}, gout.scalar_type(), gout.device());
  if (gin.numel() == 0) return gin;
  const DType dt = dtype_of(gout);
  const cudaError_t err = blur_cuda::blur2d_backward(gout.const_data_ptr(), act != 0 ? x.const_data_ptr() : nullptr,
                                                     gin.mutable_data_ptr(), dt, g, int(act), float(tau),
                                                     current_stream(device));
  STD_TORCH_CHECK(err == cudaSuccess, "blur2d_backward (cuda): ", cudaGetErrorString(err));
  return gin;
}

}  // namespace blur_cuda_binding
}  // namespace alterops

STABLE_TORCH_LIBRARY_IMPL(alterops, CUDA, m) {
  m.impl("blur2d_forward", TORCH_BOX(&alterops::blur_cuda_binding::blur2d_forward_cuda));
  m.impl("blur2d_backward", TORCH_BOX(&alterops::blur_cuda_binding::blur2d_backward_cuda));
}
