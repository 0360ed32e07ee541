#pragma once

// Row kernels behind the CPU ops, compiled once per ISA (csrc/cpu/isa/*.cpp).
// Only raw pointers cross this boundary: the ISA translation units include no
// torch headers, so no inline function compiled for AVX-512 can be merged into
// code that runs on a CPU without it.

#include <cstdint>

#include "common/cpu_isa.h"

namespace patchslim::cpu {

// Rows of a (B, N, C) tensor whose last dimension is contiguous; row r of the
// first `rows_per_batch` rows of each batch is (r / rows_per_batch, r % rows_per_batch).
template <typename T>
struct RowView {
  T* data;
  int64_t batch_stride;
  int64_t row_stride;
  int64_t rows_per_batch;

  T* row(int64_t r) const {
    return data + (r / rows_per_batch) * batch_stride + (r % rows_per_batch) * row_stride;
  }
};

template <typename T>
struct LayerNormForwardArgs {
  RowView<const T> input;
  T* output;  // (rows, C) contiguous
  T* mean;    // (rows,)
  T* rstd;    // (rows,)
  const T* weight;
  const T* bias;
  int64_t channels;
  T eps;
};

template <typename T>
struct LayerNormBackwardArgs {
  const T* grad_output;  // (rows, C) contiguous
  RowView<const T> input;
  const T* mean;
  const T* rstd;
  const T* weight;
  RowView<T> grad_input;
  int64_t channels;
};

// One ISA's kernels. Each processes rows [begin, end).
template <typename T>
struct CpuKernels {
  void (*layer_norm_forward)(const LayerNormForwardArgs<T>&, int64_t begin, int64_t end);
  // Writes grad_input for its rows and adds Σ g·x̂ and Σ g into grad_weight and
  // grad_bias (each of `channels`), which the caller owns per chunk.
  void (*layer_norm_backward)(const LayerNormBackwardArgs<T>&, int64_t begin, int64_t end,
                              T* grad_weight, T* grad_bias);
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

template <typename T>
const CpuKernels<T>& kernels_for(CpuIsa isa) {
  switch (isa) {
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
