// Feature-map statistics kernels on the CPU: the paper's Δ log amplitude (diagonal DFT bins
// only) and the mean unbiased spatial variance, for a LIST of (B, C, H, W) maps in one call (one
// parallel region over the planes of every map: the batched entry point of the analysis
// toolkit runs every layer of a model in one launch). Raw pointers (see statistics.h); the
// binding in statistics_binding.cpp checks the maps and converts the results.
//
// Δ log amplitude. For a square N x N plane, DFT bin (k, k) is
//   F[k, k] = sum_{y,x} x[y, x] exp(-2πi k (y + x) / N) = sum_s a_s exp(-2πi k s / N),
// with the anti-diagonal sums a_s = sum_{(y + x) mod N = s} x[y, x]. Each plane is read once:
// its N anti-diagonal sums are formed (unrolled for N <= 32), the K = N - N//2 bins are a
// small (N x 2K) product with a cos/sin table, and log(|F| + eps) is taken with a vectorised
// log over a chunk of planes. Δ_k = mean_planes(L_k) - mean_planes(L_0).
//
// Variance. Each plane is read once, in blocks of at most 4096 elements: a two-pass (mean,
// then squared deviations) over a block that sits in L1, blocks merged with Chan's formula.
// var = M2 / (n - 1); the op returns the mean over planes.
//
// Determinism: planes are processed in fixed chunks of 64 (independent of the thread count);
// every chunk writes its own partial sums, which are reduced in chunk order in double.
// Accumulation: float for float/half/bfloat16 inputs, double for float64. Results are written
// in double. No planes (B*C == 0) gives NaN, as a mean over nothing.
#include "statistics.h"

#include "../common/log_approx.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || defined(__F16C__)
#include <immintrin.h>
#endif
// AVX2 + FMA builds without AVX-512 (e.g. AMD Zen 2/3): 8-lane paths for float32 maps with
// n <= 32. An AVX-512 build never compiles them: its code is unchanged.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define ALTEROPS_STATS_AVX2 1
#endif

