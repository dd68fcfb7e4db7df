// The CPU implementations of adpo::cpu_mse, adpo::cpu_pairs and adpo::cpu_pairs_bwd.
//
// The schemas, fake impls and autograd formula are defined once in adpo_kernels/ops.py;
// this file registers only the CPU kernels (TORCH_LIBRARY_IMPL), so the .so must be
// loaded after `import adpo_kernels` (importing adpo_kernels._C guarantees that).
//
//   mse:       per-row MSE of model_pred, ref_pred and each annotator (spec section 2),
//              two stages: fixed row-chunk partial sums (kernels_impl.h, SIMD, threads),
//              then a sequential combination of the partials of each row in double.
//   pairs:     the scalar stage (spec sections 2-8) over B_global pairs, in double.
//   pairs_bwd: grad[i] = grad_loss * g_i * (-+2/N) * (model_pred[i] - target[i]).
#include <ATen/Dispatch.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../adpo_common.h"
#include "../op_checks.h"
#include "cpu_kernels.h"

namespace adpo::cpu {

namespace {

enum class Isa { Default, Avx2, Avx512 };

// ATen's capability honours ATEN_CPU_CAPABILITY (default / avx2 / avx512), which tests use
// to cover every path; the cpuid checks guard against a capability string we misread.
Isa detect_isa() {
#if defined(ADPO_HAVE_AVX2_KERNELS)
  const std::string cap = at::get_cpu_capability();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (cap == "AVX512" && avx512) return Isa::Avx512;
  if ((cap == "AVX2" || cap == "AVX512") && avx2) return Isa::Avx2;
#endif
  return Isa::Default;
}

Isa cpu_isa_cached() {
  static const Isa v = detect_isa();
  return v;
}

void run_mse_partials(at::ScalarType dt, const MseArgs& a) {
#if defined(ADPO_HAVE_AVX2_KERNELS)
  if (cpu_isa_cached() == Isa::Avx512) return isa_avx512::mse_partials(dt, a);
  if (cpu_isa_cached() == Isa::Avx2) return isa_avx2::mse_partials(dt, a);
#endif
  isa_default::mse_partials(dt, a);
}

void run_pairs_bwd(at::ScalarType dt, const BwdArgs& a) {
#if defined(ADPO_HAVE_AVX2_KERNELS)
  if (cpu_isa_cached() == Isa::Avx512) return isa_avx512::pairs_bwd(dt, a);
  if (cpu_isa_cached() == Isa::Avx2) return isa_avx2::pairs_bwd(dt, a);
#endif
  isa_default::pairs_bwd(dt, a);
}

void check_cpu(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got one on ", t.device());
}

// The scalar stage.  mse is (T = 2 + K, 2, B) row-major; outputs cover pairs offset ..
// offset + n.  Batch statistics run over all B pairs in a fixed sequential order.
template <typename acc_t>
void pairs_kernel(const acc_t* mse, int64_t T, int64_t B, int64_t offset, int64_t n, const Params& p,
                  acc_t* out_loss, acc_t* logits, acc_t* metric, acc_t* weights, acc_t* margin,
                  acc_t* out_acc, acc_t* gcoef) {
  const int64_t kp1 = T - 1;  // the policy and the K annotators
  std::vector<double> Z(kp1 * B);
  for (int64_t i = 0; i < B; ++i) {
    auto diff = [&](int64_t t) { return (double)mse[t * 2 * B + i] - (double)mse[t * 2 * B + B + i]; };
    const double ref_diff = diff(1);
    Z[i] = ref_diff - diff(0);
    for (int64_t k = 1; k < kp1; ++k) Z[k * B + i] = ref_diff - diff(k + 1);
  }
  const double* z = Z.data();

  std::vector<double> m(B, 0.0);
  if (p.metric == METRIC_ON) {
    if (kp1 == 1) {
      for (int64_t i = 0; i < B; ++i) m[i] = sigmoid(-p.rho * z[i]);  // 1 - sigmoid(rho z)
    } else {
      std::vector<double> norms(kp1);
      if (p.logits_normalize) {
        for (int64_t k = 0; k < kp1; ++k) {
          double ss = 0.0;
          for (int64_t i = 0; i < B; ++i) ss += Z[k * B + i] * Z[k * B + i];
          norms[k] = std::max(sqrt(ss), NORM_EPS);
        }
      }
      std::vector<double> d(B);
      for (int64_t i = 0; i < B; ++i) {
        double c;
        confidence_stability(z, B, i, kp1, p.logits_normalize ? norms.data() : nullptr, p.rho, &c, &d[i]);
        m[i] = c * d[i];
      }
      if (p.std_standardize) {
        double dsum = 0.0;
        for (int64_t i = 0; i < B; ++i) dsum += d[i];
        const double dmean = dsum / (double)B;
        for (int64_t i = 0; i < B; ++i) m[i] = dmean == 0.0 ? sigmoid(-p.rho * z[i]) : m[i] / dmean;
      }
      if (p.weight_normalize) {
        double total = 0.0;
        for (int64_t i = 0; i < B; ++i) total += m[i];
        if (total != 0.0)
          for (int64_t i = 0; i < B; ++i) m[i] /= total;
      }
    }
  }

  double threshold = 0.0;
  if (p.flip) {
    std::vector<double> sorted(m);
    std::sort(sorted.begin(), sorted.end(), less_nan_last);
    const double q = sorted[flip_rank(B, p.flip_ratio)];
    threshold = q < p.flip_threshold ? p.flip_threshold : q;  // clamp(q, min=h); NaN stays NaN
  }

  // zbar: the mean of the logits as the loss sees them, flipped pairs negated (spec section 7)
  double zsum = 0.0;
  for (int64_t i = 0; i < B; ++i) zsum += p.flip && m[i] > threshold ? -z[i] : z[i];
  const double zbar = zsum / (double)B;

  double lsum = 0.0;
  int64_t pos = 0, zero = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = offset + j;
    const bool on = p.metric != METRIC_OFF;
    const double w = on ? weight_fn(m[i], p) : 1.0;
    const double gamma = on ? margin_fn(m[i], zbar, p) : 0.0;
    const bool flipped = p.flip && m[i] > threshold;
    double l, dz;
    pair_loss(z[i], m[i], w, gamma, zbar, flipped, p, &l, &dz);
    lsum += l;
    pos += z[i] > 0;
    zero += z[i] == 0;
    logits[j] = (acc_t)z[i];
    metric[j] = (acc_t)m[i];
    weights[j] = (acc_t)w;
    margin[j] = (acc_t)gamma;
    gcoef[j] = (acc_t)(dz / (double)n);
  }
  *out_loss = (acc_t)(lsum / (double)n);
  *out_acc = (acc_t)((double)pos / (double)n + 0.5 * ((double)zero / (double)n));
}

}  // namespace

