// Kernels compiled for avx2; chosen at run time by active_cpu_isa().
#define PATCHSLIM_ISA_AVX2
#define PATCHSLIM_ISA_NAMESPACE avx2
#define PATCHSLIM_ISA_TARGET "avx2,fma"
#include "cpu/isa/isa_unit.inc"
