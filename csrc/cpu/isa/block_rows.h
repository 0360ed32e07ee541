// Row kernels of the pruned transformer block, written once against Vec<acc_t<T>>
// and compiled per ISA. Included by isa_unit.inc after layer_norm_rows.h (chunk
// helpers) and vec_math.h.

// p = softmax(scale · x) in place, max-subtracted; T is float or double (the fused
// attention kernel's scratch rows).
template <typename T>
void softmax_rows(const SoftmaxArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  const int64_t N = a.cols;
  const V scale = V::broadcast(a.scale);
  for (int64_t r = begin; r < end; ++r) {
    T* row = a.scores.row(r);
    V best = V::broadcast(-std::numeric_limits<T>::infinity());
    for_each_chunk<T>(N, [&](int64_t c, int64_t n) {
      best = best.max(load_chunk(row + c, n, -std::numeric_limits<T>::infinity()));
    });
    const V shift = V::broadcast(best.reduce_max() * a.scale);
    V total = V::zero();
    for_each_chunk<T>(N, [&](int64_t c, int64_t n) {
      const V e = vexp(V::fma(load_chunk(row + c, n, T(0)), scale, V::zero() - shift));
      store_chunk(e, row + c, n);
      total = total + (n == V::size ? e : load_chunk(row + c, n, T(0)));
    });
    const V inverse = V::broadcast(T(1) / total.sum());
    for_each_chunk<T>(N, [&](int64_t c, int64_t n) {
      store_chunk(load_chunk(row + c, n, T(0)) * inverse, row + c, n);
    });
  }
}

// dlogits = scale · p ⊙ (dp − Σ dp ⊙ p), in place over dp.
template <typename T>
void softmax_backward_rows(const SoftmaxBackwardArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = Vec<A>;
  const int64_t N = a.cols;
  for (int64_t r = begin; r < end; ++r) {
    const T* p = a.probs.row(r);
    T* g = a.grad.row(r);
    V dot = V::zero();
    for_each_chunk<T>(N, [&](int64_t c, int64_t n) {
      dot = V::fma(load_chunk(g + c, n, A(0)), load_chunk(p + c, n, A(0)), dot);
    });
    const V centre = V::broadcast(dot.sum());
    const V scale = V::broadcast(a.scale);
    for_each_chunk<T>(N, [&](int64_t c, int64_t n) {
      const V grad = (load_chunk(g + c, n, A(0)) - centre) * load_chunk(p + c, n, A(0));
      store_chunk(grad * scale, g + c, n);
    });
  }
}

// Φ for GELU on values stored as T: the rational form where T is 16-bit and the
// vectors are float (vec_math.h: its error is below their rounding), else the erfc form.
template <typename T>
inline Vec<acc_t<T>> gelu_cdf(Vec<acc_t<T>> x) {
  if constexpr (sizeof(T) == 2 && kFastFloat<acc_t<T>>) {
    return vnormal_cdf_rational(x);
  } else {
    return vnormal_cdf(x);
  }
}

template <typename T>
void bias_gelu_rows(const BiasGeluArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = Vec<A>;
  for (int64_t r = begin; r < end; ++r) {
    T* h = a.hidden.row(r);
    for_each_chunk<T>(a.cols, [&](int64_t c, int64_t n) {
      const V x = load_chunk(h + c, n, A(0)) + load_chunk(a.bias + c, n, A(0));
      store_chunk(x * gelu_cdf<T>(x), h + c, n);
    });
  }
}

template <typename T>
void bias_gelu_backward_rows(const BiasGeluBackwardArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = Vec<A>;
  for (int64_t r = begin; r < end; ++r) {
    const T* pre = a.pre.row(r);
    T* g = a.grad.row(r);
    for_each_chunk<T>(a.cols, [&](int64_t c, int64_t n) {
      const V x = load_chunk(pre + c, n, A(0)) + load_chunk(a.bias + c, n, A(0));
      const V slope = V::fma(x, vnormal_pdf(x), gelu_cdf<T>(x));
      store_chunk(load_chunk(g + c, n, A(0)) * slope, g + c, n);
    });
  }
}

template <typename T>
void bias_residual_rows(const BiasResidualArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  for (int64_t r = begin; r < end; ++r) {
    T* out = a.out.row(r);
    const T* residual = a.residual.row(r);
    for_each_chunk<T>(a.cols, [&](int64_t c, int64_t n) {
      store_chunk(load_chunk(out + c, n, A(0)) + load_chunk(a.bias + c, n, A(0)) +
                      load_chunk(residual + c, n, A(0)),
                  out + c, n);
    });
  }
}

