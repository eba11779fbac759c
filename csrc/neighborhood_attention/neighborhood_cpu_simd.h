// Neighbourhood attention CPU kernels: the vector type of this build's level (16 floats with
// AVX-512 and without AVX2, 8 with AVX2 + FMA), loads, stores, broadcasts, exp and log of
// vectors, aligned buffers, and the register transposes that pack key rows.
// Part of neighborhood_attention_cpu.cpp, the one translation unit that includes it (compiled once
// per instruction-set level; everything here has internal linkage).
#pragma once

// 64-byte vectors passed by value between internal functions of the generic build: GCC notes
// that their calling convention differs from an AVX-512 build's, which no caller outside this
// translation unit ever sees. (Before the includes: exp_approx.h's exp_poly5 is instantiated for
// them too.)
#pragma GCC diagnostic ignored "-Wpsabi"

#include "../common/exp_approx.h"
#include "../common/scalar.h"
#include "../common/log_approx.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12's AVX-512 shuffle/unpack intrinsics start from _mm512_undefined_ps(), a deliberately
// self-initialised value that -Wmaybe-uninitialized reports at every use (and -Wuninitialized
// where _mm512_reduce_max_ps / _mm512_reduce_add_ps take its 256-bit halves).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// Vector width. AVX-512 (and ISAs without AVX2) use 64-byte vectors (16 floats); AVX2 + FMA
// without AVX-512 uses 32-byte vectors (8 floats, one ymm register each), so that the register
// blocks of neighborhood_cpu_tiles.h (up to ~14 live vectors) fit in the 16 ymm registers
// instead of spilling.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NA_AVX2 1
#define NA_VEC_BYTES 32
#else
#define NA_AVX2 0
#define NA_VEC_BYTES 64
#endif
// AVX2 + FMA instructions available (the AVX2 and AVX-512 levels): 8x8 register transposes for
// packing rows, whatever the vector width.
#if defined(__AVX2__) && defined(__FMA__)
#define NA_X86V3 1
#else
#define NA_X86V3 0
#endif

namespace alterops {
namespace neighborhood {
namespace {

template <typename T>
struct VecOf {
  static constexpr int N = NA_VEC_BYTES / sizeof(T);
  typedef T type __attribute__((vector_size(NA_VEC_BYTES)));
};

template <typename T>
using Vec = typename VecOf<T>::type;

// Allocator of 64-byte aligned storage: a buffer that vector loads read at multiples of the
// vector width from its start then never splits a cache line in those loads.
template <typename T>
struct CacheAligned {
  typedef T value_type;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};
template <typename T>
using Buf = std::vector<T, CacheAligned<T>>;

// How many floats p lies past the 64-byte boundary at or before it (0..15).
static inline int floats_past_line(const float* p) {
  return (int)((reinterpret_cast<uintptr_t>(p) & 63) / sizeof(float));
}

// 64-byte aligned storage left uninitialised (for buffers that their users fill: the first
// write then comes from the thread that uses the memory).
template <typename T>
class RawBuf {
 public:
  explicit RawBuf(size_t n)
      : p_(static_cast<T*>(::operator new(std::max<size_t>(n, 1) * sizeof(T), std::align_val_t(64)))) {}
  ~RawBuf() { ::operator delete(p_, std::align_val_t(64)); }
  RawBuf(const RawBuf&) = delete;
  RawBuf& operator=(const RawBuf&) = delete;
  T* data() { return p_; }
  const T* data() const { return p_; }

