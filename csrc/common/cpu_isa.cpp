#include "common/cpu_isa.h"

#include <cstdlib>
#include <stdexcept>

namespace patchslim {

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar:
      return "scalar";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx512Bf16:
      return "avx512_bf16";
  }
  return "unknown";
}

namespace {

CpuIsa probe_cpu_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // libgcc's probe also checks XCR0, so a CPU whose OS does not save the wide
  // registers reports no support.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512bf16") ? CpuIsa::kAvx512Bf16 : CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return CpuIsa::kAvx2;
  }
#endif
  return CpuIsa::kScalar;
}

}  // namespace

CpuIsa detected_cpu_isa() {
  static const CpuIsa isa = probe_cpu_isa();
  return isa;
}

CpuIsa active_cpu_isa() {
  const CpuIsa best = detected_cpu_isa();
  const char* env = std::getenv("PATCHSLIM_CPU_ISA");
  if (env == nullptr || *env == '\0') {
    return best;
  }
  const std::string name(env);
  CpuIsa wanted;
  if (name == "scalar") {
    wanted = CpuIsa::kScalar;
  } else if (name == "avx2") {
    wanted = CpuIsa::kAvx2;
  } else if (name == "avx512") {
    wanted = CpuIsa::kAvx512;
  } else if (name == "avx512_bf16") {
    wanted = CpuIsa::kAvx512Bf16;
  } else {
    throw std::invalid_argument(
        "PATCHSLIM_CPU_ISA must be one of scalar, avx2, avx512, avx512_bf16; got '" + name +
        "'");
  }
  if (static_cast<int>(wanted) > static_cast<int>(best)) {
    throw std::invalid_argument(
        "PATCHSLIM_CPU_ISA=" + name + " was requested but this CPU supports at most " +
        cpu_isa_name(best));
  }
  return wanted;
}

}  // namespace patchslim
