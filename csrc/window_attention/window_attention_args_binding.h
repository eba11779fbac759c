// What the CPU and CUDA bindings of window_attention2d share (stable ABI only): the checks of q, k
// and v's shapes and dtypes against each other, of the window and shift, and of the bias table's
// shape. Device and dtype rules differ per binding and stay there.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <vector>

#include "../common/tensor_util.h"

namespace alterops {
namespace window {

// q (B, H, W, heads, head_dim); k and v of its shape and dtype.
inline void check_qkv(const torch::stable::Tensor& q, const torch::stable::Tensor& k,
                      const torch::stable::Tensor& v) {
  using torch::headeronly::toString;
  STD_TORCH_CHECK(q.dim() == 5, "window_attention2d: q must be (B, H, W, heads, head_dim), got shape ",
                  binding::shape_str(q));
  STD_TORCH_CHECK(binding::same_sizes(k, q) && binding::same_sizes(v, q), "window_attention2d: q, k, v shapes differ: ",
                  binding::shape_str(q), ", ", binding::shape_str(k), ", ", binding::shape_str(v));
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                  "window_attention2d: q, k, v dtypes differ: ", toString(q.scalar_type()), ", ",
                  toString(k.scalar_type()), ", ", toString(v.scalar_type()));
}

// window_size pair >= 1, shift pair in [0, window_size).
inline void check_window_shift(const std::vector<int64_t>& window, const std::vector<int64_t>& shift) {
  STD_TORCH_CHECK(window.size() == 2 && shift.size() == 2, "window_attention2d: window_size and shift are pairs");
  STD_TORCH_CHECK(window[0] >= 1 && window[1] >= 1, "window_attention2d: window_size must be >= 1, got (", window[0],
                  ", ", window[1], ")");
  STD_TORCH_CHECK(shift[0] >= 0 && shift[0] < window[0] && shift[1] >= 0 && shift[1] < window[1],
                  "window_attention2d: shift must be in [0, window_size), got (", shift[0], ", ", shift[1],
                  ") for window_size (", window[0], ", ", window[1], ")");
}

// The bias table: (heads or 1, 2wh-1, 2ww-1) for q's heads and the window.
inline void check_bias_shape(const torch::stable::Tensor& t, const torch::stable::Tensor& q,
                             const std::vector<int64_t>& window) {
  STD_TORCH_CHECK(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == q.size(3)) && t.size(1) == 2 * window[0] - 1 &&
                      t.size(2) == 2 * window[1] - 1,
                  "window_attention2d: rel_pos_bias must be (heads or 1, 2wh-1, 2ww-1) = (", q.size(3), " or 1, ",
                  2 * window[0] - 1, ", ", 2 * window[1] - 1, "), got shape ", binding::shape_str(t));
}

}  // namespace window
}  // namespace alterops
