#pragma once

// Row addressing shared by the CPU kernels and the CUDA kernels (host and device).

#include <cstdint>

#if defined(__CUDACC__)
#define PATCHSLIM_HOST_DEVICE __host__ __device__
#else
#define PATCHSLIM_HOST_DEVICE
#endif

namespace patchslim {

// Rows of a (B, N, C) tensor whose last dimension is contiguous; row r of the
// first `rows_per_batch` rows of each batch is (r / rows_per_batch, r % rows_per_batch).
// A contiguous tensor flattened to rows is batch_stride 0, rows_per_batch = all rows.
template <typename T>
struct RowView {
  T* data;
  int64_t batch_stride;
  int64_t row_stride;
  int64_t rows_per_batch;

  PATCHSLIM_HOST_DEVICE T* row(int64_t r) const {
    return data + (r / rows_per_batch) * batch_stride + (r % rows_per_batch) * row_stride;
  }
};

}  // namespace patchslim
