#pragma once

// Row kernels behind the CPU ops, compiled once per ISA (csrc/cpu/isa/*.cpp).
// Only raw pointers cross this boundary: the ISA translation units include no
// torch headers, so no inline function compiled for AVX-512 can be merged into
// code that runs on a CPU without it.

#include <algorithm>
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/row_view.h"

namespace patchslim::cpu {

using patchslim::RowView;

// bfloat16 and float16 as the kernels see them: the bits of c10::BFloat16 and
// c10::Half (same layout), which the torch glue passes by reinterpret_cast. The
// kernels load them into float vectors and do all arithmetic in float.
struct BFloat16Bits {
  uint16_t bits;
};
struct HalfBits {
  uint16_t bits;
};

// The type a kernel computes and accumulates in for storage type T.
template <typename T>
struct Accumulate {
  using type = T;
};
template <>
struct Accumulate<BFloat16Bits> {
  using type = float;
};
template <>
struct Accumulate<HalfBits> {
  using type = float;
};
template <typename T>
using acc_t = typename Accumulate<T>::type;

// Statistics (mean, rstd) are in the accumulation type: float for bfloat16 and float16.
template <typename T>
struct LayerNormForwardArgs {
  RowView<const T> input;
  T* output;        // (rows, C) contiguous
  acc_t<T>* mean;   // (rows,)
  acc_t<T>* rstd;   // (rows,)
  const T* weight;
  const T* bias;
  int64_t channels;
  acc_t<T> eps;
};

template <typename T>
struct LayerNormBackwardArgs {
  const T* grad_output;  // (rows, C) contiguous
  RowView<const T> input;
  const acc_t<T>* mean;
  const acc_t<T>* rstd;
  const T* weight;
  RowView<T> grad_input;
  int64_t channels;
};

// out[b, i] = Σ_k x[b, k, i] · y[b, k, i]: a column reduction, (B, K, N) -> (B, N),
// accumulated in out, which is therefore in the accumulation type.
template <typename T>
struct ColumnDotArgs {
  const T* x;
  const T* y;
  acc_t<T>* out;  // (B, N) contiguous
  int64_t rows;  // K
  int64_t cols;  // N, contiguous in x and y
  int64_t x_batch_stride, x_row_stride;
  int64_t y_batch_stride, y_row_stride;
};

// out[b, i] = scale[b, i] · Σ_h Σ_d x[b, h, i, d] · y[b, h, i, d]: (B, H, N, D) -> (B, N).
template <typename T>
struct RowDotArgs {
  const T* x;
  const T* y;
  const T* scale;  // (B, N) contiguous
  T* out;          // (B, N) contiguous
  int64_t heads, tokens, depth;  // H, N, D (D contiguous in x and y)
  int64_t x_strides[3];  // batch, head, token
  int64_t y_strides[3];
};

// Row-wise kernels of the pruned block; every row has `cols` contiguous elements.
template <typename T>
struct SoftmaxArgs {
  RowView<T> scores;  // in: logits; out: probabilities (in place)
  int64_t cols;
  acc_t<T> scale;  // applied to the logits first
};

template <typename T>
struct SoftmaxBackwardArgs {
  RowView<const T> probs;
  RowView<T> grad;  // in: dL/dP; out: dL/dlogits, times the forward's scale
  int64_t cols;
  acc_t<T> scale;
};

// h = GELU(h + bias) in place (exact GELU, x·Φ(x)).
template <typename T>
struct BiasGeluArgs {
  RowView<T> hidden;
  const T* bias;
  int64_t cols;
};

// grad *= GELU'(pre + bias), in place.
template <typename T>
struct BiasGeluBackwardArgs {
  RowView<const T> pre;
  const T* bias;
  RowView<T> grad;
  int64_t cols;
};

// out += bias + residual.
template <typename T>
struct BiasResidualArgs {
  RowView<T> out;
  const T* bias;
  RowView<const T> residual;
  int64_t cols;
};

// out = x Wᵀ (+ bias) for a few rows x: each output is the dot product of two
// contiguous rows, so W (out_features, in_features) is read as it is stored. A GEMM
// library repacks W on every call (oneDNN: 20-30 µs for a 192×768 bf16 weight at one
// row), which is most of the time of a GEMM over the last blocks' few kept rows.
template <typename T>
struct FewRowsLinearArgs {
  RowView<const T> x;  // rows of in_features
  const T* weight;     // (out_features, in_features), rows weight_stride apart
  const T* bias;       // (out_features,) or nullptr
  RowView<T> out;      // rows of out_features
  int64_t rows, in_features, out_features, weight_stride;
};

constexpr int64_t kAttentionLanes = 16;

// The scratch of the bf16-pair attention kernel (block_rows.h), in 32-bit words: K
// (words × padded_keys), V (key_pairs × padded_dim), P (key_pairs × lanes), Q (words ×
// lanes), the scores of the padded keys (padded_keys × lanes) and 1/Σ (lanes).
struct Bf16PairLayout {
  int64_t words;        // dim / 2: pairs along the head dim
  int64_t padded_keys;  // keys rounded up to kAttentionLanes
  int64_t key_pairs;    // keys / 2 rounded up
  int64_t padded_dim;   // dim rounded up to kAttentionLanes
  constexpr Bf16PairLayout(int64_t dim, int64_t keys)
      : words(dim / 2),
        padded_keys((keys + kAttentionLanes - 1) / kAttentionLanes * kAttentionLanes),
        key_pairs((keys + 1) / 2),
        padded_dim((dim + kAttentionLanes - 1) / kAttentionLanes * kAttentionLanes) {}
  constexpr int64_t size() const {
    return words * padded_keys + key_pairs * (padded_dim + kAttentionLanes) +
           kAttentionLanes * (words + padded_keys + 1);
  }
};

// Floats of scratch per thread for the attention kernel (block_rows.h): K and V staged
// in the accumulation type (2·keys·dim), one block of at most kAttentionLanes queries
// (dim·lanes), its scores (keys·lanes) and 1/Σ (lanes); or the bf16-pair layout.
constexpr int64_t attention_scratch_size(int64_t dim, int64_t keys) {
  const int64_t staged = 2 * keys * dim + kAttentionLanes * (dim + keys + 1);
  return std::max(staged, Bf16PairLayout(dim, keys).size());
}

// Fused attention core: the n queries of each (image, head) pair against its N keys,
// softmax, times V. q, k, v, out are (B, H, rows, d) views with a contiguous d;
// strides are (batch, head, row). Each pair's queries are split into query_splits
// ranges, one task each.
template <typename T>
struct AttentionArgs {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  T* probs;  // (B, H, n, N) contiguous, or nullptr where the caller does not want them
  const T* query_bias;  // (H·d) added to every query, or nullptr
  const T* value_bias;  // (H·d) added to every output row, or nullptr
  int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3];
  int64_t heads, queries, keys, dim;
  int64_t query_splits;
  acc_t<T> scale;
};

