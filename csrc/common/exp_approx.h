// e^r for |r| <= ln(2) / 2, of float or lane by lane of a GCC vector of floats, the core of the
// exps that split x into n ln(2) + r and scale by 2^n. Written once for the scalar loops that
// compilers vectorise (window attention) and for explicit vectors (neighbourhood attention's
// softmax).
//   exp_poly: the degree-6 Taylor polynomial (relative error about 1.2e-7 in exact arithmetic).
//   exp_poly5: a degree-5 polynomial fitted for the least maximum relative error on the interval
//   (9.1e-8 in exact arithmetic; constant term 1), one FMA fewer.
#pragma once

namespace alterops {

template <typename F>
static inline F exp_poly(F r) {
  F p = F{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p;
}

template <typename F>
static inline F exp_poly5(F r) {
  F p = F{} + 8.290309480925254e-3f;
  p = p * r + 4.1897934090616616e-2f;
  p = p * r + 1.6667636292840485e-1f;
  p = p * r + 4.999914948711815e-1f;
  p = p * r + 9.999997071535828e-1f;
  p = p * r + 1.0f;
  return p;
}

}  // namespace alterops
