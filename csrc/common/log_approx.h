// Natural log of float, or lane by lane of a GCC vector of floats (F) with int32 lanes (I):
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)), then Cephes' logf polynomial in m - 1 (about
// 1 ulp). Valid for normal positive finite x; callers handle other values. Written once for the
// scalar loops that compilers vectorise (statistics) and for explicit vectors (neighbourhood
// attention's log-sum-exp).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace alterops {

template <typename F, typename I = int32_t>
static inline F log_approx(F x) {
  static_assert(sizeof(F) == sizeof(I), "F and I must have as many lanes");
  I ix;
  std::memcpy(&ix, &x, sizeof(ix));
  const I t = ix - 0x3f3504f3;  // (sqrt(1/2)'s bits)
  const I e = t >> 23;
  const I im = (t & 0x007fffff) + 0x3f3504f3;
  F m;
  std::memcpy(&m, &im, sizeof(m));
  const F f = m - 1.0f;
  const F z = f * f;
  F p = F{} + 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  F y = f * z * p;
  F fe;
  if constexpr (std::is_same<F, float>::value)
    fe = static_cast<float>(e);
  else
    fe = __builtin_convertvector(e, F);
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return f + y + fe * 0.693359375f;
}

}  // namespace alterops