// The fused attention kernel (docs/design.md §10) works on blocks of V::size queries
// held across the vector lanes: scores are key-major (N × lanes), so the softmax over
// the keys is lane-parallel (no horizontal reductions) and K needs no transpose. K and V
// of the (image, head) pair are staged row-major in the accumulation type, the scaled
// queries transposed (d × lanes, zero past the last query).
template <typename T>
struct AttentionScratch {
  acc_t<T>* keys;     // N × d
  acc_t<T>* values;   // N × d
  acc_t<T>* queries;  // d × lanes
  acc_t<T>* scores;   // N × lanes
  acc_t<T>* inverse_sums;  // lanes
};

// The queries [first, first + count) of one pair, count ≤ V::size.
template <typename T>
void attention_query_block(const AttentionArgs<T>& a, int64_t pair, int64_t first, int64_t count,
                           const AttentionScratch<T>& s) {
  using A = acc_t<T>;
  using V = Vec<A>;
  constexpr int64_t lanes = V::size;
  // Keys per pass of Q Kᵀ and queries per pass of P V: each vector load feeds this many
  // FMAs, enough independent ones to hide the FMA latency.
  constexpr int kKeys = 8;
  constexpr int kRows = lanes < 8 ? static_cast<int>(lanes) : 8;
  const int64_t N = a.keys;
  const int64_t d = a.dim;
  const int64_t b = pair / a.heads;
  const int64_t h = pair % a.heads;
  for (int64_t r = 0; r < lanes; ++r) {
    if (r >= count) {
      for (int64_t t = 0; t < d; ++t) s.queries[t * lanes + r] = A(0);
      continue;
    }
    const T* q = a.q + b * a.q_strides[0] + h * a.q_strides[1] + (first + r) * a.q_strides[2];
    const T* bias = a.query_bias == nullptr ? nullptr : a.query_bias + h * d;
    for (int64_t t = 0; t < d; ++t) {
      const A biased = to_acc(q[t]) + (bias == nullptr ? A(0) : to_acc(bias[t]));
      s.queries[t * lanes + r] = biased * a.scale;
    }
  }
  int64_t j = 0;
  for (; j + kKeys <= N; j += kKeys) {
    V acc[kKeys];
    for (int k = 0; k < kKeys; ++k) acc[k] = V::zero();
    for (int64_t t = 0; t < d; ++t) {
      const V q = V::load(s.queries + t * lanes);
      for (int k = 0; k < kKeys; ++k) {
        acc[k] = V::fma(V::broadcast(s.keys[(j + k) * d + t]), q, acc[k]);
      }
    }
    for (int k = 0; k < kKeys; ++k) acc[k].store(s.scores + (j + k) * lanes);
  }
  for (; j < N; ++j) {
    V acc = V::zero();
    for (int64_t t = 0; t < d; ++t) {
      acc = V::fma(V::broadcast(s.keys[j * d + t]), V::load(s.queries + t * lanes), acc);
    }
    acc.store(s.scores + j * lanes);
  }
  // Softmax over the keys, unnormalised: P V is scaled by 1/Σ at the end.
  V best = V::broadcast(-std::numeric_limits<A>::infinity());
  for (j = 0; j < N; ++j) best = best.max(V::load(s.scores + j * lanes));
  V total = V::zero();
  for (j = 0; j < N; ++j) {
    const V e = vexp(V::load(s.scores + j * lanes) - best);
    e.store(s.scores + j * lanes);
    total = total + e;
  }
  (V::broadcast(A(1)) / total).store(s.inverse_sums);
  if (a.probs != nullptr) {
    for (int64_t r = 0; r < count; ++r) {
      T* p = a.probs + (pair * a.queries + first + r) * N;
      for (j = 0; j < N; ++j) p[j] = from_acc<T>(s.scores[j * lanes + r] * s.inverse_sums[r]);
    }
  }
  for (int64_t r0 = 0; r0 < count; r0 += kRows) {
    for_each_chunk<A>(d, [&](int64_t c, int64_t n) {
      V acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = V::zero();
      for (int64_t key = 0; key < N; ++key) {
        const V values = load_chunk(s.values + key * d + c, n, A(0));
        const A* p = s.scores + key * lanes + r0;
        for (int r = 0; r < kRows; ++r) acc[r] = V::fma(V::broadcast(p[r]), values, acc[r]);
      }
      const V bias =
          a.value_bias == nullptr ? V::zero() : load_chunk(a.value_bias + h * d + c, n, A(0));
      for (int r = 0; r < kRows && r0 + r < count; ++r) {
        const int64_t i = first + r0 + r;
        T* out = a.out + b * a.out_strides[0] + h * a.out_strides[1] + i * a.out_strides[2];
        store_chunk(V::fma(acc[r], V::broadcast(s.inverse_sums[r0 + r]), bias), out + c, n);
      }
    });
  }
}