// One ISA's kernels. Each processes rows [begin, end).
template <typename T>
struct CpuKernels {
  void (*layer_norm_forward)(const LayerNormForwardArgs<T>&, int64_t begin, int64_t end);
  // Writes grad_input for its rows and adds Σ g·x̂ and Σ g into grad_weight and
  // grad_bias (each of `channels`), which the caller owns per chunk.
  void (*layer_norm_backward)(const LayerNormBackwardArgs<T>&, int64_t begin, int64_t end,
                              acc_t<T>* grad_weight, acc_t<T>* grad_bias);
  // Batches [begin, end).
  void (*column_dot)(const ColumnDotArgs<T>&, int64_t begin, int64_t end);
  // Rows r = b * N + i in [begin, end).
  void (*row_dot)(const RowDotArgs<T>&, int64_t begin, int64_t end);
  void (*softmax_backward)(const SoftmaxBackwardArgs<T>&, int64_t begin, int64_t end);
  void (*bias_gelu)(const BiasGeluArgs<T>&, int64_t begin, int64_t end);
  void (*bias_gelu_backward)(const BiasGeluBackwardArgs<T>&, int64_t begin, int64_t end);
  void (*bias_residual)(const BiasResidualArgs<T>&, int64_t begin, int64_t end);
  // Tasks [begin, end) of B·H·query_splits; scratch as attention_scratch_size says.
  void (*attention)(const AttentionArgs<T>&, int64_t begin, int64_t end, acc_t<T>* scratch);
  // Outputs (columns of out) [begin, end), for every row.
  void (*few_rows_linear)(const FewRowsLinearArgs<T>&, int64_t begin, int64_t end);
};

namespace scalar {
template <typename T>
const CpuKernels<T>& kernels();
}
namespace avx2 {
template <typename T>
const CpuKernels<T>& kernels();
}
namespace avx512 {
template <typename T>
const CpuKernels<T>& kernels();
}
namespace avx512_bf16 {
template <typename T>
const CpuKernels<T>& kernels();
}

template <typename T>
const CpuKernels<T>& kernels_for(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Bf16:
      return avx512_bf16::kernels<T>();
    case CpuIsa::kAvx512:
      return avx512::kernels<T>();
    case CpuIsa::kAvx2:
      return avx2::kernels<T>();
    case CpuIsa::kScalar:
      break;
  }
  return scalar::kernels<T>();
}

}  // namespace patchslim::cpu
