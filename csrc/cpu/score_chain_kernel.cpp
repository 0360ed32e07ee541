// CPU kernels of the scoring ops: score_chain_step, score_factor_step,
// score_chain_diagonal and patch_scores. GEMMs go through ATen (MKL); the
// reductions after them are the ISA kernels in isa/score_reductions.h.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "common/score_ops.h"
#include "cpu/cpu_dispatch.h"
#include "cpu/kernels.h"

namespace patchslim {
namespace {

using namespace scoring;

// (B, K, N) x (B, K, N) -> (B, N), Σ over K. Inputs need a contiguous last dim.
at::Tensor column_dot_cpu(const at::Tensor& x, const at::Tensor& y) {
  const int64_t B = x.size(0);
  const int64_t K = x.size(1);
  const int64_t N = x.size(2);
  auto out = at::empty({B, N}, x.options());
  if (out.numel() == 0) return out;
  const auto isa = cpu::checked_cpu_isa();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "column_dot_cpu", [&] {
    const cpu::ColumnDotArgs<scalar_t> args{x.const_data_ptr<scalar_t>(),
                                            y.const_data_ptr<scalar_t>(),
                                            out.mutable_data_ptr<scalar_t>(),
                                            K,
                                            N,
                                            x.stride(0),
                                            x.stride(1),
                                            y.stride(0),
                                            y.stride(1)};
    const auto& kernels = cpu::kernels_for<scalar_t>(isa);
    at::parallel_for(0, B, std::max<int64_t>(1, cpu::kElementsPerTask / std::max<int64_t>(1, K * N)),
                     [&](int64_t begin, int64_t end) { kernels.column_dot(args, begin, end); });
  });
  return out;
}

// (B, H, N, D) x (B, H, N, D), scale (B, N) -> (B, N). Inputs need a contiguous last dim.
at::Tensor row_dot_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale) {
  const int64_t B = x.size(0);
  const int64_t H = x.size(1);
  const int64_t N = x.size(2);
  const int64_t D = x.size(3);
  auto out = at::empty({B, N}, x.options());
  if (out.numel() == 0) return out;
  const auto scale_c = scale.contiguous();
  const auto isa = cpu::checked_cpu_isa();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_dot_cpu", [&] {
    const cpu::RowDotArgs<scalar_t> args{x.const_data_ptr<scalar_t>(),
                                         y.const_data_ptr<scalar_t>(),
                                         scale_c.const_data_ptr<scalar_t>(),
                                         out.mutable_data_ptr<scalar_t>(),
                                         H,
                                         N,
                                         D,
                                         {x.stride(0), x.stride(1), x.stride(2)},
                                         {y.stride(0), y.stride(1), y.stride(2)}};
    const auto& kernels = cpu::kernels_for<scalar_t>(isa);
    at::parallel_for(0, B * N, std::max<int64_t>(1, cpu::kElementsPerTask / std::max<int64_t>(1, H * D)),
                     [&](int64_t begin, int64_t end) { kernels.row_dot(args, begin, end); });
  });
  return out;
}

at::Tensor score_chain_step_cpu(const at::Tensor& S, const at::Tensor& attn, int64_t n_out) {
  constexpr const char* op = "score_chain_step";
  check_attn(attn, op);
  check_state(S, attn, /*factored=*/false, op);
  check_n_out(n_out, attn, op);
  cpu::check_cpu_dtype(attn, op);
  return chain_step(S, attn, n_out);
}

at::Tensor score_factor_step_cpu(const at::Tensor& F, const at::Tensor& attn, int64_t n_out) {
  constexpr const char* op = "score_factor_step";
  check_attn(attn, op);
  check_state(F, attn, /*factored=*/true, op);
  check_n_out(n_out, attn, op);
  cpu::check_cpu_dtype(attn, op);
  return factor_products(F, attn, n_out);
}

at::Tensor score_chain_diagonal_cpu(const at::Tensor& state, const at::Tensor& attn, bool factored) {
  constexpr const char* op = "score_chain_diagonal";
  check_attn(attn, op);
  check_state(state, attn, factored, op);
  cpu::check_cpu_dtype(attn, op);
  const int64_t B = attn.size(0);
  const int64_t N = attn.size(3);
  if (factored) {
    const auto G = factor_products(state, attn, N);
    return column_dot_cpu(G, G);
  }
  const int64_t rows = stacked_rows(attn);
  const auto T = chain_products(state, attn, N).reshape({B, rows, N});
  return column_dot_cpu(attn.contiguous().view({B, rows, N}), T);
}

at::Tensor patch_scores_cpu(const at::Tensor& s_diag, const at::Tensor& attn, const at::Tensor& z_in) {
  constexpr const char* op = "patch_scores";
  check_attn(attn, op);
  cpu::check_cpu_dtype(attn, op);
  const int64_t B = attn.size(0);
  const int64_t H = attn.size(1);
  const int64_t N = attn.size(3);
  TORCH_CHECK(attn.size(2) == N, op, ": attn must be block t's full map (B, H, N, N), got ",
              attn.sizes());
  TORCH_CHECK(s_diag.dim() == 2 && s_diag.size(0) == B && s_diag.size(1) == N, op,
              ": s_diag must have shape (B, N) = (", B, ", ", N, "), got ", s_diag.sizes());
  TORCH_CHECK(z_in.dim() == 3 && z_in.size(0) == B && z_in.size(1) == N, op,
              ": z_in must have shape (B, N, C) with (B, N) = (", B, ", ", N, "), got ", z_in.sizes());
  check_same(s_diag, attn, op, "s_diag");
  check_same(z_in, attn, op, "z_in");
  const int64_t C = z_in.size(2);
  const auto z_abs = at::abs(z_in);
  // Σ_h ‖P_h[i] |Z|‖² directly costs H·N²·C; through the Gram matrix G = |Z||Z|ᵀ
  // it is p_iᵀ G p_i, costing N²·C + H·N³. Take the cheaper.
  if (N * C + H * N * N < H * N * C) {
    const auto gram = at::bmm(z_abs, z_abs.transpose(1, 2));
    const auto weighted = at::matmul(attn, gram.unsqueeze(1));
    return row_dot_cpu(weighted, attn.stride(3) == 1 ? attn : attn.contiguous(), s_diag);
  }
  const auto U = at::matmul(attn, z_abs.unsqueeze(1));
  return row_dot_cpu(U, U, s_diag);
}

}  // namespace

TORCH_LIBRARY_IMPL(patchslim, CPU, m) {
  m.impl("score_chain_step", &score_chain_step_cpu);
  m.impl("score_factor_step", &score_factor_step_cpu);
  m.impl("score_chain_diagonal", &score_chain_diagonal_cpu);
  m.impl("patch_scores", &patch_scores_cpu);
}

}  // namespace patchslim