// Tasks [begin, end): task = pair · query_splits + s takes the s-th range of one
// (image, head) pair's queries, so that a few pairs (batch 1) still fill every thread.
// fn(pair, first, last) runs each non-empty range; ranges are whole blocks of `lanes`.
template <typename Fn>
void for_each_attention_task(int64_t queries, int64_t query_splits, int64_t lanes, int64_t begin,
                             int64_t end, Fn&& fn) {
  const int64_t blocks = (queries + lanes - 1) / lanes;
  const int64_t per_split = (blocks + query_splits - 1) / query_splits * lanes;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t first = task % query_splits * per_split;
    const int64_t last = std::min(queries, first + per_split);
    if (first < last) fn(task / query_splits, first, last);
  }
}

#if defined(PATCHSLIM_ISA_AVX512_BF16)
// bfloat16 without probabilities, on CPUs with AVX512-BF16 (docs/design.md §10): the
// same blocks of 16 queries across the lanes, but vdpbf16ps takes two bf16 products
// per fp32 lane and instruction. Each 32-bit word holds a pair along the reduction:
// for Q Kᵀ, (q[2t], q[2t+1]) of each query and (k[2t], k[2t+1]) of each key, the keys'
// words staged pair-major (t, key) so that 16 keys are 16 fixed offsets from one
// pointer; for P V, (p[j], p[j+1]) of each query, rounded to bf16 as flash attention
// rounds P, and V staged as (v[j][c], v[j+1][c]) words. vdpbf16ps has a longer latency
// than an FMA, so each loop keeps 16 independent sums. Sums stay in fp32; the scale
// multiplies the fp32 logits, not the bf16 queries.
struct Bf16PairScratch {
  Bf16PairLayout layout;
  uint32_t* key_pairs;    // words × padded_keys, zero past the last key
  uint32_t* value_pairs;  // key_pairs × padded_dim
  uint32_t* prob_pairs;   // key_pairs × 16
  uint32_t* query_pairs;  // words × 16
  float* scores;          // padded_keys × 16
  float* inverse_sums;    // 16
};

inline uint32_t bf16_pair_at(const BFloat16Bits* p) {
  uint32_t word;
  std::memcpy(&word, p, sizeof word);
  return word;
}

// The words (x[c], y[c]) for c in [0, count) of two bf16 rows (y null: zeros); zero
// past count.
inline __m512i bf16_pairs(const BFloat16Bits* x, const BFloat16Bits* y, int64_t count) {
  const __mmask16 m = static_cast<__mmask16>((1u << count) - 1u);
  const __m512i low = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x));
  if (y == nullptr) return low;
  const __m512i high = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, y));
  return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}

// x rounded to bf16 (nearest even), each in the low half of a 32-bit word.
inline __m512i bf16_words(__m512 x) {
  const __m256bh rounded = _mm512_cvtneps_pbh(x);
  return _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(rounded));
}

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
}

// The block's output rows, count ≤ kRows: Σ_j p[r][j] v[j] / Σ_j p[r][j].
template <int kRows>
inline void attention_values_bf16_pairs(const AttentionArgs<BFloat16Bits>& a, int64_t pair,
                                        int64_t first, int64_t count, const Bf16PairScratch& s) {
  constexpr int64_t lanes = Vec<float>::size;
  const int64_t d = a.dim;
  const int64_t b = pair / a.heads;
  const int64_t h = pair % a.heads;
  for (int64_t c = 0; c < d; c += lanes) {
    __m512 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
    const uint32_t* values = s.value_pairs + c;
    const uint32_t* p = s.prob_pairs;
    for (int64_t kp = 0; kp < s.layout.key_pairs;
         ++kp, values += s.layout.padded_dim, p += lanes) {
      const __m512i v = _mm512_loadu_si512(values);
      for (int r = 0; r < kRows; ++r) {
        acc[r] = dot_pairs(acc[r], _mm512_set1_epi32(static_cast<int>(p[r])), v);
      }
    }
    const int64_t n = std::min(lanes, d - c);
    const Vec<float> bias = a.value_bias == nullptr ? Vec<float>::zero()
                                                    : load_chunk(a.value_bias + h * d + c, n, 0.0f);
    for (int r = 0; r < kRows && r < count; ++r) {
      const int64_t i = first + r;
      BFloat16Bits* out = a.out + b * a.out_strides[0] + h * a.out_strides[1] + i * a.out_strides[2];
      store_chunk(Vec<float>::fma(Vec<float>{acc[r]}, Vec<float>::broadcast(s.inverse_sums[r]), bias),
                  out + c, n);
    }
  }
}

