// e^r for |r| <= ln(2) / 2, of float or lane by lane of a GCC vector of floats: the degree-6
// Taylor polynomial (relative error about 2e-7), the core of the exps that split x into
// n ln(2) + r and scale by 2^n. Written once for the scalar loops that compilers vectorise
// (window attention) and for explicit vectors (neighbourhood attention's softmax).
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

}  // namespace alterops
