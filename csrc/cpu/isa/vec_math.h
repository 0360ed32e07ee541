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

// Φ(x) = ½ + x·P(x²)/Q(x²), P and Q of degree 5, x clamped to ±5.6 (where Φ rounds to
// 0 or 1 in fp32): an absolute error of 2e-7 at most, without exp or a reflection, in
// about half the time of vnormal_cdf. Its relative error grows in the left tail (4e-4
// where Φ ≈ 5e-4), as that of torch's ½(1 + erf) does, so only 16-bit storage uses it:
// there GELU's absolute error, 1e-6 at most, is far below the rounding at the scale of
// the activations (half an ulp of 1 is 4e-3 in bf16, 5e-4 in fp16). The coefficients
// are scripts/fit_normal_cdf.py's minimax fit of Φ − ½ on [0, 5.6], rounded to float.
template <typename T>
inline Vec<T> vnormal_cdf_rational(Vec<T> x) {
  static_assert(kFastFloat<T>, "a float-vector approximation");
  using V = Vec<T>;
  const V clamped = V::broadcast(-5.6f).max(V::broadcast(5.6f).min(x));
  const V square = clamped * clamped;
  V numerator = V::broadcast(2.19837215e-08f);
  for (const float c : {6.40701728e-06f, 0.000178013492f, 0.0047329478f, 0.0347587243f,
                        0.398942232f}) {
    numerator = V::fma(numerator, square, V::broadcast(c));
  }
  V denominator = V::broadcast(1.17922343e-06f);
  for (const float c : {7.65494551e-05f, 0.00193652592f, 0.0291646831f, 0.253792822f, 1.0f}) {
    denominator = V::fma(denominator, square, V::broadcast(c));
  }
  return V::fma(V::broadcast(0.5f), denominator, clamped * numerator) / denominator;
}

// φ(x) = e^{−x²/2}/√(2π), for GELU'(x) = Φ(x) + x·φ(x).
template <typename T>
inline Vec<T> vnormal_pdf(Vec<T> x) {
  using V = Vec<T>;
  return V::broadcast(T(0.39894228040143267794)) * vexp(V::broadcast(T(-0.5)) * x * x);
}
