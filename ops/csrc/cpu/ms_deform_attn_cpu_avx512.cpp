// CPU kernels compiled for AVX-512 (F, VL, BW, DQ) + FMA with 512-bit vectors; chosen at run
// time when the CPU supports them (see ms_deform_attn_cpu.cpp). The plain-C++ headers are
// included before the target switch so that only this file's own kernels get the wider
// instruction set.
#include "cpu/ms_deform_attn_cpu_isa.h"
#include "ms_deform_attn_bilinear.h"

#ifdef MSDA_HAVE_X86_VARIANTS
#if defined(__clang__)
#pragma clang attribute push(                                                                      \
    __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq"), min_vector_width(512))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
#endif

#define MSDA_ISA avx512
#include "cpu/ms_deform_attn_cpu_kernel.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // MSDA_HAVE_X86_VARIANTS
