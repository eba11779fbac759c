// CUDA bindings of blur2d_forward / blur2d_backward (schemas in csrc/cpu/blur.cpp).
// Inputs are made contiguous (a channels-last x costs one copy); outputs are contiguous NCHW.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "blur_kernels.h"

namespace alterops {
namespace blur_cuda_binding {

using alterops::blur_cuda::DType;
using alterops::blur_cuda::Geometry;

static DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "blur2d (cuda): supports float32, float16 and bfloat16, got ", t.scalar_type());
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

static Geometry make_geometry(int64_t planes, int64_t H, int64_t W, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, int64_t pad_mode) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 4,
              "blur2d: kernel_size and stride must have 2 entries, padding 4 (top, bottom, left, right)");
  TORCH_CHECK(pad_mode >= 0 && pad_mode <= 2, "blur2d: pad_mode must be 0, 1 or 2");
  TORCH_CHECK(H >= 1 && W >= 1, "blur2d: the spatial size must be at least 1x1");
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1 && stride[0] >= 1 && stride[1] >= 1,
              "blur2d: kernel_size and stride must be >= 1");
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0,
              "blur2d: padding must be >= 0");
  if (pad_mode == 2)
    TORCH_CHECK(padding[0] < H && padding[1] < H && padding[2] < W && padding[3] < W,
                "blur2d: reflect padding must be < the input size");
  TORCH_CHECK(H + padding[0] + padding[1] >= kernel_size[0] && W + padding[2] + padding[3] >= kernel_size[1],
              "blur2d: kernel_size larger than the padded input");
  const int64_t Hp = H + padding[0] + padding[1], Wp = W + padding[2] + padding[3];
  TORCH_CHECK(Hp < (int64_t(1) << 30) && Wp < (int64_t(1) << 30), "blur2d: spatial size too large");
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

at::Tensor blur2d_forward_cuda(const at::Tensor& x_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, int64_t pad_mode, int64_t act, double tau) {
  TORCH_CHECK(x_in.dim() == 4, "blur2d_forward: x must be (B, C, H, W), got ", x_in.sizes());
  TORCH_CHECK(x_in.is_cuda(), "blur2d_forward: x must be a CUDA tensor");
  TORCH_CHECK(act >= 0 && act <= 2, "blur2d_forward: act must be 0, 1 or 2");
  TORCH_CHECK(tau > 0, "blur2d_forward: tau must be > 0");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const Geometry g = make_geometry(x.size(0) * x.size(1), x.size(2), x.size(3), kernel_size, stride, padding, pad_mode);
  at::Tensor out = new_output({x.size(0), x.size(1), g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const DType dt = dtype_of(x);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err = blur_cuda::blur2d_forward(x.const_data_ptr(), out.mutable_data_ptr(), dt, g, int(act),
                                                    float(tau), stream);
  TORCH_CHECK(err == cudaSuccess, "blur2d_forward (cuda): ", cudaGetErrorString(err));
  return out;
}

at::Tensor blur2d_backward_cuda(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& x_opt,
                                at::IntArrayRef input_hw, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, int64_t pad_mode, int64_t act, double tau) {
  TORCH_CHECK(grad_out_in.dim() == 4, "blur2d_backward: grad_out must be (B, C, Ho, Wo)");
  TORCH_CHECK(grad_out_in.is_cuda(), "blur2d_backward: grad_out must be a CUDA tensor");
  TORCH_CHECK(input_hw.size() == 2, "blur2d_backward: input_hw must have 2 entries");
  TORCH_CHECK(act >= 0 && act <= 2, "blur2d_backward: act must be 0, 1 or 2");
  TORCH_CHECK(tau > 0, "blur2d_backward: tau must be > 0");
  c10::cuda::CUDAGuard guard(grad_out_in.device());
  const int64_t B = grad_out_in.size(0), C = grad_out_in.size(1);
  const Geometry g = make_geometry(B * C, input_hw[0], input_hw[1], kernel_size, stride, padding, pad_mode);
  TORCH_CHECK(grad_out_in.size(2) == g.Ho && grad_out_in.size(3) == g.Wo,
              "blur2d_backward: grad_out has spatial size ", grad_out_in.sizes(), " but the geometry gives ", g.Ho,
              "x", g.Wo);
  const at::Tensor gout = grad_out_in.contiguous();
  at::Tensor x;
  if (act != 0) {
    TORCH_CHECK(x_opt.has_value() && x_opt->defined(), "blur2d_backward: x is needed when act != 0");
    x = x_opt->contiguous();
    TORCH_CHECK(x.sizes() == at::IntArrayRef({B, C, int64_t(g.H), int64_t(g.W)}),
                "blur2d_backward: x has the wrong shape");
    TORCH_CHECK(x.scalar_type() == gout.scalar_type() && x.device() == gout.device(),
                "blur2d_backward: x and grad_out differ in dtype or device");
  }
  at::Tensor gin = new_output({B, C, g.H, g.W}, gout.options().memory_format(at::MemoryFormat::Contiguous));
  if (gin.numel() == 0) return gin;
  const DType dt = dtype_of(gout);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gout.device().index()).stream();
  const cudaError_t err = blur_cuda::blur2d_backward(gout.const_data_ptr(), act != 0 ? x.const_data_ptr() : nullptr,
                                                     gin.mutable_data_ptr(), dt, g, int(act), float(tau), stream);
  TORCH_CHECK(err == cudaSuccess, "blur2d_backward (cuda): ", cudaGetErrorString(err));
  return gin;
}

}  // namespace blur_cuda_binding
}  // namespace alterops

TORCH_LIBRARY_IMPL(alterops, CUDA, m) {
  m.impl("blur2d_forward", &alterops::blur_cuda_binding::blur2d_forward_cuda);
  m.impl("blur2d_backward", &alterops::blur_cuda_binding::blur2d_backward_cuda);
}
