// Schemas of every patchslim operator. Backend kernels register themselves in
// csrc/cpu/*_kernel.cpp and csrc/cuda/*_cuda.cpp; fake (meta) kernels and
// autograd formulas are registered from Python in patchslim_ext.ops.

#include <torch/library.h>

TORCH_LIBRARY(patchslim, m) {
  // Each group of ops names the Python module that registers its fake kernels,
  // so that C++-only users are told what to import.
  m.set_python_module("patchslim_ext.ops.layer_norm");

  // LayerNorm over the first n_rows rows of each image:
  //   input (B, N, C), weight (C,), bias (C,) -> out (B, n_rows, C), mean (B, n_rows), rstd (B, n_rows)
  m.def(
      "prefix_layer_norm(Tensor input, SymInt n_rows, Tensor weight, Tensor bias, float eps)"
      " -> (Tensor, Tensor, Tensor)");
  //   grad_out (B, n_rows, C) -> grad_input (B, N, C; rows >= n_rows are zero), grad_weight (C,), grad_bias (C,)
  m.def(
      "prefix_layer_norm_backward(Tensor grad_out, Tensor input, SymInt n_rows, Tensor mean,"
      " Tensor rstd, Tensor weight) -> (Tensor, Tensor, Tensor)");

  // Eq. 13 scores through the second-moment chain S_{l-1} = Σ_h P_hᵀ S_l[:n, :n] P_h
  // (P = attention probabilities on the n kept rows). Not differentiable.
  m.set_python_module("patchslim_ext.ops.scoring");
  //   S (B, M, M) with M >= n, attn (B, H, n, N) -> (B, n_out, n_out): the top-left
  //   n_out x n_out block of the next S (n_out = N for all of it).
  m.def("score_chain_step(Tensor S, Tensor attn, SymInt n_out) -> Tensor");
  //   The same step on a factor, S = Fᵀ F: F (B, R, M) with M >= n -> (B, H*R, n_out).
  m.def("score_factor_step(Tensor F, Tensor attn, SymInt n_out) -> Tensor");
  //   diag of the next S over all N tokens without forming it: state is S (B, M, M) or,
  //   with factored=True, F (B, R, M); attn (B, H, n, N) -> (B, N).
  m.def("score_chain_diagonal(Tensor state, Tensor attn, bool factored) -> Tensor");
  //   s = s_diag * Σ_h ‖(P_h |Z|)[i, :]‖²: s_diag (B, N), attn (B, H, N, N), z_in (B, N, C) -> (B, N).
  m.def("patch_scores(Tensor s_diag, Tensor attn, Tensor z_in) -> Tensor");

  // The pruned block (paper Eq. 2): block input x (B, N, C), kept rows [0, n_keep).
  m.set_python_module("patchslim_ext.ops.pruned_block");
  //   MSA sub-layer -> (x[:, :n] + Proj(Attn(LN1(x)[:, :n], LN1(x), LN1(x))) (B, n, C),
  //                     attention probabilities (B, H, n, N),
  //                     and, for the backward, q (B, n, C), kv (B, N, 2C), context (B, n, C)).
  //   qkv_bias None: the projection has no bias (T2T-ViT, timm's qkv_bias=False).
  //   scale None: logits are scaled by 1/sqrt(head_dim).
  m.def(
      "pruned_msa(Tensor x, SymInt n_keep, int num_heads, Tensor ln_weight, Tensor ln_bias,"
      " Tensor qkv_weight, Tensor? qkv_bias, Tensor proj_weight, Tensor proj_bias, float eps,"
      " float? scale=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  //   The same, updating x[:, :n_keep] in place (inference).
  m.def(
      "pruned_msa_(Tensor(a!) x, SymInt n_keep, int num_heads, Tensor ln_weight, Tensor ln_bias,"
      " Tensor qkv_weight, Tensor? qkv_bias, Tensor proj_weight, Tensor proj_bias, float eps,"
      " float? scale=None) -> ()");
  //   The updated rows alone (B, n_keep, C), without the probabilities or the activations
  //   the backward reads (inference; not differentiable). torch.compile and torch.export
  //   record pruned_msa_ as this op and a copy into x's prefix.
  m.def(
      "pruned_msa_inference(Tensor x, SymInt n_keep, int num_heads, Tensor ln_weight,"
      " Tensor ln_bias, Tensor qkv_weight, Tensor? qkv_bias, Tensor proj_weight,"
      " Tensor proj_bias, float eps, float? scale=None) -> Tensor");
  //   -> grads of x, ln_weight, ln_bias, qkv_weight, qkv_bias, proj_weight, proj_bias
  //   (without a qkv_bias, the (3C,) gradient a zero bias would get).
  m.def(
      "pruned_msa_backward(Tensor grad_out, Tensor? grad_attn, Tensor x, SymInt n_keep,"
      " int num_heads, Tensor ln_weight, Tensor ln_bias, Tensor qkv_weight, Tensor? qkv_bias,"
      " Tensor proj_weight, Tensor proj_bias, float eps, Tensor attn, Tensor q, Tensor kv,"
      " Tensor context, float? scale=None)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  //   MLP sub-layer on the kept rows x (B, n, C) -> (x + FC2(GELU(FC1(LN2(x)))),
  //                                                  FC1's output before bias (B, n, D)).
  m.def(
      "pruned_mlp(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight, Tensor fc1_bias,"
      " Tensor fc2_weight, Tensor fc2_bias, float eps) -> (Tensor, Tensor)");
  m.def(
      "pruned_mlp_(Tensor(a!) x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight,"
      " Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, float eps) -> ()");
  //   The first output of pruned_mlp alone (inference; what pruned_mlp_ is recorded as).
  m.def(
      "pruned_mlp_inference(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight,"
      " Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, float eps) -> Tensor");
  //   -> grads of x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias.
  m.def(
      "pruned_mlp_backward(Tensor grad_out, Tensor x, Tensor ln_weight, Tensor ln_bias,"
      " Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, float eps,"
      " Tensor pre) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
