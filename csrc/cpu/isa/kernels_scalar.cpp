// Kernels compiled for scalar; chosen at run time by active_cpu_isa().
#define PATCHSLIM_ISA_SCALAR
#define PATCHSLIM_ISA_NAMESPACE scalar
#include "cpu/isa/isa_unit.inc"
