// The two bandwidth-bound CPU kernels, compiled once per instruction set.
//
//   partial[t, r, c] = sum_{n in chunk c} (pred_t[r, n] - target[r mod Bt, n])^2
//   grad[r, n]       = coef_r * (model_pred[r, n] - target[r mod Bt, n])
//
// Included by kernels_default.cpp and kernels_avx2.cpp, each of which defines
// CPU_CAPABILITY (at::vec's namespace switch) and ADPO_ISA_NS first.  Rows are split into
// fixed chunks of ROW_CHUNK elements (a function of the shape only), so the partial sums
// and the order in which ops_cpu.cpp combines them never depend on the thread count:
// the result is bitwise reproducible for any torch.set_num_threads.  Accumulation is in
// float for fp32/bf16/fp16 inputs and in double for fp64 inputs.
#pragma once

#include "kernels_prelude.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace adpo::cpu::ADPO_ISA_NS {

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename V>
inline typename V::value_type hsum(const V& v) {
  __at_align__ typename V::value_type buf[V::size()];
  v.store(buf);
  typename V::value_type s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += buf[i];  // fixed order
  return s;
}

// out[k] = sum_n (p[k][n] - t[n])^2 for n < len and the NP tensors p[0 .. NP).  The NP + 1
// streams are read together: one core reaches DRAM bandwidth only with many misses in
// flight, and NP + 1 concurrent streams keep the prefetchers busier than one stream at a
// time (measured: about 1.5x on the sdxl shape with K = 2).  The target vector is loaded
// once for all NP tensors.
template <typename T, int NP>
void sumsq_diff_multi(const T* const* p, const T* __restrict__ t, int64_t len, acc_of<T>* out) {
  using acc_t = acc_of<T>;
  using AVec = at::vec::Vectorized<acc_t>;
  AVec a0[NP], a1[NP];
  for (int k = 0; k < NP; ++k) a0[k] = a1[k] = AVec(acc_t(0));
  int64_t i = 0;
  if constexpr (std::is_same_v<T, acc_t>) {
    constexpr int64_t W = AVec::size();
    for (; i + 2 * W <= len; i += 2 * W) {
      const AVec t0 = AVec::loadu(t + i), t1 = AVec::loadu(t + i + W);
      for (int k = 0; k < NP; ++k) {
        const AVec d0 = AVec::loadu(p[k] + i) - t0, d1 = AVec::loadu(p[k] + i + W) - t1;
        a0[k] = at::vec::fmadd(d0, d0, a0[k]);
        a1[k] = at::vec::fmadd(d1, d1, a1[k]);
      }
    }
  } else {  // bf16 / fp16: widen each 16-bit vector into two float vectors
    using RVec = at::vec::Vectorized<T>;
    constexpr int64_t W = RVec::size();
    for (; i + W <= len; i += W) {
      auto [t0, t1] = at::vec::convert_to_float<T>(RVec::loadu(t + i));
      for (int k = 0; k < NP; ++k) {
        auto [p0, p1] = at::vec::convert_to_float<T>(RVec::loadu(p[k] + i));
        const AVec d0 = p0 - t0, d1 = p1 - t1;
        a0[k] = at::vec::fmadd(d0, d0, a0[k]);
        a1[k] = at::vec::fmadd(d1, d1, a1[k]);
      }
    }
  }
  for (int k = 0; k < NP; ++k) {
    acc_t tail = 0;
    for (int64_t j = i; j < len; ++j) {
      const acc_t d = static_cast<acc_t>(p[k][j]) - static_cast<acc_t>(t[j]);
      tail += d * d;
    }
    out[k] = hsum(a0[k] + a1[k]) + tail;  // fixed order
  }
}

// Up to MAX_FUSED prediction tensors share one pass over a chunk.
constexpr int64_t MAX_FUSED = 4;

template <typename T>
void sumsq_diff_group(const T* const* p, int64_t np, const T* t, int64_t len, acc_of<T>* out) {
  switch (np) {
    case 1: return sumsq_diff_multi<T, 1>(p, t, len, out);
    case 2: return sumsq_diff_multi<T, 2>(p, t, len, out);
    case 3: return sumsq_diff_multi<T, 3>(p, t, len, out);
    default: return sumsq_diff_multi<T, 4>(p, t, len, out);
  }
}