at::Tensor mse_cpu(const at::Tensor& model_pred, const at::Tensor& ref_pred, const at::Tensor& target,
                   at::TensorList annotators) {
  constexpr const char* op = "adpo::cpu_mse";
  check_mse_args(op, model_pred, ref_pred, target, annotators);
  check_cpu(op, model_pred);
  const at::ScalarType dt = model_pred.scalar_type(), acc = acc_dtype(dt);
  std::vector<at::Tensor> preds = {model_pred.contiguous(), ref_pred.contiguous()};
  for (const at::Tensor& a : annotators) preds.push_back(a.contiguous());
  const at::Tensor tgt = target.contiguous();
  const int64_t T = (int64_t)preds.size(), R = model_pred.size(0), N = model_pred.size(1);
  const int64_t nc = (N + ROW_CHUNK - 1) / ROW_CHUNK;
  std::vector<const void*> ptrs;
  for (const at::Tensor& t : preds) ptrs.push_back(t.data_ptr());
  at::Tensor partials = at::empty({T, R, nc}, model_pred.options().dtype(acc));
  run_mse_partials(dt, MseArgs{ptrs.data(), T, tgt.data_ptr(), R, tgt.size(0), N, partials.data_ptr()});
  at::Tensor out = at::empty({T, R}, model_pred.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "adpo_cpu_mse_combine", [&] {
    const scalar_t* part = partials.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t row = 0; row < T * R; ++row) {
      double s = 0.0;
      for (int64_t c = 0; c < nc; ++c) s += (double)part[row * nc + c];
      o[row] = (scalar_t)(s / (double)N);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairs_cpu(
    const at::Tensor& mse, const at::Tensor& model_pred, const at::Tensor& target, int64_t offset,
    int64_t num_pairs, c10::ArrayRef<double> fparams, c10::IntArrayRef iparams) {
  constexpr const char* op = "adpo::cpu_pairs";
  const Params p = check_pairs_args(op, mse, model_pred, offset, num_pairs, fparams, iparams);
  check_cpu(op, mse);
  const at::Tensor ms = mse.contiguous();
  const auto opts = ms.options();
  at::Tensor loss = at::empty({}, opts), acc = at::empty({}, opts);
  at::Tensor logits = at::empty({num_pairs}, opts), metric = at::empty({num_pairs}, opts);
  at::Tensor weights = at::empty({num_pairs}, opts), margin = at::empty({num_pairs}, opts);
  at::Tensor gcoef = at::empty({num_pairs}, opts);
  AT_DISPATCH_FLOATING_TYPES(ms.scalar_type(), "adpo_cpu_pairs", [&] {
    pairs_kernel<scalar_t>(ms.const_data_ptr<scalar_t>(), ms.size(0), ms.size(2), offset, num_pairs, p,
                           loss.mutable_data_ptr<scalar_t>(), logits.mutable_data_ptr<scalar_t>(),
                           metric.mutable_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(),
                           margin.mutable_data_ptr<scalar_t>(), acc.mutable_data_ptr<scalar_t>(),
                           gcoef.mutable_data_ptr<scalar_t>());
  });
  return {loss, logits, metric, weights, margin, acc, gcoef};
}

at::Tensor pairs_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_coef, const at::Tensor& model_pred,
                         const at::Tensor& target) {
  constexpr const char* op = "adpo::cpu_pairs_bwd";
  check_bwd_args(op, grad_loss, grad_coef, model_pred, target);
  check_cpu(op, model_pred);
  const at::Tensor mp = model_pred.contiguous(), tgt = target.contiguous();
  const at::Tensor gc = grad_coef.to(at::kDouble).contiguous();
  at::Tensor grad = at::empty(mp.sizes(), mp.options());
  run_pairs_bwd(mp.scalar_type(), BwdArgs{mp.data_ptr(), tgt.data_ptr(), grad.data_ptr(), gc.const_data_ptr<double>(),
                                          grad_loss.item<double>(), mp.size(0), tgt.size(0), mp.size(1)});
  return grad;
}

const char* cpu_isa() {
  switch (cpu_isa_cached()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

}  // namespace adpo::cpu

TORCH_LIBRARY_IMPL(adpo, CPU, m) {
  m.impl("cpu_mse", &adpo::cpu::mse_cpu);
  m.impl("cpu_pairs", &adpo::cpu::pairs_cpu);
  m.impl("cpu_pairs_bwd", &adpo::cpu::pairs_bwd_cpu);
}