 private:
  T* p_;
};

template <typename T>
static inline Vec<T> loadu(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
static inline void storeu(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
// N elements of 16-bit storage as floats (InPtr / OutPtr below), widened exactly and narrowed to
// nearest even with NaN kept quiet, as torch converts, so that bfloat16 and float16 tensors take
// the float32 arithmetic without float32 copies. float16 converts with F16C at the AVX2 and
// AVX-512 levels (x86-64-v3 includes it) and with Half's conversions at the generic one.
typedef uint16_t Bf16Vec __attribute__((vector_size(VecOf<float>::N * 2)));
typedef uint32_t U32Vec __attribute__((vector_size(VecOf<float>::N * 4)));
static inline Vec<float> load_e(const BFloat16* p) {
  Bf16Vec h;
  std::memcpy(&h, p, sizeof(h));
  const U32Vec u = __builtin_convertvector(h, U32Vec) << 16;
  Vec<float> f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
static inline void store_e(BFloat16* p, Vec<float> v) {
  U32Vec u;
  std::memcpy(&u, &v, sizeof(u));
  const U32Vec nan = (U32Vec)((u & 0x7fffffffu) > 0x7f800000u);
  const U32Vec r = (((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) & ~nan) | (nan & 0x7fc0u);
  const Bf16Vec h = __builtin_convertvector(r, Bf16Vec);
  std::memcpy(p, &h, sizeof(h));
}
static inline Vec<float> load_e(const Half* p) {
#if defined(__AVX512F__)
  return (Vec<float>)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif NA_AVX2
  return (Vec<float>)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  Vec<float> f;
  for (int l = 0; l < VecOf<float>::N; ++l) f[l] = Half::to_float(p[l].bits);
  return f;
#endif
}
static inline void store_e(Half* p, Vec<float> v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif NA_AVX2
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int l = 0; l < VecOf<float>::N; ++l) p[l].bits = Half::from_float(v[l]);
#endif
}

// f(std::integral_constant<int, DV>{}) for a head of D channels of a fast width (float_fast_width:
// 16-64, 96, 128), DV its vectors of VecOf<float>::N channels (16 channels are one AVX-512 vector,
// two AVX2 ones): the one place the float32 kernels' instances are chosen.
template <class F>
static inline void dispatch_fast_width(int64_t D, F&& f) {
  constexpr int M = 16 / VecOf<float>::N;
  switch (D / 16) {
    case 1: f(std::integral_constant<int, M>{}); break;
    case 2: f(std::integral_constant<int, 2 * M>{}); break;
    case 3: f(std::integral_constant<int, 3 * M>{}); break;
    case 4: f(std::integral_constant<int, 4 * M>{}); break;
    case 6: f(std::integral_constant<int, 6 * M>{}); break;
    default: f(std::integral_constant<int, 8 * M>{}); break;
  }
}

// The storage type of a float32 kernel's tensors: float32, or bfloat16 / float16 widened as loaded
// and narrowed as stored; elem_bytes is its size.
enum class Elem : int64_t { F32, BF16, F16 };
inline int64_t elem_bytes(Elem e) { return e == Elem::F32 ? 4 : 2; }

// Pointers into a float32, bfloat16 or float16 tensor, the element type decided at run time: the
// float32 kernels take 16-bit tensors without a second instance of their code (which had doubled
// their build). Arithmetic is in elements; widen_tokens, get and store convert (load_e, store_e).
struct InPtr {
  const char* p;
  Elem e;
  InPtr operator+(int64_t n) const { return {p + n * elem_bytes(e), e}; }
  explicit operator bool() const { return p != nullptr; }
  const float* f32() const { return reinterpret_cast<const float*>(p); }  // (float32 tensors)
  // tokens [x0, x1) of D channels, xs elements apart, as float32 rows of D at dst (x0 at dst + x0 * D)
  void widen_tokens(float* dst, int64_t xs, int64_t x0, int64_t x1, int64_t D) const {
    if (e == Elem::F32)
      widen<float>(dst, xs, x0, x1, D);
    else if (e == Elem::BF16)
      widen<BFloat16>(dst, xs, x0, x1, D);
    else
      widen<Half>(dst, xs, x0, x1, D);
  }
  float get() const {  // one element
    return e == Elem::F32    ? *reinterpret_cast<const float*>(p)
           : e == Elem::BF16 ? static_cast<float>(*reinterpret_cast<const BFloat16*>(p))
                             : static_cast<float>(*reinterpret_cast<const Half*>(p));
  }

 private:
  template <typename S>
  void widen(float* dst, int64_t xs, int64_t x0, int64_t x1, int64_t D) const {
    constexpr int N = VecOf<float>::N;
    const S* s = reinterpret_cast<const S*>(p);
    for (int64_t x = x0; x < x1; ++x)
      for (int64_t c = 0; c < D; c += N) {
        if constexpr (std::is_same<S, float>::value)
          storeu(dst + x * D + c, loadu(s + x * xs + c));
        else
          storeu(dst + x * D + c, load_e(s + x * xs + c));
      }
  }
};
struct OutPtr {
  char* p;
  Elem e;
  OutPtr operator+(int64_t n) const { return {p + n * elem_bytes(e), e}; }
  void store(Vec<float> v) const {
    if (e == Elem::F32)
      storeu(reinterpret_cast<float*>(p), v);
    else if (e == Elem::BF16)
      store_e(reinterpret_cast<BFloat16*>(p), v);
    else
      store_e(reinterpret_cast<Half*>(p), v);
  }
  float* f32() const { return reinterpret_cast<float*>(p); }  // (float32 tensors)
};

// A store that goes around the caches (p aligned to the vector): for output that the kernel
// does not read again. stream_fence() orders a thread's streaming stores before its later stores
// (each task calls it before it returns).
static inline void stream_store(float* p, Vec<float> v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, (__m512)v);
#elif NA_AVX2
  _mm256_stream_ps(p, (__m256)v);
#else
  storeu(p, v);
#endif
}
// The same for 16-bit storage: v narrowed (store_e's rounding), its half-vector of bytes written
// with one streaming store (p aligned to it). A thread's consecutive half-vector stores into one
// line fill it in the write-combining buffer before it goes out, so the callers write whole lines.
template <typename E>  // BFloat16 or Half
static inline void stream_store(E* p, Vec<float> v) {
#if NA_X86V3
  Bf16Vec h;  // (any N 16-bit elements)
  store_e(reinterpret_cast<E*>(&h), v);
#if defined(__AVX512F__)
  __m256i x;
  std::memcpy(&x, &h, sizeof(x));
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), x);
#else
  __m128i x;
  std::memcpy(&x, &h, sizeof(x));
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), x);
#endif
#else
  store_e(p, v);
#endif
}
// *p = v for float32 rows: with a streaming store where `stream` (p aligned to the vector),
// through the caches otherwise.
static inline void store_out(float* p, Vec<float> v, bool stream) {
  if (stream)
    stream_store(p, v);
  else
    storeu(p, v);
}
// o = v, with a streaming store where `stream` (o aligned to its vector of elements:
// stream_output's conditions), through the caches otherwise.
static inline void store_out(OutPtr o, Vec<float> v, bool stream) {
  if (!stream)
    o.store(v);
  else if (o.e == Elem::F32)
    stream_store(o.f32(), v);
  else if (o.e == Elem::BF16)
    stream_store(reinterpret_cast<BFloat16*>(o.p), v);
  else
    stream_store(reinterpret_cast<Half*>(o.p), v);
}
static inline void stream_fence() {
#if NA_X86V3
  _mm_sfence();
#endif
}
// Output size from which the AVX2 and AVX-512 kernels write an output with streaming stores (the
// forward's interior P.V tiles, the backward's dq, dk and dv).
constexpr int64_t kStreamOutBytes = int64_t(4) << 20;
// Whether an output of `bytes` at p is written with streaming stores: AVX2 or AVX-512, at least
// kStreamOutBytes, aligned to the vector.
static inline bool stream_output(const void* p, int64_t bytes) {
  return NA_X86V3 && bytes >= kStreamOutBytes && reinterpret_cast<uintptr_t>(p) % NA_VEC_BYTES == 0;
}
template <typename T>
static inline Vec<T> splat(T x) {
  return x - Vec<T>{};  // a broadcast (x - 0 folds to x; a per-lane loop compiles to masked inserts)
}

// Keeps v in a register from here on: the compiler may no longer re-read it from memory at each
// use. (GCC otherwise folds the load into every FMA that reads the vector, so a key vector
// shared by three query rows costs three unaligned loads, and the loads, not the FMAs, set the
// pace.)
template <typename V>
static inline void pin_register(V& v) {
#if defined(__AVX512F__)  // (with 16 ymm registers, AVX2 blocks have no register to spare)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// Fully unrolls a loop over a register block. GCC keeps an accumulator array such as
// acc[rows][channels] in registers only when the loops indexing it are unrolled before its scalar
// replacement pass; otherwise the array round-trips through the stack on entry and exit of every
// block, which costs about as much as the FMAs when the block's loop is short (7 neighbours).
#define NA_UNROLL _Pragma("GCC unroll 32")
// Register-block kernels whose accumulators the caller owns: inlined wherever they are used (an
// out-of-line call takes the accumulators by reference, through memory).
#define NA_TILE static inline __attribute__((always_inline))

// exp for float vectors, exactly 0 below -87 (and for -inf), NaN for NaN, for x up to 88 (the
// softmax's x - max and x - lse, at most 0). vexp_inline is always inlined (for loops that take
// one exp per vector); vexp leaves the choice to the compiler.
static inline __attribute__((always_inline)) Vec<float> vexp_inline(Vec<float> x) {
#if defined(__AVX512F__)
  // AVX-512: 2^n * p(r), n = round(x log2(e)) (vrndscaleps), r = x - n ln(2) in one FMA,
  // p = exp_poly5(r) as below, and the scaling by 2^n in one instruction (vscalefps) whose mask
  // zeroes the lanes below -87 (unordered compare: a NaN stays NaN; -inf and those lanes compute
  // garbage that the mask drops). 10 operations where the degree-6 polynomial of (x log2(e) - n)
  // ln(2) took 13 (Zen 4: 2-D forward 1-2% faster), with the accuracy of the AVX2 form below.
  const __m512 xv = (__m512)x;
  const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xv, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), xv);
  return (Vec<float>)_mm512_maskz_scalef_ps(keep, (__m512)exp_poly5((Vec<float>)r), n);
#else
  // 2^n * p(r): tm = x log2(e) + 1.5 * 2^23 + 127 in one FMA holds n = round(x log2(e)) in its
  // low bits, so that tm - (1.5 * 2^23 + 127) is n and tm's bits shifted left by 23 are 2^n;
  // r = x - n ln(2) in one FMA (|r| <= ln(2) / 2), p = exp_poly5(r); the lanes below -87 are
  // cleared by a mask (unordered: a NaN stays NaN), which also clears the garbage that -inf and
  // such lanes compute. 15 operations where the clamp-and-convert form with the degree-6
  // polynomial took 21 (Zen 3: softmax_block 11.2% -> 7.9% of the 2-D forward's profile), and
  // with FMA (the AVX2 build) about 4x more accurate: relative error at most 1.7e-7 for x in
  // [-10, 0] and 3.7e-7 down to -80, where that form's rounding of x log2(e) had given 6e-7 and
  // 3.9e-6. (The generic build rounds the products separately, about as accurate as before.)
  typedef int32_t VI __attribute__((vector_size(NA_VEC_BYTES)));
  constexpr float kRound = 12582912.0f + 127.0f;  // 1.5 * 2^23 + 127
  const Vec<float> tm = x * 1.44269504088896341f + kRound;
  const Vec<float> n = tm - kRound;
  const Vec<float> r = x - n * 0.693147180559945309f;
  const Vec<float> e = exp_poly5(r) * (Vec<float>)((VI)tm << 23);  // (casts reinterpret the bits)
  return (Vec<float>)((VI)e & ~(VI)(x < -87.0f));
#endif
}
static inline Vec<float> vexp(Vec<float> x) { return vexp_inline(x); }
// log for float vectors (log_approx, ~1 ulp); lanes that are not positive normal numbers (never
// the softmax sums it takes, which are >= 1) go through std::log.
static inline Vec<float> vlog(Vec<float> x) {
  typedef int32_t VI __attribute__((vector_size(NA_VEC_BYTES)));
  const VI bad = (x < std::numeric_limits<float>::min()) | (x > std::numeric_limits<float>::max()) | (x != x);
  bool any_bad = false;
  for (int l = 0; l < VecOf<float>::N; ++l) any_bad |= bad[l] != 0;
  if (any_bad) {
    Vec<float> r;
    for (int l = 0; l < VecOf<float>::N; ++l) r[l] = std::log(x[l]);
    return r;
  }
  return log_approx<Vec<float>, VI>(x);
}
static inline Vec<double> vexp(Vec<double> x) {
  Vec<double> r{};
  for (int l = 0; l < VecOf<double>::N; ++l) r[l] = std::exp(x[l]);
  return r;
}
template <typename T>
static inline Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}

