// Runtime ops of the CPU binding library: choosing and loading a kernel level, and the output
// pool's controls. Op families register their own ops in csrc/<family>/<family>_binding.cpp.
#include <dlfcn.h>

#include <atomic>
#include <string>
#include <vector>

#include "binding.h"

namespace alterops {
namespace binding {

extern std::atomic<const KernelTable*> g_cpu_kernels;
std::vector<int64_t> pool_stats();
void pool_empty();
void pool_set_limit(int64_t bytes);

namespace {

// Whether this CPU can execute code of `level` (cpuid, as the kernels' compile flags need it).
bool cpu_isa_supported(std::string level) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (level == "generic") return true;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe");
  if (level == "avx2") return avx2;
  if (level == "avx512")
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  STD_TORCH_CHECK(false, "level must be 'generic', 'avx2' or 'avx512', got '", level, "'");
#else
  return level == "generic";
#endif
  return false;
}

// Loads the kernel object at `path` and makes its table the one every CPU op calls. Returns the
// level its code was compiled for. The object stays loaded (tables of earlier levels too: a
// kernel running in another thread may still be using one).
std::string cpu_load_kernels(std::string path) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  STD_TORCH_CHECK(handle != nullptr, "alterops: could not load the CPU kernels ", path, ": ", dlerror());
  using Getter = const KernelTable* (*)();
  auto get = reinterpret_cast<Getter>(dlsym(handle, "alterops_cpu_kernel_table"));
  STD_TORCH_CHECK(get != nullptr, "alterops: ", path, " has no alterops_cpu_kernel_table (not an alterops kernel object)");
  const KernelTable* table = get();
  STD_TORCH_CHECK(table != nullptr && table->abi_version == kKernelAbiVersion &&
                      table->table_size == sizeof(KernelTable),
                  "alterops: ", path, " was built for another kernel ABI (", table ? table->abi_version : 0,
                  ", expected ", kKernelAbiVersion, "); rebuild or reinstall alterops");
  STD_TORCH_CHECK(cpu_isa_supported(table->isa), "alterops: ", path, " holds ", table->isa,
                  " code, which this CPU cannot execute");
  g_cpu_kernels.store(table, std::memory_order_release);
  return std::string(table->isa);
}

// The level loaded now ("" when none) and its compile flags.
std::vector<std::string> cpu_loaded_kernels() {
  const KernelTable* t = g_cpu_kernels.load(std::memory_order_acquire);
  if (t == nullptr) return {"", ""};
  return {std::string(t->isa), std::string(t->march)};
}

// The neighbourhood attention plans the loaded level keeps (0 / nothing when none is loaded).
int64_t cpu_plan_cache_bytes() {
  const KernelTable* t = g_cpu_kernels.load(std::memory_order_acquire);
  return t == nullptr ? 0 : t->neighborhood->plan_cache_bytes();
}
void cpu_plan_cache_clear() {
  const KernelTable* t = g_cpu_kernels.load(std::memory_order_acquire);
  if (t != nullptr) t->neighborhood->plan_cache_clear();
}

}  // namespace
}  // namespace binding
}  // namespace alterops

STABLE_TORCH_LIBRARY(alterops, m) {
  m.def("_cpu_isa_supported(str level) -> bool");
  m.def("_cpu_load_kernels(str path) -> str");
  m.def("_cpu_loaded_kernels() -> str[]");
  m.def("cpu_pool_stats() -> int[]");
  m.def("cpu_pool_empty() -> ()");
  m.def("cpu_pool_set_limit(int limit_bytes) -> ()");
  m.def("cpu_plan_cache_bytes() -> int");
  m.def("cpu_plan_cache_clear() -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(alterops, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa_supported", TORCH_BOX(&alterops::binding::cpu_isa_supported));
  m.impl("_cpu_load_kernels", TORCH_BOX(&alterops::binding::cpu_load_kernels));
  m.impl("_cpu_loaded_kernels", TORCH_BOX(&alterops::binding::cpu_loaded_kernels));
  m.impl("cpu_pool_stats", TORCH_BOX(&alterops::binding::pool_stats));
  m.impl("cpu_pool_empty", TORCH_BOX(&alterops::binding::pool_empty));
  m.impl("cpu_pool_set_limit", TORCH_BOX(&alterops::binding::pool_set_limit));
  m.impl("cpu_plan_cache_bytes", TORCH_BOX(&alterops::binding::cpu_plan_cache_bytes));
  m.impl("cpu_plan_cache_clear", TORCH_BOX(&alterops::binding::cpu_plan_cache_clear));
}
