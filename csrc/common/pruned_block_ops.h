#pragma once

// The pruned transformer block (paper Eq. 2, DESIGN.md §3), written once for every
// backend. Block l updates only its kept rows [0, n) of x (B, N, C); keys and
// values come from all N rows; the other rows pass through.
//
//   MSA:  out = x[:, :n] + Proj(softmax(s·Q Kᵀ) V),  Q = LN1(x)[:, :n] Wq,  K, V = LN1(x) Wk, Wv
//         (s = 1/√d unless the caller gives one; the qkv bias is optional)
//   MLP:  out = x + FC2(GELU(FC1(LN2(x))))            on the kept rows x (B, n, C)
//
// The forward GEMMs are the backend's `linear` (ATen's, or on the CPU its own kernel
// over a few rows), the backward's are ATen's; LayerNorm, the softmax, bias+GELU and
// bias+residual are the backend's kernels. `Backend` supplies (all in place where
// named with _):
//   check_dtype(t, op)
//   linear(x (B, R, K), weight (O, K), bias (O,) or none) -> (B, R, O)
//   layer_norm(x (B, R, C), weight, bias, eps) -> (y, mean, rstd)
//   layer_norm_backward(grad (B, R, C), x, mean, rstd, weight) -> (dx, dweight, dbias)
//   softmax_(scores (B, H, n, N), scale)                     p = softmax(scale·s);
//                                                            only for unfused_attention
//   softmax_backward_(grad (B, H, n, N), probs, scale)       dP -> scale·dlogits
//   bias_gelu_(h (B, n, D), bias)                            h = GELU(h + bias)
//   bias_gelu_backward_(grad (B, n, D), pre, bias)           grad *= GELU'(pre + bias)
//   bias_residual_(out (B, n, C), bias, residual (B, n, C))  out += bias + residual
//   attention(q (B, H, n, d), k, v (B, H, N, d), scale, want_probs,
//             query_bias (C,) or none, value_bias (C,) or none)
//       -> (context (B, n, C), probs (B, H, n, N) or undefined), with q + query_bias
//          as the queries and value_bias added to the context
//   kFoldsQkvBias                                            whether the inference ops
//                                                            project Q, K, V without bias
// The forward ops also return what their backward reads instead of recomputing
// GEMMs (as native_layer_norm returns its statistics): Q (B, n, C), the K|V
// projection (B, N, 2C) and the attention context (B, n, C) for MSA; FC1's
// output before bias and GELU (B, n, D) for the MLP. LayerNorm is recomputed.

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace patchslim::block {

inline void check_param(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
                        const char* op, const char* name, const char* shape_text) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape_text, " = ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(),
              ", got ", t.device());
}

struct MsaParams {
  const at::Tensor& ln_weight;
  const at::Tensor& ln_bias;
  const at::Tensor& qkv_weight;
  const std::optional<at::Tensor>& qkv_bias;  // absent: the projection has no bias
  const at::Tensor& proj_weight;
  const at::Tensor& proj_bias;
};

struct MlpParams {
  const at::Tensor& ln_weight;
  const at::Tensor& ln_bias;
  const at::Tensor& fc1_weight;
  const at::Tensor& fc1_bias;
  const at::Tensor& fc2_weight;
  const at::Tensor& fc2_bias;
};

inline void check_msa(const at::Tensor& x, int64_t n_keep, int64_t num_heads, const MsaParams& p,
                      const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (B, N, C), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
              x.scalar_type());
  const int64_t N = x.size(1);
  const int64_t C = x.size(2);
  TORCH_CHECK(n_keep >= 1 && n_keep <= N, op, ": n_keep must be in [1, N=", N, "], got ", n_keep);
  TORCH_CHECK(num_heads >= 1 && C % num_heads == 0, op, ": C=", C,
              " must be divisible by num_heads=", num_heads);
  check_param(p.ln_weight, x, {C}, op, "ln_weight", "(C,)");
  check_param(p.ln_bias, x, {C}, op, "ln_bias", "(C,)");
  check_param(p.qkv_weight, x, {3 * C, C}, op, "qkv_weight", "(3C, C)");
  if (p.qkv_bias.has_value()) check_param(*p.qkv_bias, x, {3 * C}, op, "qkv_bias", "(3C,)");
  check_param(p.proj_weight, x, {C, C}, op, "proj_weight", "(C, C)");
  check_param(p.proj_bias, x, {C}, op, "proj_bias", "(C,)");
}

