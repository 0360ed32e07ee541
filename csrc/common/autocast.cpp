// Autocast kernels of the patchslim ops, for CPU and CUDA: inputs are cast once, here,
// and the op runs below autocast (as torchvision's csrc/ops/autocast does).
//   - the block ops (and their inference forms) run in the autocast dtype (their GEMMs
//     are what autocast speeds up; the row kernels accumulate in float32);
//   - the in-place ops keep x's dtype (a cast copy of x would take the write) and cast
//     the parameters to it;
//   - prefix_layer_norm runs in float32, as autocast runs torch's layer_norm;
//   - the scoring ops run in float32: the second-moment chain multiplies many maps.
// Backward ops need none: autograd calls them with the forward's dtypes.

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace patchslim {
namespace {

enum class Cast { kAutocastDtype, kFirstArgumentDtype, kFloat32 };

template <c10::DeviceType device, Cast cast>
void autocast_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet /*keys*/,
                     torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto first = stack->end() - static_cast<std::ptrdiff_t>(op.schema().arguments().size());
  at::ScalarType dtype = at::kFloat;
  if constexpr (cast == Cast::kAutocastDtype) dtype = at::autocast::get_autocast_dtype(device);
  if constexpr (cast == Cast::kFirstArgumentDtype) dtype = first->toTensor().scalar_type();
  for (auto it = cast == Cast::kFirstArgumentDtype ? first + 1 : first; it != stack->end(); ++it) {
    if (it->isTensor()) *it = at::autocast::cached_cast(dtype, it->toTensor(), device);
  }
  op.callBoxed(stack);
}

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  for (const char* name :
       {"pruned_msa", "pruned_mlp", "pruned_msa_inference", "pruned_mlp_inference"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<
                     &autocast_kernel<device, Cast::kAutocastDtype>>());
  }
  for (const char* name : {"pruned_msa_", "pruned_mlp_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<
                     &autocast_kernel<device, Cast::kFirstArgumentDtype>>());
  }
  for (const char* name : {"prefix_layer_norm", "score_chain_step", "score_factor_step",
                           "score_chain_diagonal", "patch_scores"}) {
    m.impl(name,
           torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<device, Cast::kFloat32>>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(patchslim, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(patchslim, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace patchslim
