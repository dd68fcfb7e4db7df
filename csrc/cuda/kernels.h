// Launchers of the CUDA kernels (kernels.cu).  Plain C++ with raw pointers and no torch
// headers, so that nvcc compiles kernels.cu quickly for several archs; ops_cuda.cpp
// (compiled by the host compiler) does the at::Tensor work, device guard and stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../adpo_common.h"

namespace adpo::cuda {

enum class DType : int { F64 = 0, F32 = 1, BF16 = 2, F16 = 3 };

constexpr int MSE_THREADS = 256;      // threads of the row-chunk kernels
constexpr int MSE_ITERS = 8;          // 16-byte vectors per thread per chunk (bytes in flight)
constexpr int MAX_PREDS_PER_LAUNCH = 16;
constexpr int PAIRS_THREADS = 512;    // the one block of the scalar stage

inline int64_t elem_size(DType dt) { return dt == DType::F64 ? 8 : dt == DType::F32 ? 4 : 2; }

// Elements per row chunk: one block's work, a function of the dtype only, so the
// two-stage reduction has the same order on every run.
inline int64_t chunk_elems(DType dt) { return (int64_t)MSE_THREADS * MSE_ITERS * (16 / elem_size(dt)); }

inline int64_t num_chunks(DType dt, int64_t N) { return (N + chunk_elems(dt) - 1) / chunk_elems(dt); }

// partials (T, R, nchunks) <- per-chunk sums of squares; accumulation dtype (f32, f64 for F64).
void launch_mse_partials(DType dt, const void* const* preds, int64_t T, const void* target, int64_t R,
                         int64_t Bt, int64_t N, void* partials, cudaStream_t stream);

// out (rows,) <- sum over chunks of partials (rows, nchunks) / N, fixed order.
void launch_mse_combine(bool f64, const void* partials, int64_t rows, int64_t nchunks, int64_t N, void* out,
                        cudaStream_t stream);

struct PairsOut {
  void *loss, *logits, *metric, *weights, *margin, *acc, *grad_coef;
};

// The scalar stage in one block; workspace holds (K + 3) * B + (K + 1) doubles.
void launch_pairs(bool f64, const void* mse, int64_t T, int64_t B, int64_t offset, int64_t n, const Params& p,
                  double* workspace, PairsOut out, cudaStream_t stream);

inline int64_t pairs_workspace_size(int64_t T, int64_t B) { return (T + 1) * B + (T - 1); }

// grad (R, N) <- grad_loss * g[r mod B] * (-+2/N) * (model_pred - target[r mod Bt]).
// grad_loss and grad_coef are in the accumulation dtype.
void launch_pairs_bwd(DType dt, const void* grad_loss, const void* grad_coef, const void* model_pred,
                      const void* target, int64_t R, int64_t Bt, int64_t N, void* grad, cudaStream_t stream);

}  // namespace adpo::cuda