namespace alterops {
namespace statistics {

constexpr int64_t kChunk = 64;       // planes per work item
constexpr int64_t kVarBlock = 4096;  // elements per two-pass block of the variance

// dst[i] = src[i] in the accumulation type, for the 16-bit inputs. float16 uses F16C's
// vcvtph2ps where the level has it (as c10::Half's conversion does; the portable bit-twiddling
// conversion does not vectorise as well); both are exact.
template <typename scalar_t, typename acc_t>
static inline void to_acc(const scalar_t* __restrict src, acc_t* __restrict dst, int64_t n) {
#if defined(__F16C__)
  if constexpr (std::is_same<scalar_t, Half>::value) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].bits);
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// ---------------------------------------------------------------------------------------
// Anti-diagonal sums a_s = sum_{(y+x) mod n = s} p[y*n + x] of one contiguous n x n plane.
// ---------------------------------------------------------------------------------------
// Fixed small n: a_s = sum_y p[y, (s - y) mod n], a gather per output (no store-to-load
// dependency chains, which make the "add each row at offset y" form slow for small n).
template <int N, typename T>
static inline void antidiag_fixed(const T* __restrict p, T* __restrict a) {
  for (int s = 0; s < N; ++s) {
    T acc = T(0);
    for (int y = 0; y < N; ++y) acc += p[y * N + (s - y + N) % N];
    a[s] = acc;
  }
}

// The vector code of the level.
#if defined(__AVX512F__)
#include "statistics_avx512.h"
#elif defined(ALTEROPS_STATS_AVX2)
#include "statistics_avx2.h"
#endif

template <typename T>
static inline void antidiag_generic(const T* __restrict p, T* __restrict a, T* __restrict d, int64_t n) {
  for (int64_t i = 0; i < 2 * n; ++i) d[i] = T(0);
  for (int64_t y = 0; y < n; ++y) {
    const T* row = p + y * n;
    T* dy = d + y;
#pragma omp simd
    for (int64_t x = 0; x < n; ++x) dy[x] += row[x];
  }
  for (int64_t s = 0; s < n; ++s) a[s] = d[s] + d[s + n];
}

template <typename T>
using AntidiagFn = void (*)(const T*, T*);

template <typename T, int N>
static void antidiag_entry(const T* p, T* a) {
  antidiag_fixed<N, T>(p, a);
}

template <typename T>
static AntidiagFn<T> antidiag_for(int64_t n) {
  switch (n) {
#define ALTEROPS_AD_CASE(NN) \
  case NN:                   \
    return &antidiag_entry<T, NN>;
    ALTEROPS_AD_CASE(1) ALTEROPS_AD_CASE(2) ALTEROPS_AD_CASE(3) ALTEROPS_AD_CASE(4)
    ALTEROPS_AD_CASE(5) ALTEROPS_AD_CASE(6) ALTEROPS_AD_CASE(7) ALTEROPS_AD_CASE(8)
    ALTEROPS_AD_CASE(9) ALTEROPS_AD_CASE(10) ALTEROPS_AD_CASE(11) ALTEROPS_AD_CASE(12)
    ALTEROPS_AD_CASE(13) ALTEROPS_AD_CASE(14) ALTEROPS_AD_CASE(15) ALTEROPS_AD_CASE(16)
    ALTEROPS_AD_CASE(17) ALTEROPS_AD_CASE(18) ALTEROPS_AD_CASE(19) ALTEROPS_AD_CASE(20)
    ALTEROPS_AD_CASE(21) ALTEROPS_AD_CASE(22) ALTEROPS_AD_CASE(23) ALTEROPS_AD_CASE(24)
    ALTEROPS_AD_CASE(25) ALTEROPS_AD_CASE(26) ALTEROPS_AD_CASE(27) ALTEROPS_AD_CASE(28)
    ALTEROPS_AD_CASE(29) ALTEROPS_AD_CASE(30) ALTEROPS_AD_CASE(31) ALTEROPS_AD_CASE(32)
#undef ALTEROPS_AD_CASE
    default:
      return nullptr;
  }
}

// ---------------------------------------------------------------------------------------
// One map of the list: its planes, geometry and DFT table.
// ---------------------------------------------------------------------------------------
struct MapJob {
  const void* data = nullptr;
  DType dtype = DType::Float32;
  int64_t planes = 0, n = 0, hw = 0, k = 0, cols = 0;  // cols: 2K rounded up to a multiple of 16
  int64_t first_chunk = 0, chunks = 0;
  std::vector<double> table_d;  // n x cols: [cos(2πks/n), k < K | -sin(2πks/n), k < K | 0...]
  std::vector<float> table_f;
  std::vector<int32_t> rot;  // AVX-512 rotation indices (n <= 32)
#if defined(ALTEROPS_STATS_AVX2)
  std::vector<float> table2;       // AVX2 (n <= 32): see dft_power_avx2
  std::vector<int32_t> ad_masks;   // AVX2 (n <= 32): see build_antidiag_masks
#endif
};

static void build_table(MapJob& job) {
  const int64_t n = job.n, cols = job.cols;
  job.table_d.assign(n * cols, 0.0);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t k = 0; k < job.k; ++k) {
      // Reduce k*s mod n exactly before the trigonometric call.
      const double angle = 2.0 * M_PI * static_cast<double>((k * s) % n) / static_cast<double>(n);
      job.table_d[s * cols + k] = std::cos(angle);
      job.table_d[s * cols + job.k + k] = -std::sin(angle);
    }
  }
  job.table_f.assign(job.table_d.begin(), job.table_d.end());
#if defined(__AVX512F__)
  if (n <= 32) build_rotations(static_cast<int>(n), job.rot);
#endif
#if defined(ALTEROPS_STATS_AVX2)
  if (n <= 32) {
    const int64_t kp = job.k <= 8 ? 8 : 16;
    job.table2.assign(n * 2 * kp, 0.f);
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t k = 0; k < job.k; ++k) {
        job.table2[s * 2 * kp + k] = job.table_f[s * cols + k];
        job.table2[s * 2 * kp + kp + k] = job.table_f[s * cols + job.k + k];
      }
    }
    build_antidiag_masks(static_cast<int>(n), job.ad_masks);
  }
#endif
}

