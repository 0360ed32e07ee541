// CPU kernels of patchslim::prefix_layer_norm and its backward: argument
// checks, ISA dispatch and threading; the row maths is in isa/layer_norm_rows.h.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/prefix_layer_norm_checks.h"
#include "cpu/cpu_dispatch.h"
#include "cpu/kernels.h"
#include "cpu/prefix_layer_norm.h"

namespace patchslim {
namespace cpu {
namespace {



template <typename T>
RowView<T> row_view(T* data, const at::Tensor& t, int64_t rows_per_batch) {
  return {data, t.stride(0), t.stride(1), rows_per_batch};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_layer_norm_cpu(const at::Tensor& input_arg,
                                                                      int64_t n_rows,
                                                                      const at::Tensor& weight_arg,
                                                                      const at::Tensor& bias_arg,
                                                                      double eps) {
  check_prefix_layer_norm_forward(input_arg, n_rows, weight_arg, bias_arg);
  check_cpu_dtype(input_arg, "prefix_layer_norm");
  const int64_t B = input_arg.size(0);
  const int64_t C = input_arg.size(2);
  auto output = at::empty({B, n_rows, C}, input_arg.options());
  // Statistics in the accumulation dtype: float32 for bfloat16 and float16 inputs.
  const auto stats_options = input_arg.options().dtype(accumulate_dtype(input_arg.scalar_type()));
  auto mean = at::empty({B, n_rows}, stats_options);
  auto rstd = at::empty({B, n_rows}, stats_options);
  if (output.numel() == 0) {
    return {output, mean, rstd};
  }
  const auto input = with_contiguous_channels(input_arg);
  const auto weight = weight_arg.contiguous();
  const auto bias = bias_arg.contiguous();
  const CpuIsa isa = checked_cpu_isa();

  PATCHSLIM_DISPATCH_CPU(input.scalar_type(), "prefix_layer_norm_cpu", [&] {
    using K = kernel_t<scalar_t>;
    using A = acc_t<K>;
    const LayerNormForwardArgs<K> args{row_view(data_of<scalar_t>(input), input, n_rows),
                                       mutable_data_of<scalar_t>(output),
                                       mean.mutable_data_ptr<A>(),
                                       rstd.mutable_data_ptr<A>(),
                                       data_of<scalar_t>(weight),
                                       data_of<scalar_t>(bias),
                                       C,
                                       static_cast<A>(eps)};
    const auto& kernels = kernels_for<K>(isa);
    at::parallel_for(0, B * n_rows, std::max<int64_t>(1, kElementsPerTask / C),
                     [&](int64_t begin, int64_t end) { kernels.layer_norm_forward(args, begin, end); });
  });
  return {output, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_layer_norm_backward_cpu(
    const at::Tensor& grad_out_arg, const at::Tensor& input_arg, int64_t n_rows,
    const at::Tensor& mean_arg, const at::Tensor& rstd_arg, const at::Tensor& weight_arg) {
  check_prefix_layer_norm_backward(grad_out_arg, input_arg, n_rows, mean_arg, rstd_arg, weight_arg);
  check_cpu_dtype(input_arg, "prefix_layer_norm_backward");
  const auto stats_dtype = accumulate_dtype(input_arg.scalar_type());
  TORCH_CHECK(mean_arg.scalar_type() == stats_dtype && rstd_arg.scalar_type() == stats_dtype,
              "prefix_layer_norm_backward: on CPU, mean and rstd must be ", stats_dtype,
              " for a ", input_arg.scalar_type(), " input, got ", mean_arg.scalar_type(), " and ",
              rstd_arg.scalar_type());
  const int64_t B = input_arg.size(0);
  const int64_t N = input_arg.size(1);
  const int64_t C = input_arg.size(2);
  auto grad_input = at::empty({B, N, C}, input_arg.options());
  grad_input.narrow(1, n_rows, N - n_rows).zero_();
  const int64_t rows = B * n_rows;
  if (rows == 0 || C == 0) {
    return {grad_input, at::zeros({C}, weight_arg.options()), at::zeros({C}, weight_arg.options())};
  }
  const auto grad_out = grad_out_arg.contiguous();
  const auto input = with_contiguous_channels(input_arg);
  const auto mean = mean_arg.contiguous();
  const auto rstd = rstd_arg.contiguous();
  const auto weight = weight_arg.contiguous();
  const CpuIsa isa = checked_cpu_isa();

  // Fixed chunks, each with its own weight/bias partial sums, reduced in chunk
  // order: the result does not depend on which thread ran which chunk.
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / C);
  const int64_t num_chunks = std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain);
  const int64_t chunk_rows = (rows + num_chunks - 1) / num_chunks;
  auto partials = at::zeros({num_chunks, 2, C}, input.options().dtype(stats_dtype));

  PATCHSLIM_DISPATCH_CPU(input.scalar_type(), "prefix_layer_norm_backward_cpu", [&] {
    using K = kernel_t<scalar_t>;
    using A = acc_t<K>;
    const LayerNormBackwardArgs<K> args{data_of<scalar_t>(grad_out),
                                        row_view(data_of<scalar_t>(input), input, n_rows),
                                        mean.const_data_ptr<A>(),
                                        rstd.const_data_ptr<A>(),
                                        data_of<scalar_t>(weight),
                                        row_view(mutable_data_of<scalar_t>(grad_input), grad_input, n_rows),
                                        C};
    const auto& kernels = kernels_for<K>(isa);
    A* partial = partials.mutable_data_ptr<A>();
    at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t begin = chunk * chunk_rows;
        const int64_t end = std::min(rows, begin + chunk_rows);
        A* grad_weight = partial + chunk * 2 * C;
        kernels.layer_norm_backward(args, begin, end, grad_weight, grad_weight + C);
      }
    });
  });
  return {grad_input, partials.select(1, 0).sum(0).to(weight_arg.scalar_type()),
          partials.select(1, 1).sum(0).to(weight_arg.scalar_type())};
}

TORCH_LIBRARY_IMPL(patchslim, CPU, m) {
  m.impl("prefix_layer_norm", &prefix_layer_norm_cpu);
  m.impl("prefix_layer_norm_backward", &prefix_layer_norm_backward_cpu);
}

}  // namespace cpu
}  // namespace patchslim
