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

// sum_n (p[n] - t[n])^2 for n < len.
template <typename T>
acc_of<T> sumsq_diff(const T* __restrict__ p, const T* __restrict__ t, int64_t len) {
  using acc_t = acc_of<T>;
  using AVec = at::vec::Vectorized<acc_t>;
  AVec a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
  int64_t i = 0;
  if constexpr (std::is_same_v<T, acc_t>) {
    constexpr int64_t W = AVec::size();
    for (; i + 4 * W <= len; i += 4 * W) {
      const AVec d0 = AVec::loadu(p + i) - AVec::loadu(t + i);
      const AVec d1 = AVec::loadu(p + i + W) - AVec::loadu(t + i + W);
      const AVec d2 = AVec::loadu(p + i + 2 * W) - AVec::loadu(t + i + 2 * W);
      const AVec d3 = AVec::loadu(p + i + 3 * W) - AVec::loadu(t + i + 3 * W);
      a0 = at::vec::fmadd(d0, d0, a0);
      a1 = at::vec::fmadd(d1, d1, a1);
      a2 = at::vec::fmadd(d2, d2, a2);
      a3 = at::vec::fmadd(d3, d3, a3);
    }
    for (; i + W <= len; i += W) {
      const AVec d = AVec::loadu(p + i) - AVec::loadu(t + i);
      a0 = at::vec::fmadd(d, d, a0);
    }
  } else {  // bf16 / fp16: widen each 16-bit vector into two float vectors
    using RVec = at::vec::Vectorized<T>;
    constexpr int64_t W = RVec::size();
    for (; i + 2 * W <= len; i += 2 * W) {
      auto [p0, p1] = at::vec::convert_to_float<T>(RVec::loadu(p + i));
      auto [t0, t1] = at::vec::convert_to_float<T>(RVec::loadu(t + i));
      auto [p2, p3] = at::vec::convert_to_float<T>(RVec::loadu(p + i + W));
      auto [t2, t3] = at::vec::convert_to_float<T>(RVec::loadu(t + i + W));
      const AVec d0 = p0 - t0, d1 = p1 - t1, d2 = p2 - t2, d3 = p3 - t3;
      a0 = at::vec::fmadd(d0, d0, a0);
      a1 = at::vec::fmadd(d1, d1, a1);
      a2 = at::vec::fmadd(d2, d2, a2);
      a3 = at::vec::fmadd(d3, d3, a3);
    }
    for (; i + W <= len; i += W) {
      auto [p0, p1] = at::vec::convert_to_float<T>(RVec::loadu(p + i));
      auto [t0, t1] = at::vec::convert_to_float<T>(RVec::loadu(t + i));
      const AVec d0 = p0 - t0, d1 = p1 - t1;
      a0 = at::vec::fmadd(d0, d0, a0);
      a1 = at::vec::fmadd(d1, d1, a1);
    }
  }
  acc_t tail = 0;
  for (; i < len; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - static_cast<acc_t>(t[i]);
    tail += d * d;
  }
  return hsum((a0 + a1) + (a2 + a3)) + tail;
}

// out[n] = coef * (p[n] - t[n]) for n < len, rounded once to T.
template <typename T>
void scale_diff(T* __restrict__ out, const T* __restrict__ p, const T* __restrict__ t, int64_t len,
                acc_of<T> coef) {
  using acc_t = acc_of<T>;
  using AVec = at::vec::Vectorized<acc_t>;
  const AVec c(coef);
  int64_t i = 0;
  if constexpr (std::is_same_v<T, acc_t>) {
    constexpr int64_t W = AVec::size();
    for (; i + 2 * W <= len; i += 2 * W) {
      ((AVec::loadu(p + i) - AVec::loadu(t + i)) * c).store(out + i);
      ((AVec::loadu(p + i + W) - AVec::loadu(t + i + W)) * c).store(out + i + W);
    }
    for (; i + W <= len; i += W) ((AVec::loadu(p + i) - AVec::loadu(t + i)) * c).store(out + i);
  } else {
    using RVec = at::vec::Vectorized<T>;
    constexpr int64_t W = RVec::size();
    for (; i + W <= len; i += W) {
      auto [p0, p1] = at::vec::convert_to_float<T>(RVec::loadu(p + i));
      auto [t0, t1] = at::vec::convert_to_float<T>(RVec::loadu(t + i));
      at::vec::convert_from_float<T>((p0 - t0) * c, (p1 - t1) * c).store(out + i);
    }
  }
  for (; i < len; ++i) out[i] = static_cast<T>(coef * (static_cast<acc_t>(p[i]) - static_cast<acc_t>(t[i])));
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
      for (int64_t t = 0; t < a.T; ++t) {  // the target chunk stays in cache across tensors
        const T* prow = static_cast<const T*>(a.preds[t]) + r * a.N + start;
        partials[(t * a.R + r) * nc + c] = sumsq_diff(prow, trow, len);
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
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / nc, c = task % nc;
      const int64_t start = c * ROW_CHUNK, len = std::min<int64_t>(ROW_CHUNK, a.N - start);
      // winners (r < B) get -2/N, losers +2/N; one rounding of the coefficient to acc_t
      const double sign = r < B ? -1.0 : 1.0;
      const acc_t coef = static_cast<acc_t>(a.grad_loss * a.grad_coef[r % B] * sign * two_over_n);
      scale_diff(grad + r * a.N + start, mp + r * a.N + start, target + (r % a.Bt) * a.N + start, len, coef);
    }
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
