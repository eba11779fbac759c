// Helpers of the binding layer: turning torch::stable::Tensors into the raw-pointer calls of the
// kernels (csrc/<family>/<family>.h). Bindings use only the LibTorch stable ABI
// (torch/csrc/stable, TORCH_TARGET_VERSION = the oldest supported torch), so one build runs on
// that torch and every later one. Bindings check every argument (a clear error naming it) before
// any kernel runs; kernels assume checked arguments.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernel_table.h"
#include "parallel.h"
#include "scalar.h"
#include "tensor_util.h"

namespace alterops {
namespace binding {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

// The CPU kernel table of the level loaded by alterops._ext (error if none is loaded yet).
const KernelTable& cpu_kernels();

// torch's intra-op pool, for the kernels.
Parallel cpu_parallel();

// The kernels' element type for a tensor of `t`'s dtype; error (naming `what`) for other dtypes.
DType dtype_of(ScalarType t, const char* what);
ScalarType scalar_type_of(DType t);

// A new uninitialised contiguous CPU tensor, from the output pool when >= 4 MiB (NaN-filled
// under ALTEROPS_POISON_OUTPUTS=1).
Tensor new_output(const std::vector<int64_t>& sizes, ScalarType dtype);
// A contiguous float32 copy of `t` from the pool (how 16-bit inputs reach float32 kernels).
Tensor float_copy(const Tensor& t);
// A contiguous float32 copy of `t` (last dimension D <= width) with `width` channels, D.. zero
// (how heads of other widths reach the float32 kernels' fast widths).
Tensor float_copy_padded(const Tensor& t, int64_t width);
// dst = the first dst.size(-1) channels of src (dtype conversion included).
void copy_narrowed(Tensor& dst, const Tensor& src);
// With widen, float_copy(t); otherwise t itself.
Tensor float_copy_if(bool widen, const Tensor& t);
// With widen, a new float32 output of out's sizes (the kernel writes it; copy_into then rounds it
// into out); otherwise out itself.
Tensor float_output_if(bool widen, const Tensor& out);
// A zero-filled contiguous CPU tensor (not pooled).
Tensor zeros(const std::vector<int64_t>& sizes, ScalarType dtype);
// Copies src into dst (dtype conversion included).
void copy_into(Tensor& dst, const Tensor& src);

template <class T>
inline const T* cptr(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <class T>
inline T* mptr(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

}  // namespace binding
}  // namespace alterops
