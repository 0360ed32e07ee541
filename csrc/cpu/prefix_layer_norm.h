#pragma once

// The CPU prefix_layer_norm kernels, for other CPU ops that normalise rows.

#include <ATen/core/Tensor.h>

#include <tuple>

namespace patchslim::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_layer_norm_cpu(const at::Tensor& input,
                                                                      int64_t n_rows,
                                                                      const at::Tensor& weight,
                                                                      const at::Tensor& bias,
                                                                      double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_layer_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, int64_t n_rows, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight);

}  // namespace patchslim::cpu
