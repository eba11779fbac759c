// Fourier statistics: the AVX2 + FMA code of the CPU kernels (the n <= 32 DFT power of float32
// maps). Included by statistics_cpu.cpp only, inside its namespace, when the level has AVX2 +
// FMA and not AVX-512 (ALTEROPS_STATS_AVX2).
#pragma once

// n <= 32 with AVX2: lane s of row y rotated by y lanes, p[y, (s - y) mod n], is p[y, s - y]
// for s >= y and p[y, s - y + n] for s < y: two unaligned loads straight from the plane (at
// p + y*(n-1) and p + y*n + n - y), each ANDed with a lane mask; no permutes. (vmaskmovps
// loads were several times slower here on Zen 3.) The loads reach up to 7 floats past the end
// of the plane: the caller passes a padded copy of a map's last plane.
// masks: per row y and 8-lane chunk c, two 8-lane masks (lanes y <= s < n, lanes s < y).
static void build_antidiag_masks(int n, std::vector<int32_t>& masks) {
  const int nc = (n + 7) / 8;
  masks.assign(static_cast<size_t>(n) * nc * 16, 0);
  for (int y = 0; y < n; ++y) {
    for (int c = 0; c < nc; ++c) {
      for (int l = 0; l < 8; ++l) {
        const int s = 8 * c + l;
        masks[(static_cast<size_t>(y) * nc + c) * 16 + l] = (s >= y && s < n) ? -1 : 0;
        masks[(static_cast<size_t>(y) * nc + c) * 16 + 8 + l] = (s < y) ? -1 : 0;
      }
    }
  }
}

template <int NC>
static inline void antidiag_avx2(const float* __restrict p, float* __restrict a, int n,
                                 const int32_t* __restrict masks) {
  __m256 acc1[NC], acc2[NC];
  for (int c = 0; c < NC; ++c) acc1[c] = acc2[c] = _mm256_setzero_ps();
  for (int c = 0; c < NC; ++c)  // row 0: no rotation
    acc1[c] = _mm256_and_ps(_mm256_loadu_ps(p + 8 * c), _mm256_loadu_ps(reinterpret_cast<const float*>(masks + c * 16)));
  for (int y = 1; y < n; ++y) {
    const float* b1 = p + y * (n - 1);
    const float* b2 = p + y * n + (n - y);
    const int32_t* my = masks + static_cast<size_t>(y) * NC * 16;
    for (int c = 0; c < NC; ++c) {
      const __m256 m1 = _mm256_loadu_ps(reinterpret_cast<const float*>(my + c * 16));
      const __m256 m2 = _mm256_loadu_ps(reinterpret_cast<const float*>(my + c * 16 + 8));
      acc1[c] = _mm256_add_ps(acc1[c], _mm256_and_ps(_mm256_loadu_ps(b1 + 8 * c), m1));
      acc2[c] = _mm256_add_ps(acc2[c], _mm256_and_ps(_mm256_loadu_ps(b2 + 8 * c), m2));
    }
  }
  for (int c = 0; c < NC; ++c) _mm256_store_ps(a + 8 * c, _mm256_add_ps(acc1[c], acc2[c]));
}

static inline void antidiag_avx2_n(const float* __restrict p, float* __restrict a, int n,
                                   const int32_t* __restrict masks) {
  switch ((n + 7) / 8) {
    case 1: antidiag_avx2<1>(p, a, n, masks); break;
    case 2: antidiag_avx2<2>(p, a, n, masks); break;
    case 3: antidiag_avx2<3>(p, a, n, masks); break;
    default: antidiag_avx2<4>(p, a, n, masks); break;
  }
}

// |F[k, k]|^2 for k < K of one plane from its anti-diagonal sums a (n <= 32): table2 is
// n x (2 KP) with KP = 8 (K <= 8) or 16: [cos(2πks/n), k < KP | -sin(2πks/n), k < KP], zero
// for k >= K. Writes KP lanes at out (the caller leaves room past K).
template <int KP>
static inline void dft_power_avx2(const float* __restrict a, int n, const float* __restrict table2,
                                  float* __restrict out) {
  constexpr int V = KP / 8;  // vectors per half
  __m256 e[2 * V], o[2 * V];
  for (int v = 0; v < 2 * V; ++v) e[v] = o[v] = _mm256_setzero_ps();
  int s = 0;
  for (; s + 1 < n; s += 2) {
    const __m256 a0 = _mm256_broadcast_ss(a + s), a1 = _mm256_broadcast_ss(a + s + 1);
    const float* t0 = table2 + s * 2 * KP;
    for (int v = 0; v < 2 * V; ++v) {
      e[v] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(t0 + 8 * v), e[v]);
      o[v] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(t0 + 2 * KP + 8 * v), o[v]);
    }
  }
  if (s < n) {
    const __m256 a0 = _mm256_broadcast_ss(a + s);
    const float* t0 = table2 + s * 2 * KP;
    for (int v = 0; v < 2 * V; ++v) e[v] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(t0 + 8 * v), e[v]);
  }
  for (int v = 0; v < V; ++v) {
    const __m256 re = _mm256_add_ps(e[v], o[v]), im = _mm256_add_ps(e[V + v], o[V + v]);
    _mm256_storeu_ps(out + 8 * v, _mm256_fmadd_ps(im, im, _mm256_mul_ps(re, re)));
  }
}
