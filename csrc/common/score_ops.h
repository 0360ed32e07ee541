#pragma once

// The ATen side of the scoring ops, shared by the CPU and CUDA backends: argument
// checks and the GEMM-shaped products (MKL/oneDNN or cuBLAS through at::matmul).
// The reductions that follow them are each backend's own kernels.

#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/matmul.h>
#include <c10/util/Exception.h>

namespace patchslim::scoring {

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have attn's dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on attn's device ",
              ref.device(), ", got ", t.device());
}

// attn (B, H, n, N) with n >= 1 kept rows and n <= N.
inline void check_attn(const at::Tensor& attn, const char* op) {
  TORCH_CHECK(attn.dim() == 4, op, ": attn must have shape (B, H, n, N), got ", attn.sizes());
  check_float(attn, op, "attn");
  TORCH_CHECK(attn.size(2) <= attn.size(3), op, ": attn has n=", attn.size(2),
              " kept rows but only N=", attn.size(3), " tokens; expected n <= N");
}

// The chain state: S (B, M, M) or a factor F (B, R, M), with M >= n.
inline void check_state(const at::Tensor& state, const at::Tensor& attn, bool factored,
                        const char* op) {
  const char* name = factored ? "F" : "S";
  const int64_t B = attn.size(0);
  const int64_t n = attn.size(2);
  TORCH_CHECK(state.dim() == 3, op, ": ", name, " must have shape ",
              factored ? "(B, R, M)" : "(B, M, M)", " with B=", B, " and M >= n=", n, ", got ",
              state.sizes());
  TORCH_CHECK(state.size(0) == B, op, ": ", name, " has batch ", state.size(0),
              " but attn has B=", B);
  TORCH_CHECK(factored || state.size(1) == state.size(2), op,
              ": S must be square, (B, M, M), got ", state.sizes());
  TORCH_CHECK(state.size(2) >= n, op, ": ", name, " covers M=", state.size(2),
              " tokens but attn has n=", n, " kept rows; expected M >= n");
  check_same(state, attn, op, name);
}

inline void check_n_out(int64_t n_out, const at::Tensor& attn, const char* op) {
  TORCH_CHECK(n_out >= 0 && n_out <= attn.size(3), op, ": n_out must be in [0, N=", attn.size(3),
              "], got ", n_out);
}

// H*n: the kept rows of every head stacked, the K of the head-summed GEMMs.
inline int64_t stacked_rows(const at::Tensor& attn) { return attn.size(1) * attn.size(2); }

// T_h = S[:n, :n] P_h[:, :cols] for every head: (B, H, n, cols).
inline at::Tensor chain_products(const at::Tensor& S, const at::Tensor& attn, int64_t cols) {
  const int64_t n = attn.size(2);
  return at::matmul(S.narrow(1, 0, n).narrow(2, 0, n).unsqueeze(1), attn.narrow(3, 0, cols));
}

// (F[:, :, :n] P_h[:, :cols]) for every head, stacked along the rows: (B, H*R, cols).
inline at::Tensor factor_products(const at::Tensor& F, const at::Tensor& attn, int64_t cols) {
  const int64_t n = attn.size(2);
  const auto G = at::matmul(F.narrow(2, 0, n).unsqueeze(1), attn.narrow(3, 0, cols));
  return G.reshape({attn.size(0), attn.size(1) * F.size(1), cols});
}

// Σ_h P_h[:, :n_out]ᵀ T_h as one GEMM over all heads: K = H*n.
inline at::Tensor chain_step(const at::Tensor& S, const at::Tensor& attn, int64_t n_out) {
  const auto rows = stacked_rows(attn);
  const auto T = chain_products(S, attn, n_out).reshape({attn.size(0), rows, n_out});
  const auto P = attn.narrow(3, 0, n_out).reshape({attn.size(0), rows, n_out});
  return at::bmm(P.transpose(1, 2), T);
}

}  // namespace patchslim::scoring