inline void check_mlp(const at::Tensor& x, const MlpParams& p, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (B, n, C), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
              x.scalar_type());
  const int64_t C = x.size(2);
  TORCH_CHECK(p.fc1_weight.dim() == 2, op, ": fc1_weight must have shape (D, C), got ",
              p.fc1_weight.sizes());
  const int64_t D = p.fc1_weight.size(0);
  check_param(p.ln_weight, x, {C}, op, "ln_weight", "(C,)");
  check_param(p.ln_bias, x, {C}, op, "ln_bias", "(C,)");
  check_param(p.fc1_weight, x, {D, C}, op, "fc1_weight", "(D, C)");
  check_param(p.fc1_bias, x, {D}, op, "fc1_bias", "(D,)");
  check_param(p.fc2_weight, x, {C, D}, op, "fc2_weight", "(C, D)");
  check_param(p.fc2_bias, x, {C}, op, "fc2_bias", "(C,)");
}

// Whether two elements of t share memory. Dense tensors have none and expanded
// (stride-0) ones do; for other strided layouts, dims taken by increasing stride must
// each step past the span of the dims before them, else the layout counts as
// overlapping (as_strided windows that reuse elements among them).
inline bool has_overlapping_elements(const at::Tensor& t) {
  switch (at::has_internal_overlap(t)) {
    case at::MemOverlap::No:
      return false;
    case at::MemOverlap::Yes:
      return true;
    case at::MemOverlap::TooHard:
      break;
  }
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return true;
    span += stride * (size - 1);
  }
  return false;
}

// Whether a and b (same dtype) may read or write the same memory: the overlap status
// where ATen can tell, else whether their storage ranges intersect.
inline bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return false;
  switch (at::get_overlap_status(a, b)) {
    case at::MemOverlapStatus::Full:
    case at::MemOverlapStatus::Partial:
      return true;
    case at::MemOverlapStatus::No:
      return false;
    case at::MemOverlapStatus::TooHard:
      break;
  }
  const auto last = [](const at::Tensor& t) {
    int64_t offset = t.storage_offset();
    for (int64_t d = 0; d < t.dim(); ++d) offset += t.stride(d) * (t.size(d) - 1);
    return offset;
  };
  return a.storage_offset() <= last(b) && b.storage_offset() <= last(a);
}

// The in-place ops write x: its elements must be distinct memory, and no parameter may
// live in x's memory (it would be read after being overwritten).
inline void check_writable(const at::Tensor& x,
                           std::initializer_list<std::pair<const char*, const at::Tensor*>> params,
                           const char* op) {
  TORCH_CHECK(x.stride(2) == 1, op, ": x must have a contiguous channel dimension");
  TORCH_CHECK(!has_overlapping_elements(x), op,
              ": x has elements that share memory (expanded, stride 0 or overlapping "
              "as_strided, strides ", x.strides(), "), which the op would write more than once; "
              "pass x.contiguous()");
  for (const auto& [name, param] : params) {
    TORCH_CHECK(param == nullptr || !shares_memory(x, *param), op, ": ", name,
                " shares memory with x, which the op overwrites; pass a copy of it");
  }
}

// (B, R, H·d) <-> (B, H, R, d) views.
inline at::Tensor split_heads(const at::Tensor& t, int64_t heads) {
  return t.view({t.size(0), t.size(1), heads, t.size(2) / heads}).transpose(1, 2);
}
inline at::Tensor merge_heads(const at::Tensor& t) {
  return t.transpose(1, 2).reshape({t.size(0), t.size(2), t.size(1) * t.size(3)});
}

// Σ over the leading dims of (…, K) grad times (…, M) input: (K, M).
inline at::Tensor weight_grad(const at::Tensor& grad, const at::Tensor& input) {
  return at::mm(grad.reshape({-1, grad.size(-1)}).t(), input.reshape({-1, input.size(-1)}));
}

// Σ over the batch and token dims of a (B, n, K) grad: the bias's gradient, (K,). The
// dims are named as an IntArrayRef: a braced list is ambiguous between sum's int and
// Dimname overloads in torch 2.11's headers.
inline at::Tensor bias_grad(const at::Tensor& grad) { return grad.sum(at::IntArrayRef{0, 1}); }

