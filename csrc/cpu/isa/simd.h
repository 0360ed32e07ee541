#pragma once

// A minimal SIMD vector for the row kernels. Operators are members, not
// friends: GCC does not apply a target pragma to in-class friend definitions. Include only from an ISA
// translation unit, after it has defined exactly one of PATCHSLIM_ISA_SCALAR,
// PATCHSLIM_ISA_AVX2, PATCHSLIM_ISA_AVX512 and opened that ISA's namespace:
// every function here then gets that namespace and that target.

#if !defined(PATCHSLIM_ISA_SCALAR) && !defined(PATCHSLIM_ISA_AVX2) && !defined(PATCHSLIM_ISA_AVX512)
#error "define the ISA before including simd.h"
#endif

// Scalar conversions between float and the 16-bit storage types, round to nearest
// even (NaN stays NaN, overflow gives Inf), as c10::BFloat16 and c10::Half convert.
inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(BFloat16Bits v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
inline float to_acc(HalfBits v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1Fu;
  const uint32_t mantissa = v.bits & 0x3FFu;
  if (exponent == 0x1F) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign != 0 ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

template <typename T>
inline T from_acc(acc_t<T> v) {
  return v;
}
template <>
inline BFloat16Bits from_acc<BFloat16Bits>(float v) {
  const uint32_t bits = float_to_bits(v);
  if (std::isnan(v)) return {static_cast<uint16_t>((bits >> 16) | 0x40u)};
  return {static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16)};
}
template <>
inline HalfBits from_acc<HalfBits>(float v) {
  uint32_t bits = float_to_bits(v);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  bits &= 0x7FFFFFFFu;
  if (bits > 0x7F800000u) return {static_cast<uint16_t>(sign | 0x7E00u)};
  if (bits >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};  // >= 65520: Inf
  if (bits < 0x38800000u) {  // below 2^-14: a subnormal half, mantissa = v · 2^24 rounded
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(
                                              bits_to_float(bits) * 16777216.0f)))};
  }
  // Re-bias the exponent (127 -> 15) and round the 13 dropped mantissa bits.
  bits += 0xC8000FFFu + ((bits >> 13) & 1u);
  return {static_cast<uint16_t>(sign | (bits >> 13))};
}

template <typename T>
struct Vec;

#if defined(PATCHSLIM_ISA_AVX512)

template <>
struct Vec<float> {
  static constexpr int64_t size = 16;
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  // Lanes at and past `count` read as `fill`.
  static Vec load_partial(const float* p, int64_t count, float fill) {
    return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), lane_mask(count), p)};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store_partial(float* p, int64_t count) const { _mm512_mask_storeu_ps(p, lane_mask(count), v); }
  float sum() const { return _mm512_reduce_add_ps(v); }
  Vec operator+(Vec b) const { return {_mm512_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm512_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm512_mul_ps(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  Vec max(Vec b) const { return {_mm512_max_ps(v, b.v)}; }
  Vec operator/(Vec b) const { return {_mm512_div_ps(v, b.v)}; }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  Vec abs() const { return {_mm512_abs_ps(v)}; }
  // cond >= 0 ? a : b, lane by lane.
  static Vec where_nonneg(Vec cond, Vec a, Vec b) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(cond.v, _mm512_setzero_ps(), _CMP_GE_OQ), b.v, a.v)};
  }
  Vec min(Vec b) const { return {_mm512_min_ps(v, b.v)}; }
  Vec round() const { return {_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // v · 2^k for integer-valued k.
  Vec scale_pow2(Vec k) const { return {_mm512_scalef_ps(v, k.v)}; }
  static __mmask16 lane_mask(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }

  // 16-bit storage: widened on load, rounded to nearest even on store.
  static Vec from_bf16(__m256i h) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  __m256i to_bf16() const {
#if defined(PATCHSLIM_ISA_AVX512_BF16)
    // One vcvtneps2bf16 rounds as below, except that it flushes subnormal inputs to
    // zero; those (|v| < 2^-126, never met in activations) take the integer path.
    if (_mm512_fpclass_ps_mask(v, 0x20) == 0) {
      const __m256bh rounded = _mm512_cvtneps_pbh(v);
      return reinterpret_cast<const __m256i&>(rounded);
    }
#endif
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i high = _mm512_srli_epi32(bits, 16);
    const __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(
        _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(high, _mm512_set1_epi32(0x40))));
  }
  __m256i to_half() const { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static Vec load(const BFloat16Bits* p) { return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static Vec load(const HalfBits* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  static Vec load_partial(const BFloat16Bits* p, int64_t count, float fill) {
    const __mmask16 m = lane_mask(count);
    return {_mm512_mask_blend_ps(m, _mm512_set1_ps(fill), from_bf16(_mm256_maskz_loadu_epi16(m, p)).v)};
  }
  static Vec load_partial(const HalfBits* p, int64_t count, float fill) {
    const __mmask16 m = lane_mask(count);
    return {_mm512_mask_blend_ps(m, _mm512_set1_ps(fill), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)))};
  }
  void store(BFloat16Bits* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16()); }
  void store(HalfBits* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_half()); }
  void store_partial(BFloat16Bits* p, int64_t count) const { _mm256_mask_storeu_epi16(p, lane_mask(count), to_bf16()); }
  void store_partial(HalfBits* p, int64_t count) const { _mm256_mask_storeu_epi16(p, lane_mask(count), to_half()); }
};

