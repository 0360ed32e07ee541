#pragma once

// The ATen side of the scoring ops, shared by the CPU and CUDA backends: argument
// checks and the GEMM-shaped products (MKL/oneDNN or cuBLAS through at::matmul).
// The reductions that follow them are each backend's own kernels.

#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
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

// The four ops, written once. `Backend` supplies the reductions:
//   static void check_dtype(const at::Tensor&, const char* op);
//   static at::Tensor column_dot(x (B, K, N), y (B, K, N));           // Σ_k x·y -> (B, N)
//   static at::Tensor row_dot(x (B, H, N, D), y (B, H, N, D), scale);  // scale·Σ_h Σ_d x·y -> (B, N)
// Both take inputs whose last dimension is contiguous.
template <typename Backend>
at::Tensor score_chain_step(const at::Tensor& S, const at::Tensor& attn, int64_t n_out) {
  constexpr const char* op = "score_chain_step";
  check_attn(attn, op);
  check_state(S, attn, /*factored=*/false, op);
  check_n_out(n_out, attn, op);
  Backend::check_dtype(attn, op);
  return chain_step(S, attn, n_out);
}

template <typename Backend>
at::Tensor score_factor_step(const at::Tensor& F, const at::Tensor& attn, int64_t n_out) {
  constexpr const char* op = "score_factor_step";
  check_attn(attn, op);
  check_state(F, attn, /*factored=*/true, op);
  check_n_out(n_out, attn, op);
  Backend::check_dtype(attn, op);
  return factor_products(F, attn, n_out);
}

template <typename Backend>
at::Tensor score_chain_diagonal(const at::Tensor& state, const at::Tensor& attn, bool factored) {
  constexpr const char* op = "score_chain_diagonal";
  check_attn(attn, op);
  check_state(state, attn, factored, op);
  Backend::check_dtype(attn, op);
  const int64_t N = attn.size(3);
  if (factored) {
    const auto G = factor_products(state, attn, N);
    return Backend::column_dot(G, G);
  }
  const int64_t B = attn.size(0);
  const int64_t rows = stacked_rows(attn);
  const auto T = chain_products(state, attn, N).reshape({B, rows, N});
  return Backend::column_dot(attn.contiguous().view({B, rows, N}), T);
}

template <typename Backend>
at::Tensor patch_scores(const at::Tensor& s_diag, const at::Tensor& attn, const at::Tensor& z_in) {
  constexpr const char* op = "patch_scores";
  check_attn(attn, op);
  Backend::check_dtype(attn, op);
  const int64_t B = attn.size(0);
  const int64_t H = attn.size(1);
  const int64_t N = attn.size(3);
  TORCH_CHECK(attn.size(2) == N, op, ": attn must be block t's full map (B, H, N, N), got ",
              attn.sizes());
  TORCH_CHECK(s_diag.dim() == 2 && s_diag.size(0) == B && s_diag.size(1) == N, op,
              ": s_diag must have shape (B, N) = (", B, ", ", N, "), got ", s_diag.sizes());
  TORCH_CHECK(z_in.dim() == 3 && z_in.size(0) == B && z_in.size(1) == N, op,
              ": z_in must have shape (B, N, C) with (B, N) = (", B, ", ", N, "), got ",
              z_in.sizes());
  check_same(s_diag, attn, op, "s_diag");
  check_same(z_in, attn, op, "z_in");
  const int64_t C = z_in.size(2);
  const auto z_abs = at::abs(z_in);
  // Σ_h ‖P_h[i] |Z|‖² directly costs H·N²·C; through the Gram matrix G = |Z||Z|ᵀ
  // it is Σ_h p_iᵀ G p_i, costing N²·C + H·N³. Take the cheaper.
  if (N * C + H * N * N < H * N * C) {
    const auto gram = at::bmm(z_abs, z_abs.transpose(1, 2));
    const auto weighted = at::matmul(attn, gram.unsqueeze(1));
    return Backend::row_dot(weighted, attn.stride(3) == 1 ? attn : attn.contiguous(), s_diag);
  }
  const auto U = at::matmul(attn, z_abs.unsqueeze(1));
  return Backend::row_dot(U, U, s_diag);
}

}  // namespace patchslim::scoring
