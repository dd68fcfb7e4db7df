// Argument checks of the adpo:: ops shared by the CPU and CUDA registrations.
//
// The public API validates user input once, in adpo_kernels/_validate.py, with messages
// that name the argument; these checks only guard direct calls of the torch ops (a
// wrong call must raise, never read out of bounds).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "adpo_common.h"

namespace adpo {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// model_pred (2B, N), ref_pred (2B, N), target (2B, N) or (B, N), annotators K x (2B, N).
inline void check_mse_args(const char* op, const at::Tensor& model_pred, const at::Tensor& ref_pred,
                           const at::Tensor& target, at::TensorList annotators) {
  TORCH_CHECK(model_pred.dim() == 2, op, ": model_pred must be 2-D (2B, N), got shape ", model_pred.sizes());
  TORCH_CHECK(is_float_dtype(model_pred.scalar_type()), op,
              ": model_pred must be float64, float32, bfloat16 or float16, got ", model_pred.scalar_type());
  const int64_t R = model_pred.size(0), N = model_pred.size(1);
  TORCH_CHECK(R > 0 && R % 2 == 0 && N > 0, op, ": model_pred must be (2B, N) with B, N > 0, got shape ",
              model_pred.sizes());
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == model_pred.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                ", expected ", model_pred.scalar_type(), " (that of model_pred)");
    TORCH_CHECK(t.device() == model_pred.device(), op, ": ", name, " is on ", t.device(), ", expected ",
                model_pred.device(), " (that of model_pred)");
  };
  same(ref_pred, "ref_pred");
  same(target, "target");
  TORCH_CHECK(ref_pred.sizes() == model_pred.sizes(), op, ": ref_pred must have shape ", model_pred.sizes(),
              ", got ", ref_pred.sizes());
  TORCH_CHECK(target.dim() == 2 && target.size(1) == N && (target.size(0) == R || target.size(0) == R / 2), op,
              ": target must have shape (", R, ", ", N, ") or (", R / 2, ", ", N, "), got ", target.sizes());
  for (size_t k = 0; k < annotators.size(); ++k) {
    same(annotators[k], "an annotator");
    TORCH_CHECK(annotators[k].sizes() == model_pred.sizes(), op, ": annotators[", k, "] must have shape ",
                model_pred.sizes(), ", got ", annotators[k].sizes());
  }
}

