// Kernels over the PTX wrappers of csrc/common/cuda_ptx.cuh: the fragment layouts (mma, ldmatrix),
// the cp.async group semantics, a tensor-core GEMM tile loop (cp.async global -> shared, ldmatrix,
// mma in float16 and bfloat16) and deliberately buggy variants. tests/test_cuda_emulated_ptx.py
// runs them on the CPU executor; tests/test_nvcc_compile.py compiles this file with nvcc for
// sm_80 / sm_90 (every wrapper on the real instructions, no spills).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_ptx.cuh"

namespace {

using namespace alterops::ptx;

// ---- layouts ----------------------------------------------------------------------------------
// The coordinate helpers: per lane, (row, col) of A elements 0..7, B elements 0..3, C elements 0..3.
__global__ void frag_coords_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x);
  int* o = out + lane * 32;
  for (int e = 0; e < 8; ++e) {
    o[2 * e] = mma_a_row(lane, e);
    o[2 * e + 1] = mma_a_col(lane, e);
  }
  for (int e = 0; e < 4; ++e) {
    o[16 + 2 * e] = mma_b_row(lane, e);
    o[16 + 2 * e + 1] = mma_b_col(lane, e);
  }
  for (int i = 0; i < 4; ++i) {
    o[24 + 2 * i] = mma_c_row(lane, i);
    o[24 + 2 * i + 1] = mma_c_col(lane, i);
  }
}

// pack_half2 / pack_bf162 of x[2t], x[2t + 1]: out[t] and out[n + t].
__global__ void pack_kernel(const float* x, uint32_t* out, int n) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (t >= n) return;
  out[t] = pack_half2(x[2 * t], x[2 * t + 1]);
  out[n + t] = pack_bf162(x[2 * t], x[2 * t + 1]);
}

// One mma per warp on registers given per lane (regs: a[0..3], b[0..1]; c: 4 floats), in place
// (d is c's array); d: 4 floats per lane.
template <bool kBf16>
__global__ void mma_raw_kernel(const uint32_t* regs, const float* c, float* d) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const uint32_t* p = regs + t * 6;
  const uint32_t a[4] = {p[0], p[1], p[2], p[3]};
  const uint32_t b[2] = {p[4], p[5]};
  float acc[4] = {c[t * 4], c[t * 4 + 1], c[t * 4 + 2], c[t * 4 + 3]};
  if (kBf16)
    mma_m16n8k16_bf16(acc, a, b, acc);
  else
    mma_m16n8k16_f16(acc, a, b, acc);
  for (int i = 0; i < 4; ++i) d[t * 4 + i] = acc[i];
}

// ldmatrix from a 32 x 8 tile of 16-bit values: lane l points at row rows[l] (rows[l] < 0: an
// address 2 bytes into the tile, misaligned, for lanes whose address the instruction ignores);
// out: 4 registers per lane (the unused ones 0).
__global__ void ldmatrix_kernel(const uint16_t* src, const int* rows, uint32_t* out, int mode) {
  __shared__ __align__(16) uint16_t tile[32 * 8];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 32 * 8; i += 32) tile[i] = src[i];
  __syncwarp();
  const int row = rows[lane];
  const void* p = row >= 0 ? static_cast<const void*>(&tile[row * 8]) : static_cast<const void*>(&tile[1]);
  uint32_t r[4] = {0, 0, 0, 0};
  if (mode == 0) {
    uint32_t x[1];
    ldmatrix_x1(x, p);
    r[0] = x[0];
  } else if (mode == 1) {
    uint32_t x[2];
    ldmatrix_x2(x, p);
    r[0] = x[0];
    r[1] = x[1];
  } else if (mode == 2) {
    ldmatrix_x4(r, p);
  } else if (mode == 3) {
    uint32_t x[2];
    ldmatrix_x2_trans(x, p);
    r[0] = x[0];
    r[1] = x[1];
  } else {
    ldmatrix_x4_trans(r, p);
  }
  for (int m = 0; m < 4; ++m) out[lane * 4 + m] = r[m];
}

