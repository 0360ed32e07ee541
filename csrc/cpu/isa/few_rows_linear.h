// out = x Wᵀ (+ bias) over a few rows (kernels.h, FewRowsLinearArgs), written once
// against Vec<acc_t<T>> and compiled per ISA; bfloat16 on AVX512-BF16 takes vdpbf16ps
// pairs instead. Included by isa_unit.inc after block_rows.h.
//
// Each task takes a range of outputs. A tile of kTileRows rows × few_rows_tile_outputs()
// outputs keeps one vector sum per (row, output) across the reduction (no packing: both
// rows are contiguous) and reduces each horizontally at the end; outputs are the outer
// loop, so a tile's weight rows stay in L1 while every row block reads them.

template <typename A>
constexpr int few_rows_tile_outputs() {
  // 16 sums + 4 weight vectors + 1 row fit AVX-512's 32 registers; AVX2 has 16.
  return sizeof(Vec<A>) >= 64 ? 4 : 2;
}
constexpr int kTileRows = 4;

template <typename T, int kRows, int kOutputs>
inline void few_rows_linear_tile(const FewRowsLinearArgs<T>& a, int64_t row, int64_t output) {
  using A = acc_t<T>;
  using V = Vec<A>;
  const T* x[kRows];
  const T* w[kOutputs];
  for (int r = 0; r < kRows; ++r) x[r] = a.x.row(row + r);
  for (int j = 0; j < kOutputs; ++j) w[j] = a.weight + (output + j) * a.weight_stride;
  V sums[kRows][kOutputs];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kOutputs; ++j) sums[r][j] = V::zero();
  }
  for_each_chunk<T>(a.in_features, [&](int64_t c, int64_t n) {
    V weights[kOutputs];
    for (int j = 0; j < kOutputs; ++j) weights[j] = load_chunk(w[j] + c, n, A(0));
    for (int r = 0; r < kRows; ++r) {
      const V xs = load_chunk(x[r] + c, n, A(0));
      for (int j = 0; j < kOutputs; ++j) sums[r][j] = V::fma(xs, weights[j], sums[r][j]);
    }
  });
  for (int r = 0; r < kRows; ++r) {
    T* out = a.out.row(row + r) + output;
    for (int j = 0; j < kOutputs; ++j) {
      const A bias = a.bias == nullptr ? A(0) : to_acc(a.bias[output + j]);
      out[j] = from_acc<T>(sums[r][j].sum() + bias);
    }
  }
}

#if defined(PATCHSLIM_ISA_AVX512_BF16)
// bfloat16 with vdpbf16ps: 32 bf16 of a row per load, two products per fp32 lane;
// masked loads zero the tail of a row, which then adds nothing.
template <int kRows, int kOutputs>
inline void few_rows_linear_tile_bf16_pairs(const FewRowsLinearArgs<BFloat16Bits>& a, int64_t row,
                                            int64_t output) {
  const BFloat16Bits* x[kRows];
  const BFloat16Bits* w[kOutputs];
  for (int r = 0; r < kRows; ++r) x[r] = a.x.row(row + r);
  for (int j = 0; j < kOutputs; ++j) w[j] = a.weight + (output + j) * a.weight_stride;
  __m512 sums[kRows][kOutputs];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kOutputs; ++j) sums[r][j] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < a.in_features; c += 32) {
    const int64_t n = std::min<int64_t>(32, a.in_features - c);
    const __mmask32 mask = n == 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1u);
    __m512i weights[kOutputs];
    for (int j = 0; j < kOutputs; ++j) weights[j] = _mm512_maskz_loadu_epi16(mask, w[j] + c);
    for (int r = 0; r < kRows; ++r) {
      const __m512i xs = _mm512_maskz_loadu_epi16(mask, x[r] + c);
      for (int j = 0; j < kOutputs; ++j) sums[r][j] = dot_pairs(sums[r][j], xs, weights[j]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    BFloat16Bits* out = a.out.row(row + r) + output;
    for (int j = 0; j < kOutputs; ++j) {
      const float bias = a.bias == nullptr ? 0.0f : to_acc(a.bias[output + j]);
      out[j] = from_acc<BFloat16Bits>(_mm512_reduce_add_ps(sums[r][j]) + bias);
    }
  }
}
#endif

template <typename T, int kOutputs>
inline void few_rows_linear_outputs(const FewRowsLinearArgs<T>& a, int64_t row, int64_t rows,
                                    int64_t output) {
  const auto tile = [&](auto rows_constant) {
    constexpr int kRows = decltype(rows_constant)::value;
#if defined(PATCHSLIM_ISA_AVX512_BF16)
    if constexpr (std::is_same_v<T, BFloat16Bits>) {
      few_rows_linear_tile_bf16_pairs<kRows, kOutputs>(a, row, output);
      return;
    }
#endif
    few_rows_linear_tile<T, kRows, kOutputs>(a, row, output);
  };
  switch (rows) {
    case 1:
      return tile(std::integral_constant<int, 1>{});
    case 2:
      return tile(std::integral_constant<int, 2>{});
    case 3:
      return tile(std::integral_constant<int, 3>{});
    default:
      return tile(std::integral_constant<int, kTileRows>{});
  }
}

template <typename T>
void few_rows_linear(const FewRowsLinearArgs<T>& a, int64_t begin, int64_t end) {
  constexpr int kOutputs = few_rows_tile_outputs<acc_t<T>>();
  int64_t output = begin;
  for (; output + kOutputs <= end; output += kOutputs) {
    for (int64_t row = 0; row < a.rows; row += kTileRows) {
      few_rows_linear_outputs<T, kOutputs>(a, row, std::min<int64_t>(kTileRows, a.rows - row),
                                           output);
    }
  }
  for (; output < end; ++output) {
    for (int64_t row = 0; row < a.rows; row += kTileRows) {
      few_rows_linear_outputs<T, 1>(a, row, std::min<int64_t>(kTileRows, a.rows - row), output);
    }
  }
}