#if NA_X86V3
// dst[c * ds + l] = mul * rows[l][c] for l < 8, c < D (D % 8 == 0); a null row reads zeros.
// Stream: with streaming stores (dst and ds aligned to 8 floats).
template <bool Stream = false>
static inline void transpose8(const float* const* rows, int64_t D, float mul, float* dst, int64_t ds) {
  const __m256 m = _mm256_set1_ps(mul);
  for (int64_t c0 = 0; c0 < D; c0 += 8) {
    __m256 r[8], t[8];
    for (int l = 0; l < 8; ++l) r[l] = rows[l] ? _mm256_loadu_ps(rows[l] + c0) : _mm256_setzero_ps();
    for (int l = 0; l < 8; l += 2) {
      t[l] = _mm256_unpacklo_ps(r[l], r[l + 1]);
      t[l + 1] = _mm256_unpackhi_ps(r[l], r[l + 1]);
    }
    for (int l = 0; l < 8; l += 4) {
      r[l] = _mm256_shuffle_ps(t[l], t[l + 2], 0x44);
      r[l + 1] = _mm256_shuffle_ps(t[l], t[l + 2], 0xEE);
      r[l + 2] = _mm256_shuffle_ps(t[l + 1], t[l + 3], 0x44);
      r[l + 3] = _mm256_shuffle_ps(t[l + 1], t[l + 3], 0xEE);
    }
    // r[0..3]: channels 0,1,2,3 (+4..7 in the high halves) of rows 0-3; r[4..7]: of rows 4-7
    for (int l = 0; l < 4; ++l) {
      t[l] = _mm256_permute2f128_ps(r[l], r[4 + l], 0x20);      // channel c0 + l
      t[4 + l] = _mm256_permute2f128_ps(r[l], r[4 + l], 0x31);  // channel c0 + 4 + l
    }
    if (mul != 1.0f)  // (only the queries carry a scale: keys, values and gradients skip this)
      for (int l = 0; l < 8; ++l) t[l] = _mm256_mul_ps(t[l], m);
    for (int l = 0; l < 8; ++l) {
      if (Stream)
        _mm256_stream_ps(dst + (c0 + l) * ds, t[l]);
      else
        _mm256_storeu_ps(dst + (c0 + l) * ds, t[l]);
    }
  }
}
// transpose8 with streaming stores or plain ones, chosen at run time.
static inline void transpose8_to(bool stream, const float* const* rows, int64_t D, float mul, float* dst,
                                 int64_t ds) {
  if (stream)
    transpose8<true>(rows, D, mul, dst, ds);
  else
    transpose8(rows, D, mul, dst, ds);
}
// dst[t * ds + l] = mul * rows[l][t] for l < 16, t < 8: two 8 x 8 transposes through a small
// buffer, then each of dst's 8 rows of 16 floats (a whole 64-byte line where dst and ds are
// aligned to 16 floats) written with two adjacent stores, streamed where `stream` (dst and ds
// aligned to 8 floats). transpose8 per 8 rows wrote each line in two halves 8 stores apart: on a
// Xeon at AVX2, the general backward's dk and dv rows written this way made the 2-D
// forward+backward (B = 4, 56 x 56, 4 heads, d = 32, k = 7, streamed gradients) 7% faster.
static inline void transpose16x8_to(bool stream, const float* const* rows, float mul, float* dst, int64_t ds) {
  alignas(32) float tl[8 * 16];
  transpose8(rows, 8, mul, tl, 16);
  transpose8(rows + 8, 8, mul, tl + 8, 16);
  for (int t = 0; t < 8; ++t) {
    const __m256 a = _mm256_load_ps(tl + t * 16), b = _mm256_load_ps(tl + t * 16 + 8);
    float* o = dst + t * ds;
    if (stream) {
      _mm256_stream_ps(o, a);
      _mm256_stream_ps(o + 8, b);
    } else {
      _mm256_storeu_ps(o, a);
      _mm256_storeu_ps(o + 8, b);
    }
  }
}
#endif