// cp.async groups, one warp: thread t copies 16 bytes per group into its own slot s[g][t]:
// group 0 one 16-byte copy, group 1 two 8-byte copies, group 2 four 4-byte copies, then a
// zero-filling 16-byte copy left uncommitted. After wait<2>, wait<1>, wait<0> and wait_all the
// thread snapshots its four slots: out[snapshot][t][group][4].
__global__ void cp_async_groups_kernel(const float* src, float* out) {
  __shared__ __align__(16) float s[4][32][4];
  const int t = static_cast<int>(threadIdx.x);
  const float* g = src + t * 16;
  cp_async_16(&s[0][t][0], g, true);
  cp_async_commit();
  cp_async_8(&s[1][t][0], g + 4, true);
  cp_async_8(&s[1][t][2], g + 6, true);
  cp_async_commit();
  for (int i = 0; i < 4; ++i) cp_async_4(&s[2][t][i], g + 8 + i, true);
  cp_async_commit();
  cp_async_16(&s[3][t][0], g + 12, false);
  float* o = out + t * 16;
  cp_async_wait<2>();
  for (int i = 0; i < 16; ++i) o[i] = s[i / 4][t][i % 4];
  o += 32 * 16;
  cp_async_wait<1>();
  for (int i = 0; i < 16; ++i) o[i] = s[i / 4][t][i % 4];
  o += 32 * 16;
  cp_async_wait<0>();
  for (int i = 0; i < 16; ++i) o[i] = s[i / 4][t][i % 4];
  o += 32 * 16;
  cp_async_wait_all();
  for (int i = 0; i < 16; ++i) o[i] = s[i / 4][t][i % 4];
}

// ---- a tensor-core GEMM: C (M x N, float32) = A (M x K, row-major) B ----------------------------
// B is K x N row-major (bmode 0: one ldmatrix_x2_trans per n8 tile; bmode 1: one ldmatrix_x4_trans
// for both) or given as N x K row-major, i.e. column-major (bmode 2: ldmatrix_x2 for the first n8
// tile, two ldmatrix_x1 for the second). Blocks of 32 x 32 outputs, 4 warps of 16 x 16 (two
// m16n8k16 tiles each), K in steps of 32 through two shared-memory stages filled by cp.async
// (kCopy-byte copies; rows and columns outside the matrices zero-filled). Needs K % 8 == 0, and
// N % 8 == 0 for bmode 0 and 1.
constexpr int kBM = 32, kBN = 32, kBK = 32, kPad = 8, kLd = kBK + kPad;  // kBM == kBN == kBK: one tile shape

enum Bug : int {
  kNoBug = 0,
  kBugNoWait = 1,          // no cp_async_wait before the barrier: the stage is read before its copies land
  kBugWaitDepth = 2,       // cp_async_wait<2>: the stage about to be read may still be pending
  kBugNoTrailingSync = 3,  // no barrier after the compute: the next stage's copies refill a buffer in use
  kBugHalfWarp = 4,        // lanes 16..31 skip the mma
  kBugMisaligned = 5,      // A's ldmatrix rows one element off (not 16-byte aligned)
  kBugFragment = 6,        // a[1] and a[2] swapped (rows 8..15 with columns 8..15)
  kBugLdmatrixGlobal = 7,  // ldmatrix on a global pointer
  kBugCopyMisaligned = 8,  // cp.async source 8 bytes off
  kBugCopyUnguarded = 9,   // cp.async without the bounds predicate: reads past the end of A
};

template <typename T>
struct IsBf16 {
  static constexpr bool value = false;
};
template <>
struct IsBf16<__nv_bfloat16> {
  static constexpr bool value = true;
};

template <int kCopy, typename T>
__device__ __forceinline__ void copy_chunk(T* dst, const T* src, bool pred) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  if (kCopy == 16) {
    cp_async_16(dst, src, pred);
  } else if (kCopy == 8) {
    cp_async_8(dst, src, pred);
    cp_async_8(dst + 4, src + 4, pred);
  } else {
    for (int i = 0; i < 8; i += 2) cp_async_4(dst + i, src + i, pred);
  }
}