inline void attention_query_block_bf16_pairs(const AttentionArgs<BFloat16Bits>& a, int64_t pair,
                                             int64_t first, int64_t count,
                                             const Bf16PairScratch& s) {
  using V = Vec<float>;
  constexpr int64_t lanes = V::size;
  // Keys per pass of Q Kᵀ: the keys are padded to whole passes.
  constexpr int kKeys = kAttentionLanes;
  const int64_t N = a.keys;
  const int64_t padded_keys = s.layout.padded_keys;
  const int64_t words = s.layout.words;
  const int64_t b = pair / a.heads;
  const int64_t h = pair % a.heads;
  for (int64_t r = 0; r < lanes; ++r) {
    if (r >= count) {
      for (int64_t t = 0; t < words; ++t) s.query_pairs[t * lanes + r] = 0u;
      continue;
    }
    const BFloat16Bits* q =
        a.q + b * a.q_strides[0] + h * a.q_strides[1] + (first + r) * a.q_strides[2];
    if (a.query_bias == nullptr) {
      for (int64_t t = 0; t < words; ++t) s.query_pairs[t * lanes + r] = bf16_pair_at(q + 2 * t);
      continue;
    }
    // q + b, rounded to bf16 (the GEMM with the bias would have rounded once, not twice).
    const BFloat16Bits* bias = a.query_bias + h * a.dim;
    const auto biased = [&](int64_t c) -> uint32_t {
      return from_acc<BFloat16Bits>(to_acc(q[c]) + to_acc(bias[c])).bits;
    };
    for (int64_t t = 0; t < words; ++t) {
      s.query_pairs[t * lanes + r] = biased(2 * t) | (biased(2 * t + 1) << 16);
    }
  }
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t j = 0; j < padded_keys; j += kKeys) {
    __m512 acc[kKeys];
    for (int k = 0; k < kKeys; ++k) acc[k] = _mm512_setzero_ps();
    const uint32_t* key = s.key_pairs + j;
    for (int64_t t = 0; t < words; ++t, key += padded_keys) {
      const __m512i q = _mm512_loadu_si512(s.query_pairs + t * lanes);
      for (int k = 0; k < kKeys; ++k) {
        acc[k] = dot_pairs(acc[k], q, _mm512_set1_epi32(static_cast<int>(key[k])));
      }
    }
    for (int k = 0; k < kKeys; ++k) {
      _mm512_storeu_ps(s.scores + (j + k) * lanes, _mm512_mul_ps(acc[k], scale));
    }
  }
  // Softmax over the keys, unnormalised, as words (p[j], p[j+1]) per query; the missing
  // last key of an odd N has p = 0 (and V zero).
  V best = V::broadcast(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < N; ++j) best = best.max(V::load(s.scores + j * lanes));
  V total = V::zero();
  for (int64_t j = 0; j < N; j += 2) {
    const V even = vexp(V::load(s.scores + j * lanes) - best);
    const V odd = j + 1 < N ? vexp(V::load(s.scores + (j + 1) * lanes) - best) : V::zero();
    total = total + even + odd;
    _mm512_storeu_si512(s.prob_pairs + j / 2 * lanes,
                        _mm512_or_si512(bf16_words(even.v), _mm512_slli_epi32(bf16_words(odd.v), 16)));
  }
  (V::broadcast(1.0f) / total).store(s.inverse_sums);
  if (count > 8) {
    attention_values_bf16_pairs<16>(a, pair, first, count, s);
  } else {
    attention_values_bf16_pairs<8>(a, pair, first, count, s);
  }
}

