#pragma once

// Argument checks shared by the CPU and CUDA prefix_layer_norm kernels, so both
// backends refuse the same inputs with the same messages.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace patchslim {

inline void check_prefix_layer_norm_forward(const at::Tensor& input, int64_t n_rows,
                                            const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(input.dim() == 3, "prefix_layer_norm: input must have shape (B, N, C), got ",
              input.sizes());
  const int64_t N = input.size(1);
  const int64_t C = input.size(2);
  TORCH_CHECK(n_rows >= 0 && n_rows <= N, "prefix_layer_norm: n_rows must be in [0, N=", N,
              "], got ", n_rows);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C,
              "prefix_layer_norm: weight must have shape (C,) = (", C, ",), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C,
              "prefix_layer_norm: bias must have shape (C,) = (", C, ",), got ", bias.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && bias.scalar_type() == input.scalar_type(),
              "prefix_layer_norm: weight and bias must have the input's dtype ", input.scalar_type(),
              ", got ", weight.scalar_type(), " and ", bias.scalar_type());
  TORCH_CHECK(weight.device() == input.device() && bias.device() == input.device(),
              "prefix_layer_norm: input, weight and bias must be on one device, got ",
              input.device(), ", ", weight.device(), ", ", bias.device());
}

inline void check_prefix_layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                             int64_t n_rows, const at::Tensor& mean,
                                             const at::Tensor& rstd, const at::Tensor& weight) {
  TORCH_CHECK(input.dim() == 3, "prefix_layer_norm_backward: input must have shape (B, N, C), got ",
              input.sizes());
  const int64_t B = input.size(0);
  const int64_t N = input.size(1);
  const int64_t C = input.size(2);
  TORCH_CHECK(n_rows >= 0 && n_rows <= N, "prefix_layer_norm_backward: n_rows must be in [0, N=", N,
              "], got ", n_rows);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, n_rows, C}),
              "prefix_layer_norm_backward: grad_out must have shape (B, n_rows, C) = (", B, ", ",
              n_rows, ", ", C, "), got ", grad_out.sizes());
  TORCH_CHECK(mean.sizes() == at::IntArrayRef({B, n_rows}) && rstd.sizes() == mean.sizes(),
              "prefix_layer_norm_backward: mean and rstd must have shape (B, n_rows) = (", B, ", ",
              n_rows, "), got ", mean.sizes(), " and ", rstd.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C,
              "prefix_layer_norm_backward: weight must have shape (C,) = (", C, ",), got ",
              weight.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type() &&
                  weight.scalar_type() == input.scalar_type(),
              "prefix_layer_norm_backward: grad_out and weight must have the input's dtype ",
              input.scalar_type());
  for (const at::Tensor* t : {&grad_out, &mean, &rstd, &weight}) {
    TORCH_CHECK(t->device() == input.device(),
                "prefix_layer_norm_backward: all tensors must be on the input's device ",
                input.device(), ", got one on ", t->device());
  }
}

// The kernels need only the channel dimension of a (B, N, C) input to be contiguous.
inline at::Tensor with_contiguous_channels(const at::Tensor& t) {
  return t.stride(2) == 1 ? t : t.contiguous();
}

}  // namespace patchslim
