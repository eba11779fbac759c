// The CPU output pool (see output_pool.h).
#include "output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

#include <new>

namespace alterops {
namespace cpu {
namespace {

constexpr size_t kGranule = size_t(2) << 20;       // size classes and alignment
constexpr size_t kMinPooledBytes = size_t(4) << 20;  // smaller outputs: glibc's heap reuses them already

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return false;
  const std::string s(v);
  return s == "1" || s == "true" || s == "yes" || s == "on";
}

// One mapping of `bytes` (a multiple of kGranule), aligned to kGranule, or nullptr. No
// MADV_HUGEPAGE: with THP in "madvise" mode a fresh huge-page fault may compact memory first,
// which made first use 4x slower here (62 ms against 15 ms for a 55 MB output).
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

struct Block {
  void* ptr;
  size_t bytes;
};

class Pool {
 public:
  Pool() = default;

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
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "alterops: could not allocate ", bytes,
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
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& kv : free_)
        for (void* p : kv.second) drop.push_back({p, kv.first});
      free_.clear();
      cached_ = 0;
    }
    for (const Block& b : drop) unmap_block(b.ptr, b.bytes);
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
  size_t limit_ = size_t(1024) << 20;  // alterops._ext sets it from ALTEROPS_CPU_POOL_MB at load
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

void delete_block(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  pool().give_back(b->ptr, b->bytes);
  delete b;
}

class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    // Only reached for n >= kMinPooledBytes (new_output), or when a pooled tensor is resized.
    if (n == 0) return c10::GetDefaultCPUAllocator()->allocate(0);
    const size_t bytes = (n + kGranule - 1) / kGranule * kGranule;
    void* p = pool().acquire(bytes);
    return {p, new Block{p, bytes}, &delete_block, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count > 0) std::memcpy(dest, src, count);
  }
};

PoolAllocator& pool_allocator() {
  static PoolAllocator* a = new PoolAllocator();
  return *a;
}

bool poison_outputs() {
  static const bool poison = env_flag("ALTEROPS_POISON_OUTPUTS");
  return poison;
}

}  // namespace

at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  TORCH_INTERNAL_ASSERT(opts.device().is_cpu());
  const at::ScalarType dtype = c10::typeMetaToScalarType(opts.dtype());
  const size_t nbytes = size_t(c10::multiply_integers(shape)) * c10::elementSize(dtype);
  at::Tensor out;
  if (nbytes >= kMinPooledBytes && pool().enabled()) {
    out = at::detail::empty_generic(shape, &pool_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                    at::MemoryFormat::Contiguous);
  } else {
    out = at::empty(shape, opts.memory_format(at::MemoryFormat::Contiguous));
  }
  if (poison_outputs() && at::isFloatingType(out.scalar_type())) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

at::Tensor float_copy(const at::Tensor& t) {
  at::Tensor f = new_output(t.sizes(), t.options().dtype(at::kFloat));
  f.copy_(t);
  return f;
}

}  // namespace cpu
}  // namespace alterops

// Python-facing controls (alterops.memory): registered as ops so they need no pybind.
namespace {
std::vector<int64_t> cpu_pool_stats() { return alterops::cpu::pool().stats(); }
void cpu_pool_empty() { alterops::cpu::pool().release_all(); }
void cpu_pool_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "limit must be >= 0 bytes, got ", bytes);
  alterops::cpu::pool().set_limit(size_t(bytes));
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(alterops, m) {
  m.def("cpu_pool_stats() -> int[]", &cpu_pool_stats);
  m.def("cpu_pool_empty() -> ()", &cpu_pool_empty);
  m.def("cpu_pool_set_limit(int limit_bytes) -> ()", &cpu_pool_set_limit);
}
