// Autograd-key kernels of the inference ops, shared by every backend. The in-place ops
// (pruned_msa_, pruned_mlp_): the checks torch makes before its own in-place ops, then
// the op below autograd, then a version bump of x so that autograd notices the
// overwrite. The functional inference ops (pruned_msa_inference, pruned_mlp_inference):
// an input that requires grad is refused.

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <string>

namespace patchslim {
namespace {

std::string op_name(const c10::OperatorHandle& op) {
  return op.schema().name().substr(op.schema().name().find("::") + 2);
}

// Under grad mode, refuses the first input that requires grad, naming the op, the
// argument and the differentiable op; `before_refusal` runs first (the in-place ops
// let torch's own leaf check speak for a leaf x).
template <typename Fn>
void refuse_inputs_requiring_grad(const c10::OperatorHandle& op, const torch::jit::Stack& stack,
                                  const char* kind, const std::string& differentiable,
                                  Fn&& before_refusal) {
  if (!torch::autograd::GradMode::is_enabled()) return;
  const auto& arguments = op.schema().arguments();
  const auto inputs = torch::jit::last(stack, arguments.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].isTensor() || !inputs[i].toTensor().requires_grad()) continue;
    before_refusal();
    TORCH_CHECK(false, op_name(op), ": ", arguments[i].name(), " requires grad, but the ", kind,
                " is not differentiable (it is the inference path); call it under "
                "torch.no_grad(), or use ",
                differentiable, ", which is");
  }
}

// The in-place ops have no derivative: they are the inference path of pruned_msa and
// pruned_mlp. With grad mode on, an input that requires grad is refused, a leaf (or a
// view of one) with torch's own message; under torch.no_grad() the op runs, and a
// backward through a tensor saved before the overwrite then fails on x's version.
void inplace_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                      torch::jit::Stack* stack) {
  const at::Tensor x = torch::jit::last(*stack, op.schema().arguments().size())[0].toTensor();
  const std::string name = op_name(op);
  refuse_inputs_requiring_grad(op, *stack, "in-place op", name.substr(0, name.size() - 1),
                               [&] { torch::autograd::check_inplace(x, /*requires_grad=*/true); });
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  torch::autograd::increment_version(x);
}

// The functional inference ops return no activations for a backward.
void inference_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  const std::string name = op_name(op);
  refuse_inputs_requiring_grad(op, *stack, "op",
                               name.substr(0, name.size() - std::string("_inference").size()),
                               [] {});
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(patchslim, Autograd, m) {
  m.impl("pruned_msa_", torch::CppFunction::makeFromBoxedFunction<&inplace_autograd>());
  m.impl("pruned_mlp_", torch::CppFunction::makeFromBoxedFunction<&inplace_autograd>());
  m.impl("pruned_msa_inference",
         torch::CppFunction::makeFromBoxedFunction<&inference_autograd>());
  m.impl("pruned_mlp_inference",
         torch::CppFunction::makeFromBoxedFunction<&inference_autograd>());
}

}  // namespace patchslim
