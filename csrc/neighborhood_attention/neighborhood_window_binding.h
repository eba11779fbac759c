// What the CPU and CUDA bindings of the neighbourhood attention ops share (stable ABI only): the
// border name and the per-axis argument lists turned into a Window, and the checks of the heads,
// the window and the bias table's shape against q.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../common/tensor_util.h"
#include "neighborhood_window.h"

namespace alterops {
namespace neighborhood {

inline int32_t border_code(const std::string& b, const char* op) {
  if (b == "clamp") return kClamp;
  if (b == "mask") return kMask;
  if (b == "zero") return kZero;
  STD_TORCH_CHECK(false, op, ": border must be 'clamp', 'mask' or 'zero', got '", b, "'");
  return kClamp;
}

// The op's kernel_size, dilation, stride and causal lists (three entries each: T, H, W).
inline Window window_nd(const std::vector<int64_t>& kernel, const std::vector<int64_t>& dilation,
                        const std::vector<int64_t>& stride, const std::vector<int64_t>& causal,
                        const std::string& border, const char* op) {
  const std::vector<int64_t>* lists[4] = {&kernel, &dilation, &stride, &causal};
  const char* names[4] = {"kernel_size", "dilation", "stride", "causal"};
  for (int i = 0; i < 4; ++i)
    STD_TORCH_CHECK(lists[i]->size() == 3, op, ": ", names[i], " must have 3 entries (T, H, W), got ",
                    lists[i]->size());
  Window w{};
  for (int a = 0; a < 3; ++a) {
    w.kernel[a] = kernel[a];
    w.dilation[a] = dilation[a];
    w.stride[a] = stride[a];
    w.causal[a] = static_cast<int32_t>(causal[a]);
  }
  w.border = border_code(border, op);
  return w;
}

// The heads of q (B, T, H, W, heads, D) against those of k and v (a divisor, read in place).
inline void check_heads(const torch::stable::Tensor& q, const torch::stable::Tensor& k,
                        const torch::stable::Tensor& v, const char* op) {
  const int64_t heads = q.size(4), heads_kv = k.size(4);
  STD_TORCH_CHECK(v.size(4) == heads_kv, op, ": k has ", heads_kv, " heads but v has ", v.size(4));
  STD_TORCH_CHECK(heads_kv >= 1 && heads % heads_kv == 0, op, ": heads of q (", heads,
                  ") must be a multiple of the heads of k and v (", heads_kv, ")");
}

// The window against q's (T, H, W) (the rules of alterops/neighborhood_attention_nd.py).
inline void check_window(const torch::stable::Tensor& q, const Window& w, const char* op) {
  const char* axis_name[3] = {"T", "H", "W"};
  for (int a = 0; a < 3; ++a) {
    const int64_t L = q.size(1 + a);
    const int64_t ks = w.kernel[a], d = w.dilation[a], s = w.stride[a];
    STD_TORCH_CHECK(ks >= 1, op, ": kernel_size must be >= 1, got ", ks, " on axis ", axis_name[a]);
    STD_TORCH_CHECK(d >= 1, op, ": dilation must be >= 1, got ", d, " on axis ", axis_name[a]);
    STD_TORCH_CHECK(s >= 1 && s <= ks, op, ": stride must be in [1, kernel_size] = [1, ", ks, "], got ", s,
                    " on axis ", axis_name[a]);
    STD_TORCH_CHECK(w.causal[a] == 0 || w.causal[a] == 1, op, ": causal must be 0 or 1, got ", w.causal[a]);
    if (w.border == kClamp) {
      STD_TORCH_CHECK(ks * d <= L, op, ": border 'clamp' needs kernel_size * dilation <= the axis length, got kernel ",
                      ks, ", dilation ", d, " on axis ", axis_name[a], " of length ", L);
    } else {
      STD_TORCH_CHECK(s == 1 && w.causal[a] == 0, op,
                      ": borders 'mask' and 'zero' need stride 1 and no causal axis, got stride ", s, ", causal ",
                      w.causal[a], " on axis ", axis_name[a]);
    }
  }
}

// The bias table's shape: (heads|1, 2kt-1, 2kh-1, 2kw-1) for q's heads and the window.
inline void check_bias_shape(const torch::stable::Tensor& b, const torch::stable::Tensor& q, const Window& w,
                             const char* op) {
  const int64_t heads = q.size(4);
  bool ok = b.dim() == 4 && (b.size(0) == 1 || b.size(0) == heads);
  for (int a = 0; ok && a < 3; ++a) ok = b.size(1 + a) == 2 * w.kernel[a] - 1;
  STD_TORCH_CHECK(ok, op, ": bias must be (heads|1, 2kt-1, 2kh-1, 2kw-1) = (", heads, "|1, ", 2 * w.kernel[0] - 1,
                  ", ", 2 * w.kernel[1] - 1, ", ", 2 * w.kernel[2] - 1, "), got ", binding::shape_str(b));
}

}  // namespace neighborhood
}  // namespace alterops