// dst[c * ds + l] = mul * rows[l][c] for l < 16, c < D (D % 16 == 0); a null row reads zeros.
// Stream (AVX-512): with streaming stores, each a whole 64-byte line (dst and ds aligned to 16
// floats).
template <bool Stream = false>
static inline void transpose16(const float* const* rows, int64_t D, float mul, float* dst, int64_t ds) {
#if defined(__AVX512F__)
  const __m512 m = _mm512_set1_ps(mul);
  for (int64_t c0 = 0; c0 < D; c0 += 16) {
    __m512 r[16], t[16];
    for (int l = 0; l < 16; ++l) r[l] = rows[l] ? _mm512_loadu_ps(rows[l] + c0) : _mm512_setzero_ps();
    for (int l = 0; l < 16; l += 2) {
      t[l] = _mm512_unpacklo_ps(r[l], r[l + 1]);
      t[l + 1] = _mm512_unpackhi_ps(r[l], r[l + 1]);
    }
    for (int l = 0; l < 16; l += 4) {
      r[l] = _mm512_shuffle_ps(t[l], t[l + 2], 0x44);
      r[l + 1] = _mm512_shuffle_ps(t[l], t[l + 2], 0xEE);
      r[l + 2] = _mm512_shuffle_ps(t[l + 1], t[l + 3], 0x44);
      r[l + 3] = _mm512_shuffle_ps(t[l + 1], t[l + 3], 0xEE);
    }
    for (int a = 0; a < 16; a += 8)
      for (int l = 0; l < 4; ++l) {
        t[a + l] = _mm512_shuffle_f32x4(r[a + l], r[a + 4 + l], 0x88);
        t[a + 4 + l] = _mm512_shuffle_f32x4(r[a + l], r[a + 4 + l], 0xdd);
      }
    for (int l = 0; l < 8; ++l) {
      r[l] = _mm512_shuffle_f32x4(t[l], t[8 + l], 0x88);
      r[8 + l] = _mm512_shuffle_f32x4(t[l], t[8 + l], 0xdd);
    }
    if (mul != 1.0f)  // (only the queries carry a scale: keys, values and gradients skip this)
      for (int l = 0; l < 16; ++l) r[l] = _mm512_mul_ps(r[l], m);
    for (int l = 0; l < 16; ++l) {
      if (Stream)
        _mm512_stream_ps(dst + (c0 + l) * ds, r[l]);
      else
        _mm512_storeu_ps(dst + (c0 + l) * ds, r[l]);
    }
  }
#else
  for (int l = 0; l < 16; ++l)
    for (int64_t c = 0; c < D; ++c) dst[c * ds + l] = rows[l] ? rows[l][c] * mul : 0.0f;
#endif
}
// transpose16 with streaming stores or plain ones, chosen at run time.
static inline void transpose16_to(bool stream, const float* const* rows, int64_t D, float mul, float* dst,
                                  int64_t ds) {
  if (stream)
    transpose16<true>(rows, D, mul, dst, ds);
  else
    transpose16(rows, D, mul, dst, ds);
}