// Per chunk of planes of one map: sum over the chunk's planes of log(|F[k,k]| + eps).
template <typename scalar_t>
static void delta_chunk(const MapJob& job, int64_t p0, int64_t p1, double eps, double* out_partial) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = job.n, hw = job.hw, K = job.k, cols = job.cols, np = p1 - p0;
  const acc_t* table = nullptr;
  if constexpr (std::is_same<acc_t, double>::value) {
    table = job.table_d.data();
  } else {
    table = job.table_f.data();
  }
  std::vector<acc_t> plane_buf(std::is_same<scalar_t, acc_t>::value ? 0 : hw);
#if defined(ALTEROPS_STATS_AVX2)
  // dft_power_avx2 writes 8 or 16 lanes per plane: 16 floats of slack
  std::vector<acc_t> a(std::max<int64_t>(n, 32)), d(2 * n), f(cols), logs(np * K + 16);
#else
  std::vector<acc_t> a(std::max<int64_t>(n, 32)), d(2 * n), f(cols), logs(np * K);
#endif
  AntidiagFn<acc_t> fixed = antidiag_for<acc_t>(n);
  const scalar_t* base = static_cast<const scalar_t*>(job.data);

  bool chunk_done = false;
#if defined(__AVX512F__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (n <= 32) {
      // Two phases over the chunk, so that consecutive planes' dependency chains overlap.
      alignas(64) float sums[kChunk * 32];
      for (int64_t j = 0; j < np; ++j) antidiag_avx512(base + (p0 + j) * hw, sums + j * 32, static_cast<int>(n), job.rot.data());
      for (int64_t j = 0; j < np; ++j) dft_power_avx512(sums + j * 32, static_cast<int>(n), static_cast<int>(K), table, logs.data() + j * K);
      chunk_done = true;
    }
  }
#elif defined(ALTEROPS_STATS_AVX2)
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (n <= 32) {
      // Two phases over the chunk, so that consecutive planes' dependency chains overlap.
      alignas(32) float sums[kChunk * 32];
      const int ni = static_cast<int>(n);
      for (int64_t j = 0; j < np; ++j) {
        const float* plane = base + (p0 + j) * hw;
        alignas(32) float last[32 * 32 + 8];
        if (p0 + j == job.planes - 1) {  // the loads may reach 7 floats past the plane: padded copy
          std::memcpy(last, plane, sizeof(float) * hw);
          std::memset(last + hw, 0, sizeof(float) * 8);
          plane = last;
        }
        {  // software prefetch of a plane a few ahead (prefetches never fault)
          const char* ahead = reinterpret_cast<const char*>(base + (p0 + j + 4) * hw);
          for (int64_t off = 0; off < hw * 4; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
        }
        antidiag_avx2_n(plane, sums + j * 32, ni, job.ad_masks.data());
      }
      if (K <= 8) {
        for (int64_t j = 0; j < np; ++j) dft_power_avx2<8>(sums + j * 32, ni, job.table2.data(), logs.data() + j * K);
      } else {
        for (int64_t j = 0; j < np; ++j) dft_power_avx2<16>(sums + j * 32, ni, job.table2.data(), logs.data() + j * K);
      }
      chunk_done = true;
    }
  }
#endif
  for (int64_t j = 0; j < (chunk_done ? 0 : np); ++j) {
    const scalar_t* src = base + (p0 + j) * hw;
    const acc_t* plane;
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      plane = src;
    } else {
      to_acc(src, plane_buf.data(), hw);
      plane = plane_buf.data();
    }
    bool done = false;
#if defined(__AVX512F__)
    if constexpr (std::is_same<acc_t, float>::value) {
      if (n <= 32) {
        plane_power_avx512(plane, static_cast<int>(n), static_cast<int>(K), table, job.rot.data(), logs.data() + j * K);
        continue;
      }
    }
