// Unfused neighbourhood attention on the CPU: the gathers behind NATTEN's separate qk / av
// operations (alterops/_na_unfused.py, alterops/compat/natten.py). The neighbourhood arrives as
// tables (slot -> key, slot -> bias cell, key -> (query, slot) entries), so one loop nest serves
// every dimension, kernel size, dilation and causal mask. Compiled once per instruction-set
// level like the other kernels; the inner loops over head_dim vectorise (omp simd) where the
// head_dim stride is 1.
//
// Every output row is written by one thread, summing in a fixed order: results do not depend on
// the number of threads.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "neighborhood_attention.h"

namespace alterops {
namespace neighborhood {
namespace {

// Rows (b, h, p) handed to a thread at a time: enough work to amortise the dispatch.
int64_t grain_rows(int64_t per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_row, 1)); }

template <typename T>
struct Rows {  // a View4's row (b, h, p) start, and its last-axis stride
  const T* base;
  int64_t sb, sh, sp, sd;
  int64_t heads, N;
  explicit Rows(const View4& v)
      : base(static_cast<const T*>(v.data)),
        sb(v.stride[0]),
        sh(v.stride[1]),
        sp(v.stride[2]),
        sd(v.stride[3]),
        heads(v.size[1]),
        N(v.size[2]) {}
  // the start of (b, h) = (bh / heads, bh % heads), and of its row p
  const T* plane(int64_t bh) const { return base + (bh / heads) * sb + (bh % heads) * sh; }
  const T* at(int64_t bh, int64_t p) const { return plane(bh) + p * sp; }
};

template <typename T>
inline T dot_row(const T* a, int64_t sa, const T* b, int64_t sb, int64_t D) {
  T s = 0;
  if (sa == 1 && sb == 1) {
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  } else {
    for (int64_t d = 0; d < D; ++d) s += a[d * sa] * b[d * sb];
  }
  return s;
}

template <typename T>
inline void axpy_row(T* acc, T w, const T* y, int64_t sy, int64_t D) {
  if (sy == 1) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += w * y[d];
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] += w * y[d * sy];
  }
}

// FixedD > 0: head_dim known at compile time (contiguous rows): the dot unrolls completely.
template <typename T, int FixedD>
void dot_impl(const UnfusedDotArgs& a, const Parallel& par) {
  const Rows<T> x(a.x), y(a.y);
  const int64_t BH = a.x.size[0] * a.x.size[1], N = a.x.size[2], D = FixedD > 0 ? FixedD : a.x.size[3], K = a.K;
  const T* table = static_cast<const T*>(a.table);
  T* out = static_cast<T*>(a.out);
  const T fill = static_cast<T>(a.fill);
  par.for_each(0, BH * N, grain_rows(K * D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / N, p = r % N, h = bh % x.heads;
      const T* xr = x.at(bh, p);
      const T* yp = y.plane(bh);
      T* o = out + r * K;
      for (int64_t c = 0; c < K; ++c) {
        const int64_t s = c * N + p;
        if (a.ok && !a.ok[s]) {
          o[c] = fill;
          continue;
        }
        const T* yr = yp + a.nb[s] * y.sp;
        T v;
        if constexpr (FixedD > 0) {
          T acc[FixedD];
#pragma omp simd
          for (int d = 0; d < FixedD; ++d) acc[d] = xr[d] * yr[d];
          for (int w = FixedD / 2; w >= 1; w /= 2) {  // pairwise: a fixed tree, vector halves
#pragma omp simd
            for (int d = 0; d < w; ++d) acc[d] += acc[d + w];
          }
          v = acc[0];
        } else {
          v = dot_row(xr, x.sd, yr, y.sd, D);
        }
        if (table) v += table[h * a.table_cells + a.cell[s]];
        o[c] = v;
      }
    }
  });
}

template <typename T>
void dot_typed(const UnfusedDotArgs& a, const Parallel& par) {
  const bool contiguous_rows = a.x.stride[3] == 1 && a.y.stride[3] == 1;
  switch (contiguous_rows ? a.x.size[3] : 0) {
    case 16: dot_impl<T, 16>(a, par); break;
    case 32: dot_impl<T, 32>(a, par); break;
    case 64: dot_impl<T, 64>(a, par); break;
    default: dot_impl<T, 0>(a, par); break;
  }
}

template <typename T>
void sum_typed(const UnfusedSumArgs& a, const Parallel& par) {
  const Rows<T> w(a.w), y(a.y);
  const int64_t BH = a.y.size[0] * a.y.size[1], N = a.y.size[2], D = a.y.size[3], K = a.w.size[3];
  T* out = static_cast<T*>(a.out);
  par.for_each(0, BH * N, grain_rows(K * D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / N, p = r % N;
      const T* wr = w.at(bh, p);
      const T* yp = y.plane(bh);
      T* o = out + r * D;
      std::fill(o, o + D, T(0));
      for (int64_t c = 0; c < K; ++c) {
        const int64_t s = c * N + p;
        if (a.ok && !a.ok[s]) continue;
        axpy_row(o, wr[c * w.sd], yp + a.nb[s] * y.sp, y.sd, D);
      }
    }
  });
}

template <typename T, typename I>
void scatter_typed(const UnfusedScatterArgs& a, const Parallel& par) {
  const Rows<T> w(a.w), x(a.x);
  const int64_t BH = a.x.size[0] * a.x.size[1], N = a.x.size[2], D = a.x.size[3], K = a.K;
  const I* rowptr = static_cast<const I*>(a.rowptr);
  const I* entries = static_cast<const I*>(a.entries);
  T* out = static_cast<T*>(a.out);
  par.for_each(0, BH * N, grain_rows(K * D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / N, j = r % N;
      const T* wp = w.plane(bh);
      const T* xp = x.plane(bh);
      T* o = out + r * D;
      std::fill(o, o + D, T(0));
      for (int64_t e = rowptr[j]; e < rowptr[j + 1]; ++e) {
        const int64_t pc = entries[e], p = pc / K, c = pc % K;
        axpy_row(o, wp[p * w.sp + c * w.sd], xp + p * x.sp, x.sd, D);
      }
    }
  });
}

}  // namespace

void unfused_dot(const UnfusedDotArgs& a, const Parallel& par) {
  if (a.dtype == DType::Float64)
    dot_typed<double>(a, par);
  else
    dot_typed<float>(a, par);
}

void unfused_sum(const UnfusedSumArgs& a, const Parallel& par) {
  if (a.dtype == DType::Float64)
    sum_typed<double>(a, par);
  else
    sum_typed<float>(a, par);
}

void unfused_scatter(const UnfusedScatterArgs& a, const Parallel& par) {
  const bool f64 = a.dtype == DType::Float64;
  if (a.index64) {
    if (f64) scatter_typed<double, int64_t>(a, par); else scatter_typed<float, int64_t>(a, par);
  } else {
    if (f64) scatter_typed<double, int32_t>(a, par); else scatter_typed<float, int32_t>(a, par);
  }
}

}  // namespace neighborhood
}  // namespace alterops