// mse (2 + K, 2, B_global) in float32/float64; pairs offset .. offset + num_pairs are local.
// model_pred is the local (2 * num_pairs, N) input that the backward differentiates.
inline Params check_pairs_args(const char* op, const at::Tensor& mse, const at::Tensor& model_pred, int64_t offset,
                               int64_t num_pairs, c10::ArrayRef<double> fparams, c10::IntArrayRef iparams) {
  TORCH_CHECK(mse.dim() == 3 && mse.size(0) >= 2 && mse.size(1) == 2 && mse.size(2) > 0, op,
              ": mse must be (2 + K, 2, B) with B > 0, got shape ", mse.sizes());
  TORCH_CHECK(mse.scalar_type() == at::kFloat || mse.scalar_type() == at::kDouble, op,
              ": mse must be float32 or float64, got ", mse.scalar_type());
  const int64_t B = mse.size(2);
  TORCH_CHECK(num_pairs > 0 && offset >= 0 && offset + num_pairs <= B, op, ": local pairs [", offset, ", ",
              offset + num_pairs, ") must be a non-empty range inside the ", B, " pairs of mse");
  TORCH_CHECK(model_pred.dim() == 2 && model_pred.size(0) == 2 * num_pairs, op, ": model_pred must be (2 * num_pairs, N) = (",
              2 * num_pairs, ", N), got shape ", model_pred.sizes());
  TORCH_CHECK(model_pred.device() == mse.device(), op, ": model_pred is on ", model_pred.device(), ", mse on ",
              mse.device());
  TORCH_CHECK((int64_t)fparams.size() == NUM_F, op, ": fparams must have ", (int)NUM_F, " entries, got ",
              fparams.size());
  TORCH_CHECK((int64_t)iparams.size() == NUM_I, op, ": iparams must have ", (int)NUM_I, " entries, got ",
              iparams.size());
  Params p;
  p.beta = fparams[F_BETA];
  p.rho = fparams[F_RHO];
  p.tau = fparams[F_TAU];
  p.intercept = fparams[F_INTERCEPT];
  p.beta_ipo = fparams[F_BETA_IPO];
  p.eps = fparams[F_EPS];
  p.flip_ratio = fparams[F_FLIP_RATIO];
  p.flip_threshold = fparams[F_FLIP_THRESHOLD];
  p.loss = (int)iparams[I_LOSS];
  p.weight = (int)iparams[I_WEIGHT];
  p.margin = (int)iparams[I_MARGIN];
  p.metric = (int)iparams[I_METRIC];
  p.logits_normalize = (int)iparams[I_LOGITS_NORMALIZE];
  p.std_standardize = (int)iparams[I_STD_STANDARDIZE];
  p.weight_normalize = (int)iparams[I_WEIGHT_NORMALIZE];
  p.flip = (int)iparams[I_FLIP];
  TORCH_CHECK(p.loss >= 0 && p.loss <= LOSS_CONSERVATIVE, op, ": bad loss type ", p.loss);
  TORCH_CHECK(p.weight >= 0 && p.weight <= WEIGHT_EXP, op, ": bad weight type ", p.weight);
  TORCH_CHECK(p.margin >= 0 && p.margin <= MARGIN_QUADRATIC, op, ": bad margin type ", p.margin);
  TORCH_CHECK(p.metric >= 0 && p.metric <= METRIC_ON, op, ": bad metric mode ", p.metric);
  // the flip's quantile index is (int)(B * (1 - flip_ratio)): out of [0, 1] (or NaN) it would index outside
  // the sorted metric (CUDA read m[-1], the CPU sorted[negative]); written so that NaN fails too
  TORCH_CHECK(!p.flip || (p.flip_ratio >= 0.0 && p.flip_ratio <= 1.0), op,
              ": flip_ratio must be in [0, 1] when flip is on, got ", p.flip_ratio);
  return p;
}

// grad_coef (B,), model_pred (2B, N), target (2B, N) or (B, N).
inline void check_bwd_args(const char* op, const at::Tensor& grad_loss, const at::Tensor& grad_coef,
                           const at::Tensor& model_pred, const at::Tensor& target) {
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one element, got shape ", grad_loss.sizes());
  // N > 0 as the forward requires (a row length of 0 gave the CUDA launcher a zero-block grid)
  TORCH_CHECK(model_pred.dim() == 2 && model_pred.size(0) % 2 == 0 && model_pred.size(0) > 0 && model_pred.size(1) > 0,
              op, ": model_pred must be (2B, N) with B, N > 0, got shape ", model_pred.sizes());
  TORCH_CHECK(is_float_dtype(model_pred.scalar_type()), op, ": model_pred must be a float tensor, got ",
              model_pred.scalar_type());
  const int64_t R = model_pred.size(0), N = model_pred.size(1);
  TORCH_CHECK(grad_coef.dim() == 1 && grad_coef.size(0) == R / 2, op, ": grad_coef must have shape (", R / 2,
              ",), got ", grad_coef.sizes());
  TORCH_CHECK(target.scalar_type() == model_pred.scalar_type(), op, ": target has dtype ", target.scalar_type(),
              ", expected ", model_pred.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(1) == N && (target.size(0) == R || target.size(0) == R / 2), op,
              ": target must have shape (", R, ", ", N, ") or (", R / 2, ", ", N, "), got ", target.sizes());
  for (const at::Tensor* t : {&grad_loss, &grad_coef, &target}) {
    TORCH_CHECK(t->device() == model_pred.device(), op, ": all tensors must be on ", model_pred.device(),
                ", got one on ", t->device());
  }
}

}  // namespace adpo
