// Raw-pointer API of the statistics CPU kernels (no torch types): argument structs and the table of
// entry points one instruction-set build provides (see csrc/common/kernel_table.h).
//
// Both ops take a LIST of (B, C, H, W) maps and run one parallel region over the planes of
// every map; each map's result is written in double (the binding converts it to the result
// dtype). The binding checks the maps (square for the Δ log amplitude, H * W >= 2 for the
// variance) and makes them contiguous.
#pragma once

#include <cstdint>

#include "../common/parallel.h"
#include "../common/scalar.h"

namespace alterops {
namespace statistics {

// One contiguous (B, C, H, W) map; planes = B * C. Element types: all four DTypes.
struct Map {
  const void* data;
  DType dtype;
  int64_t planes;
  int64_t h, w;
  double* out;  // Δ log amplitude: h - h/2 values; variance: one value
};

// out[k] = mean over planes of log(|F[k, k]| + eps) minus the same for k = 0, k < h - h/2, with
// F the plane's 2D DFT (maps square, h == w). NaN when a map has no planes.
struct DeltaArgs {
  const Map* maps;
  int64_t num_maps;
  double eps;
};

// out[0] = mean over planes of the unbiased variance of the plane's h * w >= 2 values (NaN
// when a map has no planes).
struct VarianceArgs {
  const Map* maps;
  int64_t num_maps;
};

struct Kernels {
  void (*delta_log_amplitude)(const DeltaArgs&, const Parallel&);
  void (*feature_variance)(const VarianceArgs&, const Parallel&);
};

// The entry points of this build's level (defined in statistics_cpu.cpp).
const Kernels& kernels();

}  // namespace statistics
}  // namespace alterops