#if NA_X86V3
// dst[t * ds + c] = mul * src[c * cs + t] for NT tokens t (8, or 16 at AVX-512 with D % 16 == 0)
// and c < D (D % 8 == 0), every store a whole 64-byte line of a token where 16 channels allow it
// (transpose16_to for 16 tokens, transpose16x8_to for 8; the last 8 channels of an odd count
// through transpose8_to), streamed where `stream`. The backward's dk, dv and dq rows.
template <int NT>
static inline void store_token_block(bool stream, const float* src, int64_t cs, int64_t D, float mul, float* dst,
                                     int64_t ds) {
  const float* rows[16];
  int64_t c0 = 0;
  for (; c0 + 16 <= D; c0 += 16) {
    for (int l = 0; l < 16; ++l) rows[l] = src + (c0 + l) * cs;
    if constexpr (NT == 16)
      transpose16_to(stream, rows, 16, mul, dst + c0, ds);
    else
      transpose16x8_to(stream, rows, mul, dst + c0, ds);
  }
  static_assert(NT == 8 || NT == 16, "8 or 16 tokens");
  if constexpr (NT == 8)
    for (; c0 < D; c0 += 8) {
      for (int l = 0; l < 8; ++l) rows[l] = src + (c0 + l) * cs;
      transpose8_to(stream, rows, 8, mul, dst + c0, ds);
    }
}
#endif