// at::linear of the rows of (B, n, C) x as one (B·n, C) GEMM: (B, n, out). Given the
// 3-D tensor, at::linear without a bias (at::matmul) folds it into a matrix only when
// its strides allow a view, else it takes a batched GEMM that copies the weight once
// per image (B·C² elements; 7 of 10 ms for DeiT-B in bfloat16 at batch 32). The kept
// rows of one image are such a case although is_contiguous() holds (a size-1 batch dim
// keeps the full tensor's stride): T2T-ViT-14, without qkv bias, paid a 384×384 copy
// per block at batch 1. reshape copies the rows only where no view exists (B > 1).
inline at::Tensor linear_of_rows(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  return at::linear(x.reshape({-1, x.size(-1)}), weight, bias)
      .view({x.size(0), x.size(1), weight.size(0)});
}

// Elements [start, start + length) of the qkv bias, or none where the projection has
// no bias.
inline std::optional<at::Tensor> qkv_bias_part(const MsaParams& p, int64_t start,
                                               int64_t length) {
  if (!p.qkv_bias.has_value()) return std::nullopt;
  return p.qkv_bias->narrow(0, start, length);
}

// Everything the attention forward and backward share: normalised x, Q, K, V.
// q (B, n, C) and kv (B, N, 2C) as projected, and their per-head views. Where the
// biases are set, q and kv were projected without the qkv bias, and the attention adds
// query_bias to the queries and value_bias to its output (msa_projections says why
// that is exact).
struct MsaProjections {
  at::Tensor q, kv;
  at::Tensor q_heads() const { return split_heads(q, num_heads); }
  at::Tensor k_heads() const { return split_heads(kv.narrow(2, 0, q.size(2)), num_heads); }
  at::Tensor v_heads() const { return split_heads(kv.narrow(2, q.size(2), q.size(2)), num_heads); }
  int64_t num_heads;
  std::optional<at::Tensor> query_bias = std::nullopt;
  std::optional<at::Tensor> value_bias = std::nullopt;
};

template <typename Backend>
MsaProjections msa_projections(const at::Tensor& normed, int64_t n_keep, int64_t num_heads,
                               const MsaParams& p, bool views_suffice) {
  const int64_t C = normed.size(2);
  // Q, K|V not returned (the in-place and inference ops): their bias need not be in
  // them. The key bias adds q·b_k to every logit of a query, which the softmax cancels;
  // a query's probabilities sum to 1, so the value bias adds b_v to its context row;
  // the attention adds b_q to the n queries it reads. The GEMMs then go without bias
  // (on the CPU, ATen's addmm first copies the bias into every output row: ~10% of a
  // block's K|V GEMM at batch 1).
  const bool fold_bias = views_suffice && Backend::kFoldsQkvBias && p.qkv_bias.has_value();
  const auto gemm_bias = [&](int64_t start, int64_t length) {
    return fold_bias ? std::nullopt : qkv_bias_part(p, start, length);
  };
  MsaProjections out{at::Tensor(), at::Tensor(), num_heads};
  if (fold_bias) {
    out.query_bias = qkv_bias_part(p, 0, C);
    out.value_bias = qkv_bias_part(p, 2 * C, C);
  }
  if (views_suffice && n_keep == normed.size(1)) {
    // Every row kept, and Q, K|V not returned: one GEMM, and Q and K|V as views of its
    // (B, N, 3C) output. A call fewer, which shows in small blocks.
    const auto qkv = Backend::linear(normed, p.qkv_weight, gemm_bias(0, 3 * C));
    out.q = qkv.narrow(2, 0, C);
    out.kv = qkv.narrow(2, C, 2 * C);
    return out;
  }
  out.q = Backend::linear(normed.narrow(1, 0, n_keep), p.qkv_weight.narrow(0, 0, C),
                          gemm_bias(0, C));
  out.kv = Backend::linear(normed, p.qkv_weight.narrow(0, C, 2 * C), gemm_bias(C, 2 * C));
  return out;
}

// The logits' scale: the caller's (T2T-ViT uses embed_dim^-0.5), else 1/sqrt(head_dim).
inline double attention_scale(int64_t channels, int64_t heads, std::optional<double> scale) {
  return scale.value_or(1.0 / std::sqrt(static_cast<double>(channels / heads)));
}