template <>
struct Vec<double> {
  static constexpr int64_t size = 8;
  __m512d v;
  static Vec zero() { return {_mm512_setzero_pd()}; }
  static Vec broadcast(double x) { return {_mm512_set1_pd(x)}; }
  static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static Vec load_partial(const double* p, int64_t count, double fill) {
    return {_mm512_mask_loadu_pd(_mm512_set1_pd(fill), lane_mask(count), p)};
  }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  void store_partial(double* p, int64_t count) const { _mm512_mask_storeu_pd(p, lane_mask(count), v); }
  double sum() const { return _mm512_reduce_add_pd(v); }
  Vec operator+(Vec b) const { return {_mm512_add_pd(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm512_sub_pd(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm512_mul_pd(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
  Vec max(Vec b) const { return {_mm512_max_pd(v, b.v)}; }
  Vec operator/(Vec b) const { return {_mm512_div_pd(v, b.v)}; }
  double reduce_max() const { return _mm512_reduce_max_pd(v); }
  static __mmask8 lane_mask(int64_t count) { return static_cast<__mmask8>((1u << count) - 1u); }
};

#elif defined(PATCHSLIM_ISA_AVX2)

// AVX2 has no masked float loads with a fill value; partial vectors go through
// a small stack buffer, which only the last chunk of a row pays for.

template <>
struct Vec<float> {
  static constexpr int64_t size = 8;
  __m256 v;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load_partial(const float* p, int64_t count, float fill) {
    alignas(32) float lanes[size];
    for (int64_t i = 0; i < size; ++i) lanes[i] = i < count ? p[i] : fill;
    return {_mm256_load_ps(lanes)};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store_partial(float* p, int64_t count) const {
    alignas(32) float lanes[size];
    _mm256_store_ps(lanes, v);
    for (int64_t i = 0; i < count; ++i) p[i] = lanes[i];
  }
  float sum() const {
    const __m128 pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
    return _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 0x1)));
  }
  Vec operator+(Vec b) const { return {_mm256_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm256_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm256_mul_ps(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  Vec max(Vec b) const { return {_mm256_max_ps(v, b.v)}; }
  Vec operator/(Vec b) const { return {_mm256_div_ps(v, b.v)}; }
  Vec abs() const { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)}; }
  static Vec where_nonneg(Vec cond, Vec a, Vec b) {
    return {_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(cond.v, _mm256_setzero_ps(), _CMP_GE_OQ))};
  }
  float reduce_max() const {
    alignas(32) float lanes[size];
    _mm256_store_ps(lanes, v);
    float best = lanes[0];
    for (int64_t i = 1; i < size; ++i) best = lanes[i] > best ? lanes[i] : best;
    return best;
  }
  Vec min(Vec b) const { return {_mm256_min_ps(v, b.v)}; }
  Vec round() const { return {_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // v · 2^k for integer-valued k in the normal exponent range, built in the exponent bits.
  Vec scale_pow2(Vec k) const {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k.v), _mm256_set1_epi32(127)), 23);
    return {_mm256_mul_ps(v, _mm256_castsi256_ps(bits))};
  }

  // 16-bit storage, lane by lane through the scalar conversions.
  template <typename S>
  static Vec load_partial(const S* p, int64_t count, float fill) {
    alignas(32) float lanes[size];
    for (int64_t i = 0; i < size; ++i) lanes[i] = i < count ? to_acc(p[i]) : fill;
    return {_mm256_load_ps(lanes)};
  }
  template <typename S>
  static Vec load(const S* p) {
    return load_partial(p, size, 0.0f);
  }
  template <typename S>
  void store_partial(S* p, int64_t count) const {
    alignas(32) float lanes[size];
    _mm256_store_ps(lanes, v);
    for (int64_t i = 0; i < count; ++i) p[i] = from_acc<S>(lanes[i]);
  }
  template <typename S>
  void store(S* p) const {
    store_partial(p, size);
  }
};

template <>
struct Vec<double> {
  static constexpr int64_t size = 4;
  __m256d v;
  static Vec zero() { return {_mm256_setzero_pd()}; }
  static Vec broadcast(double x) { return {_mm256_set1_pd(x)}; }
  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static Vec load_partial(const double* p, int64_t count, double fill) {
    alignas(32) double lanes[size];
    for (int64_t i = 0; i < size; ++i) lanes[i] = i < count ? p[i] : fill;
    return {_mm256_load_pd(lanes)};
  }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  void store_partial(double* p, int64_t count) const {
    alignas(32) double lanes[size];
    _mm256_store_pd(lanes, v);
    for (int64_t i = 0; i < count; ++i) p[i] = lanes[i];
  }
  double sum() const {
    const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
  }
  Vec operator+(Vec b) const { return {_mm256_add_pd(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm256_sub_pd(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm256_mul_pd(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
  Vec max(Vec b) const { return {_mm256_max_pd(v, b.v)}; }
  Vec operator/(Vec b) const { return {_mm256_div_pd(v, b.v)}; }
  double reduce_max() const {
    alignas(32) double lanes[size];
    _mm256_store_pd(lanes, v);
    double best = lanes[0];
    for (int64_t i = 1; i < size; ++i) best = lanes[i] > best ? lanes[i] : best;
    return best;
  }
};

#else  // PATCHSLIM_ISA_SCALAR: the reference path, one lane.

template <typename T>
struct Vec {
  static constexpr int64_t size = 1;
  T v;
  static Vec zero() { return {T(0)}; }
  static Vec broadcast(T x) { return {x}; }
  static Vec load(const T* p) { return {*p}; }
  static Vec load_partial(const T* p, int64_t, T) { return {*p}; }
  void store(T* p) const { *p = v; }
  void store_partial(T* p, int64_t) const { *p = v; }
  T sum() const { return v; }
  Vec operator+(Vec b) const { return {v + b.v}; }
  Vec operator-(Vec b) const { return {v - b.v}; }
  Vec operator*(Vec b) const { return {v * b.v}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
  Vec max(Vec b) const { return {v > b.v ? v : b.v}; }
  Vec operator/(Vec b) const { return {v / b.v}; }
  T reduce_max() const { return v; }
  // 16-bit storage (T is float then).
  template <typename S>
  static Vec load(const S* p) {
    return {to_acc(*p)};
  }
  template <typename S>
  static Vec load_partial(const S* p, int64_t, T) {
    return {to_acc(*p)};
  }
  template <typename S>
  void store(S* p) const {
    *p = from_acc<S>(v);
  }
  template <typename S>
  void store_partial(S* p, int64_t) const {
    *p = from_acc<S>(v);
  }
};

#endif
