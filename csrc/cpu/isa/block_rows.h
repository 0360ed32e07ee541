// Row kernels of the pruned transformer block, written once against Vec<T> and
// compiled per ISA. Included by isa_unit.inc after layer_norm_rows.h (chunk
// helpers) and vec_math.h.

// p = softmax(scale · x) in place, max-subtracted.
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
  using V = Vec<T>;
  const int64_t N = a.cols;
  for (int64_t r = begin; r < end; ++r) {
    const T* p = a.probs.row(r);
    T* g = a.grad.row(r);
    V dot = V::zero();
    for_each_chunk<T>(N, [&](int64_t c, int64_t n) {
      dot = V::fma(load_chunk(g + c, n, T(0)), load_chunk(p + c, n, T(0)), dot);
    });
    const V centre = V::broadcast(dot.sum());
    const V scale = V::broadcast(a.scale);
    for_each_chunk<T>(N, [&](int64_t c, int64_t n) {
      const V grad = (load_chunk(g + c, n, T(0)) - centre) * load_chunk(p + c, n, T(0));
      store_chunk(grad * scale, g + c, n);
    });
  }
}

template <typename T>
void bias_gelu_rows(const BiasGeluArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  for (int64_t r = begin; r < end; ++r) {
    T* h = a.hidden.row(r);
    for_each_chunk<T>(a.cols, [&](int64_t c, int64_t n) {
      const V x = load_chunk(h + c, n, T(0)) + load_chunk(a.bias + c, n, T(0));
      store_chunk(x * vnormal_cdf(x), h + c, n);
    });
  }
}

template <typename T>
void bias_gelu_backward_rows(const BiasGeluBackwardArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  for (int64_t r = begin; r < end; ++r) {
    const T* pre = a.pre.row(r);
    T* g = a.grad.row(r);
    for_each_chunk<T>(a.cols, [&](int64_t c, int64_t n) {
      const V x = load_chunk(pre + c, n, T(0)) + load_chunk(a.bias + c, n, T(0));
      const V slope = V::fma(x, vnormal_pdf(x), vnormal_cdf(x));
      store_chunk(load_chunk(g + c, n, T(0)) * slope, g + c, n);
    });
  }
}

template <typename T>
void bias_residual_rows(const BiasResidualArgs<T>& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    T* out = a.out.row(r);
    const T* residual = a.residual.row(r);
    for_each_chunk<T>(a.cols, [&](int64_t c, int64_t n) {
      store_chunk(load_chunk(out + c, n, T(0)) + load_chunk(a.bias + c, n, T(0)) +
                      load_chunk(residual + c, n, T(0)),
                  out + c, n);
    });
  }
}