template <typename T, int kCopy>
__global__ void __launch_bounds__(128) gemm_kernel(const T* A, const T* B, float* C, int M, int N, int K, int bmode,
                                                   int bug) {
  __shared__ __align__(16) T As[2][kBM][kLd];
  __shared__ __align__(16) T Bs[2][kBK][kLd];  // [k][n] for bmode 0 / 1, [n][k] for bmode 2
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int m0 = static_cast<int>(blockIdx.y) * kBM, n0 = static_cast<int>(blockIdx.x) * kBN;
  const int wm = (warp >> 1) * 16, wn = (warp & 1) * 16;
  // this thread's 16-byte chunk of each tile: row tid / 4, elements 8 (tid % 4) ..
  const int cr = tid >> 2, cc = (tid & 3) * 8;

  auto load_stage = [&](int stage, int k0) {
    {
      const int gm = m0 + cr, gk = k0 + cc;
      const bool pred = bug == kBugCopyUnguarded || (gm < M && gk < K);
      const T* src = pred ? A + static_cast<long long>(gm) * K + gk : A;
      copy_chunk<kCopy>(&As[stage][cr][cc], bug == kBugCopyMisaligned ? src + 4 : src, pred);
    }
    if (bmode == 2) {
      const int gn = n0 + cr, gk = k0 + cc;
      const bool pred = gn < N && gk < K;
      copy_chunk<kCopy>(&Bs[stage][cr][cc], pred ? B + static_cast<long long>(gn) * K + gk : B, pred);
    } else {
      const int gk = k0 + cr, gn = n0 + cc;
      const bool pred = gk < K && gn < N;
      copy_chunk<kCopy>(&Bs[stage][cr][cc], pred ? B + static_cast<long long>(gk) * N + gn : B, pred);
    }
  };

  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  const int ktiles = (K + kBK - 1) / kBK;
  load_stage(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < ktiles; ++kt) {
    const int s = kt & 1;
    if (kt + 1 < ktiles) load_stage(s ^ 1, (kt + 1) * kBK);
    cp_async_commit();  // possibly empty: one group per iteration keeps wait<1> right
    if (bug == kBugWaitDepth)
      cp_async_wait<2>();
    else if (bug != kBugNoWait)
      cp_async_wait<1>();
    __syncthreads();
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t a[4];
      const T* ap = &As[s][wm + (lane & 15)][kk + (lane >> 4) * 8];
      if (bug == kBugMisaligned) ap += 1;
      if (bug == kBugLdmatrixGlobal) ap = A;
      ldmatrix_x4(a, ap);
      if (bug == kBugFragment) {
        const uint32_t x = a[1];
        a[1] = a[2];
        a[2] = x;
      }
      uint32_t b[2][2];
      if (bmode == 0) {
        for (int j = 0; j < 2; ++j) ldmatrix_x2_trans(b[j], &Bs[s][kk + (lane & 15)][wn + 8 * j]);
      } else if (bmode == 1) {
        uint32_t x[4];
        ldmatrix_x4_trans(x, &Bs[s][kk + (lane & 15)][wn + (lane >> 4) * 8]);
        b[0][0] = x[0];
        b[0][1] = x[1];
        b[1][0] = x[2];
        b[1][1] = x[3];
      } else {
        ldmatrix_x2(b[0], &Bs[s][wn + (lane & 7)][kk + ((lane >> 3) & 1) * 8]);
        uint32_t lo[1], hi[1];
        ldmatrix_x1(lo, &Bs[s][wn + 8 + (lane & 7)][kk]);
        ldmatrix_x1(hi, &Bs[s][wn + 8 + (lane & 7)][kk + 8]);
        b[1][0] = lo[0];
        b[1][1] = hi[0];
      }
      if (bug == kBugHalfWarp && lane >= 16) continue;
      for (int j = 0; j < 2; ++j) {
        if (IsBf16<T>::value)
          mma_m16n8k16_bf16(acc[j], a, b[j], acc[j]);
        else
          mma_m16n8k16_f16(acc[j], a, b[j], acc[j]);
      }
    }
    if (bug != kBugNoTrailingSync) __syncthreads();
  }
  for (int j = 0; j < 2; ++j)
    for (int i = 0; i < 4; ++i) {
      const int r = m0 + wm + mma_c_row(lane, i), c = n0 + wn + 8 * j + mma_c_col(lane, i);
      if (r < M && c < N) C[static_cast<long long>(r) * N + c] = acc[j][i];
    }
}

