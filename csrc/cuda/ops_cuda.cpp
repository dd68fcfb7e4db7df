// The CUDA implementations of adpo::cuda_mse, adpo::cuda_pairs and adpo::cuda_pairs_bwd:
// argument checks, device guard, current stream, allocation, then the launchers of
// kernels.cu.  Schemas, fake impls and autograd live in adpo_kernels/ops.py.
//
// Compiled with -DADPO_CUDA_EMU (the CUDA-on-CPU harness, csrc/cuda_emu, test-only), the same
// code registers adpo::cuda_emu_* for CPU tensors: no guard, no stream, and the harness runs
// the launchers' kernels on CPU threads (a device-side failure throws from the launcher).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#ifdef ADPO_CUDA_EMU
#define ADPO_OP_NAME(stage) "adpo::cuda_emu_" stage
#define ADPO_DEVICE_GUARD(tensor)
#define ADPO_STREAM() (cudaStream_t) nullptr
#define ADPO_LAUNCH_CHECK()
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define ADPO_OP_NAME(stage) "adpo::cuda_" stage
#define ADPO_DEVICE_GUARD(tensor) const c10::cuda::CUDAGuard guard((tensor).device())
#define ADPO_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#define ADPO_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif

#include <limits>
#include <vector>

#include "../op_checks.h"
#include "kernels.h"

namespace adpo::cuda {

namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::F64;
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "adpo CUDA kernels: unsupported dtype ", t);
  }
}

void check_cuda(const char* op, const at::Tensor& t) {
#ifdef ADPO_CUDA_EMU
  TORCH_CHECK(t.is_cpu(), op, ": expected CPU tensors (the CUDA-on-CPU harness), got one on ", t.device());
#else
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got one on ", t.device());
#endif
}

void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": input too large (", blocks,
              " blocks in one launch)");
}

}  // namespace

at::Tensor mse_cuda(const at::Tensor& model_pred, const at::Tensor& ref_pred, const at::Tensor& target,
                    at::TensorList annotators) {
  constexpr const char* op = ADPO_OP_NAME("mse");
  check_mse_args(op, model_pred, ref_pred, target, annotators);
  check_cuda(op, model_pred);
  ADPO_DEVICE_GUARD(model_pred);
  const DType dt = to_dtype(model_pred.scalar_type());
  const at::ScalarType acc = acc_dtype(model_pred.scalar_type());
  std::vector<at::Tensor> preds = {model_pred.contiguous(), ref_pred.contiguous()};
  for (const at::Tensor& a : annotators) preds.push_back(a.contiguous());
  const at::Tensor tgt = target.contiguous();
  const int64_t T = (int64_t)preds.size(), R = model_pred.size(0), N = model_pred.size(1);
  const int64_t nchunks = num_chunks(dt, N);
  check_grid(op, R * nchunks * std::min<int64_t>(T, MAX_PREDS_PER_LAUNCH));
  std::vector<const void*> ptrs;
  for (const at::Tensor& t : preds) ptrs.push_back(t.data_ptr());
  at::Tensor partials = at::empty({T, R, nchunks}, model_pred.options().dtype(acc));
  at::Tensor out = at::empty({T, R}, model_pred.options().dtype(acc));
  const cudaStream_t stream = ADPO_STREAM();
  launch_mse_partials(dt, ptrs.data(), T, tgt.data_ptr(), R, tgt.size(0), N, partials.data_ptr(), stream);
  ADPO_LAUNCH_CHECK();
  launch_mse_combine(acc == at::kDouble, partials.data_ptr(), T * R, nchunks, N, out.data_ptr(), stream);
  ADPO_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairs_cuda(
    const at::Tensor& mse, const at::Tensor& model_pred, const at::Tensor& target, int64_t offset,
    int64_t num_pairs, c10::ArrayRef<double> fparams, c10::IntArrayRef iparams) {
  constexpr const char* op = ADPO_OP_NAME("pairs");
  const Params p = check_pairs_args(op, mse, model_pred, offset, num_pairs, fparams, iparams);
  check_cuda(op, mse);
  ADPO_DEVICE_GUARD(mse);
  const at::Tensor ms = mse.contiguous();
  const int64_t T = ms.size(0), B = ms.size(2);
  const auto opts = ms.options();
  at::Tensor loss = at::empty({}, opts), acc = at::empty({}, opts);
  at::Tensor logits = at::empty({num_pairs}, opts), metric = at::empty({num_pairs}, opts);
  at::Tensor weights = at::empty({num_pairs}, opts), margin = at::empty({num_pairs}, opts);
  at::Tensor gcoef = at::empty({num_pairs}, opts);
  at::Tensor ws = at::empty({pairs_workspace_size(T, B)}, opts.dtype(at::kDouble));
  PairsOut out{loss.data_ptr(), logits.data_ptr(), metric.data_ptr(), weights.data_ptr(),
               margin.data_ptr(), acc.data_ptr(), gcoef.data_ptr()};
  launch_pairs(ms.scalar_type() == at::kDouble, ms.data_ptr(), T, B, offset, num_pairs, p,
               ws.data_ptr<double>(), out, ADPO_STREAM());
  ADPO_LAUNCH_CHECK();
  return {loss, logits, metric, weights, margin, acc, gcoef};
}

at::Tensor pairs_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_coef, const at::Tensor& model_pred,
                          const at::Tensor& target) {
  constexpr const char* op = ADPO_OP_NAME("pairs_bwd");
  check_bwd_args(op, grad_loss, grad_coef, model_pred, target);
  check_cuda(op, model_pred);
  ADPO_DEVICE_GUARD(model_pred);
  const DType dt = to_dtype(model_pred.scalar_type());
  const at::ScalarType acc = acc_dtype(model_pred.scalar_type());
  const at::Tensor mp = model_pred.contiguous(), tgt = target.contiguous();
  const at::Tensor gl = grad_loss.to(acc).contiguous(), gc = grad_coef.to(acc).contiguous();
  const int64_t R = mp.size(0), N = mp.size(1);
  check_grid(op, R * num_chunks(dt, N));
  at::Tensor grad = at::empty(mp.sizes(), mp.options());
  launch_pairs_bwd(dt, gl.data_ptr(), gc.data_ptr(), mp.data_ptr(), tgt.data_ptr(), R, tgt.size(0), N,
                   grad.data_ptr(), ADPO_STREAM());
  ADPO_LAUNCH_CHECK();
  return grad;
}

}  // namespace adpo::cuda

#ifdef ADPO_CUDA_EMU
TORCH_LIBRARY_IMPL(adpo, CPU, m) {
  m.impl("cuda_emu_mse", &adpo::cuda::mse_cuda);
  m.impl("cuda_emu_pairs", &adpo::cuda::pairs_cuda);
  m.impl("cuda_emu_pairs_bwd", &adpo::cuda::pairs_bwd_cuda);
}
#else
TORCH_LIBRARY_IMPL(adpo, CUDA, m) {
  m.impl("cuda_mse", &adpo::cuda::mse_cuda);
  m.impl("cuda_pairs", &adpo::cuda::pairs_cuda);
  m.impl("cuda_pairs_bwd", &adpo::cuda::pairs_bwd_cuda);
}
#endif
