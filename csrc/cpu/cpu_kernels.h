// Entry points of the CPU kernels (kernels_impl.h), one set per instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace adpo::cpu {

// Elements per row chunk: the unit of parallel work and of the fixed-order reduction.
// A function of nothing but this constant, so results do not depend on the thread count.
constexpr int64_t ROW_CHUNK = 16384;

struct MseArgs {
  const void* const* preds;  // T pointers to (R, N) rows
  int64_t T;
  const void* target;        // (Bt, N), Bt = R or R / 2
  int64_t R, Bt, N;
  void* partials;            // (T, R, ceil(N / ROW_CHUNK)) in the accumulation dtype
};

struct BwdArgs {
  const void* model_pred;    // (R, N)
  const void* target;        // (Bt, N)
  void* grad;                // (R, N), model_pred's dtype
  const double* grad_coef;   // (R / 2,)
  double grad_loss;
  int64_t R, Bt, N;
};

#define ADPO_DECLARE_CPU_KERNELS(ns)                                 \
  namespace ns {                                                     \
  void mse_partials(at::ScalarType dtype, const MseArgs& a);         \
  void pairs_bwd(at::ScalarType dtype, const BwdArgs& a);            \
  }

ADPO_DECLARE_CPU_KERNELS(isa_default)
#if defined(__x86_64__) || defined(_M_X64)
#define ADPO_HAVE_AVX2_KERNELS 1
ADPO_DECLARE_CPU_KERNELS(isa_avx2)
ADPO_DECLARE_CPU_KERNELS(isa_avx512)
#endif

}  // namespace adpo::cpu
