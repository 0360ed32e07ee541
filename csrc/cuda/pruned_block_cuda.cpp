// CUDA backend of the pruned-block ops: the op bodies are in
// common/pruned_block_ops.h; the row kernels are pruned_block_kernel.cu and the
// LayerNorm kernels prefix_layer_norm_kernel.cu.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/pruned_block_ops.h"
#include "cuda/launchers.h"
#include "cuda/prefix_layer_norm_cuda.h"
#include "cuda/torch_glue.h"

namespace patchslim::cuda {
namespace {

struct CudaBlock {
  // cuBLAS adds a bias in the GEMM's epilogue: nothing to gain from leaving it out.
  static constexpr bool kFoldsQkvBias = false;
  // The few-queries attention of the CPU (docs/design.md §11) is not written for CUDA.
  static constexpr bool kFewQueriesAttention = false;

  static void check_dtype(const at::Tensor& t, const char* op) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                    t.scalar_type() == at::kBFloat16,
                op, ": CUDA supports float32, float16 and bfloat16 inputs, got ", t.scalar_type());
  }

  static at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
    return block::linear_of_rows(x, weight, bias);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x,
                                                                    const at::Tensor& weight,
                                                                    const at::Tensor& bias,
                                                                    double eps) {
    return prefix_layer_norm_cuda(x, x.size(1), weight, bias, eps);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
      const at::Tensor& weight) {
    return prefix_layer_norm_backward_cuda(grad, x, x.size(1), mean, rstd, weight);
  }

  static void softmax_(const at::Tensor& scores, double scale) {
    const c10::cuda::CUDAGuard guard(scores.device());
    dispatch_cuda_dtype(scores.scalar_type(), "softmax", [&](auto torch_t, auto cuda_t) {
      using TorchT = decltype(torch_t);
      using CudaT = decltype(cuda_t);
      check_launch(softmax_forward<CudaT>(rows_of<CudaT>(scores.mutable_data_ptr<TorchT>(), scores),
                                          row_count(scores), scores.size(-1),
                                          static_cast<float>(scale),
                                          at::cuda::getCurrentCUDAStream()),
                   "softmax");
    });
  }

  static void softmax_backward_(const at::Tensor& grad, const at::Tensor& probs, double scale) {
    const c10::cuda::CUDAGuard guard(grad.device());
    dispatch_cuda_dtype(grad.scalar_type(), "softmax_backward", [&](auto torch_t, auto cuda_t) {
      using TorchT = decltype(torch_t);
      using CudaT = decltype(cuda_t);
      check_launch(softmax_backward<CudaT>(
                       rows_of<const CudaT>(probs.const_data_ptr<TorchT>(), probs),
                       rows_of<CudaT>(grad.mutable_data_ptr<TorchT>(), grad), row_count(grad),
                       grad.size(-1), static_cast<float>(scale), at::cuda::getCurrentCUDAStream()),
                   "softmax_backward");
    });
  }

  static void bias_gelu_(const at::Tensor& hidden, const at::Tensor& bias) {
    const c10::cuda::CUDAGuard guard(hidden.device());
    const auto b = bias.contiguous();
    dispatch_cuda_dtype(hidden.scalar_type(), "bias_gelu", [&](auto torch_t, auto cuda_t) {
      using TorchT = decltype(torch_t);
      using CudaT = decltype(cuda_t);
      check_launch(bias_gelu_forward<CudaT>(
                       rows_of<CudaT>(hidden.mutable_data_ptr<TorchT>(), hidden),
                       reinterpret_cast<const CudaT*>(b.const_data_ptr<TorchT>()),
                       row_count(hidden), hidden.size(-1), at::cuda::getCurrentCUDAStream()),
                   "bias_gelu");
    });
  }

  static void bias_gelu_backward_(const at::Tensor& grad, const at::Tensor& pre,
                                  const at::Tensor& bias) {
    const c10::cuda::CUDAGuard guard(grad.device());
    const auto b = bias.contiguous();
    dispatch_cuda_dtype(grad.scalar_type(), "bias_gelu_backward", [&](auto torch_t, auto cuda_t) {
      using TorchT = decltype(torch_t);
      using CudaT = decltype(cuda_t);
      check_launch(bias_gelu_backward<CudaT>(
                       rows_of<const CudaT>(pre.const_data_ptr<TorchT>(), pre),
                       reinterpret_cast<const CudaT*>(b.const_data_ptr<TorchT>()),
                       rows_of<CudaT>(grad.mutable_data_ptr<TorchT>(), grad), row_count(grad),
                       grad.size(-1), at::cuda::getCurrentCUDAStream()),
                   "bias_gelu_backward");
    });
  }

  // Without probabilities to return (inference), torch's fused attention (flash,
  // cuDNN or memory-efficient, as SDPA picks): it never writes the (B, H, n, N)
  // probabilities, which made our in-place blocks 1.2-2x slower than the same maths
  // with SDPA on an H200 (bench_pruned_block, bf16, batch 256).
  static std::tuple<at::Tensor, at::Tensor> attention(
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
      bool want_probs, const std::optional<at::Tensor>& query_bias,
      const std::optional<at::Tensor>& value_bias) {
    // kFoldsQkvBias is false: Q, K, V come with their bias.
    TORCH_INTERNAL_ASSERT(!query_bias.has_value() && !value_bias.has_value());
    if (want_probs) {
      return block::unfused_attention<CudaBlock>(q, k, v, scale);
    }
    const auto context = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{},
                                                          /*dropout_p=*/0.0,
                                                          /*is_causal=*/false, scale);
    return {block::merge_heads(context), at::Tensor()};
  }

  static void bias_residual_(const at::Tensor& out, const at::Tensor& bias,
                             const at::Tensor& residual) {
    const c10::cuda::CUDAGuard guard(out.device());
    const auto b = bias.contiguous();
    const auto res = residual.stride(2) == 1 ? residual : residual.contiguous();
    dispatch_cuda_dtype(out.scalar_type(), "bias_residual", [&](auto torch_t, auto cuda_t) {
      using TorchT = decltype(torch_t);
      using CudaT = decltype(cuda_t);
      check_launch(bias_residual<CudaT>(rows_of<CudaT>(out.mutable_data_ptr<TorchT>(), out),
                                        reinterpret_cast<const CudaT*>(b.const_data_ptr<TorchT>()),
                                        rows_of<const CudaT>(res.const_data_ptr<TorchT>(), res),
                                        row_count(out), out.size(-1),
                                        at::cuda::getCurrentCUDAStream()),
                   "bias_residual");
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(patchslim, CUDA, m) { block::Ops<CudaBlock>::register_kernels(m); }

}  // namespace patchslim::cuda
