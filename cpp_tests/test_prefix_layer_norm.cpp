// prefix_layer_norm through the dispatcher, on every CPU ISA this machine has,
// against ATen's layer norm and its backward.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>

#include "common/cpu_isa.h"

namespace {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

int failures = 0;
int passes = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  const bool ok = got.sizes() == want.sizes() && at::allclose(got, want, tol, tol);
  if (ok) {
    ++passes;
  } else {
    ++failures;
    const double diff = got.sizes() == want.sizes() ? (got - want).abs().max().item<double>() : -1;
    std::printf("FAIL %s (max abs diff %g)\n", what.c_str(), diff);
  }
}

Triple forward(const at::Tensor& x, int64_t n, const at::Tensor& w, const at::Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("patchslim::prefix_layer_norm", "")
                             .typed<Triple(const at::Tensor&, c10::SymInt, const at::Tensor&,
                                           const at::Tensor&, double)>();
  return op.call(x, c10::SymInt(n), w, b, 1e-6);
}

Triple backward(const at::Tensor& g, const at::Tensor& x, int64_t n, const at::Tensor& mean,
                const at::Tensor& rstd, const at::Tensor& w) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("patchslim::prefix_layer_norm_backward", "")
                             .typed<Triple(const at::Tensor&, const at::Tensor&, c10::SymInt,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(g, x, c10::SymInt(n), mean, rstd, w);
}

void check_isa(patchslim::CpuIsa isa, at::ScalarType dtype) {
  setenv("PATCHSLIM_CPU_ISA", patchslim::cpu_isa_name(isa), 1);
  const std::string tag = std::string(patchslim::cpu_isa_name(isa)) + "/" + c10::toString(dtype);
  const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
  const auto options = at::TensorOptions().dtype(dtype);
  for (const int64_t channels : {5, 16, 37, 192}) {
    const int64_t batch = 3, tokens = 11, n = 7;
    const auto x = at::randn({batch, tokens, channels}, options) * 2 + 1;
    const auto w = at::randn({channels}, options);
    const auto b = at::randn({channels}, options);
    const auto [out, mean, rstd] = forward(x, n, w, b);
    const auto prefix = x.slice(1, 0, n);
    const auto [ref, ref_mean, ref_rstd] = at::native_layer_norm(prefix, {channels}, w, b, 1e-6);
    const std::string what = tag + " C=" + std::to_string(channels);
    expect_close(out, ref, tol, "forward " + what);
    expect_close(mean, ref_mean.view({batch, n}), tol, "mean " + what);
    expect_close(rstd, ref_rstd.view({batch, n}), tol, "rstd " + what);

    const auto grad = at::randn({batch, n, channels}, options);
    const auto [dx, dw, db] = backward(grad, x, n, mean, rstd, w);
    const auto [ref_dx, ref_dw, ref_db] = at::native_layer_norm_backward(
        grad, prefix, {channels}, ref_mean, ref_rstd, w, b, {true, true, true});
    expect_close(dx.slice(1, 0, n), ref_dx, tol, "grad_input " + what);
    expect_close(dx.slice(1, n), at::zeros_like(dx.slice(1, n)), 0, "grad_input tail " + what);
    expect_close(dw, ref_dw, tol, "grad_weight " + what);
    expect_close(db, ref_db, tol, "grad_bias " + what);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto best = patchslim::detected_cpu_isa();
  for (int isa = 0; isa <= static_cast<int>(best); ++isa) {
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      check_isa(static_cast<patchslim::CpuIsa>(isa), dtype);
    }
  }
  std::printf("%d passed, %d failed\n", passes, failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
