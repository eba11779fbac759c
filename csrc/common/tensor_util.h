// Small stable-ABI tensor helpers shared by the CPU and CUDA binding libraries (header-only:
// the CUDA library does not link the CPU binding helpers).
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/shim_utils.h>

// torch 2.13 added STABLE_TORCH_ERROR_CODE_CHECK (which at TORCH_TARGET_VERSION 2.11 is
// TORCH_ERROR_CODE_CHECK); the headers of torch 2.11 and 2.12 have only the latter.
#ifndef STABLE_TORCH_ERROR_CODE_CHECK
#define STABLE_TORCH_ERROR_CODE_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#endif

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace alterops {
namespace binding {

// An environment flag set to 1, true, yes or on (as alterops/_config.py reads flags).
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return false;
  const std::string s(v);
  return s == "1" || s == "true" || s == "yes" || s == "on";
}

// ALTEROPS_POISON_OUTPUTS=1: kernel outputs are NaN-filled before the kernels run.
inline bool poison_outputs() {
  static const bool poison = env_flag("ALTEROPS_POISON_OUTPUTS");
  return poison;
}

// "(2, 3, 4)"
inline std::string shape_str(const torch::stable::Tensor& t) {
  std::ostringstream s;
  s << "(";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << (t.dim() == 1 ? ",)" : ")");
  return s.str();
}

inline bool same_sizes(const torch::stable::Tensor& a, const torch::stable::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i)
    if (a.size(i) != b.size(i)) return false;
  return true;
}

// `t` itself when contiguous, else a contiguous copy.
inline torch::stable::Tensor contiguous(const torch::stable::Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

// A new uninitialised contiguous tensor on `device` (NaN-filled under ALTEROPS_POISON_OUTPUTS=1);
// CPU kernel outputs use new_output (binding.h), which adds the output pool.
inline torch::stable::Tensor new_device_output(const std::vector<int64_t>& sizes, torch::headeronly::ScalarType dtype,
                                               const torch::stable::Device& device) {
  torch::stable::Tensor out = torch::stable::empty(sizes, dtype, std::nullopt, device);
  if (poison_outputs() && out.numel() > 0) torch::stable::fill_(out, std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace binding
}  // namespace alterops
