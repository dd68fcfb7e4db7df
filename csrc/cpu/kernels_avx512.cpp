// The CPU kernels built for AVX-512 (F, BW, VL, DQ; x86-64 only), chosen at run time by
// ops_cpu.cpp when the CPU and ATen's capability (ATEN_CPU_CAPABILITY) allow it.
// Same technique as kernels_avx2.cpp, which explains it.

#if defined(__x86_64__) || defined(_M_X64)
#include "kernels_prelude.h"  // compiled for any CPU: see the note there

#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#pragma GCC diagnostic ignored "-Wpsabi"  // vector ABI notes; all AVX2 code stays in this file
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define ADPO_ISA_NS isa_avx512
#include "kernels_impl.h"
#endif