#endif
    if (!done) {
      if (fixed != nullptr) {
        fixed(plane, a.data());
      } else {
        antidiag_generic<acc_t>(plane, a.data(), d.data(), n);
      }
    }
    acc_t* fr = f.data();
    for (int64_t c = 0; c < cols; ++c) fr[c] = acc_t(0);
    for (int64_t s = 0; s < n; ++s) {
      const acc_t as = a[s];
      const acc_t* row = table + s * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) fr[c] += as * row[c];
    }
    acc_t* lj = logs.data() + j * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) lj[k] = fr[k] * fr[k] + fr[K + k] * fr[K + k];
  }

  // log(|F| + eps) over the whole chunk at once.
  const int64_t total = np * K;
  acc_t* L = logs.data();
  const acc_t e = static_cast<acc_t>(eps);
  if constexpr (std::is_same<acc_t, float>::value) {
    std::vector<float> amp(total);
    float* A = amp.data();
#pragma omp simd
    for (int64_t i = 0; i < total; ++i) A[i] = std::sqrt(L[i]) + e;
#pragma omp simd
    for (int64_t i = 0; i < total; ++i) L[i] = log_approx(A[i]);
    // Values the approximation does not cover (0 when eps = 0, inf, nan, denormals): checked
    // with a vectorised test first, fixed up with the library log only when present.
    int bad = 0;
    const float lo = std::numeric_limits<float>::min(), hi = std::numeric_limits<float>::max();
#if defined(__AVX512F__)
    {
      const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
      int64_t i = 0;
      for (; i + 16 <= total; i += 16) {
        const __m512 v = _mm512_loadu_ps(A + i);
        const __mmask16 ok = _mm512_cmp_ps_mask(v, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, vhi, _CMP_LE_OQ);
        bad |= static_cast<int>(ok != static_cast<__mmask16>(0xFFFF));
      }
      for (; i < total; ++i) bad |= static_cast<int>(!(A[i] >= lo && A[i] <= hi));
    }
#else
    for (int64_t i = 0; i < total; ++i) bad |= static_cast<int>(!(A[i] >= lo && A[i] <= hi));
#endif
    if (bad) {
      for (int64_t i = 0; i < total; ++i) {
        if (!(A[i] >= lo && A[i] <= hi)) L[i] = std::log(A[i]);
      }
    }
  } else {
    for (int64_t i = 0; i < total; ++i) L[i] = std::log(std::sqrt(L[i]) + e);
  }
  for (int64_t k = 0; k < K; ++k) out_partial[k] = 0.0;
  for (int64_t j = 0; j < np; ++j) {
    for (int64_t k = 0; k < K; ++k) out_partial[k] += static_cast<double>(L[j * K + k]);
  }
}


