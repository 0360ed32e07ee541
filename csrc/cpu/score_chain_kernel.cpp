// CPU backend of the scoring ops: the op bodies (checks, ATen/MKL GEMMs) are in
// common/score_ops.h; the reductions after the GEMMs are the ISA kernels in
// isa/score_reductions.h.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "common/score_ops.h"
#include "cpu/cpu_dispatch.h"
#include "cpu/kernels.h"

namespace patchslim {
namespace {

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, cpu::kElementsPerTask / std::max<int64_t>(1, work_per_item));
}

struct CpuScoring {
  static void check_dtype(const at::Tensor& t, const char* op) { cpu::check_cpu_dtype(t, op); }

  static at::Tensor column_dot(const at::Tensor& x, const at::Tensor& y) {
    const int64_t B = x.size(0);
    const int64_t K_rows = x.size(1);
    const int64_t N = x.size(2);
    // Accumulated in place: in float32 for bfloat16 and float16 inputs, cast at the end.
    auto out = at::empty({B, N}, x.options().dtype(cpu::accumulate_dtype(x.scalar_type())));
    if (out.numel() == 0) return out.to(x.scalar_type());
    const auto isa = cpu::checked_cpu_isa();
    PATCHSLIM_DISPATCH_CPU(x.scalar_type(), "column_dot_cpu", [&] {
      using K = cpu::kernel_t<scalar_t>;
      const cpu::ColumnDotArgs<K> args{cpu::data_of<scalar_t>(x),
                                       cpu::data_of<scalar_t>(y),
                                       out.mutable_data_ptr<cpu::acc_t<K>>(),
                                       K_rows,
                                       N,
                                       x.stride(0),
                                       x.stride(1),
                                       y.stride(0),
                                       y.stride(1)};
      const auto& kernels = cpu::kernels_for<K>(isa);
      at::parallel_for(0, B, grain_for(K_rows * N),
                       [&](int64_t begin, int64_t end) { kernels.column_dot(args, begin, end); });
    });
    return out.to(x.scalar_type());
  }

  static at::Tensor row_dot(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale) {
    const int64_t B = x.size(0);
    const int64_t H = x.size(1);
    const int64_t N = x.size(2);
    const int64_t D = x.size(3);
    auto out = at::empty({B, N}, x.options());
    if (out.numel() == 0) return out;
    const auto scale_c = scale.contiguous();
    const auto isa = cpu::checked_cpu_isa();
    PATCHSLIM_DISPATCH_CPU(x.scalar_type(), "row_dot_cpu", [&] {
      using K = cpu::kernel_t<scalar_t>;
      const cpu::RowDotArgs<K> args{cpu::data_of<scalar_t>(x),
                                           cpu::data_of<scalar_t>(y),
                                           cpu::data_of<scalar_t>(scale_c),
                                           cpu::mutable_data_of<scalar_t>(out),
                                           H,
                                           N,
                                           D,
                                           {x.stride(0), x.stride(1), x.stride(2)},
                                           {y.stride(0), y.stride(1), y.stride(2)}};
      const auto& kernels = cpu::kernels_for<K>(isa);
      at::parallel_for(0, B * N, grain_for(H * D),
                       [&](int64_t begin, int64_t end) { kernels.row_dot(args, begin, end); });
    });
    return out;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(patchslim, CPU, m) {
  m.impl("score_chain_step", &scoring::score_chain_step<CpuScoring>);
  m.impl("score_factor_step", &scoring::score_factor_step<CpuScoring>);
  m.impl("score_chain_diagonal", &scoring::score_chain_diagonal<CpuScoring>);
  m.impl("patch_scores", &scoring::patch_scores<CpuScoring>);
}

}  // namespace patchslim
