#pragma once

// Stand-in for torch's CUDAGuard (see ATen/cuda/CUDAContext.h beside this file).

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