// (projected attention (B, n, C) without bias, probabilities (B, H, n, N)).
// The attention core as GEMM, softmax kernel, GEMM: for backends without a fused
// attention kernel.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> unfused_attention(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, double scale) {
  auto probs = at::matmul(q, k.transpose(-2, -1));
  Backend::softmax_(probs, scale);
  return {merge_heads(at::matmul(probs, v)), probs};
}

// The attention sub-layer without the output bias and residual.
struct MsaForward {
  at::Tensor projected, probs, q, kv, context;
};

template <typename Backend>
MsaForward msa_core(const at::Tensor& x, int64_t n_keep, int64_t num_heads, const MsaParams& p,
                    double eps, std::optional<double> scale, bool want_probs) {
  const auto normed = std::get<0>(Backend::layer_norm(x, p.ln_weight, p.ln_bias, eps));
  if constexpr (Backend::kFewQueriesAttention) {
    const int64_t C = x.size(2);
    if (!want_probs &&
        Backend::few_queries_attention_pays(n_keep, x.size(1), C / num_heads, x.scalar_type())) {
      // A few queries (the last blocks): attention in the tokens' space, without
      // projecting K and V for all N tokens (docs/design.md §11).
      const auto q =
          Backend::linear(normed.narrow(1, 0, n_keep), p.qkv_weight.narrow(0, 0, C), std::nullopt);
      const auto context = Backend::few_queries_attention(
          q, normed, p.qkv_weight.narrow(0, C, C), p.qkv_weight.narrow(0, 2 * C, C),
          qkv_bias_part(p, 0, C), qkv_bias_part(p, 2 * C, C),
          attention_scale(C, num_heads, scale), num_heads);
      return {Backend::linear(context, p.proj_weight, std::nullopt), at::Tensor(), at::Tensor(),
              at::Tensor(), context};
    }
  }
  // Without probabilities (the in-place op) the projections are not returned either.
  const auto proj = msa_projections<Backend>(normed, n_keep, num_heads, p, !want_probs);
  auto [context, probs] =
      Backend::attention(proj.q_heads(), proj.k_heads(), proj.v_heads(),
                         attention_scale(x.size(2), num_heads, scale), want_probs,
                         proj.query_bias, proj.value_bias);
  return {Backend::linear(context, p.proj_weight, std::nullopt), probs, proj.q, proj.kv, context};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pruned_msa(
    const at::Tensor& x, int64_t n_keep, int64_t num_heads, const MsaParams& p, double eps,
    std::optional<double> scale) {
  check_msa(x, n_keep, num_heads, p, "pruned_msa");
  Backend::check_dtype(x, "pruned_msa");
  auto f = msa_core<Backend>(x, n_keep, num_heads, p, eps, scale, /*want_probs=*/true);
  Backend::bias_residual_(f.projected, p.proj_bias, x.narrow(1, 0, n_keep));
  return {f.projected, f.probs, f.q, f.kv, f.context};
}

// x[:, :n] += bias + Proj(Attn(…)), in place: untouched rows are never read or written
// after LN1.
template <typename Backend>
void pruned_msa_(const at::Tensor& x, int64_t n_keep, int64_t num_heads, const MsaParams& p,
                 double eps, std::optional<double> scale) {
  check_msa(x, n_keep, num_heads, p, "pruned_msa_");
  Backend::check_dtype(x, "pruned_msa_");
  check_writable(x,
                 {{"ln_weight", &p.ln_weight},
                  {"ln_bias", &p.ln_bias},
                  {"qkv_weight", &p.qkv_weight},
                  {"qkv_bias", p.qkv_bias.has_value() ? &*p.qkv_bias : nullptr},
                  {"proj_weight", &p.proj_weight},
                  {"proj_bias", &p.proj_bias}},
                 "pruned_msa_");
  const auto f = msa_core<Backend>(x, n_keep, num_heads, p, eps, scale, /*want_probs=*/false);
  Backend::bias_residual_(x.narrow(1, 0, n_keep), p.proj_bias, f.projected);
}

// pruned_msa's first output alone: no probabilities, Q, K|V or context kept.
template <typename Backend>
at::Tensor pruned_msa_inference(const at::Tensor& x, int64_t n_keep, int64_t num_heads,
                                const MsaParams& p, double eps, std::optional<double> scale) {
  check_msa(x, n_keep, num_heads, p, "pruned_msa_inference");
  Backend::check_dtype(x, "pruned_msa_inference");
  const auto f = msa_core<Backend>(x, n_keep, num_heads, p, eps, scale, /*want_probs=*/false);
  Backend::bias_residual_(f.projected, p.proj_bias, x.narrow(1, 0, n_keep));
  return f.projected;
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pruned_msa_backward(const at::Tensor& grad_out_arg, const std::optional<at::Tensor>& grad_probs,
                    const at::Tensor& x, int64_t n_keep, int64_t num_heads, const MsaParams& p,
                    double eps, const at::Tensor& probs_arg, const at::Tensor& q_arg,
                    const at::Tensor& kv_arg, const at::Tensor& context,
                    std::optional<double> scale) {
  constexpr const char* op = "pruned_msa_backward";
  check_msa(x, n_keep, num_heads, p, op);
  Backend::check_dtype(x, op);
  const int64_t B = x.size(0);
  const int64_t N = x.size(1);
  const int64_t C = x.size(2);
  check_param(probs_arg, x, {B, num_heads, n_keep, N}, op, "attn", "(B, H, n_keep, N)");
  check_param(grad_out_arg, x, {B, n_keep, C}, op, "grad_out", "(B, n_keep, C)");
  check_param(q_arg, x, {B, n_keep, C}, op, "q", "(B, n_keep, C)");
  check_param(kv_arg, x, {B, N, 2 * C}, op, "kv", "(B, N, 2C)");
  check_param(context, x, {B, n_keep, C}, op, "context", "(B, n_keep, C)");
  if (grad_probs.has_value() && grad_probs->defined()) {
    check_param(*grad_probs, x, {B, num_heads, n_keep, N}, op, "grad_attn", "(B, H, n_keep, N)");
  }
  // Saved tensors may come with any strides (the kernels and the head views below
  // need contiguous ones); contiguous() copies only those that are not.
  const auto probs = probs_arg.contiguous();
  const auto grad_out = grad_out_arg.contiguous();
  const auto [normed, mean, rstd] = Backend::layer_norm(x, p.ln_weight, p.ln_bias, eps);
  const MsaProjections a{q_arg.contiguous(), kv_arg.contiguous(), num_heads};
  const auto v_heads = a.v_heads();

  const auto grad_proj_weight = weight_grad(grad_out, context);
  const auto grad_proj_bias = bias_grad(grad_out);
  const auto grad_context = split_heads(at::matmul(grad_out, p.proj_weight), num_heads);
  const auto grad_v = at::matmul(probs.transpose(-2, -1), grad_context);
  auto grad_logits = at::matmul(grad_context, v_heads.transpose(-2, -1));
  if (grad_probs.has_value() && grad_probs->defined()) {
    grad_logits.add_(*grad_probs);
  }
  Backend::softmax_backward_(grad_logits, probs, attention_scale(C, num_heads, scale));
  const auto grad_q = merge_heads(at::matmul(grad_logits, a.k_heads()));
  const auto grad_kv = at::cat({merge_heads(at::matmul(grad_logits.transpose(-2, -1), a.q_heads())),
                                merge_heads(grad_v)},
                               2);

  const auto kv_weight = p.qkv_weight.narrow(0, C, 2 * C);
  auto grad_normed = at::matmul(grad_kv, kv_weight);
  grad_normed.narrow(1, 0, n_keep).add_(at::matmul(grad_q, p.qkv_weight.narrow(0, 0, C)));
  const auto grad_qkv_weight = at::cat(
      {weight_grad(grad_q, normed.narrow(1, 0, n_keep)), weight_grad(grad_kv, normed)}, 0);
  const auto grad_qkv_bias = at::cat({bias_grad(grad_q), bias_grad(grad_kv)}, 0);

  auto [grad_x, grad_ln_weight, grad_ln_bias] =
      Backend::layer_norm_backward(grad_normed, x, mean, rstd, p.ln_weight);
  grad_x.narrow(1, 0, n_keep).add_(grad_out);
  return {grad_x,          grad_ln_weight,   grad_ln_bias,  grad_qkv_weight,
          grad_qkv_bias,   grad_proj_weight, grad_proj_bias};
}

// FC2(GELU(FC1(LN2(x)) + bias)) without FC2's bias, and FC1's output before bias.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> mlp_core(const at::Tensor& x, const MlpParams& p, double eps,
                                            bool keep_pre) {
  const auto normed = std::get<0>(Backend::layer_norm(x, p.ln_weight, p.ln_bias, eps));
  auto pre = Backend::linear(normed, p.fc1_weight, std::nullopt);
  auto hidden = keep_pre ? pre.clone() : pre;
  Backend::bias_gelu_(hidden, p.fc1_bias);
  return {Backend::linear(hidden, p.fc2_weight, std::nullopt), keep_pre ? pre : at::Tensor()};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> pruned_mlp(const at::Tensor& x, const MlpParams& p, double eps) {
  check_mlp(x, p, "pruned_mlp");
  Backend::check_dtype(x, "pruned_mlp");
  auto [out, pre] = mlp_core<Backend>(x, p, eps, /*keep_pre=*/true);
  Backend::bias_residual_(out, p.fc2_bias, x);
  return {out, pre};
}

template <typename Backend>
void pruned_mlp_(const at::Tensor& x, const MlpParams& p, double eps) {
  check_mlp(x, p, "pruned_mlp_");
  Backend::check_dtype(x, "pruned_mlp_");
  check_writable(x,
                 {{"ln_weight", &p.ln_weight},
                  {"ln_bias", &p.ln_bias},
                  {"fc1_weight", &p.fc1_weight},
                  {"fc1_bias", &p.fc1_bias},
                  {"fc2_weight", &p.fc2_weight},
                  {"fc2_bias", &p.fc2_bias}},
                 "pruned_mlp_");
  const auto out = std::get<0>(mlp_core<Backend>(x, p, eps, /*keep_pre=*/false));
  Backend::bias_residual_(x, p.fc2_bias, out);
}

// pruned_mlp's first output alone (FC1's pre-activation not kept).
template <typename Backend>
at::Tensor pruned_mlp_inference(const at::Tensor& x, const MlpParams& p, double eps) {
  check_mlp(x, p, "pruned_mlp_inference");
  Backend::check_dtype(x, "pruned_mlp_inference");
  auto out = std::get<0>(mlp_core<Backend>(x, p, eps, /*keep_pre=*/false));
  Backend::bias_residual_(out, p.fc2_bias, x);
  return out;
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pruned_mlp_backward(const at::Tensor& grad_out_arg, const at::Tensor& x, const MlpParams& p,
                    double eps, const at::Tensor& pre_arg) {
  constexpr const char* op = "pruned_mlp_backward";
  check_mlp(x, p, op);
  Backend::check_dtype(x, op);
  check_param(grad_out_arg, x, x.sizes(), op, "grad_out", "(B, n, C)");
  check_param(pre_arg, x, {x.size(0), x.size(1), p.fc1_weight.size(0)}, op, "pre", "(B, n, D)");
  // The row kernels read pre and write a clone of it with a contiguous channel dim.
  const auto pre = pre_arg.contiguous();
  const auto grad_out = grad_out_arg.contiguous();
  const auto [normed, mean, rstd] = Backend::layer_norm(x, p.ln_weight, p.ln_bias, eps);
  auto hidden = pre.clone();
  Backend::bias_gelu_(hidden, p.fc1_bias);

  const auto grad_fc2_weight = weight_grad(grad_out, hidden);
  const auto grad_fc2_bias = bias_grad(grad_out);
  auto grad_pre = at::matmul(grad_out, p.fc2_weight);
  Backend::bias_gelu_backward_(grad_pre, pre, p.fc1_bias);
  const auto grad_fc1_weight = weight_grad(grad_pre, normed);
  const auto grad_fc1_bias = bias_grad(grad_pre);
  const auto grad_normed = at::matmul(grad_pre, p.fc1_weight);
  auto [grad_x, grad_ln_weight, grad_ln_bias] =
      Backend::layer_norm_backward(grad_normed, x, mean, rstd, p.ln_weight);
  grad_x.add_(grad_out);
  return {grad_x,          grad_ln_weight,  grad_ln_bias,  grad_fc1_weight,
          grad_fc1_bias,   grad_fc2_weight, grad_fc2_bias};
}

using Grads7 =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The ops with their schema's flat signatures, for TORCH_LIBRARY_IMPL.
template <typename Backend>
struct Ops {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> msa(
      const at::Tensor& x, int64_t n_keep, int64_t heads, const at::Tensor& ln_w,
      const at::Tensor& ln_b, const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
      const at::Tensor& proj_w, const at::Tensor& proj_b, double eps,
      std::optional<double> scale) {
    return pruned_msa<Backend>(x, n_keep, heads, {ln_w, ln_b, qkv_w, qkv_b, proj_w, proj_b}, eps,
                               scale);
  }
  static void msa_(const at::Tensor& x, int64_t n_keep, int64_t heads, const at::Tensor& ln_w,
                   const at::Tensor& ln_b, const at::Tensor& qkv_w,
                   const std::optional<at::Tensor>& qkv_b, const at::Tensor& proj_w,
                   const at::Tensor& proj_b, double eps, std::optional<double> scale) {
    pruned_msa_<Backend>(x, n_keep, heads, {ln_w, ln_b, qkv_w, qkv_b, proj_w, proj_b}, eps, scale);
  }
  static at::Tensor msa_inference(const at::Tensor& x, int64_t n_keep, int64_t heads,
                                  const at::Tensor& ln_w, const at::Tensor& ln_b,
                                  const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
                                  const at::Tensor& proj_w, const at::Tensor& proj_b, double eps,
                                  std::optional<double> scale) {
    return pruned_msa_inference<Backend>(x, n_keep, heads,
                                         {ln_w, ln_b, qkv_w, qkv_b, proj_w, proj_b}, eps, scale);
  }
  static Grads7 msa_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attn,
                             const at::Tensor& x, int64_t n_keep, int64_t heads,
                             const at::Tensor& ln_w, const at::Tensor& ln_b, const at::Tensor& qkv_w,
                             const std::optional<at::Tensor>& qkv_b, const at::Tensor& proj_w,
                             const at::Tensor& proj_b, double eps, const at::Tensor& attn,
                             const at::Tensor& q, const at::Tensor& kv, const at::Tensor& context,
                             std::optional<double> scale) {
    return pruned_msa_backward<Backend>(grad_out, grad_attn, x, n_keep, heads,
                                        {ln_w, ln_b, qkv_w, qkv_b, proj_w, proj_b}, eps, attn, q,
                                        kv, context, scale);
  }
  static std::tuple<at::Tensor, at::Tensor> mlp(const at::Tensor& x, const at::Tensor& ln_w,
                                                const at::Tensor& ln_b,
                        const at::Tensor& fc1_w, const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                        const at::Tensor& fc2_b, double eps) {
    return pruned_mlp<Backend>(x, {ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b}, eps);
  }
  static void mlp_(const at::Tensor& x, const at::Tensor& ln_w, const at::Tensor& ln_b,
                   const at::Tensor& fc1_w, const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                   const at::Tensor& fc2_b, double eps) {
    pruned_mlp_<Backend>(x, {ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b}, eps);
  }
  static at::Tensor mlp_inference(const at::Tensor& x, const at::Tensor& ln_w,
                                  const at::Tensor& ln_b, const at::Tensor& fc1_w,
                                  const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                                  const at::Tensor& fc2_b, double eps) {
    return pruned_mlp_inference<Backend>(x, {ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b}, eps);
  }
  static Grads7 mlp_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& ln_w,
                             const at::Tensor& ln_b, const at::Tensor& fc1_w,
                             const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                             const at::Tensor& fc2_b, double eps, const at::Tensor& pre) {
    return pruned_mlp_backward<Backend>(grad_out, x, {ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b}, eps,
                                        pre);
  }

  static void register_kernels(torch::Library& m) {
    m.impl("pruned_msa", &msa);
    m.impl("pruned_msa_", &msa_);
    m.impl("pruned_msa_inference", &msa_inference);
    m.impl("pruned_msa_backward", &msa_backward);
    m.impl("pruned_mlp", &mlp);
    m.impl("pruned_mlp_", &mlp_);
    m.impl("pruned_mlp_inference", &mlp_inference);
    m.impl("pruned_mlp_backward", &mlp_backward);
  }
};

}  // namespace patchslim::block
