#pragma once

// The ATen side of the scoring ops, shared by the CPU and CUDA backends: argument
// checks and the GEMM-shaped products (MKL/oneDNN or cuBLAS through at::bmm).
// The reductions that follow them are each backend's own kernels.

#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/bmm.h>
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

// attn[..., :cols] laid out as (B, n, H, cols), heads inside rows: one copy that
// turns the per-head products into two large GEMMs,
//   S[:n, :n] · [P_1 | … | P_H]       (M = n, K = n, N = H·cols), and
//   Σ_h P_hᵀ T_h over K = n·H          (the (n, H) rows of both operands merge),
// instead of B·H small ones with S broadcast over the heads.
inline at::Tensor heads_inner(const at::Tensor& attn, int64_t cols) {
  return attn.narrow(3, 0, cols).permute({0, 2, 1, 3}).contiguous();
}

// (B, n, H, cols) as (B, n, H·cols): the heads side by side, a view.
inline at::Tensor merge_columns(const at::Tensor& inner) {
  return inner.view({inner.size(0), inner.size(1), inner.size(2) * inner.size(3)});
}

// T = S[:n, :n] [P_1 | … | P_H] as (B, n, H, cols); `inner` is heads_inner(attn, cols).
inline at::Tensor chain_products(const at::Tensor& S, const at::Tensor& inner) {
  const int64_t n = inner.size(1);
  return at::bmm(S.narrow(1, 0, n).narrow(2, 0, n), merge_columns(inner)).view(inner.sizes());
}

// Rows (n, H) of a (B, n, H, cols) tensor merged: (B, n·H, cols), a view.
inline at::Tensor merge_rows(const at::Tensor& t) {
  return t.view({t.size(0), t.size(1) * t.size(2), t.size(3)});
}

// F[:, :, :n] [P_1 | … | P_H]: (B, R·H, cols), rows (r, h); S = Fᵀ F is unchanged by
// the order of the rows.
inline at::Tensor factor_products(const at::Tensor& F, const at::Tensor& attn, int64_t cols) {
  const auto inner = heads_inner(attn, cols);
  const auto G = at::bmm(F.narrow(2, 0, inner.size(1)), merge_columns(inner));
  return G.view({inner.size(0), F.size(1) * inner.size(2), cols});
}

// Σ_h P_h[:, :n_out]ᵀ S[:n, :n] P_h[:, :n_out].
inline at::Tensor chain_step(const at::Tensor& S, const at::Tensor& attn, int64_t n_out) {
  const auto inner = heads_inner(attn, n_out);
  const auto T = chain_products(S, inner);
  return at::bmm(merge_rows(inner).transpose(1, 2), merge_rows(T));
}

// (B, H, N, N) maps times a per-image (B, N, D) matrix, one bmm over the stacked
// (h, i) rows: (B, H, N, D).
inline at::Tensor per_head_products(const at::Tensor& attn, const at::Tensor& right) {
  const int64_t B = attn.size(0);
  const int64_t H = attn.size(1);
  const int64_t N = attn.size(2);
  return at::bmm(attn.reshape({B, H * N, attn.size(3)}), right).view({B, H, N, right.size(2)});
}

// The four ops, written once. `Backend` supplies the reductions:
//   static void check_dtype(const at::Tensor&, const char* op);
//   static at::Tensor column_dot(x (B, K, N), y (B, K, N));           // Σ_k x·y -> (B, N)
//   static at::Tensor row_dot(x (B, H, N, D), y (B, H, N, D), scale);  // scale·Σ_h Σ_d x·y -> (B, N)
// Both take inputs whose last dimension is contiguous.
template <typename Backend>
void check_step(const at::Tensor& state, const at::Tensor& attn, int64_t n_out, bool factored,
                const char* op) {
  check_attn(attn, op);
  check_state(state, attn, factored, op);
  check_n_out(n_out, attn, op);
  Backend::check_dtype(attn, op);
}

template <typename Backend>
at::Tensor score_chain_step(const at::Tensor& S, const at::Tensor& attn, int64_t n_out) {
  check_step<Backend>(S, attn, n_out, /*factored=*/false, "score_chain_step");
  return chain_step(S, attn, n_out);
}

template <typename Backend>
at::Tensor score_factor_step(const at::Tensor& F, const at::Tensor& attn, int64_t n_out) {
  check_step<Backend>(F, attn, n_out, /*factored=*/true, "score_factor_step");
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
  const auto inner = heads_inner(attn, N);
  return Backend::column_dot(merge_rows(inner), merge_rows(chain_products(state, inner)));
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
    const auto weighted = per_head_products(attn, at::bmm(z_abs, z_abs.transpose(1, 2)));
    return Backend::row_dot(weighted, attn.stride(3) == 1 ? attn : attn.contiguous(), s_diag);
  }
  const auto U = per_head_products(attn, z_abs);
  return Backend::row_dot(U, U, s_diag);
}

}  // namespace patchslim::scoring
