// What the CPU and CUDA bindings of the neighbourhood attention ops share (stable ABI only): the
// border name and the per-axis argument lists turned into a checked Window.
#pragma once

#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

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

}  // namespace neighborhood
}  // namespace alterops
