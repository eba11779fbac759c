// CUDA emulation header, force-included (g++ -include) before a .cu file that
// tests/cuda_emu/driver.py has rewritten for the host compiler (see README.md).
//
// It pulls in CUDA's own host headers (types, cudaError_t, dim3, __half, __nv_bfloat16 and
// their host conversions), then redefines the execution-space keywords to nothing and maps the
// device built-ins onto the executor in emu_runtime.cpp: threadIdx / blockIdx / blockDim /
// gridDim, the barriers, the warp collectives (masks checked), atomics, shared memory and the
// few device math functions the host library lacks; ptx_emu.h (included at the end) does the same
// for the tensor-core PTX wrappers of csrc/common/cuda_ptx.cuh.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __grid_constant__
#undef __launch_bounds__
#undef __noinline__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __launch_bounds__(...)
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
// The driver rewrites every `__shared__` declaration; one left over is a declaration it did not
// understand (namespace scope, several names in one declaration, ...): fail loudly.
#define __shared__ __shared___declaration_not_rewritten_by_the_cuda_emu_driver

namespace emu {

struct Fiber;

// ---- runtime state (emu_runtime.cpp) --------------------------------------------------
extern Fiber* g_cur;  // the running thread, null on the host
extern dim3 g_block_idx, g_block_dim, g_grid_dim;
const uint3& thread_idx();  // of g_cur; fails (and aborts the launch) on the host

// Barriers and warp collectives. Every one is a switch point of the fiber scheduler.
int syncthreads(int kind, int pred, const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
uint64_t warp_collective(int op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);
enum WarpOp : int { kSyncwarp = 0, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kReduceAdd,
                    kReduceMin, kReduceMax, kReduceAnd, kReduceOr, kReduceXor,
                    // .sync.aligned matrix instructions (ptx_emu.h): the whole warp, the same call site
                    kMma, kLdmatrix };
enum BarKind : int { kBarPlain = 0, kBarCount, kBarAnd, kBarOr };

// Shared memory.
void* dynamic_smem();
void static_smem(void* p, size_t bytes, const char* name, const char* file, int line);

// Launch (the driver rewrites `k<<<g, b, s, st>>>(args)` into
// `::emu::Launch(g, b, s, st).bounds(...).run("k", k, args)`).
using Thunk = void (*)(void* ctx);
cudaError_t launch(const char* name, const void* key, Thunk thunk, void* ctx, dim3 grid, dim3 block, size_t smem,
                   int max_threads, const char* file, int line);

struct Launch {
  dim3 grid, block;
  size_t smem;
  int max_threads = 0;
  const char* file = "";
  int line = 0;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
  Launch& bounds(int max_threads_per_block, int = 0, int = 0) {
    max_threads = max_threads_per_block;
    return *this;
  }
  Launch& at(const char* f, int l) {
    file = f;
    line = l;
    return *this;
  }
  template <typename... P, typename... A>
  void run(const char* name, void (*kernel)(P...), A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
    // Arguments are converted to the parameter types and copied once, at the launch, as CUDA
    // does; every thread then gets its own copy of the parameters.
    struct Ctx {
      void (*k)(P...);
      std::tuple<std::decay_t<P>...> params;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    Thunk thunk = [](void* c) {
      Ctx* x = static_cast<Ctx*>(c);
      std::apply(x->k, x->params);
    };
    launch(name, reinterpret_cast<const void*>(kernel), thunk, &ctx, grid, block, smem, max_threads, file, line);
  }
};

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
inline T shfl(int op, const char* file, int line, unsigned mask, T v, int arg, int width = 32) {
  return from_bits<T>(warp_collective(op, mask, to_bits(v), arg, width, file, line));
}
inline unsigned ballot(const char* file, int line, unsigned mask, int pred) {
  return static_cast<unsigned>(warp_collective(kBallot, mask, pred != 0, 0, 32, file, line));
}
inline int vote(int op, const char* file, int line, unsigned mask, int pred) {
  return static_cast<int>(warp_collective(op, mask, pred != 0, 0, 32, file, line));
}
template <typename T>
inline T reduce(int op, const char* file, int line, unsigned mask, T v) {
  static_assert(std::is_integral<T>::value && sizeof(T) == 4, "__reduce_*_sync takes 32-bit integers");
  const uint64_t r = warp_collective(op, mask, static_cast<uint64_t>(static_cast<uint32_t>(v)),
                                     std::is_signed<T>::value, 32, file, line);
  return static_cast<T>(static_cast<uint32_t>(r));
}

// ---- atomics: fibers switch only at barriers and collectives, so a plain read-modify-write
// is atomic here --------------------------------------------------------------------------
template <typename T, typename F>
inline T rmw(T* p, F f) {
  const T old = *p;
  *p = f(old);
  return old;
}

// sin(pi x), cos(pi x) with exact argument reduction (x mod 2 is exact in floating point).
inline void sincospi_impl(double x, double* s, double* c) {
  if (!std::isfinite(x)) {
    *s = *c = NAN;
    return;
  }
  double r = std::fmod(x, 2.0);  // (-2, 2), exact
  if (r > 1.0) r -= 2.0;
  if (r < -1.0) r += 2.0;  // [-1, 1]
  // exact special points, as CUDA's sincospi gives them
  if (r == 0.0) {
    *s = std::copysign(0.0, x);
    *c = 1.0;
    return;
  }
  if (r == 0.5 || r == -1.5) {
    *s = 1.0;
    *c = 0.0;
    return;
  }
  if (r == -0.5 || r == 1.5) {
    *s = -1.0;
    *c = 0.0;
    return;
  }
  if (r == 1.0 || r == -1.0) {
    *s = 0.0;
    *c = -1.0;
    return;
  }
  const double pi = 3.14159265358979323846;
  *s = std::sin(pi * r);
  *c = std::cos(pi * r);
}

}  // namespace emu

// ---- built-in variables ---------------------------------------------------------------------
#define threadIdx (::emu::thread_idx())
#define blockIdx (static_cast<const dim3&>(::emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::emu::g_grid_dim))
#define warpSize 32

// ---- barriers and warp collectives ------------------------------------------------------
#define __syncthreads() ((void)::emu::syncthreads(::emu::kBarPlain, 1, __FILE__, __LINE__))
#define __syncthreads_count(p) ::emu::syncthreads(::emu::kBarCount, (p) != 0, __FILE__, __LINE__)
#define __syncthreads_and(p) ::emu::syncthreads(::emu::kBarAnd, (p) != 0, __FILE__, __LINE__)
#define __syncthreads_or(p) ::emu::syncthreads(::emu::kBarOr, (p) != 0, __FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(::emu::syncwarp_mask(__VA_ARGS__), __FILE__, __LINE__)
namespace emu {
inline unsigned syncwarp_mask() { return 0xffffffffu; }
inline unsigned syncwarp_mask(unsigned m) { return m; }
}  // namespace emu
#define __shfl_sync(...) ::emu::shfl(::emu::kShflIdx, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl(::emu::kShflUp, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl(::emu::kShflDown, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl(::emu::kShflXor, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(m, p) ::emu::ballot(__FILE__, __LINE__, (m), (p))
#define __any_sync(m, p) ::emu::vote(::emu::kAny, __FILE__, __LINE__, (m), (p))
#define __all_sync(m, p) ::emu::vote(::emu::kAll, __FILE__, __LINE__, (m), (p))
#define __reduce_add_sync(m, v) ::emu::reduce(::emu::kReduceAdd, __FILE__, __LINE__, (m), (v))
#define __reduce_min_sync(m, v) ::emu::reduce(::emu::kReduceMin, __FILE__, __LINE__, (m), (v))
#define __reduce_max_sync(m, v) ::emu::reduce(::emu::kReduceMax, __FILE__, __LINE__, (m), (v))
#define __reduce_and_sync(m, v) ::emu::reduce(::emu::kReduceAnd, __FILE__, __LINE__, (m), (v))
#define __reduce_or_sync(m, v) ::emu::reduce(::emu::kReduceOr, __FILE__, __LINE__, (m), (v))
#define __reduce_xor_sync(m, v) ::emu::reduce(::emu::kReduceXor, __FILE__, __LINE__, (m), (v))
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)

// ---- atomics ------------------------------------------------------------------------------
template <typename T>
inline T atomicAdd(T* p, T v) { return ::emu::rmw(p, [v](T o) { return T(o + v); }); }
template <typename T>
inline T atomicSub(T* p, T v) { return ::emu::rmw(p, [v](T o) { return T(o - v); }); }
template <typename T>
inline T atomicExch(T* p, T v) { return ::emu::rmw(p, [v](T) { return v; }); }
template <typename T>
inline T atomicMin(T* p, T v) { return ::emu::rmw(p, [v](T o) { return v < o ? v : o; }); }
template <typename T>
inline T atomicMax(T* p, T v) { return ::emu::rmw(p, [v](T o) { return v > o ? v : o; }); }
template <typename T>
inline T atomicAnd(T* p, T v) { return ::emu::rmw(p, [v](T o) { return T(o & v); }); }
template <typename T>
inline T atomicOr(T* p, T v) { return ::emu::rmw(p, [v](T o) { return T(o | v); }); }
template <typename T>
inline T atomicXor(T* p, T v) { return ::emu::rmw(p, [v](T o) { return T(o ^ v); }); }
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) { return ::emu::rmw(p, [cmp, v](T o) { return o == cmp ? v : o; }); }
inline unsigned atomicInc(unsigned* p, unsigned lim) {
  return ::emu::rmw(p, [lim](unsigned o) { return o >= lim ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* p, unsigned lim) {
  return ::emu::rmw(p, [lim](unsigned o) { return (o == 0u || o > lim) ? lim : o - 1u; });
}

// ---- device math the host library lacks -----------------------------------------------
inline void sincospif(float x, float* s, float* c) {
  double sd, cd;
  ::emu::sincospi_impl(static_cast<double>(x), &sd, &cd);
  *s = static_cast<float>(sd);
  *c = static_cast<float>(cd);
}
inline void sincospi(double x, double* s, double* c) { ::emu::sincospi_impl(x, s, c); }
inline float sinpif(float x) { float s, c; sincospif(x, &s, &c); return s; }
inline float cospif(float x) { float s, c; sincospif(x, &s, &c); return c; }
inline double sinpi(double x) { double s, c; sincospi(x, &s, &c); return s; }
inline double cospi(double x) { double s, c; sincospi(x, &s, &c); return c; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// The C++ overload cuda_runtime.h declares only for nvcc: kernels by function pointer.
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*entry)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

// ---- the PTX wrappers of csrc/common/cuda_ptx.cuh (mma.sync, ldmatrix, cp.async) --------------
#include "ptx_emu.h"
