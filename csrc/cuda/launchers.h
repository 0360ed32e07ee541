#pragma once

// Plain launchers of the CUDA kernels. The .cu files include only CUDA headers
// (the CPU torch wheel has none of torch's CUDA headers), so nvcc can compile
// them anywhere; the torch glue in *_cuda.cpp calls these on the current stream.
// Each returns the launch's cudaError_t.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace patchslim::cuda {

// Rows [0, rows_per_batch) of each batch of a (B, N, C) tensor with unit channel stride.
template <typename T>
struct RowView {
  T* data;
  int64_t batch_stride;
  int64_t row_stride;
  int64_t rows_per_batch;
};

// T is float, __half or __nv_bfloat16; statistics are float32.
template <typename T>
cudaError_t prefix_layer_norm_forward(RowView<const T> input, T* output, float* mean, float* rstd,
                                      const T* weight, const T* bias, int64_t rows, int64_t channels,
                                      float eps, cudaStream_t stream);

// grad_weight and grad_bias are float32 (channels,); the caller casts them.
template <typename T>
cudaError_t prefix_layer_norm_backward(const T* grad_output, RowView<const T> input,
                                       const float* mean, const float* rstd, const T* weight,
                                       RowView<T> grad_input, float* grad_weight, float* grad_bias,
                                       int64_t rows, int64_t channels, cudaStream_t stream);

}  // namespace patchslim::cuda
