// The Python extension module: loading it registers the patchslim operators
// (csrc/ops.cpp and the backend kernels). It exposes only what is not an op:
// how the library was built, which CPU kernels it runs, and the CPU peak-memory
// probe of `patchslim bench`.

#include <c10/util/ScopeExit.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/profiler/orchestration/observer.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>

#include "common/cpu_isa.h"

namespace py = pybind11;

namespace {

namespace profiler = torch::profiler::impl;

// c10's CPU allocator reports every allocation and free to the profiler state of
// the thread that makes it; torch.profiler's memory events come from there. This
// state takes those reports and nothing else, so the peak is known without starting
// a profiler (kineto also logs every start and stop on stderr). Frees of blocks
// allocated before the state was pushed are not reported, as for the profiler.
class CpuPeakMemory final : public profiler::ProfilerStateBase {
 public:
  CpuPeakMemory()
      : ProfilerStateBase(profiler::ProfilerConfig(
            profiler::ProfilerState::Disabled, /*report_input_shapes=*/false,
            /*profile_memory=*/true)) {}

  void reportMemoryUsage(void* /*ptr*/, int64_t alloc_size, size_t /*total_allocated*/,
                         size_t /*total_reserved*/, c10::Device device) override {
    if (!device.is_cpu()) {
      return;
    }
    std::lock_guard<std::mutex> lock(state_mutex_);
    live_bytes_ += alloc_size;
    peak_bytes_ = std::max(peak_bytes_, live_bytes_);
  }

  profiler::ActiveProfilerType profilerType() override {
    return profiler::ActiveProfilerType::NONE;
  }

  int64_t peak_bytes() {
    std::lock_guard<std::mutex> lock(state_mutex_);
    return peak_bytes_;
  }

 private:
  int64_t live_bytes_ = 0;
  int64_t peak_bytes_ = 0;
};

int64_t cpu_peak_memory_bytes(const py::function& fn) {
  TORCH_CHECK(
      profiler::ProfilerStateBase::get() == nullptr,
      "cpu_peak_memory_bytes cannot run under a profiler: it takes the allocator's "
      "reports the profiler would receive");
  auto state = std::make_shared<CpuPeakMemory>();
  profiler::ProfilerStateBase::push(state);
  const auto pop = c10::make_scope_exit([] { profiler::ProfilerStateBase::pop(/*global=*/false); });
  fn();
  return state->peak_bytes();
}

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
  m.def(
      "cpu_peak_memory_bytes", &cpu_peak_memory_bytes, py::arg("fn"),
      "Call fn() and return the peak bytes of CPU memory held by the blocks allocated during "
      "the call (on this thread) and not yet freed: what torch.profiler's memory events "
      "add up to, without a profiler.");
}
