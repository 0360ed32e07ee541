// Reductions behind the scoring ops, written once against Vec<T> and compiled per
// ISA. Included by isa_unit.inc after layer_norm_rows.h (for the chunk helpers).

// out[b, :] = Σ_k x[b, k, :] ⊙ y[b, k, :]. The output row (accumulation type) stays
// in L1 while the K input rows stream past it.
template <typename T>
void column_dot(const ColumnDotArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = Vec<A>;
  const int64_t N = a.cols;
  for (int64_t b = begin; b < end; ++b) {
    A* out = a.out + b * N;
    for (int64_t i = 0; i < N; ++i) out[i] = A(0);
    for (int64_t k = 0; k < a.rows; ++k) {
      const T* x = a.x + b * a.x_batch_stride + k * a.x_row_stride;
      const T* y = a.y + b * a.y_batch_stride + k * a.y_row_stride;
      for_each_chunk<T>(N, [&](int64_t c, int64_t n) {
        store_chunk(V::fma(load_chunk(x + c, n, A(0)), load_chunk(y + c, n, A(0)),
                           load_chunk(out + c, n, A(0))),
                    out + c, n);
      });
    }
  }
}

// out[b, i] = scale[b, i] · Σ_h x[b, h, i, :] · y[b, h, i, :].
template <typename T>
void row_dot(const RowDotArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = Vec<A>;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / a.tokens;
    const int64_t i = r % a.tokens;
    V acc = V::zero();
    for (int64_t h = 0; h < a.heads; ++h) {
      const T* x = a.x + b * a.x_strides[0] + h * a.x_strides[1] + i * a.x_strides[2];
      const T* y = a.y + b * a.y_strides[0] + h * a.y_strides[1] + i * a.y_strides[2];
      for_each_chunk<T>(a.depth, [&](int64_t c, int64_t n) {
        acc = V::fma(load_chunk(x + c, n, A(0)), load_chunk(y + c, n, A(0)), acc);
      });
    }
    a.out[r] = from_acc<T>(to_acc(a.scale[r]) * acc.sum());
  }
}