inline void attention_heads_bf16_pairs(const AttentionArgs<BFloat16Bits>& a, int64_t begin,
                                       int64_t end, float* scratch) {
  constexpr int64_t lanes = Vec<float>::size;
  static_assert(lanes == kAttentionLanes, "Bf16PairLayout pads to kAttentionLanes");
  const int64_t N = a.keys;
  const int64_t d = a.dim;
  const Bf16PairLayout layout(d, N);
  const int64_t words = layout.words;
  const int64_t padded_keys = layout.padded_keys;
  const int64_t key_pairs = layout.key_pairs;
  const int64_t padded_dim = layout.padded_dim;
  uint32_t* const key_words = reinterpret_cast<uint32_t*>(scratch);
  uint32_t* const value_words = key_words + words * padded_keys;
  uint32_t* const prob_words = value_words + key_pairs * padded_dim;
  uint32_t* const query_words = prob_words + key_pairs * lanes;
  float* const scores = reinterpret_cast<float*>(query_words + words * lanes);
  const Bf16PairScratch s{layout,      key_words, value_words, prob_words,
                          query_words, scores,    scores + padded_keys * lanes};
  for_each_attention_task(a.queries, a.query_splits, lanes, begin, end,
                          [&](int64_t pair, int64_t first, int64_t last) {
    const int64_t b = pair / a.heads;
    const int64_t h = pair % a.heads;
    const BFloat16Bits* k = a.k + b * a.k_strides[0] + h * a.k_strides[1];
    for (int64_t j = 0; j < padded_keys; ++j) {
      for (int64_t t = 0; t < words; ++t) {
        s.key_pairs[t * padded_keys + j] = j < N ? bf16_pair_at(k + j * a.k_strides[2] + 2 * t) : 0u;
      }
    }
    const BFloat16Bits* v = a.v + b * a.v_strides[0] + h * a.v_strides[1];
    for (int64_t kp = 0; kp < key_pairs; ++kp) {
      const BFloat16Bits* even = v + 2 * kp * a.v_strides[2];
      const BFloat16Bits* odd = 2 * kp + 1 < N ? even + a.v_strides[2] : nullptr;
      for (int64_t c = 0; c < d; c += lanes) {
        _mm512_storeu_si512(s.value_pairs + kp * padded_dim + c,
                            bf16_pairs(even + c, odd == nullptr ? nullptr : odd + c,
                                       std::min(lanes, d - c)));
      }
    }
    for (int64_t i = first; i < last; i += lanes) {
      attention_query_block_bf16_pairs(a, pair, i, std::min(lanes, last - i), s);
    }
  });
}
#endif

template <typename T>
void attention_heads(const AttentionArgs<T>& a, int64_t begin, int64_t end, acc_t<T>* scratch) {
  using A = acc_t<T>;
  constexpr int64_t lanes = Vec<A>::size;
  static_assert(lanes <= kAttentionLanes, "the scratch holds kAttentionLanes queries");
#if defined(PATCHSLIM_ISA_AVX512_BF16)
  if constexpr (std::is_same_v<T, BFloat16Bits>) {
    if (a.probs == nullptr && a.dim % 2 == 0) {
      attention_heads_bf16_pairs(a, begin, end, scratch);
      return;
    }
  }
#endif
  const int64_t N = a.keys;
  const int64_t d = a.dim;
  const AttentionScratch<T> s{scratch, scratch + N * d, scratch + 2 * N * d,
                              scratch + 2 * N * d + d * lanes,
                              scratch + 2 * N * d + d * lanes + N * lanes};
  for_each_attention_task(a.queries, a.query_splits, lanes, begin, end,
                          [&](int64_t pair, int64_t first, int64_t last) {
    const int64_t b = pair / a.heads;
    const int64_t h = pair % a.heads;
    for (int64_t j = 0; j < N; ++j) {
      const T* k = a.k + b * a.k_strides[0] + h * a.k_strides[1] + j * a.k_strides[2];
      const T* v = a.v + b * a.v_strides[0] + h * a.v_strides[1] + j * a.v_strides[2];
      for_each_chunk<T>(d, [&](int64_t c, int64_t n) {
        store_chunk(load_chunk(k + c, n, A(0)), s.keys + j * d + c, n);
        store_chunk(load_chunk(v + c, n, A(0)), s.values + j * d + c, n);
      });
    }
    for (int64_t i = first; i < last; i += lanes) {
      attention_query_block(a, pair, i, std::min(lanes, last - i), s);
    }
  });
}
