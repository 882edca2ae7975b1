// CPU kernels compiled for the build's baseline instruction set.
#define MSDA_ISA baseline
#include "cpu/ms_deform_attn_cpu_kernel.h"
