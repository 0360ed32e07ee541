// LayerNorm row kernels, written once against Vec<acc_t<T>> and compiled per ISA.
// Included by isa_unit.inc inside an anonymous namespace. T is the storage type;
// every kernel loads into, computes in and stores from vectors of acc_t<T>.

// Streams the row in vector chunks; the last chunk is partial when C is not a
// multiple of the vector width.
template <typename T, typename Fn>
inline void for_each_chunk(int64_t channels, Fn&& fn) {
  using V = Vec<acc_t<T>>;
  int64_t c = 0;
  for (; c + V::size <= channels; c += V::size) fn(c, V::size);
  if (c < channels) fn(c, channels - c);
}

template <typename T>
inline Vec<acc_t<T>> load_chunk(const T* p, int64_t count, acc_t<T> fill) {
  using V = Vec<acc_t<T>>;
  return count == V::size ? V::load(p) : V::load_partial(p, count, fill);
}

template <typename T>
inline void store_chunk(const Vec<acc_t<T>>& v, T* p, int64_t count) {
  if (count == Vec<acc_t<T>>::size) {
    v.store(p);
  } else {
    v.store_partial(p, count);
  }
}

// y = (x - mean) * rstd * w + b with a two-pass mean and variance: the row is in
// cache for the second pass, and two passes avoid cancellation in E[x²] - E[x]².
template <typename T>
void layer_norm_forward_rows(const LayerNormForwardArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = Vec<A>;
  const int64_t C = a.channels;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = a.input.row(r);
    T* y = a.output + r * C;

    V acc = V::zero();
    for_each_chunk<T>(C, [&](int64_t c, int64_t n) { acc = acc + load_chunk(x + c, n, A(0)); });
    const A mean = acc.sum() / static_cast<A>(C);

    const V mean_v = V::broadcast(mean);
    acc = V::zero();
    for_each_chunk<T>(C, [&](int64_t c, int64_t n) {
      const V d = load_chunk(x + c, n, mean) - mean_v;
      acc = V::fma(d, d, acc);
    });
    const A rstd = A(1) / std::sqrt(acc.sum() / static_cast<A>(C) + a.eps);

    const V rstd_v = V::broadcast(rstd);
    for_each_chunk<T>(C, [&](int64_t c, int64_t n) {
      const V xhat = (load_chunk(x + c, n, mean) - mean_v) * rstd_v;
      store_chunk(V::fma(xhat, load_chunk(a.weight + c, n, A(0)), load_chunk(a.bias + c, n, A(0))),
                  y + c, n);
    });
    a.mean[r] = mean;
    a.rstd[r] = rstd;
  }
}

// dx = rstd · (g·w − mean(g·w) − x̂ · mean(g·w·x̂)), dw += g·x̂, db += g.
template <typename T>
void layer_norm_backward_rows(const LayerNormBackwardArgs<T>& a, int64_t begin, int64_t end,
                              acc_t<T>* grad_weight, acc_t<T>* grad_bias) {
  using A = acc_t<T>;
  using V = Vec<A>;
  const int64_t C = a.channels;
  const A inv_c = A(1) / static_cast<A>(C);
  for (int64_t r = begin; r < end; ++r) {
    const T* g = a.grad_output + r * C;
    const T* x = a.input.row(r);
    T* dx = a.grad_input.row(r);
    const V mean_v = V::broadcast(a.mean[r]);
    const V rstd_v = V::broadcast(a.rstd[r]);

    V sum_gw = V::zero();
    V sum_gw_xhat = V::zero();
    for_each_chunk<T>(C, [&](int64_t c, int64_t n) {
      const V g_v = load_chunk(g + c, n, A(0));
      const V xhat = (load_chunk(x + c, n, a.mean[r]) - mean_v) * rstd_v;
      const V gw = g_v * load_chunk(a.weight + c, n, A(0));
      sum_gw = sum_gw + gw;
      sum_gw_xhat = V::fma(gw, xhat, sum_gw_xhat);
      store_chunk(V::fma(g_v, xhat, load_chunk(grad_weight + c, n, A(0))), grad_weight + c, n);
      store_chunk(g_v + load_chunk(grad_bias + c, n, A(0)), grad_bias + c, n);
    });
    const V mean_gw = V::broadcast(sum_gw.sum() * inv_c);
    const V mean_gw_xhat = V::broadcast(sum_gw_xhat.sum() * inv_c);

    for_each_chunk<T>(C, [&](int64_t c, int64_t n) {
      const V xhat = (load_chunk(x + c, n, a.mean[r]) - mean_v) * rstd_v;
      const V gw = load_chunk(g + c, n, A(0)) * load_chunk(a.weight + c, n, A(0));
      store_chunk(rstd_v * (gw - mean_gw - xhat * mean_gw_xhat), dx + c, n);
    });
  }
}
