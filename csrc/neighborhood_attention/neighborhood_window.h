// The argument types every neighbourhood attention kernel takes (CPU: neighborhood_attention.h,
// CUDA: neighborhood_attention_cuda.h; no torch, no CUDA types): a strided 6-d view and the
// neighbourhood. The window rule itself is documented in alterops/neighborhood_attention_nd.py.
#pragma once

#include <cstdint>

namespace alterops {
namespace neighborhood {

// Border rule (see alterops/neighborhood_attention_nd.py).
enum Border : int32_t { kClamp = 0, kMask = 1, kZero = 2 };

// A (B, T, H, W, heads, D) tensor: data pointer, sizes and element strides.
struct View6 {
  const void* data;
  int64_t size[6];
  int64_t stride[6];
};

// The neighbourhood: per spatial axis (T, H, W) kernel size >= 1, dilation >= 1, stride in
// [1, kernel] and causal flag (kernel * dilation <= axis length with "clamp"), and the border.
struct Window {
  int64_t kernel[3];
  int64_t dilation[3];
  int64_t stride[3];
  int32_t causal[3];
  int32_t border;  // Border
};

}  // namespace neighborhood
}  // namespace alterops
