// The PTX wrappers of csrc/common/cuda_ptx.cuh for the CPU executor (included by cuda_emu.h,
// which is force-included before the .cu file, so that cuda_ptx.cuh finds
// ALTEROPS_PTX_EMULATED defined and leaves these definitions in place of its asm).
//
// Same names, namespace and call syntax as the real ones; each takes two more defaulted
// arguments, the call site (__builtin_FILE / __builtin_LINE), for the messages. The work is
// done in emu_runtime.cpp: mma and ldmatrix are warp collectives of the fiber scheduler (every
// lane of the warp must reach the same call), cp.async copies are recorded per thread and
// performed at the wait that completes their group (see README.md).
#pragma once

#include <cstdint>

#define ALTEROPS_PTX_EMULATED 1

namespace emu {

enum MmaType : int { kMmaF16 = 0, kMmaBF16 = 1 };
void warp_mma_m16n8k16(int type, float* d, const uint32_t* a, const uint32_t* b, const float* c, const char* file,
                       int line);
void warp_ldmatrix(int num, int trans, uint32_t* r, const void* row, const char* file, int line);
void cp_async(void* dst, const void* src, int bytes, int pred, const char* file, int line);
void cp_async_commit(const char* file, int line);
void cp_async_wait(int pending, const char* file, int line);  // pending < 0: wait_all

}  // namespace emu

namespace alterops {
namespace ptx {

inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::emu::warp_mma_m16n8k16(::emu::kMmaF16, d, a, b, c, file, line);
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::emu::warp_mma_m16n8k16(::emu::kMmaBF16, d, a, b, c, file, line);
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row_ptr, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ::emu::warp_ldmatrix(1, 0, r, smem_row_ptr, file, line);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row_ptr, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ::emu::warp_ldmatrix(2, 0, r, smem_row_ptr, file, line);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row_ptr, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ::emu::warp_ldmatrix(4, 0, r, smem_row_ptr, file, line);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row_ptr, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  ::emu::warp_ldmatrix(2, 1, r, smem_row_ptr, file, line);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row_ptr, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  ::emu::warp_ldmatrix(4, 1, r, smem_row_ptr, file, line);
}

inline void cp_async_16(void* smem_dst, const void* gmem_src, bool pred, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ::emu::cp_async(smem_dst, gmem_src, 16, pred, file, line);
}
inline void cp_async_8(void* smem_dst, const void* gmem_src, bool pred, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::emu::cp_async(smem_dst, gmem_src, 8, pred, file, line);
}
inline void cp_async_4(void* smem_dst, const void* gmem_src, bool pred, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::emu::cp_async(smem_dst, gmem_src, 4, pred, file, line);
}
inline void cp_async_commit(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::emu::cp_async_commit(file, line);
}
template <int N>
inline void cp_async_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
  ::emu::cp_async_wait(N, file, line);
}
inline void cp_async_wait_all(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::emu::cp_async_wait(-1, file, line);
}

}  // namespace ptx
}  // namespace alterops