// Per chunk of planes: sum over the chunk's planes of the unbiased variance.
template <typename scalar_t>
static double variance_chunk(const void* data, int64_t hw, int64_t p0, int64_t p1) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* base = static_cast<const scalar_t*>(data);
  std::vector<acc_t> buf(std::is_same<scalar_t, acc_t>::value ? 0 : std::min(hw, kVarBlock));
  double total = 0.0;
  for (int64_t p = p0; p < p1; ++p) {
    const scalar_t* src = base + p * hw;
    acc_t mean = acc_t(0), m2 = acc_t(0);
    int64_t count = 0;
    for (int64_t b0 = 0; b0 < hw; b0 += kVarBlock) {
      const int64_t nb = std::min(kVarBlock, hw - b0);
      const acc_t* blk;
      if constexpr (std::is_same<scalar_t, acc_t>::value) {
        blk = src + b0;
      } else {
        acc_t* bb = buf.data();
        to_acc(src + b0, bb, nb);
        blk = bb;
      }
      acc_t bmean, bm2;
#if defined(__AVX512F__)
      if constexpr (std::is_same<acc_t, float>::value) {
        block_moments_avx512(blk, nb, &bmean, &bm2);
      } else
#endif
      {
        acc_t sum = acc_t(0);
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < nb; ++i) sum += blk[i];
        bmean = sum / static_cast<acc_t>(nb);
        bm2 = acc_t(0);
#pragma omp simd reduction(+ : bm2)
        for (int64_t i = 0; i < nb; ++i) {
          const acc_t dv = blk[i] - bmean;
          bm2 += dv * dv;
        }
      }
      if (count == 0) {
        mean = bmean;
        m2 = bm2;
      } else {  // Chan et al.: merge (count, mean, m2) with (nb, bmean, bm2)
        const acc_t nt = static_cast<acc_t>(count + nb);
        const acc_t delta = bmean - mean;
        mean += delta * static_cast<acc_t>(nb) / nt;
        m2 += bm2 + delta * delta * static_cast<acc_t>(count) * static_cast<acc_t>(nb) / nt;
      }
      count += nb;
    }
    total += static_cast<double>(m2 / static_cast<acc_t>(hw - 1));
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------
static void delta_log_amplitude(const DeltaArgs& args, const Parallel& par) {
  const int64_t num_maps = args.num_maps;
  const double eps = args.eps;
  std::vector<MapJob> jobs(num_maps);
  int64_t chunks = 0;
  for (int64_t i = 0; i < num_maps; ++i) {
    const Map& map = args.maps[i];
    MapJob& job = jobs[i];
    job.data = map.data;
    job.dtype = map.dtype;
    job.n = map.h;
    job.hw = job.n * job.n;
    job.planes = map.planes;
    job.k = job.n - job.n / 2;
    job.cols = (2 * job.k + 15) / 16 * 16;
    job.first_chunk = chunks;
    job.chunks = job.k > 0 ? (job.planes + kChunk - 1) / kChunk : 0;  // an empty 0 x 0 map has no bins
    chunks += job.chunks;
    build_table(job);
  }
  // Chunk partials, each a K-vector at a fixed offset.
  std::vector<int64_t> chunk_map(chunks), part_off(chunks);
  int64_t off = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    for (int64_t c = 0; c < jobs[i].chunks; ++c) {
      chunk_map[jobs[i].first_chunk + c] = static_cast<int64_t>(i);
      part_off[jobs[i].first_chunk + c] = off;
      off += jobs[i].k;
    }
  }
  std::vector<double> partials(off);
  // Dynamic schedule: chunks write separate partials, so the result does not depend on which
  // thread runs which chunk, and a preempted thread does not hold up the others.
  par.for_dynamic(chunks, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const MapJob& job = jobs[chunk_map[c]];
      const int64_t local = c - job.first_chunk;
      const int64_t p0 = local * kChunk, p1 = std::min(job.planes, p0 + kChunk);
      dispatch_dtype(job.dtype, [&](auto t) {
        delta_chunk<decltype(t)>(job, p0, p1, eps, partials.data() + part_off[c]);
      });
    }
  });
  for (size_t i = 0; i < jobs.size(); ++i) {
    const MapJob& job = jobs[i];
    std::vector<double> sums(job.k, 0.0);
    for (int64_t c = 0; c < job.chunks; ++c) {
      const double* part = partials.data() + part_off[job.first_chunk + c];
      for (int64_t k = 0; k < job.k; ++k) sums[k] += part[k];
    }
    double* o = args.maps[i].out;
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (int64_t k = 0; k < job.k; ++k) {
      o[k] = job.planes > 0 ? (sums[k] - sums[0]) / static_cast<double>(job.planes) : nan;
    }
  }
}

static void feature_variance(const VarianceArgs& args, const Parallel& par) {
  const int64_t num_maps = args.num_maps;
  std::vector<int64_t> first(num_maps), nchunks(num_maps), planes(num_maps), hws(num_maps);
  int64_t chunks = 0;
  for (int64_t i = 0; i < num_maps; ++i) {
    planes[i] = args.maps[i].planes;
    hws[i] = args.maps[i].h * args.maps[i].w;
    first[i] = chunks;
    nchunks[i] = (planes[i] + kChunk - 1) / kChunk;
    chunks += nchunks[i];
  }
  std::vector<int64_t> chunk_map(chunks);
  for (int64_t i = 0; i < num_maps; ++i) {
    for (int64_t c = 0; c < nchunks[i]; ++c) chunk_map[first[i] + c] = i;
  }
  std::vector<double> partials(chunks);
  par.for_dynamic(chunks, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i = chunk_map[c];
      const int64_t p0 = (c - first[i]) * kChunk, p1 = std::min(planes[i], p0 + kChunk);
      dispatch_dtype(args.maps[i].dtype, [&](auto t) {
        partials[c] = variance_chunk<decltype(t)>(args.maps[i].data, hws[i], p0, p1);
      });
    }
  });
  for (int64_t i = 0; i < num_maps; ++i) {
    double sum = 0.0;
    for (int64_t c = 0; c < nchunks[i]; ++c) sum += partials[first[i] + c];
    args.maps[i].out[0] =
        planes[i] > 0 ? sum / static_cast<double>(planes[i]) : std::numeric_limits<double>::quiet_NaN();
  }
}

const Kernels& kernels() {
  static const Kernels k{&delta_log_amplitude, &feature_variance};
  return k;
}

}  // namespace statistics
}  // namespace alterops
