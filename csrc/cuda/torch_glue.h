#pragma once

// Helpers shared by the CUDA torch glue (*_cuda.cpp): dtype dispatch to the
// launchers' CUDA types, row views of tensors, launch checks.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "cuda/launchers.h"

namespace patchslim::cuda {

// Calls fn(TorchT{}, CudaT{}) for the input's dtype.
template <typename Fn>
void dispatch_cuda_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{}, float{});
      return;
    case at::kHalf:
      fn(at::Half{}, __half{});
      return;
    case at::kBFloat16:
      fn(at::BFloat16{}, __nv_bfloat16{});
      return;
    default:
      TORCH_CHECK(false, op, ": CUDA supports float32, float16 and bfloat16 inputs, got ", dtype);
  }
}

inline void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(status));
}

// Rows of a (B, R, C) tensor with a contiguous last dimension, or of a contiguous
// tensor of any rank, as the kernels address them.
template <typename CudaT, typename TorchT>
RowView<CudaT> rows_of(TorchT* data, const at::Tensor& t) {
  auto* base = reinterpret_cast<CudaT*>(data);
  if (t.dim() == 3) {
    return {base, t.stride(0), t.stride(1), std::max<int64_t>(1, t.size(1))};
  }
  const int64_t rows = t.numel() / std::max<int64_t>(1, t.size(-1));
  return {base, 0, t.size(-1), std::max<int64_t>(1, rows)};
}

inline int64_t row_count(const at::Tensor& t) {
  return t.numel() / std::max<int64_t>(1, t.size(-1));
}

}  // namespace patchslim::cuda
