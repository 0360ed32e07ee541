#pragma once

// Plain launchers of the CUDA kernels. The .cu files include only CUDA headers
// (the CPU torch wheel has none of torch's CUDA headers), so nvcc can compile
// them anywhere; the torch glue in *_cuda.cpp calls these on the current stream.
// Each returns the launch's cudaError_t.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/row_view.h"

namespace patchslim::cuda {

using patchslim::RowView;

// T is float, __half or __nv_bfloat16; statistics are float32.
template <typename T>
cudaError_t prefix_layer_norm_forward(RowView<const T> input, T* output, float* mean, float* rstd,
                                      const T* weight, const T* bias, int64_t rows, int64_t channels,
                                      float eps, cudaStream_t stream);

// grad_weight and grad_bias are float32 (channels,); the caller casts them. scratch
// holds prefix_layer_norm_backward_scratch(rows, channels) float32 elements.
template <typename T>
cudaError_t prefix_layer_norm_backward(const T* grad_output, RowView<const T> input,
                                       const float* mean, const float* rstd, const T* weight,
                                       RowView<T> grad_input, float* grad_weight, float* grad_bias,
                                       float* scratch, int64_t rows, int64_t channels,
                                       cudaStream_t stream);

// Elements of the float32 scratch prefix_layer_norm_backward takes: the per-split
// partial column sums of the weight and bias gradients.
int64_t prefix_layer_norm_backward_scratch(int64_t rows, int64_t channels);

// out[b, i] = Σ_k x[b, k, i] · y[b, k, i]; x, y (B, K, N) with a contiguous last dim,
// out (B, N) contiguous. float32.
cudaError_t column_dot(const float* x, const float* y, float* out, int64_t batch, int64_t rows,
                       int64_t cols, int64_t x_batch_stride, int64_t x_row_stride,
                       int64_t y_batch_stride, int64_t y_row_stride, cudaStream_t stream);

// out[b, i] = scale[b, i] · Σ_h Σ_d x[b, h, i, d] · y[b, h, i, d]; x, y (B, H, N, D) with
// a contiguous last dim (strides: batch, head, token), scale and out (B, N) contiguous.
cudaError_t row_dot(const float* x, const float* y, const float* scale, float* out, int64_t batch,
                    int64_t heads, int64_t tokens, int64_t depth, const int64_t x_strides[3],
                    const int64_t y_strides[3], cudaStream_t stream);

// Pruned-block row kernels; T is float, __half or __nv_bfloat16, arithmetic in
// float32. Rows have `cols` contiguous elements.

// p = softmax(scale · s) in place.
template <typename T>
cudaError_t softmax_forward(RowView<T> scores, int64_t rows, int64_t cols, float scale,
                            cudaStream_t stream);

// grad = scale · p ⊙ (grad − Σ grad ⊙ p) in place.
template <typename T>
cudaError_t softmax_backward(RowView<const T> probs, RowView<T> grad, int64_t rows, int64_t cols,
                             float scale, cudaStream_t stream);

// h = GELU(h + bias) in place (exact GELU).
template <typename T>
cudaError_t bias_gelu_forward(RowView<T> hidden, const T* bias, int64_t rows, int64_t cols,
                              cudaStream_t stream);

// grad *= GELU'(pre + bias) in place.
template <typename T>
cudaError_t bias_gelu_backward(RowView<const T> pre, const T* bias, RowView<T> grad, int64_t rows,
                               int64_t cols, cudaStream_t stream);

// out += bias + residual.
template <typename T>
cudaError_t bias_residual(RowView<T> out, const T* bias, RowView<const T> residual, int64_t rows,
                          int64_t cols, cudaStream_t stream);

}  // namespace patchslim::cuda
