// Allocation of the CPU kernels' outputs.
//
// A fresh output of tens of MB comes from mmap, and every first write into one of its pages
// faults into the kernel, which zeroes the page: on the bandwidth-bound ops that costs more
// than the op itself (a 55 MB blur output: ~17 ms of faults and zeroing against ~3 ms of
// work). Like the CUDA caching allocator, outputs of at least 4 MiB are served from a pool of
// freed blocks (exact size classes of 2 MiB granules), so the pages of a step's outputs are
// faulted in once and reused by the next step.
//
// The pool keeps at most a limit of unused bytes (ALTEROPS_CPU_POOL_MB, default 1024, 0 turns
// the pool off; set by alterops._ext when the extension loads); alterops.empty_cache() returns
// them to the system. Blocks in use are never
// capped: the pool holds on to memory only between a tensor's release and the next request.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace alterops {
namespace cpu {

// An uninitialised contiguous tensor (NaN-filled under ALTEROPS_POISON_OUTPUTS=1).
at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts);

// A contiguous float32 copy of `t`, from the pool: how bfloat16 inputs reach the float32
// kernels. With the pool warm the copy stays in cache-sized, already-faulted blocks.
at::Tensor float_copy(const at::Tensor& t);

}  // namespace cpu
}  // namespace alterops
