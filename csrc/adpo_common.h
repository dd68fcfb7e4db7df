// Scalar math of the Adaptive-DPO loss shared by the C++ CPU and the CUDA kernels.
//
// Spec: shared/spec/ADAPTIVE_DPO.md sections 4-8 (restated in docs/math.md); the torch
// oracle is adpo_kernels/reference.py, whose docstring lists the conventions the spec
// leaves open (all followed here).  Everything in this file is per pair and runs in
// double whatever the input dtype: the scalar stage touches O(B * (K + 1)) numbers, so
// double costs nothing and keeps the metric (rho * z with z ~ 1e-4) accurate.
//
// The enums mirror adpo_kernels/config.py (LOSS_TYPES, WEIGHT_TYPES, MARGIN_TYPES,
// METRIC_*, F_* and I_* indices); tests/test_cpu_kernels.py checks that they agree.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define ADPO_HD __host__ __device__ __forceinline__
#else
#define ADPO_HD inline
#endif

namespace adpo {

enum LossType : int { LOSS_SIGMOID = 0, LOSS_IPO = 1, LOSS_HINGE = 2, LOSS_ROBUST = 3, LOSS_CONSERVATIVE = 4 };
enum WeightType : int { WEIGHT_LINEAR = 0, WEIGHT_QUADRATIC = 1, WEIGHT_SQRT = 2, WEIGHT_EXP = 3 };
enum MarginType : int { MARGIN_NONE = 0, MARGIN_LINEAR = 1, MARGIN_QUADRATIC = 2 };
enum MetricMode : int { METRIC_OFF = 0, METRIC_WARMUP = 1, METRIC_ON = 2 };

// Indices into op_params()'s float and int lists.
enum FParam : int { F_BETA, F_RHO, F_TAU, F_INTERCEPT, F_BETA_IPO, F_EPS, F_FLIP_RATIO, F_FLIP_THRESHOLD, NUM_F };
enum IParam : int { I_LOSS, I_WEIGHT, I_MARGIN, I_METRIC, I_LOGITS_NORMALIZE, I_STD_STANDARDIZE,
                    I_WEIGHT_NORMALIZE, I_FLIP, NUM_I };

constexpr double NORM_EPS = 1e-12;  // F.normalize's clamp of the batch L2 norm

// The loss options, unpacked from the op's (fparams, iparams); passed by value to kernels.
struct Params {
  double beta, rho, tau, intercept, beta_ipo, eps, flip_ratio, flip_threshold;
  int loss, weight, margin, metric, logits_normalize, std_standardize, weight_normalize, flip;
};

ADPO_HD bool is_nan(double x) { return x != x; }

ADPO_HD double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + exp(-x));
  const double e = exp(x);  // also the NaN path: NaN >= 0 is false
  return e / (1.0 + e);
}

// log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)), stable for large |x|.
ADPO_HD double log_sigmoid(double x) { return (x < 0 ? x : 0.0) - log1p(exp(-fabs(x))); }

// Spec section 5: w(m).
ADPO_HD double weight_fn(double m, const Params& p) {
  switch (p.weight) {
    case WEIGHT_LINEAR: return 1.0 / (p.tau * m + p.intercept);
    case WEIGHT_QUADRATIC: return 1.0 / (p.tau * m * m + p.intercept);
    case WEIGHT_SQRT: return 1.0 / (exp(p.tau * sqrt(m)) + p.intercept);
    default: return 1.0 / (exp(p.tau * m) + p.intercept);
  }
}

// Spec section 5: gamma(m) = zbar - m^q / beta (0 without a margin).
ADPO_HD double margin_fn(double m, double zbar, const Params& p) {
  if (p.margin == MARGIN_NONE) return 0.0;
  const double mm = p.margin == MARGIN_LINEAR ? m : m * m;
  return zbar - mm / p.beta;
}