// ---- one deliberate misuse per case (launched with 32 threads unless noted) ------------------------
__global__ void checks_kernel(int which, float* gbuf) {
  __shared__ __align__(16) uint16_t tile[8 * 8];
  extern __shared__ __align__(16) uint16_t dyn[];  // 128 bytes for case 5
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 8 * 8; i += 32) tile[i] = 0;
  __syncthreads();
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  const uint16_t* row = &tile[(lane & 7) * 8];
  switch (which) {
    case 0:  // float16 mma on lanes 0-15, bfloat16 on lanes 16-31
      if (lane < 16)
        mma_m16n8k16_f16(c, a, b, c);
      else
        mma_m16n8k16_bf16(c, a, b, c);
      break;
    case 1: {  // ldmatrix .x4 on lanes 0-15, .x2 on lanes 16-31
      uint32_t r4[4], r2[2];
      if (lane < 16) {
        ldmatrix_x4(r4, row);
        c[0] = static_cast<float>(r4[0]);
      } else {
        ldmatrix_x2(r2, row);
        c[0] = static_cast<float>(r2[0]);
      }
      break;
    }
    case 2: {  // the same ldmatrix at two call sites (.aligned: one instruction for the warp)
      uint32_t r[1];
      if (lane < 16)
        ldmatrix_x1(r, row);
      else
        ldmatrix_x1(r, row);
      c[0] = static_cast<float>(r[0]);
      break;
    }
    case 3:  // lanes 16-31 exit before the mma
      if (lane >= 16) return;
      mma_m16n8k16_f16(c, a, b, c);
      break;
#ifdef ALTEROPS_PTX_EMULATED  // (for nvcc it would be the file's only local-memory use)
    case 4: {  // ldmatrix on a thread's local array
      __align__(16) uint16_t local[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      uint32_t r[1];
      ldmatrix_x1(r, local);
      c[0] = static_cast<float>(r[0]);
      break;
    }
#endif
    case 5: {  // ldmatrix: lane 7's row starts at the end of the 128-byte dynamic shared memory
      uint32_t r[1];
      ldmatrix_x1(r, &dyn[(lane & 7) * 8 + (lane == 7 ? 8 : 0)]);
      c[0] = static_cast<float>(r[0]);
      break;
    }
    case 6:  // cp.async into global memory
      cp_async_16(gbuf + lane * 4, gbuf, true);
      cp_async_wait_all();
      break;
    case 7:  // cp.async from shared memory
      cp_async_16(&tile[(lane & 3) * 8], &tile[((lane & 3) + 4) * 8], true);
      cp_async_wait_all();
      break;
    case 8:  // mma in a block of 48 threads: the second warp has 16
      mma_m16n8k16_f16(c, a, b, c);
      break;
  }
  gbuf[128 + lane] = c[0];
}

}  // namespace

// ---- C entry points (ctypes); each returns the launch error --------------------------------------
extern "C" {

int ptx_frag_coords(int* out) {
  frag_coords_kernel<<<1, 32>>>(out);
  return static_cast<int>(cudaGetLastError());
}

int ptx_pack(const float* x, uint32_t* out, int n) {
  pack_kernel<<<(n + 63) / 64, 64>>>(x, out, n);
  return static_cast<int>(cudaGetLastError());
}

int ptx_mma_raw(int bf16, const uint32_t* regs, const float* c, float* d, int warps) {
  if (bf16)
    mma_raw_kernel<true><<<warps, 32>>>(regs, c, d);
  else
    mma_raw_kernel<false><<<warps, 32>>>(regs, c, d);
  return static_cast<int>(cudaGetLastError());
}

int ptx_ldmatrix(const uint16_t* src, const int* rows, uint32_t* out, int mode) {
  ldmatrix_kernel<<<1, 32>>>(src, rows, out, mode);
  return static_cast<int>(cudaGetLastError());
}

int ptx_cp_async_groups(const float* src, float* out) {
  cp_async_groups_kernel<<<1, 32>>>(src, out);
  return static_cast<int>(cudaGetLastError());
}

// dtype: 0 float16, 1 bfloat16; copy_bytes: 16, 8 or 4.
int ptx_gemm(int dtype, int copy_bytes, const void* A, const void* B, float* C, int M, int N, int K, int bmode,
             int bug) {
  const dim3 grid((N + kBN - 1) / kBN, (M + kBM - 1) / kBM);
  const __half* Ah = static_cast<const __half*>(A);
  const __half* Bh = static_cast<const __half*>(B);
  const __nv_bfloat16* Ab = static_cast<const __nv_bfloat16*>(A);
  const __nv_bfloat16* Bb = static_cast<const __nv_bfloat16*>(B);
  if (dtype == 0 && copy_bytes == 16) gemm_kernel<__half, 16><<<grid, 128>>>(Ah, Bh, C, M, N, K, bmode, bug);
  if (dtype == 0 && copy_bytes == 8) gemm_kernel<__half, 8><<<grid, 128>>>(Ah, Bh, C, M, N, K, bmode, bug);
  if (dtype == 0 && copy_bytes == 4) gemm_kernel<__half, 4><<<grid, 128>>>(Ah, Bh, C, M, N, K, bmode, bug);
  if (dtype == 1 && copy_bytes == 16) gemm_kernel<__nv_bfloat16, 16><<<grid, 128>>>(Ab, Bb, C, M, N, K, bmode, bug);
  if (dtype == 1 && copy_bytes == 8) gemm_kernel<__nv_bfloat16, 8><<<grid, 128>>>(Ab, Bb, C, M, N, K, bmode, bug);
  if (dtype == 1 && copy_bytes == 4) gemm_kernel<__nv_bfloat16, 4><<<grid, 128>>>(Ab, Bb, C, M, N, K, bmode, bug);
  return static_cast<int>(cudaGetLastError());
}

int ptx_check(int which, float* buf) {
  checks_kernel<<<1, which == 8 ? 48 : 32, which == 5 ? 128 : 0>>>(which, buf);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
