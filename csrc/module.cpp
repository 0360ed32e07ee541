// The Python extension module: loading it registers the patchslim operators
// (csrc/ops.cpp and the backend kernels). It exposes only what is not an op:
// how the library was built and which CPU kernels it runs.

#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "common/cpu_isa.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = TORCH_VERSION;
#if defined(PATCHSLIM_WITH_CUDA)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cpu_isas"] = py::make_tuple("scalar", "avx2", "avx512");
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "patchslim compiled library: operators live in torch.ops.patchslim";
  m.def("build_info", &build_info, "How this library was built (torch version, CUDA, compiler).");
  m.def(
      "detected_cpu_isa", [] { return patchslim::cpu_isa_name(patchslim::detected_cpu_isa()); },
      "Widest CPU instruction set the kernels can use on this machine.");
  m.def(
      "active_cpu_isa", [] { return patchslim::cpu_isa_name(patchslim::active_cpu_isa()); },
      "Instruction set the CPU kernels use now (PATCHSLIM_CPU_ISA overrides the detected one).");
}
