// Attention of a few queries in the tokens' own space, without K and V (kernels.h,
// FewQueriesAttentionArgs; docs/design.md §11), written once against Vec<acc_t<T>> and
// compiled per ISA. Included by isa_unit.inc after layer_norm_rows.h (chunk helpers)
// and vec_math.h. One task per (image, head, query); every sum in the accumulation type.

template <typename T>
void few_queries_attention(const FewQueriesAttentionArgs<T>& a, int64_t begin, int64_t end,
                           acc_t<T>* scratch) {
  using A = acc_t<T>;
  using V = Vec<A>;
  const int64_t C = a.channels;
  const int64_t N = a.keys;
  const int64_t d = C / a.heads;
  A* const query = scratch;           // q̃ (C)
  A* const mixed = scratch + C;       // Σ_j p_j x̂_j (C)
  A* const scores = scratch + 2 * C;  // (N)
  for (int64_t task = begin; task < end; ++task) {
    const int64_t i = task % a.queries;
    const int64_t h = task / a.queries % a.heads;
    const int64_t b = task / a.queries / a.heads;
    const T* q = a.q + b * a.q_batch_stride + i * a.q_row_stride + h * d;
    const T* tokens = a.normed + b * N * C;

    // q̃ = s · Σ_t (q_t + b_q,t) W_k[h·d + t, :]
    for_each_chunk<T>(C, [&](int64_t c, int64_t n) { store_chunk(V::zero(), query + c, n); });
    for (int64_t t = 0; t < d; ++t) {
      const A bias = a.query_bias == nullptr ? A(0) : to_acc(a.query_bias[h * d + t]);
      const V coefficient = V::broadcast((to_acc(q[t]) + bias) * a.scale);
      const T* w = a.key_weight + (h * d + t) * a.weight_stride;
      for_each_chunk<T>(C, [&](int64_t c, int64_t n) {
        store_chunk(V::fma(coefficient, load_chunk(w + c, n, A(0)), load_chunk(query + c, n, A(0))),
                    query + c, n);
      });
    }
    // Scores q̃ · x̂_j, then their softmax, unnormalised.
    for (int64_t j = 0; j < N; ++j) {
      V sum = V::zero();
      for_each_chunk<T>(C, [&](int64_t c, int64_t n) {
        sum = V::fma(load_chunk(query + c, n, A(0)), load_chunk(tokens + j * C + c, n, A(0)), sum);
      });
      scores[j] = sum.sum();
    }
    V best = V::broadcast(-std::numeric_limits<A>::infinity());
    for_each_chunk<A>(N, [&](int64_t c, int64_t n) {
      best = best.max(load_chunk(scores + c, n, -std::numeric_limits<A>::infinity()));
    });
    const V shift = V::broadcast(best.reduce_max());
    V total = V::zero();
    for_each_chunk<A>(N, [&](int64_t c, int64_t n) {
      const V e = vexp(load_chunk(scores + c, n, A(0)) - shift);
      store_chunk(e, scores + c, n);
      total = total + (n == V::size ? e : load_chunk(scores + c, n, A(0)));
    });
    const A inverse = A(1) / total.sum();
    // Σ_j p_j x̂_j, then W_v,h times it.
    for_each_chunk<T>(C, [&](int64_t c, int64_t n) { store_chunk(V::zero(), mixed + c, n); });
    for (int64_t j = 0; j < N; ++j) {
      const V p = V::broadcast(scores[j]);
      const T* token = tokens + j * C;
      for_each_chunk<T>(C, [&](int64_t c, int64_t n) {
        store_chunk(V::fma(p, load_chunk(token + c, n, A(0)), load_chunk(mixed + c, n, A(0))),
                    mixed + c, n);
      });
    }
    T* out = a.out + (b * a.queries + i) * C + h * d;
    for (int64_t t = 0; t < d; ++t) {
      const T* w = a.value_weight + (h * d + t) * a.weight_stride;
      V sum = V::zero();
      for_each_chunk<T>(C, [&](int64_t c, int64_t n) {
        sum = V::fma(load_chunk(mixed + c, n, A(0)), load_chunk(w + c, n, A(0)), sum);
      });
      const A bias = a.value_bias == nullptr ? A(0) : to_acc(a.value_bias[h * d + t]);
      out[t] = from_acc<T>(sum.sum() * inverse + bias);
    }
  }
}
