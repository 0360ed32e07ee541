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
}