// Store a full vector to vector-aligned memory, bypassing the cache where the ISA allows
// (AVX2 / AVX-512 streaming stores): the gradient is written once and not read back here, and a
// streaming store skips the read-for-ownership of every line, a third of the backward's
// DRAM traffic.  Callers fence with stream_fence() before the data is used elsewhere.
template <typename T, typename V>
inline void store_stream(T* ptr, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(ptr, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(ptr, v);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(ptr), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(ptr, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(ptr, v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(ptr), v);
  }
#else
  v.store(ptr);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// out[n] = coef * (p[n] - t[n]) for n < len, rounded once to T.
template <typename T, bool STREAM>
void scale_diff_impl(T* __restrict__ out, const T* __restrict__ p, const T* __restrict__ t, int64_t len,
                     acc_of<T> coef) {
  using acc_t = acc_of<T>;
  using AVec = at::vec::Vectorized<acc_t>;
  const AVec c(coef);
  auto put = [](T* dst, const auto& v) {
    if constexpr (STREAM) store_stream(dst, v);
    else v.store(dst);
  };
  int64_t i = 0;
  if constexpr (std::is_same_v<T, acc_t>) {
    constexpr int64_t W = AVec::size();
    for (; i + 2 * W <= len; i += 2 * W) {
      put(out + i, (AVec::loadu(p + i) - AVec::loadu(t + i)) * c);
      put(out + i + W, (AVec::loadu(p + i + W) - AVec::loadu(t + i + W)) * c);
    }
    for (; i + W <= len; i += W) put(out + i, (AVec::loadu(p + i) - AVec::loadu(t + i)) * c);
  } else {
    using RVec = at::vec::Vectorized<T>;
    constexpr int64_t W = RVec::size();
    for (; i + W <= len; i += W) {
      auto [p0, p1] = at::vec::convert_to_float<T>(RVec::loadu(p + i));
      auto [t0, t1] = at::vec::convert_to_float<T>(RVec::loadu(t + i));
      put(out + i, at::vec::convert_from_float<T>((p0 - t0) * c, (p1 - t1) * c));
    }
  }
  for (; i < len; ++i) out[i] = static_cast<T>(coef * (static_cast<acc_t>(p[i]) - static_cast<acc_t>(t[i])));
}

template <typename T>
void scale_diff(T* out, const T* p, const T* t, int64_t len, acc_of<T> coef) {
  // streaming stores need vector-aligned rows (at::empty aligns to 64 bytes)
  if (reinterpret_cast<uintptr_t>(out) % sizeof(at::vec::Vectorized<acc_of<T>>) == 0) {
    scale_diff_impl<T, true>(out, p, t, len, coef);
  } else {
    scale_diff_impl<T, false>(out, p, t, len, coef);
  }
}

// Work per parallel task: at least kGrainElems elements (ATen's GRAIN_SIZE), so small
// inputs run on one thread.
constexpr int64_t kGrainElems = 32768;
inline int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_task));
}

template <typename T>
void mse_partials_t(const MseArgs& a) {
  using acc_t = acc_of<T>;
  const int64_t nc = (a.N + ROW_CHUNK - 1) / ROW_CHUNK;
  const T* target = static_cast<const T*>(a.target);
  acc_t* partials = static_cast<acc_t*>(a.partials);
  at::parallel_for(0, a.R * nc, grain_for(ROW_CHUNK * a.T), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / nc, c = task % nc;
      const int64_t start = c * ROW_CHUNK, len = std::min<int64_t>(ROW_CHUNK, a.N - start);
      const T* trow = target + (r % a.Bt) * a.N + start;  // shared target: row r uses r mod B
      for (int64_t g = 0; g < a.T; g += MAX_FUSED) {  // the target chunk stays in cache across groups
        const int64_t np = std::min<int64_t>(MAX_FUSED, a.T - g);
        const T* prow[MAX_FUSED];
        acc_t sums[MAX_FUSED];
        for (int64_t k = 0; k < np; ++k) prow[k] = static_cast<const T*>(a.preds[g + k]) + r * a.N + start;
        sumsq_diff_group(prow, np, trow, len, sums);
        for (int64_t k = 0; k < np; ++k) partials[((g + k) * a.R + r) * nc + c] = sums[k];
      }
    }
  });
}

template <typename T>
void pairs_bwd_t(const BwdArgs& a) {
  using acc_t = acc_of<T>;
  const int64_t nc = (a.N + ROW_CHUNK - 1) / ROW_CHUNK;
  const int64_t B = a.R / 2;
  const T* mp = static_cast<const T*>(a.model_pred);
  const T* target = static_cast<const T*>(a.target);
  T* grad = static_cast<T*>(a.grad);
  const double two_over_n = 2.0 / (double)a.N;
  at::parallel_for(0, a.R * nc, grain_for(ROW_CHUNK), [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      // Last rows first: they are the ones the forward pass read last, still in the LLC.
      const int64_t task = a.R * nc - 1 - idx;
      const int64_t r = task / nc, c = task % nc;
      const int64_t start = c * ROW_CHUNK, len = std::min<int64_t>(ROW_CHUNK, a.N - start);
      // winners (r < B) get -2/N, losers +2/N; one rounding of the coefficient to acc_t
      const double sign = r < B ? -1.0 : 1.0;
      const acc_t coef = static_cast<acc_t>(a.grad_loss * a.grad_coef[r % B] * sign * two_over_n);
      scale_diff(grad + r * a.N + start, mp + r * a.N + start, target + (r % a.Bt) * a.N + start, len, coef);
    }
    stream_fence();  // this thread's streaming stores are visible once parallel_for returns
  });
}

void mse_partials(at::ScalarType dtype, const MseArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "adpo_cpu_mse", [&] {
    mse_partials_t<scalar_t>(a);
  });
}

void pairs_bwd(at::ScalarType dtype, const BwdArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "adpo_cpu_pairs_bwd", [&] {
    pairs_bwd_t<scalar_t>(a);
  });
}

}  // namespace adpo::cpu::ADPO_ISA_NS