// one slot block of queries/keys (VecOf<float>::N columns)
#if NA_AVX2
#define NA_TRANSPOSE_BLK transpose8
#else
#define NA_TRANSPOSE_BLK transpose16
#endif

// rows[0..n) transposed by transpose16 or transpose8 (n = 16 or 8)
[[maybe_unused]] static inline void transpose_n(int n, const float* const* rows, int64_t D, float mul, float* dst,
                                                int64_t ds) {
#if NA_X86V3
  if (n == 8) {
    transpose8(rows, D, mul, dst, ds);
    return;
  }
#endif
  transpose16(rows, D, mul, dst, ds);
}

// NA_TRANSPOSE_BLK of rows of a float32 or 16-bit tensor (D % N == 0; a null row reads zeros):
// 16-bit rows are widened into tmp (N rows of D floats) first.
static inline void transpose_blk(const InPtr* rows, int64_t D, float mul, float* dst, int64_t ds, float* tmp) {
  constexpr int N = VecOf<float>::N;
  const float* fr[N];
  for (int l = 0; l < N; ++l) {
    fr[l] = rows[l] ? (rows[l].e == Elem::F32 ? rows[l].f32() : tmp + l * D) : nullptr;
    if (rows[l] && rows[l].e != Elem::F32) rows[l].widen_tokens(tmp + l * D, 0, 0, 1, D);
  }
  NA_TRANSPOSE_BLK(fr, D, mul, dst, ds);
}

}  // namespace
}  // namespace neighborhood
}  // namespace alterops
