// Torch glue of the CUDA prefix_layer_norm kernels; built only where the
// installed torch has CUDA.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/prefix_layer_norm_checks.h"
#include "cuda/launchers.h"
#include "cuda/prefix_layer_norm_cuda.h"
#include "cuda/torch_glue.h"

namespace patchslim::cuda {
namespace {

template <typename CudaT, typename TorchT>
RowView<CudaT> row_view(TorchT* data, const at::Tensor& t, int64_t rows_per_batch) {
  return {reinterpret_cast<CudaT*>(data), t.stride(0), t.stride(1), rows_per_batch};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_layer_norm_cuda(const at::Tensor& input_arg,
                                                                       int64_t n_rows,
                                                                       const at::Tensor& weight_arg,
                                                                       const at::Tensor& bias_arg,
                                                                       double eps) {
  check_prefix_layer_norm_forward(input_arg, n_rows, weight_arg, bias_arg);
  const c10::cuda::CUDAGuard guard(input_arg.device());
  const int64_t B = input_arg.size(0);
  const int64_t C = input_arg.size(2);
  auto output = at::empty({B, n_rows, C}, input_arg.options());
  auto stats_options = input_arg.options().dtype(at::kFloat);
  auto mean = at::empty({B, n_rows}, stats_options);
  auto rstd = at::empty({B, n_rows}, stats_options);
  if (output.numel() == 0) {
    return {output, mean, rstd};
  }
  const auto input = with_contiguous_channels(input_arg);
  const auto weight = weight_arg.contiguous();
  const auto bias = bias_arg.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_cuda_dtype(input.scalar_type(), "prefix_layer_norm", [&](auto torch_t, auto cuda_t) {
    using TorchT = decltype(torch_t);
    using CudaT = decltype(cuda_t);
    check_launch(prefix_layer_norm_forward<CudaT>(
                     row_view<const CudaT>(input.const_data_ptr<TorchT>(), input, n_rows),
                     reinterpret_cast<CudaT*>(output.mutable_data_ptr<TorchT>()),
                     mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(),
                     reinterpret_cast<const CudaT*>(weight.const_data_ptr<TorchT>()),
                     reinterpret_cast<const CudaT*>(bias.const_data_ptr<TorchT>()), B * n_rows, C,
                     static_cast<float>(eps), stream),
                 "prefix_layer_norm");
  });
  return {output, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_layer_norm_backward_cuda(
    const at::Tensor& grad_out_arg, const at::Tensor& input_arg, int64_t n_rows,
    const at::Tensor& mean_arg, const at::Tensor& rstd_arg, const at::Tensor& weight_arg) {
  check_prefix_layer_norm_backward(grad_out_arg, input_arg, n_rows, mean_arg, rstd_arg, weight_arg);
  TORCH_CHECK(mean_arg.scalar_type() == at::kFloat && rstd_arg.scalar_type() == at::kFloat,
              "prefix_layer_norm_backward: on CUDA, mean and rstd must be float32");
  const c10::cuda::CUDAGuard guard(input_arg.device());
  const int64_t B = input_arg.size(0);
  const int64_t N = input_arg.size(1);
  const int64_t C = input_arg.size(2);
  auto grad_input = at::empty({B, N, C}, input_arg.options());
  grad_input.narrow(1, n_rows, N - n_rows).zero_();
  // Separate buffers: the schema's outputs must not alias.
  auto grad_weight = at::zeros({C}, input_arg.options().dtype(at::kFloat));
  auto grad_bias = at::zeros({C}, input_arg.options().dtype(at::kFloat));
  const int64_t rows = B * n_rows;
  if (rows > 0 && C > 0) {
    const auto grad_out = grad_out_arg.contiguous();
    const auto input = with_contiguous_channels(input_arg);
    const auto mean = mean_arg.contiguous();
    const auto rstd = rstd_arg.contiguous();
    const auto weight = weight_arg.contiguous();
    const auto scratch = at::empty({prefix_layer_norm_backward_scratch(rows, C)},
                                   input_arg.options().dtype(at::kFloat));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_cuda_dtype(input.scalar_type(), "prefix_layer_norm_backward", [&](auto torch_t, auto cuda_t) {
      using TorchT = decltype(torch_t);
      using CudaT = decltype(cuda_t);
      check_launch(prefix_layer_norm_backward<CudaT>(
                       reinterpret_cast<const CudaT*>(grad_out.const_data_ptr<TorchT>()),
                       row_view<const CudaT>(input.const_data_ptr<TorchT>(), input, n_rows),
                       mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                       reinterpret_cast<const CudaT*>(weight.const_data_ptr<TorchT>()),
                       row_view<CudaT>(grad_input.mutable_data_ptr<TorchT>(), grad_input, n_rows),
                       grad_weight.mutable_data_ptr<float>(), grad_bias.mutable_data_ptr<float>(),
                       scratch.mutable_data_ptr<float>(), rows, C, stream),
                   "prefix_layer_norm_backward");
    });
  }
  const auto param_dtype = weight_arg.scalar_type();
  return {grad_input, grad_weight.to(param_dtype), grad_bias.to(param_dtype)};
}

TORCH_LIBRARY_IMPL(patchslim, CUDA, m) {
  m.impl("prefix_layer_norm", &prefix_layer_norm_cuda);
  m.impl("prefix_layer_norm_backward", &prefix_layer_norm_backward_cuda);
}

}  // namespace patchslim::cuda
