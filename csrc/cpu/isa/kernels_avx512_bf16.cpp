// Kernels compiled for avx512 with AVX512-BF16; chosen at run time by active_cpu_isa().
// The same bodies as kernels_avx512.cpp except the bfloat16 attention (block_rows.h)
// and the float-to-bfloat16 stores (one vcvtneps2bf16, simd.h).
#define PATCHSLIM_ISA_AVX512
#define PATCHSLIM_ISA_AVX512_BF16
#define PATCHSLIM_ISA_NAMESPACE avx512_bf16
#define PATCHSLIM_ISA_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma"
#include "cpu/isa/isa_unit.inc"
