#pragma once

// Helpers every CPU op glue uses: the ISA to run, dtype checks, threading grain.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <stdexcept>

#include "common/cpu_isa.h"

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
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": CPU supports float32 and float64 inputs, got ", t.scalar_type());
}

}  // namespace patchslim::cpu
