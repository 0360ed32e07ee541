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

template <typename T>
void bias_gelu_rows(const BiasGeluArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = Vec<A>;
  for (int64_t r = begin; r < end; ++r) {
    T* h = a.hidden.row(r);
    for_each_chunk<T>(a.cols, [&](int64_t c, int64_t n) {
      const V x = load_chunk(h + c, n, A(0)) + load_chunk(a.bias + c, n, A(0));
      store_chunk(x * vnormal_cdf(x), h + c, n);
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
      const V slope = V::fma(x, vnormal_pdf(x), vnormal_cdf(x));
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
    for (int64_t t = 0; t < d; ++t) s.queries[t * lanes + r] = to_acc(q[t]) * a.scale;
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
      for (int r = 0; r < kRows && r0 + r < count; ++r) {
        const int64_t i = first + r0 + r;
        T* out = a.out + b * a.out_strides[0] + h * a.out_strides[1] + i * a.out_strides[2];
        store_chunk(acc[r] * V::broadcast(s.inverse_sums[r0 + r]), out + c, n);
      }
    });
  }
}

// Tasks [begin, end): task = pair · query_splits + s takes the s-th range of one
// (image, head) pair's queries, so that a few pairs (batch 1) still fill every thread.
template <typename T>
void attention_heads(const AttentionArgs<T>& a, int64_t begin, int64_t end, acc_t<T>* scratch) {
  using A = acc_t<T>;
  constexpr int64_t lanes = Vec<A>::size;
  static_assert(lanes <= kAttentionLanes, "the scratch holds kAttentionLanes queries");
  const int64_t N = a.keys;
  const int64_t d = a.dim;
  const AttentionScratch<T> s{scratch, scratch + N * d, scratch + 2 * N * d,
                              scratch + 2 * N * d + d * lanes,
                              scratch + 2 * N * d + d * lanes + N * lanes};
  // Ranges of whole query blocks.
  const int64_t blocks = (a.queries + lanes - 1) / lanes;
  const int64_t per_split = (blocks + a.query_splits - 1) / a.query_splits * lanes;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t pair = task / a.query_splits;
    const int64_t first = task % a.query_splits * per_split;
    const int64_t last = std::min(a.queries, first + per_split);
    if (first >= last) continue;
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
  }
}
