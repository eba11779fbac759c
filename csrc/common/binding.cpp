// Binding-layer helpers (see binding.h) and the CPU output pool.
//
// Output pool. A fresh output of tens of MB comes from mmap, and every first write into one of
// its pages faults into the kernel, which zeroes the page: on the bandwidth-bound ops that cost
// more than the op itself (a 55 MB blur output: ~17 ms of faults against ~3 ms of work). Like
// the CUDA caching allocator, outputs of at least 4 MiB are served from a pool of freed blocks
// (exact size classes of 2 MiB granules), so a step's output pages are faulted in once and
// reused by the next step. The pool keeps at most a limit of unused bytes
// (ALTEROPS_CPU_POOL_MB, default 1024, 0 turns it off; set by alterops._ext at load);
// alterops.empty_cache() returns them. Blocks in use are never capped.
#include "binding.h"

#include <torch/csrc/stable/c/shim.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <unordered_map>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace alterops {
namespace binding {

// ---- the loaded kernel table (set by registration.cpp's _cpu_load_kernels) -------------------
std::atomic<const KernelTable*> g_cpu_kernels{nullptr};

const KernelTable& cpu_kernels() {
  const KernelTable* t = g_cpu_kernels.load(std::memory_order_acquire);
  STD_TORCH_CHECK(t != nullptr,
                  "alterops: no CPU kernel level is loaded (import alterops loads one; see `alterops info`)");
  return *t;
}

// ---- torch's thread pool --------------------------------------------------------------------
namespace {
void torch_for_range(int64_t begin, int64_t end, int64_t grain, void (*body)(int64_t, int64_t, void*),
                     void* ctx) {
  STABLE_TORCH_ERROR_CODE_CHECK(torch_parallel_for(begin, end, grain, body, ctx));
}
}  // namespace

Parallel cpu_parallel() {
  Parallel p;
  p.num_threads = int64_t(torch::stable::get_num_threads());
  p.for_range = &torch_for_range;
  return p;
}

// ---- dtypes and shapes --------------------------------------------------------------------
DType dtype_of(ScalarType t, const char* what) {
  switch (t) {
    case ScalarType::Float: return DType::Float32;
    case ScalarType::Double: return DType::Float64;
    case ScalarType::BFloat16: return DType::BFloat16;
    case ScalarType::Half: return DType::Float16;
    default: break;
  }
  STD_TORCH_CHECK(false, what, " must be float32, float64, bfloat16 or float16, got ",
                  torch::headeronly::toString(t));
  return DType::Float32;
}

ScalarType scalar_type_of(DType t) {
  switch (t) {
    case DType::Float32: return ScalarType::Float;
    case DType::Float64: return ScalarType::Double;
    case DType::BFloat16: return ScalarType::BFloat16;
    case DType::Float16: return ScalarType::Half;
  }
  return ScalarType::Float;
}

// ---- output pool ----------------------------------------------------------------------------
namespace {

constexpr size_t kGranule = size_t(2) << 20;         // size classes and alignment
constexpr size_t kMinPooledBytes = size_t(4) << 20;  // smaller outputs: glibc's heap reuses them already

// One mapping of `bytes` (a multiple of kGranule), aligned to kGranule, or nullptr. No
// MADV_HUGEPAGE: with THP in "madvise" mode a fresh huge-page fault may compact memory first,
// which made first use 4x slower (62 ms against 15 ms for a 55 MB output).
void* map_block(size_t bytes) {
#if defined(__linux__)
  void* raw = mmap(nullptr, bytes + kGranule, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (begin + kGranule - 1) & ~(uintptr_t)(kGranule - 1);
  if (aligned > begin) munmap(raw, aligned - begin);
  const uintptr_t tail = begin + bytes + kGranule - (aligned + bytes);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  return reinterpret_cast<void*>(aligned);
#else
  return std::aligned_alloc(kGranule, bytes);
#endif
}

void unmap_block(void* p, size_t bytes) {
#if defined(__linux__)
  munmap(p, bytes);
#else
  (void)bytes;
  std::free(p);
#endif
}

class Pool {
 public:
  // A child forked while another thread held the lock (a DataLoader worker, say) would wait on
  // it forever: the child starts with a fresh lock (its copies of the blocks stay usable).
  void reset_lock_after_fork() { new (&mu_) std::mutex(); }

  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
        in_use_ += bytes;
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = map_block(bytes);
    if (p == nullptr) {  // out of memory: give the cached blocks back and try once more
      release_all();
      p = map_block(bytes);
    }
    STD_TORCH_CHECK(p != nullptr, "alterops: out of memory: could not allocate ", bytes,
                    " bytes for a CPU kernel output");
    std::lock_guard<std::mutex> lock(mu_);
    in_use_ += bytes;
    return p;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_ -= bytes;
      if (cached_ + bytes <= limit_) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        return;
      }
    }
    unmap_block(p, bytes);
  }

