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

// kRows queries at a time against one (image, head) pair's keys: scores = scale·q Kᵀ
// into scratch rows, softmax, out = p V. Accumulators stay in registers and each
// load of Kᵀ or V feeds kRows FMAs. Kᵀ and the scores are in the accumulation type.
template <typename T, int kRows>
void attention_query_block(const AttentionArgs<T>& a, int64_t pair, int64_t first,
                           const acc_t<T>* kt, const T* v, acc_t<T>* scores) {
  using A = acc_t<T>;
  using V = Vec<A>;
  const int64_t N = a.keys;
  const int64_t d = a.dim;
  const int64_t b = pair / a.heads;
  const int64_t h = pair % a.heads;
  const T* q[kRows];
  T* out[kRows];
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = first + r;
    q[r] = a.q + b * a.q_strides[0] + h * a.q_strides[1] + i * a.q_strides[2];
    out[r] = a.out + b * a.out_strides[0] + h * a.out_strides[1] + i * a.out_strides[2];
  }
  for_each_chunk<T>(N, [&](int64_t c, int64_t n) {
    V acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = V::zero();
    for (int64_t t = 0; t < d; ++t) {
      const V keys = load_chunk(kt + t * N + c, n, A(0));
      for (int r = 0; r < kRows; ++r) {
        acc[r] = V::fma(V::broadcast(to_acc(q[r][t]) * a.scale), keys, acc[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) store_chunk(acc[r], scores + r * N + c, n);
  });
  const SoftmaxArgs<A> softmax{{scores, 0, N, kRows}, N, A(1)};
  softmax_rows(softmax, 0, kRows);
  for (int r = 0; r < kRows; ++r) {
    T* p = a.probs + (pair * a.queries + first + r) * N;
    for_each_chunk<T>(N, [&](int64_t c, int64_t n) {
      store_chunk(load_chunk(scores + r * N + c, n, A(0)), p + c, n);
    });
  }
  for_each_chunk<T>(d, [&](int64_t c, int64_t n) {
    V acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = V::zero();
    for (int64_t j = 0; j < N; ++j) {
      const V values = load_chunk(v + j * a.v_strides[2] + c, n, A(0));
      for (int r = 0; r < kRows; ++r) acc[r] = V::fma(V::broadcast(scores[r * N + j]), values, acc[r]);
    }
    for (int r = 0; r < kRows; ++r) store_chunk(acc[r], out[r] + c, n);
  });
}

// Every query of (image, head) pairs [begin, end). Kᵀ is staged in scratch (d × N)
// so scores are N-wide vector FMAs; scratch also holds kAttentionRows score rows.
template <typename T>
void attention_heads(const AttentionArgs<T>& a, int64_t begin, int64_t end, acc_t<T>* scratch) {
  const int64_t N = a.keys;
  const int64_t d = a.dim;
  acc_t<T>* kt = scratch;
  acc_t<T>* scores = scratch + d * N;
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t b = pair / a.heads;
    const int64_t h = pair % a.heads;
    const T* k = a.k + b * a.k_strides[0] + h * a.k_strides[1];
    const T* v = a.v + b * a.v_strides[0] + h * a.v_strides[1];
    for (int64_t j = 0; j < N; ++j) {
      const T* row = k + j * a.k_strides[2];
      for (int64_t t = 0; t < d; ++t) kt[t * N + j] = to_acc(row[t]);
    }
    int64_t i = 0;
    for (; i + kAttentionRows <= a.queries; i += kAttentionRows) {
      attention_query_block<T, kAttentionRows>(a, pair, i, kt, v, scores);
    }
    for (; i < a.queries; ++i) attention_query_block<T, 1>(a, pair, i, kt, v, scores);
  }
}
