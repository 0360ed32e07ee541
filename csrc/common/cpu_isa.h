#pragma once

// CPU instruction-set selection for the kernels in csrc/cpu/isa/. Kept free of
// torch headers so the C++ tests and the ISA translation units can share it.

#include <string>

namespace patchslim {

// Each level includes the ones before it; kAvx512Bf16 is AVX-512 with AVX512-BF16
// (vdpbf16ps), which only the bfloat16 attention kernel uses.
enum class CpuIsa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

const char* cpu_isa_name(CpuIsa isa);

// Widest ISA this CPU and OS support (detected once).
CpuIsa detected_cpu_isa();

// The ISA kernels run with now: `PATCHSLIM_CPU_ISA=scalar|avx2|avx512|avx512_bf16`
// when set, otherwise `detected_cpu_isa()`. Read on every call so tests can switch paths.
// Throws std::invalid_argument for an unknown name or an ISA this CPU lacks.
CpuIsa active_cpu_isa();

}  // namespace patchslim
