// CUDA backend of the scoring ops: the op bodies (checks, cuBLAS GEMMs through
// ATen) are in common/score_ops.h; the reductions are score_chain_kernel.cu.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/score_ops.h"
#include "cuda/launchers.h"
#include "cuda/torch_glue.h"

namespace patchslim::cuda {
namespace {

struct CudaScoring {
  static void check_dtype(const at::Tensor& t, const char* op) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": CUDA supports float32 inputs, got ",
                t.scalar_type());
  }

  static at::Tensor column_dot(const at::Tensor& x, const at::Tensor& y) {
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t B = x.size(0);
    TORCH_CHECK(B <= 65535, "score_chain_diagonal: CUDA supports batches up to 65535, got ", B);
    auto out = at::empty({B, x.size(2)}, x.options());
    check_launch(patchslim::cuda::column_dot(x.const_data_ptr<float>(), y.const_data_ptr<float>(),
                                  out.mutable_data_ptr<float>(), B, x.size(1), x.size(2),
                                  x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                                  at::cuda::getCurrentCUDAStream()),
                 "column_dot");
    return out;
  }

  static at::Tensor row_dot(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale) {
    const c10::cuda::CUDAGuard guard(x.device());
    const auto scale_c = scale.contiguous();
    auto out = at::empty({x.size(0), x.size(2)}, x.options());
    const int64_t x_strides[3] = {x.stride(0), x.stride(1), x.stride(2)};
    const int64_t y_strides[3] = {y.stride(0), y.stride(1), y.stride(2)};
    check_launch(patchslim::cuda::row_dot(x.const_data_ptr<float>(), y.const_data_ptr<float>(),
                               scale_c.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                               x.size(0), x.size(1), x.size(2), x.size(3), x_strides, y_strides,
                               at::cuda::getCurrentCUDAStream()),
                 "row_dot");
    return out;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(patchslim, CUDA, m) {
  m.impl("score_chain_step", &scoring::score_chain_step<CudaScoring>);
  m.impl("score_factor_step", &scoring::score_factor_step<CudaScoring>);
  m.impl("score_chain_diagonal", &scoring::score_chain_diagonal<CudaScoring>);
  m.impl("patch_scores", &scoring::patch_scores<CudaScoring>);
}

}  // namespace patchslim::cuda
