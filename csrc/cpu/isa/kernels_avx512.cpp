// Kernels compiled for avx512; chosen at run time by active_cpu_isa().
#define PATCHSLIM_ISA_AVX512
#define PATCHSLIM_ISA_NAMESPACE avx512
#define PATCHSLIM_ISA_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
#include "cpu/isa/isa_unit.inc"
