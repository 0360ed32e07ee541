// exp and the normal CDF on Vec<T>. Float vectors use polynomial versions (a few
// ulp); doubles and the scalar reference path go lane by lane through libm, so
// float64 results stay exact to rounding.

template <typename T>
inline constexpr bool kFastFloat = std::is_same_v<T, float> && Vec<T>::size > 1;

template <typename T, typename Fn>
inline Vec<T> lanewise(Vec<T> x, Fn&& fn) {
  alignas(64) T lanes[Vec<T>::size];
  x.store(lanes);
  for (int64_t i = 0; i < Vec<T>::size; ++i) lanes[i] = fn(lanes[i]);
  return Vec<T>::load(lanes);
}

// e^x: x = k·ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial
// (relative error below 2e-7 there), then scaled by 2^k. NaN stays NaN, as in
// std::exp: x86 min/max return their second operand when either is NaN, so x goes
// second (a NaN logit must give a NaN softmax row, not a probability of 1).
template <typename T>
inline Vec<T> vexp(Vec<T> x) {
  if constexpr (kFastFloat<T>) {
    using V = Vec<T>;
    const V clamped =
        V::broadcast(-87.3365447504019f).max(V::broadcast(88.3762626647949f).min(x));
    const V k = (clamped * V::broadcast(1.44269504088896341f)).round();
    // ln 2 in two parts, so that k·ln2 is exact enough to subtract.
    V r = V::fma(k, V::broadcast(-0.693359375f), clamped);
    r = V::fma(k, V::broadcast(2.12194440e-4f), r);
    V poly = V::broadcast(1.0f / 720);
    for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
      poly = V::fma(poly, r, V::broadcast(c));
    }
    return poly.scale_pow2(k);
  } else {
    return lanewise(x, [](T value) { return std::exp(value); });
  }
}

// Φ(x) = ½·erfc(−x/√2), so GELU(x) = x·Φ(x). The float version evaluates erfc(z),
// z = |x|/√2, by the Chebyshev fit of Numerical Recipes §6.2 (relative error below
// 1.2e-7 for every z), and reflects for x >= 0.
template <typename T>
inline Vec<T> vnormal_cdf(Vec<T> x) {
  if constexpr (kFastFloat<T>) {
    using V = Vec<T>;
    const V z = x.abs() * V::broadcast(0.70710678118654752f);
    const V t = V::broadcast(1.0f) / V::fma(V::broadcast(0.5f), z, V::broadcast(1.0f));
    V poly = V::broadcast(0.17087277f);
    for (const float c : {-0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f, -0.18628806f,
                          0.09678418f, 0.37409196f, 1.00002368f, -1.26551223f}) {
      poly = V::fma(poly, t, V::broadcast(c));
    }
    const V half_erfc = V::broadcast(0.5f) * t * vexp(poly - z * z);
    return V::where_nonneg(x, V::broadcast(1.0f) - half_erfc, half_erfc);
  } else {
    return lanewise(x, [](T value) { return T(0.5) * std::erfc(-value * T(0.70710678118654752440)); });
  }
}

// φ(x) = e^{−x²/2}/√(2π), for GELU'(x) = Φ(x) + x·φ(x).
template <typename T>
inline Vec<T> vnormal_pdf(Vec<T> x) {
  using V = Vec<T>;
  return V::broadcast(T(0.39894228040143267794)) * vexp(V::broadcast(T(-0.5)) * x * x);
}
