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
}
