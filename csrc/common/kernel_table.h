// The table of CPU kernels one instruction-set build exports.
//
// Every CPU kernel source is compiled once per level (generic x86-64, AVX2+FMA, AVX-512 F/BW/
// VL/DQ) into its own shared object, libalterops_kernels_<level>.so, built with hidden
// visibility so that no inline function of one level can be bound to the code of another. Each
// exports one C symbol, alterops_cpu_kernel_table(), returning this table of raw-pointer entry
// points. The binding library (compiled for baseline x86-64) chooses the level at run time,
// loads its object and calls through the table; nothing above the baseline runs before that.
#pragma once

#include <cstdint>

#include "../blur/blur.h"
#include "../neighborhood_attention/neighborhood_attention.h"
#include "../statistics/statistics.h"
#include "../window_attention/window_attention.h"

namespace alterops {

// Bumped whenever an args struct or a Kernels struct changes layout.
constexpr uint32_t kKernelAbiVersion = 5;

struct KernelTable {
  uint32_t abi_version;
  uint32_t table_size;  // sizeof(KernelTable) as the kernel object saw it
  const char* isa;      // "generic", "avx2" or "avx512": what the compiler was allowed to use
  const char* march;    // the -march/-m flags the object was compiled with
  const blur::Kernels* blur;
  const neighborhood::Kernels* neighborhood;
  const window::Kernels* window;
  const statistics::Kernels* statistics;
};

}  // namespace alterops

extern "C" const alterops::KernelTable* alterops_cpu_kernel_table();
