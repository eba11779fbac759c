// The exported entry point of one per-level kernel object (see kernel_table.h).
#include "kernel_table.h"

#ifndef ALTEROPS_MARCH
#define ALTEROPS_MARCH "unknown"
#endif

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
#else
constexpr const char* kIsa = "generic";
#endif

const alterops::KernelTable kTable = {
    alterops::kKernelAbiVersion,
    uint32_t(sizeof(alterops::KernelTable)),
    kIsa,
    ALTEROPS_MARCH,
    &alterops::blur::kernels(),
    &alterops::neighborhood::kernels(),
    &alterops::window::kernels(),
    &alterops::statistics::kernels(),
};

}  // namespace

extern "C" __attribute__((visibility("default"))) const alterops::KernelTable* alterops_cpu_kernel_table() {
  return &kTable;
}
