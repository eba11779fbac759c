// Kernels that exercise the CPU executor itself (tests/test_cuda_emulator.py): the semantics of
// the warp collectives and barriers, and one deliberate bug per check the executor makes.
// Launched through `emu_selftest(case, ...)`; each case documents what it expects.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// Warp collectives: every thread writes 12 results.
__global__ void __launch_bounds__(256) collectives_kernel(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % 32;
  int* o = out + (blockIdx.x * blockDim.x + t) * 12;
  o[0] = __shfl_xor_sync(0xffffffffu, t, 5);
  o[1] = __shfl_down_sync(0xffffffffu, t, 3, 16);
  o[2] = __shfl_up_sync(0xffffffffu, t, 2, 8);
  o[3] = __shfl_sync(0xffffffffu, t * 10, lane + 7);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, t % 3 == 0));
  o[5] = __any_sync(0xffffffffu, t == 40);
  o[6] = __all_sync(0xffffffffu, t != 40);
  o[7] = __syncthreads_count(t % 5 == 0);
  o[8] = __syncthreads_or(t == 77);
  o[9] = __syncthreads_and(t < 1000);
  o[10] = __reduce_add_sync(0xffffffffu, t);
  // a sub-warp collective on the low half only
  o[11] = lane < 16 ? static_cast<int>(__shfl_xor_sync(0x0000ffffu, static_cast<float>(t), 1)) : -1;
}

// Shared-memory exchange through a reversed index, with or without the barrier.
__global__ void exchange_kernel(const float* in, float* out, int with_barrier) {
  __shared__ float s[64];
  const int t = static_cast<int>(threadIdx.x);
  s[t] = in[blockIdx.x * 64 + t];
  if (with_barrier) __syncthreads();
  out[blockIdx.x * 64 + t] = s[63 - t];
}

// The same within a warp, through dynamic shared memory, with or without __syncwarp.
__global__ void warp_exchange_kernel(const float* in, float* out, int with_syncwarp) {
  extern __shared__ __align__(16) float dyn[];
  const int t = static_cast<int>(threadIdx.x);
  dyn[t] = in[t];
  if (with_syncwarp) __syncwarp();
  out[t] = dyn[t ^ 31];
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void barrier_two_sites_kernel(float* out) {
  if (threadIdx.x % 2)
    __syncthreads();
  else
    __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void mask_excludes_lane_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1);
}

__global__ void shfl_outside_mask_kernel(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.f, 20);
}

__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void warp_vs_barrier_kernel(float* out) {
  if (threadIdx.x == 0) {
    out[0] = __shfl_xor_sync(0x3u, 1.f, 1);
  } else {
    __syncthreads();
  }
}

__global__ void read_kernel(const float* in, float* out, int offset) {
  out[threadIdx.x] = in[static_cast<int>(threadIdx.x) + offset];
}

__global__ void write_input_kernel(float* in) { in[threadIdx.x] = 0.f; }

__global__ void dyn_write_kernel(int index) {
  extern __shared__ float dyn2[];
  if (threadIdx.x == 0) dyn2[index] = 1.f;
}

__global__ void dyn_read_kernel(float* out, int index) {
  extern __shared__ float dyn3[];
  if (threadIdx.x == 0) out[0] = dyn3[index];
}

__global__ void big_static_kernel(float* out) {
  __shared__ float big[13000];  // 52000 bytes > 48 KiB
  big[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x];
}

__global__ void empty_kernel(float*) {}