  void release_all() {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& kv : free_)
        for (void* p : kv.second) drop.emplace_back(p, kv.first);
      free_.clear();
      cached_ = 0;
    }
    for (const auto& b : drop) unmap_block(b.first, b.second);
  }

  void set_limit(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = bytes;
      if (cached_ <= limit_) return;
    }
    release_all();
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(cached_), int64_t(in_use_), int64_t(hits_), int64_t(misses_), int64_t(limit_)};
  }

  bool enabled() {
    std::lock_guard<std::mutex> lock(mu_);
    return limit_ > 0;
  }

 private:
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t limit_ = size_t(1024) << 20;
  size_t cached_ = 0;
  size_t in_use_ = 0;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

// Never destroyed: tensors may outlive static destructors at interpreter exit.
Pool& pool() {
  static Pool* p = [] {
    Pool* created = new Pool();
#if defined(__linux__)
    pthread_atfork(nullptr, nullptr, [] { pool().reset_lock_after_fork(); });
#endif
    return created;
  }();
  return *p;
}

size_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Double: case ScalarType::Long: return 8;
    case ScalarType::Float: case ScalarType::Int: return 4;
    case ScalarType::BFloat16: case ScalarType::Half: case ScalarType::Short: return 2;
    default: return 1;
  }
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t s = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = s;
    s *= std::max<int64_t>(sizes[i], 1);
  }
  return strides;
}

bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::BFloat16 || t == ScalarType::Half;
}

}  // namespace

std::vector<int64_t> pool_stats() { return pool().stats(); }
void pool_empty() { pool().release_all(); }
void pool_set_limit(int64_t bytes) {
  STD_TORCH_CHECK(bytes >= 0, "limit_bytes must be >= 0, got ", bytes);
  pool().set_limit(size_t(bytes));
}

Tensor new_output(const std::vector<int64_t>& sizes, ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) {
    STD_TORCH_CHECK(s >= 0, "alterops: negative output size");
    STD_TORCH_CHECK(s == 0 || numel <= std::numeric_limits<int64_t>::max() / s,
                    "alterops: output size overflows int64");
    numel *= s;
  }
  const size_t nbytes = size_t(numel) * element_size(dtype);
  Tensor out;
  if (nbytes >= kMinPooledBytes && pool().enabled()) {
    const size_t bytes = (nbytes + kGranule - 1) / kGranule * kGranule;
    void* p = pool().acquire(bytes);
    out = torch::stable::from_blob(p, sizes, contiguous_strides(sizes), torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                   dtype, [bytes](void* data) { pool().give_back(data, bytes); });
  } else {
    out = torch::stable::empty(sizes, dtype, std::nullopt, torch::stable::Device(torch::headeronly::DeviceType::CPU));
  }
  if (poison_outputs() && is_floating(dtype) && numel > 0) torch::stable::fill_(out, std::numeric_limits<double>::quiet_NaN());
  return out;
}

Tensor float_copy(const Tensor& t) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  Tensor f = new_output(sizes, ScalarType::Float);
  copy_into(f, t);
  return f;
}

Tensor float_copy_if(bool widen, const Tensor& t) { return widen ? float_copy(t) : t; }

Tensor float_copy_padded(const Tensor& t, int64_t width) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  const int64_t last = int64_t(sizes.size()) - 1, D = sizes[last];
  if (width == D) return float_copy(t);
  sizes[last] = width;
  Tensor f = new_output(sizes, ScalarType::Float);
  Tensor head = torch::stable::narrow(f, last, 0, D), tail = torch::stable::narrow(f, last, D, width - D);
  torch::stable::copy_(head, t);
  torch::stable::zero_(tail);
  return f;
}

void copy_narrowed(Tensor& dst, const Tensor& src) {
  Tensor s = src;
  const int64_t last = s.dim() - 1;
  Tensor head = torch::stable::narrow(s, last, 0, dst.size(last));
  torch::stable::copy_(dst, head);
}

Tensor float_output_if(bool widen, const Tensor& out) {
  if (!widen) return out;
  std::vector<int64_t> sizes(out.sizes().begin(), out.sizes().end());
  return new_output(sizes, ScalarType::Float);
}

Tensor zeros(const std::vector<int64_t>& sizes, ScalarType dtype) {
  Tensor z = torch::stable::empty(sizes, dtype, std::nullopt, torch::stable::Device(torch::headeronly::DeviceType::CPU));
  torch::stable::zero_(z);
  return z;
}

void copy_into(Tensor& dst, const Tensor& src) { torch::stable::copy_(dst, src); }

}  // namespace binding
}  // namespace alterops
