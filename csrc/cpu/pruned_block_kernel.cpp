// CPU backend of the pruned-block ops: the op bodies are in
// common/pruned_block_ops.h; the row kernels are the ISA kernels in
// isa/block_rows.h, isa/few_rows_linear.h, isa/few_queries_attention.h and
// isa/layer_norm_rows.h.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/pruned_block_ops.h"
#include "cpu/cpu_dispatch.h"
#include "cpu/kernels.h"
#include "cpu/prefix_layer_norm.h"

namespace patchslim::cpu {
namespace {

// Rows of a tensor whose last dimension is contiguous: (B, R, C) with any batch
// and row strides, or a contiguous tensor of any rank flattened to rows.
template <typename T>
RowView<T> rows_of(T* data, const at::Tensor& t) {
  if (t.dim() == 3) {
    return {data, t.stride(0), t.stride(1), std::max<int64_t>(1, t.size(1))};
  }
  const int64_t rows = t.numel() / std::max<int64_t>(1, t.size(-1));
  return {data, 0, t.size(-1), std::max<int64_t>(1, rows)};
}

int64_t row_count(const at::Tensor& t) { return t.numel() / std::max<int64_t>(1, t.size(-1)); }

// Runs `kernel(args, begin, end)` over all rows of `t` on ATen's thread pool.
template <typename Args, typename Kernel>
void for_rows(const at::Tensor& t, const Args& args, Kernel kernel) {
  const int64_t cols = std::max<int64_t>(1, t.size(-1));
  at::parallel_for(0, row_count(t), std::max<int64_t>(1, kElementsPerTask / cols),
                   [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

// An optional argument (a bias) contiguous, or undefined where absent, and its data or
// nullptr: the kernels take an absent bias as nullptr.
at::Tensor optional_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}
template <typename T>
const kernel_t<T>* data_or_null(const at::Tensor& t) {
  return t.defined() ? data_of<T>(t) : nullptr;
}

// (B, H, rows, d) view strides, as the attention kernel takes them.
void head_strides(const at::Tensor& t, int64_t (&strides)[3]) {
  strides[0] = t.stride(0);
  strides[1] = t.stride(1);
  strides[2] = t.stride(2);
}

// Rows up to which few_rows_linear is faster than ATen's GEMM. Measured through the
// MLP op (C = 192, 384, 768; D = 4C) at batch 1 on a 2-core AMD EPYC (Zen 4, AVX512-BF16),
// torch 2.13: in bfloat16, ours took 16-80 µs at 1 row against ATen's (oneDNN's)
// 77-370 and was level at 8-14 rows; in float32, ours was ahead of MKL's up to 59-167
// rows, and our AVX2 kernel (forced there) up to 16-32.
int64_t few_rows_limit(at::ScalarType dtype) { return at::elementSize(dtype) == 2 ? 8 : 32; }

struct CpuBlock {
  static constexpr bool kFoldsQkvBias = true;

  static void check_dtype(const at::Tensor& t, const char* op) { check_cpu_dtype(t, op); }

  // The kept rows' GEMMs: over a few rows, our kernel, which reads the weight as
  // stored; over more, ATen's (oneDNN or MKL).
  static at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
    const int64_t rows = x.size(0) * x.size(1);
    if (rows > few_rows_limit(x.scalar_type()) || x.stride(2) != 1 || weight.stride(1) != 1) {
      return block::linear_of_rows(x, weight, bias);
    }
    auto out = at::empty({x.size(0), x.size(1), weight.size(0)}, x.options());
    if (out.numel() == 0) return out;
    const auto b = optional_contiguous(bias);
    PATCHSLIM_DISPATCH_CPU(x.scalar_type(), "few_rows_linear_cpu", [&] {
      using K = kernel_t<scalar_t>;
      const FewRowsLinearArgs<K> args{rows_of(data_of<scalar_t>(x), x),
                                      data_of<scalar_t>(weight),
                                      data_or_null<scalar_t>(b),
                                      rows_of(mutable_data_of<scalar_t>(out), out),
                                      rows,
                                      x.size(2),
                                      weight.size(0),
                                      weight.stride(0)};
      const auto kernel = kernels_for<K>(checked_cpu_isa()).few_rows_linear;
      const int64_t grain =
          std::max<int64_t>(8, kElementsPerTask / std::max<int64_t>(1, rows * x.size(2)));
      at::parallel_for(0, weight.size(0), grain,
                       [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
    });
    return out;
  }

  static constexpr bool kFewQueriesAttention = true;

  // Whether attention in the tokens' space (few_queries_attention) is cheaper than
  // projecting K and V: n·(C² + H·N·C) against N·C² multiply-adds, i.e.
  // n·(d + N)·r ≤ N·d, r being how much faster per multiply-add the GEMMs run than the
  // kernel. Measured with the in-place MSA op (C = 192, 384, 768; N = 197, d = 64) at
  // batch 1 and 8 on a 2-core AMD EPYC (Zen 4), torch 2.13, the kernel was faster up to
  // n = 8-10 in bfloat16 (r = 6 gives n ≤ 8; at n = 1, 31-188 µs against 141-1225) and
  // up to n = 13-20 in float32 (r = 3.5 gives n ≤ 13).
  static bool few_queries_attention_pays(int64_t n, int64_t N, int64_t head_dim,
                                         at::ScalarType dtype) {
    const double r = at::elementSize(dtype) == 2 ? 6.0 : 3.5;
    return static_cast<double>(n * (head_dim + N)) * r <= static_cast<double>(N * head_dim);
  }

  // (B, n, C) context rows of the n queries q (B, n, C; without the query bias) over
  // the normalised tokens (B, N, C): kernels.h, FewQueriesAttentionArgs.
  static at::Tensor few_queries_attention(const at::Tensor& q, const at::Tensor& normed_arg,
                                          const at::Tensor& key_weight_arg,
                                          const at::Tensor& value_weight_arg,
                                          const std::optional<at::Tensor>& query_bias,
                                          const std::optional<at::Tensor>& value_bias,
                                          double scale, int64_t heads) {
    TORCH_INTERNAL_ASSERT(q.stride(2) == 1);
    const int64_t B = q.size(0);
    const int64_t n = q.size(1);
    const int64_t C = q.size(2);
    const int64_t N = normed_arg.size(1);
    auto out = at::empty({B, n, C}, q.options());
    if (out.numel() == 0) return out;
    const auto normed = normed_arg.contiguous();
    const auto key_weight = key_weight_arg.contiguous();
    const auto value_weight = value_weight_arg.contiguous();
    const auto q_bias = optional_contiguous(query_bias);
    const auto v_bias = optional_contiguous(value_bias);
    const int64_t threads = at::get_num_threads();
    const int64_t scratch_size = few_queries_attention_scratch_size(C, N);
    auto scratch =
        at::empty({threads, scratch_size}, q.options().dtype(accumulate_dtype(q.scalar_type())));
    PATCHSLIM_DISPATCH_CPU(q.scalar_type(), "few_queries_attention_cpu", [&] {
      using K = kernel_t<scalar_t>;
      const FewQueriesAttentionArgs<K> args{data_of<scalar_t>(q),
                                            data_or_null<scalar_t>(q_bias),
                                            data_of<scalar_t>(normed),
                                            data_of<scalar_t>(key_weight),
                                            data_of<scalar_t>(value_weight),
                                            data_or_null<scalar_t>(v_bias),
                                            mutable_data_of<scalar_t>(out),
                                            q.stride(0),
                                            q.stride(1),
                                            key_weight.stride(0),
                                            heads,
                                            n,
                                            N,
                                            C,
                                            static_cast<acc_t<K>>(scale)};
      const auto kernel = kernels_for<K>(checked_cpu_isa()).few_queries_attention;
      auto* scratch_data = scratch.mutable_data_ptr<acc_t<K>>();
      at::parallel_for(0, B * heads * n, 1, [&](int64_t begin, int64_t end) {
        kernel(args, begin, end, scratch_data + at::get_thread_num() * scratch_size);
      });
    });
    return out;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x,
                                                                    const at::Tensor& weight,
                                                                    const at::Tensor& bias,
                                                                    double eps) {
    return prefix_layer_norm_cpu(x, x.size(1), weight, bias, eps);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
      const at::Tensor& weight) {
    return prefix_layer_norm_backward_cpu(grad, x, x.size(1), mean, rstd, weight);
  }

  static void softmax_backward_(const at::Tensor& grad, const at::Tensor& probs, double scale) {
    TORCH_INTERNAL_ASSERT(grad.is_contiguous() && probs.is_contiguous());
    PATCHSLIM_DISPATCH_CPU(grad.scalar_type(), "softmax_backward_cpu", [&] {
      using K = kernel_t<scalar_t>;
      const SoftmaxBackwardArgs<K> args{rows_of(data_of<scalar_t>(probs), probs),
                                        rows_of(mutable_data_of<scalar_t>(grad), grad),
                                        grad.size(-1), static_cast<acc_t<K>>(scale)};
      for_rows(grad, args, kernels_for<K>(checked_cpu_isa()).softmax_backward);
    });
  }

  static void bias_gelu_(const at::Tensor& hidden, const at::Tensor& bias) {
    const auto b = bias.contiguous();
    PATCHSLIM_DISPATCH_CPU(hidden.scalar_type(), "bias_gelu_cpu", [&] {
      using K = kernel_t<scalar_t>;
      const BiasGeluArgs<K> args{rows_of(mutable_data_of<scalar_t>(hidden), hidden),
                                 data_of<scalar_t>(b), hidden.size(-1)};
      for_rows(hidden, args, kernels_for<K>(checked_cpu_isa()).bias_gelu);
    });
  }

  static void bias_gelu_backward_(const at::Tensor& grad, const at::Tensor& pre,
                                  const at::Tensor& bias) {
    const auto b = bias.contiguous();
    PATCHSLIM_DISPATCH_CPU(grad.scalar_type(), "bias_gelu_backward_cpu", [&] {
      using K = kernel_t<scalar_t>;
      const BiasGeluBackwardArgs<K> args{rows_of(data_of<scalar_t>(pre), pre),
                                         data_of<scalar_t>(b),
                                         rows_of(mutable_data_of<scalar_t>(grad), grad),
                                         grad.size(-1)};
      for_rows(grad, args, kernels_for<K>(checked_cpu_isa()).bias_gelu_backward);
    });
  }

  static std::tuple<at::Tensor, at::Tensor> attention(
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
      bool want_probs, const std::optional<at::Tensor>& query_bias,
      const std::optional<at::Tensor>& value_bias) {
    // One fused kernel for every dtype, with or without the probabilities: faster than
    // ATen's flash attention and than GEMM + softmax + GEMM in float32 and bfloat16
    // (docs/design.md §10; bench/results/pruned_block_cpu.md, in place vs (a)).
    const int64_t B = q.size(0);
    const int64_t H = q.size(1);
    const int64_t n = q.size(2);
    const int64_t d = q.size(3);
    const int64_t N = k.size(2);
    auto context = at::empty({B, n, H * d}, q.options());
    // Heads side by side in the context rows: (B, H, n, d) view of (B, n, C).
    const auto out = context.view({B, n, H, d}).transpose(1, 2);
    auto probs = want_probs ? at::empty({B, H, n, N}, q.options()) : at::Tensor();
    if (context.numel() == 0) return {context, probs};
    const int64_t threads = at::get_num_threads();
    // Fewer (image, head) pairs than twice the threads (batch 1): split each pair's
    // queries into ranges of whole query blocks, so that every thread has work.
    const int64_t pairs = B * H;
    const int64_t query_splits = std::clamp<int64_t>(
        (2 * threads + pairs - 1) / pairs, 1, (n + kAttentionLanes - 1) / kAttentionLanes);
    const auto q_bias = optional_contiguous(query_bias);
    const auto v_bias = optional_contiguous(value_bias);
    const int64_t scratch_size = attention_scratch_size(d, N);
    auto scratch =
        at::empty({threads, scratch_size}, q.options().dtype(accumulate_dtype(q.scalar_type())));
    PATCHSLIM_DISPATCH_CPU(q.scalar_type(), "attention_cpu", [&] {
      using K = kernel_t<scalar_t>;
      AttentionArgs<K> args{data_of<scalar_t>(q),
                            data_of<scalar_t>(k),
                            data_of<scalar_t>(v),
                            mutable_data_of<scalar_t>(out),
                            want_probs ? mutable_data_of<scalar_t>(probs) : nullptr,
                            data_or_null<scalar_t>(q_bias),
                            data_or_null<scalar_t>(v_bias),
                            {},
                            {},
                            {},
                            {},
                            H,
                            n,
                            N,
                            d,
                            query_splits,
                            static_cast<acc_t<K>>(scale)};
      head_strides(q, args.q_strides);
      head_strides(k, args.k_strides);
      head_strides(v, args.v_strides);
      head_strides(out, args.out_strides);
      const auto kernel = kernels_for<K>(checked_cpu_isa()).attention;
      auto* scratch_data = scratch.mutable_data_ptr<acc_t<K>>();
      at::parallel_for(0, pairs * query_splits, 1, [&](int64_t begin, int64_t end) {
        kernel(args, begin, end, scratch_data + at::get_thread_num() * scratch_size);
      });
    });
    return {context, probs};
  }

  static void bias_residual_(const at::Tensor& out, const at::Tensor& bias,
                             const at::Tensor& residual) {
    TORCH_INTERNAL_ASSERT(out.dim() == 3 && residual.dim() == 3);
    const auto b = bias.contiguous();
    const auto res = residual.stride(2) == 1 ? residual : residual.contiguous();
    PATCHSLIM_DISPATCH_CPU(out.scalar_type(), "bias_residual_cpu", [&] {
      using K = kernel_t<scalar_t>;
      const BiasResidualArgs<K> args{rows_of(mutable_data_of<scalar_t>(out), out),
                                     data_of<scalar_t>(b),
                                     rows_of(data_of<scalar_t>(res), res), out.size(-1)};
      for_rows(out, args, kernels_for<K>(checked_cpu_isa()).bias_residual);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(patchslim, CPU, m) { block::Ops<CpuBlock>::register_kernels(m); }

}  // namespace patchslim::cpu