__global__ void atomics_kernel(int* counter, float* fsum) {
  atomicAdd(counter, 1);
  atomicMax(counter + 1, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
  atomicAdd(fsum, 0.5f);
}

__global__ void grid_shape_kernel(int* out) {
  // one thread per block records its block and grid coordinates
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    const unsigned b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    out[b * 3 + 0] = static_cast<int>(blockIdx.x);
    out[b * 3 + 1] = static_cast<int>(blockIdx.y);
    out[b * 3 + 2] = static_cast<int>(blockIdx.z);
  }
  // every thread of the block has a distinct index
  __shared__ int seen[8 * 4 * 2];
  const unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  seen[t] = static_cast<int>(t);
  __syncthreads();
  if (t == 0) {
    int ok = 1;
    for (unsigned i = 0; i < blockDim.x * blockDim.y * blockDim.z; ++i) ok &= seen[i] == static_cast<int>(i);
    if (!ok) out[0] = -1;
  }
}

__global__ void spin_kernel(int forever) {
  volatile int spin = forever;
  while (spin) {
  }
}

__device__ __noinline__ int recurse(int n) {
  volatile char pad[4096];
  pad[n % 4096] = static_cast<char>(n);
  return n == 0 ? 0 : recurse(n - 1) + pad[n % 4096];
}

__global__ void deep_kernel(int* out, int depth) { out[threadIdx.x] = recurse(depth); }

}  // namespace

// Returns the launch error. p0/p1 are buffers, a0/a1 integer arguments.
extern "C" int emu_selftest(int which, void* p0, void* p1, int a0, int a1) {
  float* f0 = static_cast<float*>(p0);
  float* f1 = static_cast<float*>(p1);
  switch (which) {
    case 0: collectives_kernel<<<2, 256>>>(static_cast<int*>(p0)); break;
    case 1: exchange_kernel<<<3, 64>>>(f0, f1, a0); break;
    case 2: warp_exchange_kernel<<<1, 32, 32 * sizeof(float)>>>(f0, f1, a0); break;
    case 3: divergent_barrier_kernel<<<1, 32>>>(f0); break;
    case 4: barrier_two_sites_kernel<<<1, 32>>>(f0); break;
    case 5: mask_excludes_lane_kernel<<<1, 32>>>(f0); break;
    case 6: shfl_outside_mask_kernel<<<1, 32>>>(f0); break;
    case 7: exited_lane_kernel<<<1, 32>>>(f0); break;
    case 8: warp_vs_barrier_kernel<<<1, 32>>>(f0); break;
    case 9: read_kernel<<<1, 32>>>(f0, f1, a0); break;
    case 10: write_input_kernel<<<1, 32>>>(f0); break;
    case 11: dyn_write_kernel<<<1, 32, static_cast<size_t>(a1)>>>(a0); break;
    case 12: dyn_read_kernel<<<1, 32, static_cast<size_t>(a1)>>>(f0, a0); break;
    case 13: big_static_kernel<<<1, 32>>>(f0); break;
    case 14: empty_kernel<<<1, a0>>>(f0); break;                      // block size
    case 15: empty_kernel<<<dim3(1, a0, 1), 32>>>(f0); break;         // grid y
    case 16: empty_kernel<<<dim3(1, 1, a0), 32>>>(f0); break;         // grid z
    case 17: empty_kernel<<<1, 32, static_cast<size_t>(a0)>>>(f0); break;  // dynamic smem, no opt-in
    case 18: {  // dynamic smem after opting in to a1 bytes
      const cudaError_t e = cudaFuncSetAttribute(dyn_write_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, a1);
      if (e != cudaSuccess) return static_cast<int>(e);
      dyn_write_kernel<<<1, 32, static_cast<size_t>(a0)>>>(0);
      break;
    }
    case 19: collectives_kernel<<<1, 512>>>(static_cast<int*>(p0)); break;  // above __launch_bounds__
    case 20: atomics_kernel<<<a0, 128>>>(static_cast<int*>(p0), f1); break;
    case 21: grid_shape_kernel<<<dim3(3, 2, 2), dim3(8, 4, 2)>>>(static_cast<int*>(p0)); break;
    case 22: spin_kernel<<<1, 32>>>(a0); break;
    case 23: deep_kernel<<<1, 32>>>(static_cast<int*>(p0), a0); break;  // a0 frames of 4 KiB
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
