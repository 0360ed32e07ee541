// Autograd-key kernel of the in-place ops (pruned_msa_, pruned_mlp_), shared by every
// backend: the checks torch makes before its own in-place ops, then the op below
// autograd, then a version bump of x so that autograd notices the overwrite.

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <string>

namespace patchslim {
namespace {

// The in-place ops have no derivative: they are the inference path of pruned_msa and
// pruned_mlp. With grad mode on, an input that requires grad is refused, a leaf (or a
// view of one) with torch's own message; under torch.no_grad() the op runs, and a
// backward through a tensor saved before the overwrite then fails on x's version.
void inplace_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                      torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const auto inputs = torch::jit::last(*stack, arguments.size());
  const at::Tensor x = inputs[0].toTensor();
  const std::string name = op.schema().name().substr(op.schema().name().find("::") + 2);
  if (torch::autograd::GradMode::is_enabled()) {
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (!inputs[i].isTensor() || !inputs[i].toTensor().requires_grad()) continue;
      torch::autograd::check_inplace(x, /*requires_grad=*/true);
      TORCH_CHECK(false, name, ": ", arguments[i].name(),
                  " requires grad, but the in-place op is not differentiable (it is the inference "
                  "path); call it under torch.no_grad(), or use ",
                  name.substr(0, name.size() - 1), ", which is");
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  torch::autograd::increment_version(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(patchslim, Autograd, m) {
  m.impl("pruned_msa_", torch::CppFunction::makeFromBoxedFunction<&inplace_autograd>());
  m.impl("pruned_mlp_", torch::CppFunction::makeFromBoxedFunction<&inplace_autograd>());
}

}  // namespace patchslim
