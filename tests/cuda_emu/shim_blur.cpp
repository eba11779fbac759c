// C ABI over the raw-pointer launchers of csrc/blur/blur_cuda.cu, for ctypes.
#include "blur/blur_cuda.h"

using alterops::blur_cuda::DType;
using alterops::blur_cuda::Geometry;

namespace {
Geometry make(const long long* gi) {
  Geometry g;
  g.planes = gi[0];
  g.H = int(gi[1]);
  g.W = int(gi[2]);
  g.Ho = int(gi[3]);
  g.Wo = int(gi[4]);
  g.kh = int(gi[5]);
  g.kw = int(gi[6]);
  g.sh = int(gi[7]);
  g.sw = int(gi[8]);
  g.pt = int(gi[9]);
  g.pb = int(gi[10]);
  g.pl = int(gi[11]);
  g.pr = int(gi[12]);
  g.mode = int(gi[13]);
  return g;
}
}  // namespace

extern "C" {

// geometry: planes, H, W, Ho, Wo, kh, kw, sh, sw, pt, pb, pl, pr, mode
int emu_blur2d_forward(const void* x, void* out, int dtype, const long long* geometry, int act, float tau) {
  return static_cast<int>(
      alterops::blur_cuda::blur2d_forward(x, out, static_cast<DType>(dtype), make(geometry), act, tau, nullptr));
}

int emu_blur2d_backward(const void* grad_out, const void* x, void* grad_in, int dtype, const long long* geometry,
                        int act, float tau) {
  return static_cast<int>(alterops::blur_cuda::blur2d_backward(grad_out, x, grad_in, static_cast<DType>(dtype),
                                                               make(geometry), act, tau, nullptr));
}

}  // extern "C"