// Spec section 4, K >= 1: confidence c_i and stability d_i of pair i from the (K+1, B)
// logits Z (row-major, row stride B), each row divided by norms[k] when norms != nullptr.
ADPO_HD void confidence_stability(const double* Z, int64_t B, int64_t i, int64_t kp1,
                                  const double* norms, double rho, double* c, double* d) {
  double sum_sig = 0.0, sum_s = 0.0;  // sum_sig: of sigmoid(-s) = 1 - sigmoid(s), without cancellation
  for (int64_t k = 0; k < kp1; ++k) {
    const double s = rho * (norms ? Z[k * B + i] / norms[k] : Z[k * B + i]);
    sum_sig += sigmoid(-s);
    sum_s += s;
  }
  const double mean = sum_s / (double)kp1;
  double ss = 0.0;
  for (int64_t k = 0; k < kp1; ++k) {
    const double s = rho * (norms ? Z[k * B + i] / norms[k] : Z[k * B + i]);
    ss += (s - mean) * (s - mean);
  }
  const double sd = sqrt(ss / (double)(kp1 - 1));  // unbiased std over the K+1 annotators
  *d = sd > 1.0 ? 1.0 : sd;                        // min(std, 1); NaN stays NaN like torch.clamp
  *c = sum_sig / (double)kp1;  // 1 - mean_k sigmoid(s_k)
}

// Spec section 6 (+ the flip of section 7): the loss of one pair and its derivative
// d loss_i / d z_i.  w and gamma are 1 and 0 when the metric is off.
ADPO_HD void pair_loss(double z, double m, double w, double gamma, double zbar, bool flipped,
                       const Params& p, double* loss, double* dz) {
  const double sgn = flipped ? -1.0 : 1.0;
  const double x = sgn * z;
  const double beta = p.beta;
  double l, dx;
  switch (p.loss) {
    case LOSS_SIGMOID: {
      const double u = beta * x - gamma;
      l = -w * log_sigmoid(u);
      dx = -w * beta * sigmoid(-u);
      break;
    }
    case LOSS_IPO: {
      double shift = -1.0 / (2.0 * p.beta_ipo);
      if (p.metric != METRIC_OFF && p.margin != MARGIN_NONE) {
        const double mm = p.margin == MARGIN_LINEAR ? m : m * m;
        shift = shift - mm / (beta * beta) + zbar / beta;
      }
      const double r = x + shift;
      l = w * r * r;
      dx = 2.0 * w * r;
      break;
    }
    case LOSS_HINGE: {
      const double h = 1.0 - beta * x;
      l = h > 0 ? h : 0.0;
      dx = h <= 0 ? 0.0 : -beta;  // relu'(0) = 0 and relu'(NaN) = 1, as torch
      if (is_nan(h)) l = h;
      break;
    }
    case LOSS_ROBUST: {
      const double e = p.eps, bx = beta * x;
      l = (-(1.0 - e) * log_sigmoid(bx) + e * log_sigmoid(-bx)) / (1.0 - 2.0 * e);
      dx = -beta * ((1.0 - e) * sigmoid(-bx) + e * sigmoid(bx)) / (1.0 - 2.0 * e);
      break;
    }
    default: {  // conservative
      const double e = p.eps, bx = beta * x;
      l = -(1.0 - e) * log_sigmoid(bx) - e * log_sigmoid(-bx);
      dx = -beta * ((1.0 - e) * sigmoid(-bx) - e * sigmoid(bx));
      break;
    }
  }
  *loss = l;
  *dz = sgn * dx;
}

// Spec section 7: index of the quantile in the ascending sort of B metrics.
ADPO_HD int64_t flip_rank(int64_t B, double flip_ratio) {
  const int64_t k = (int64_t)((double)B * (1.0 - flip_ratio));  // Python int(): truncation (>= 0 here)
  return k < B - 1 ? k : B - 1;
}

// The order torch.sort uses for floats: ascending, NaN last (all NaNs equal).
ADPO_HD bool less_nan_last(double a, double b) { return is_nan(b) ? !is_nan(a) : a < b; }

}  // namespace adpo
