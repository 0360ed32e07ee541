#pragma once

// Stand-in for torch's CUDA header, which the CPU torch wheel lacks: just enough
// for the CUDA torch glue (csrc/cuda/*.cpp) to be compiled on a CPU-only machine.
// Used by CMakeLists.txt's compile check only; never linked.

#include <cuda_runtime.h>

namespace at::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace at::cuda
