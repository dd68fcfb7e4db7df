// The CPU kernels built for AVX2 + FMA + F16C (x86-64 only), chosen at run time by
// ops_cpu.cpp when the CPU and ATen's capability (ATEN_CPU_CAPABILITY) allow it.
//
// setuptools cannot give one file its own compiler flags, so the target pragma does
// what -mavx2 -mfma -mf16c would.  GCC's pragma does not define the feature macros
// that at::vec and SLEEF's header test, hence the explicit definitions.  Only at::vec
// and the kernels below the pragma are AVX2 code (checked with objdump: the inline
// functions shared with the other objects come from the prelude and use no VEX
// instructions); they run only after the cpuid check in ops_cpu.cpp.
#if defined(__x86_64__) || defined(_M_X64)
#include "kernels_prelude.h"  // compiled for any CPU: see the note there

#pragma GCC target("avx,avx2,fma,f16c")
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define ADPO_ISA_NS isa_avx2
#include "kernels_impl.h"
#endif
