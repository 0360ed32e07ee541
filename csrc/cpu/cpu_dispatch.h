#pragma once

// Helpers every CPU op glue uses: the ISA to run, dtype checks and dispatch, the
// kernels' view of tensor data, threading grain.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <stdexcept>

#include "common/cpu_isa.h"
#include "cpu/kernels.h"

namespace patchslim::cpu {

// Enough elements per task that thread start-up stays small against the work.
constexpr int64_t kElementsPerTask = 32768;

inline CpuIsa checked_cpu_isa() {
  try {
    return active_cpu_isa();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
}

inline void check_cpu_dtype(const at::Tensor& t, const char* op) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              op, ": CPU supports float32, float64, bfloat16 and float16 inputs, got ", dtype);
}

// Runs the lambda with scalar_t set to the input's dtype: float, double, BFloat16, Half.
#define PATCHSLIM_DISPATCH_CPU(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

// The kernels' type for a torch scalar type: the same, or the 16-bit storage structs
// (whose layout is c10::BFloat16's and c10::Half's).
template <typename T>
struct KernelType {
  using type = T;
};
template <>
struct KernelType<at::BFloat16> {
  using type = BFloat16Bits;
};
template <>
struct KernelType<at::Half> {
  using type = HalfBits;
};
template <typename T>
using kernel_t = typename KernelType<T>::type;

template <typename T>
const kernel_t<T>* data_of(const at::Tensor& t) {
  return reinterpret_cast<const kernel_t<T>*>(t.const_data_ptr<T>());
}
template <typename T>
kernel_t<T>* mutable_data_of(const at::Tensor& t) {
  return reinterpret_cast<kernel_t<T>*>(t.mutable_data_ptr<T>());
}

// The dtype the kernels accumulate in (and keep statistics in) for an input dtype.
inline at::ScalarType accumulate_dtype(at::ScalarType dtype) {
  return at::isReducedFloatingType(dtype) ? at::kFloat : dtype;
}

}  // namespace patchslim::cpu
