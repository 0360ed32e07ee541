#pragma once

// The CUDA prefix_layer_norm kernels, for other CUDA ops that normalise rows.
// Statistics (mean, rstd) are float32.

#include <ATen/core/Tensor.h>

#include <tuple>

namespace patchslim::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_layer_norm_cuda(const at::Tensor& input,
                                                                       int64_t n_rows,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& bias,
                                                                       double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_layer_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, int64_t n_rows, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight);

}  // namespace patchslim::cuda
