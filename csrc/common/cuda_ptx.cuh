// The inline PTX of the tensor-core kernels (sm_80 and later), each instruction behind a small
// named function: warp-level matrix multiply-accumulate (mma.sync m16n8k16, float16 / bfloat16
// inputs, float32 accumulators), warp-level matrix loads from shared memory (ldmatrix) and
// asynchronous global -> shared copies (cp.async). Kernels use only these functions, never asm
// of their own, so that the CPU executor of tests/cuda_emu (which defines ALTEROPS_PTX_EMULATED
// and provides the same functions, see tests/cuda_emu/ptx_emu.h) runs them unchanged.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"),
// with g = lane >> 2 (groupID) and t = lane % 4 (threadID_in_group); a 32-bit register holds
// two 16-bit elements, the lower-numbered one in its low half:
//
//   A, 16 x 16, row-major (.row), 4 registers a[0..3] = elements a0..a7:
//     a[0] = (row g,     cols 2t, 2t+1)      a[2] = (row g,     cols 2t+8, 2t+9)
//     a[1] = (row g + 8, cols 2t, 2t+1)      a[3] = (row g + 8, cols 2t+8, 2t+9)
//   B, 16 x 8, column-major (.col), 2 registers b[0..1] = elements b0..b3:
//     b[0] = (rows 2t, 2t+1,   col g)        b[1] = (rows 2t+8, 2t+9, col g)
//   C and D, 16 x 8, float32, 4 registers:
//     c[0], c[1] = (row g,     cols 2t, 2t+1)
//     c[2], c[3] = (row g + 8, cols 2t, 2t+1)
//   mma_{a,b,c}_{row,col}(lane, element) below give the same coordinates.
//
// ldmatrix (PTX ISA, "Warp-level matrix load instruction: ldmatrix"), .m8n8 .b16: loads 1, 2
// or 4 matrices of 8 x 8 16-bit elements from shared memory; lanes 8m .. 8m+7 give the
// addresses of rows 0..7 of matrix m (x1: lanes 0-7 only, x2: lanes 0-15; the other lanes'
// pointers are not used). Each row is 16 contiguous bytes, 16-byte aligned. Register r[m] of
// lane l receives row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix m; with .trans, of
// the transposed matrix (elements (row 2 (l % 4), col l / 4) and (row 2 (l % 4) + 1, col l / 4)).
// So ldmatrix_x4 with lane l pointing at row (l % 16), column 8 (l / 16) of a 16 x 16 row-major
// tile yields the A fragment above, and ldmatrix_x2_trans with lanes 0-15 pointing at rows
// 0..15 of a 16 x 8 block of a row-major K x N matrix yields the B fragment (ldmatrix_x2 does
// the same from an N x K row-major matrix, i.e. B column-major).
//
// cp.async (PTX ISA, "Data Movement and Conversion Instructions: cp.async"): copies 4, 8 or 16
// bytes from global to shared memory asynchronously, both addresses aligned to the size. The
// copies a thread issues join its open group; cp_async_commit() closes it, cp_async_wait<N>()
// waits until at most the N most recent committed groups of this thread are pending, and
// cp_async_wait_all() waits for everything (uncommitted copies included). The data is visible to
// the issuing thread only after that wait, and to other threads after a barrier that follows it.
// With pred == false nothing is read and the destination is zero-filled.
//
// Two compiler-ordering notes: ldmatrix takes a shared address as an integer, so the compiler
// does not see it read memory: a barrier (__syncthreads / __syncwarp, which every correct use
// needs anyway since other lanes wrote the rows) must separate the writes from it. The cp.async
// functions clobber "memory", so plain loads are not moved across a wait.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if !defined(__CUDACC__) && !defined(ALTEROPS_PTX_EMULATED)
#error "cuda_ptx.cuh is for nvcc, or for the CPU executor of tests/cuda_emu (which defines ALTEROPS_PTX_EMULATED)"
#endif

namespace alterops {
namespace ptx {

// ---- fragment coordinates of mma.m16n8k16 (see above); `e` counts 16-bit elements ------------
// A: e = 0..7 (register e / 2, half e % 2); B: e = 0..3; C / D: i = 0..3 (one float each).
__host__ __device__ constexpr int mma_a_row(int lane, int e) { return (lane >> 2) + ((e >> 1) & 1) * 8; }
__host__ __device__ constexpr int mma_a_col(int lane, int e) { return (lane & 3) * 2 + (e & 1) + (e >> 2) * 8; }
__host__ __device__ constexpr int mma_b_row(int lane, int e) { return (lane & 3) * 2 + (e & 1) + (e >> 1) * 8; }
__host__ __device__ constexpr int mma_b_col(int lane, int /*e*/) { return lane >> 2; }
__host__ __device__ constexpr int mma_c_row(int lane, int i) { return (lane >> 2) + (i >> 1) * 8; }
__host__ __device__ constexpr int mma_c_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

// ---- packing: two floats rounded to nearest into one register, `lo` in the low half -----------
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}
__device__ __forceinline__ uint32_t pack_bf162(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

#ifndef ALTEROPS_PTX_EMULATED

// ---- mma.sync: d = a * b + c over the warp (all 32 lanes, converged) ---------------------------
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

namespace detail {
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
}  // namespace detail

// ---- ldmatrix: `smem_row_ptr` is this lane's row address (generic pointer into shared memory) --
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(detail::smem_address(smem_row_ptr)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(detail::smem_address(smem_row_ptr)));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(detail::smem_address(smem_row_ptr)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(detail::smem_address(smem_row_ptr)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(detail::smem_address(smem_row_ptr)));
}

// ---- cp.async: global -> shared, per thread ---------------------------------------------------
// 16 bytes, L2 only (.cg); pred == false: nothing is read, the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(detail::smem_address(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "r"(pred ? 16 : 0)
               : "memory");
}

// 8 and 4 bytes (.ca, the only form for these sizes); zero-filled when pred == false.
__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(detail::smem_address(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "r"(pred ? 8 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(detail::smem_address(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "r"(pred ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most the N most recently committed groups of this thread are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Commits the open group and waits for every copy of this thread.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

#endif  // ALTEROPS_PTX_EMULATED

}  // namespace ptx
}  // namespace alterops
