// CUDA kernels of the fused Adaptive-DPO loss (spec: docs/math.md, shared/spec/ADAPTIVE_DPO.md).
//
//   mse(p)_r   = (1/N) sum_n (p[r, n] - target[r mod Bt, n])^2           (section 2)
//   scalar stage: z, metric, weights, margins, loss, g_i = d loss / d z_i  (sections 2-8)
//   grad[r, n] = grad_loss * g_{r mod B} * (-2/N if r < B else +2/N) * (model_pred[r, n] - target[r mod Bt, n])
//
// The row reductions are bandwidth-bound: 16-byte vector loads, 8 in flight per thread,
// fp32 accumulation (fp64 for fp64).  Determinism: every reduction has a fixed order and
// no float atomics.  Stage 1 gives each (tensor, row, chunk) one block whose warps reduce
// with shuffles and then across warps through shared memory; stage 2 sums the chunk
// partials of a row in one warp, lane-strided, then by shuffles.  The scalar stage runs
// in one block in double (O(B * (K + 1)) numbers) with the per-pair math of
// adpo_common.h, shared with the CPU kernels.  Indices are 64-bit throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>

#include "kernels.h"

// Every launch goes through ADPO_LAUNCH(grid, block, shared bytes, stream, kernel)(args...): <<<>>>
// here; the CUDA-on-CPU harness (csrc/cuda_emu), which compiles this file as C++, defines its own.
#ifndef ADPO_LAUNCH
#define ADPO_LAUNCH(GRID, BLOCK, SMEM, STREAM, ...) __VA_ARGS__<<<GRID, BLOCK, SMEM, STREAM>>>
#endif

namespace adpo::cuda {
namespace {

// ---- dtype plumbing ------------------------------------------------------------------
template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };
template <typename T> using acc_t = typename AccT<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16 bytes of T, moved with one 128-bit load/store.
template <typename T> struct alignas(16) Pack { T x[16 / sizeof(T)]; };

template <typename T> __device__ __forceinline__ Pack<T> load16(const T* ptr) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
  Pack<T> out;
  memcpy(&out, &raw, 16);
  return out;
}

// __stwb (st.global.wb.v4.u32, the default caching) rather than a plain uint4 store: NVVM
// split one of the plain stores of pairs_bwd_kernel into four 4-byte stores.
template <typename T> __device__ __forceinline__ void store16(T* ptr, const Pack<T>& v) {
  uint4 raw;
  memcpy(&raw, &v, 16);
  __stwb(reinterpret_cast<uint4*>(ptr), raw);
}

// The variants are template parameters; these switches pick them at run time.
#define ADPO_DISPATCH_DTYPE(DT, TYPE, ...)                     \
  switch (DT) {                                               \
    case DType::F64: { using TYPE = double; __VA_ARGS__(); break; }        \
    case DType::F32: { using TYPE = float; __VA_ARGS__(); break; }         \
    case DType::BF16: { using TYPE = __nv_bfloat16; __VA_ARGS__(); break; } \
    case DType::F16: { using TYPE = __half; __VA_ARGS__(); break; }        \
  }

#define ADPO_DISPATCH_BOOL(COND, NAME, ...) \
  if (COND) {                               \
    constexpr bool NAME = true;             \
    __VA_ARGS__();                          \
  } else {                                  \
    constexpr bool NAME = false;            \
    __VA_ARGS__();                          \
  }

// ---- reductions (fixed order) --------------------------------------------------------
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // complete in lane 0
}

// Sum over a block of NT threads; the result is returned to every thread.  `sh` holds
// NT / 32 + 1 values; the trailing barrier lets the caller reuse it at once.
template <int NT, typename A> __device__ __forceinline__ A block_sum(A v, A* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    A t = lane < NT / 32 ? sh[lane] : A(0);
    t = warp_sum(t);
    if (lane == 0) sh[NT / 32] = t;
  }
  __syncthreads();
  const A total = sh[NT / 32];
  __syncthreads();
  return total;
}

// ---- stage 1: per-chunk sums of squares ----------------------------------------------
// Passed as a __grid_constant__ kernel parameter and indexed in place (constant bank): a
// by-value struct indexed with a runtime t was copied to local memory by every thread.
template <typename T> struct PredPtrs { const T* p[MAX_PREDS_PER_LAUNCH]; };

template <typename T> constexpr int64_t kChunk = (int64_t)MSE_THREADS * MSE_ITERS * (16 / sizeof(T));

// One block per (row r, chunk c, tensor t), t fastest so that blocks of the same target
// chunk run together and the target is read from L2.  VEC: every row start is 16-byte
// aligned (N % (16 / sizeof(T)) == 0 and aligned base pointers).
template <typename T, bool VEC>
__global__ void __launch_bounds__(MSE_THREADS, 2)
mse_partial_kernel(const __grid_constant__ PredPtrs<T> preds, int n_preds, int64_t first,
                   const T* __restrict__ target, int64_t R, int64_t Bt, int64_t N, int64_t nchunks,
                   acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  __shared__ A sh[MSE_THREADS / 32 + 1];
  const int64_t blk = blockIdx.x;
  const int t = (int)(blk % n_preds);
  const int64_t rc = blk / n_preds;
  const int64_t c = rc % nchunks, r = rc / nchunks;
  const int64_t start = c * kChunk<T>;
  const int64_t len = N - start < kChunk<T> ? N - start : kChunk<T>;
  const T* p = preds.p[t] + r * N + start;
  const T* q = target + (r % Bt) * N + start;
  A sum = 0;
  if constexpr (VEC) {
    constexpr int V = 16 / sizeof(T);
    const int64_t nvec = len / V;  // exact: len is a multiple of V
    Pack<T> pv[MSE_ITERS], tv[MSE_ITERS];
#pragma unroll
    for (int u = 0; u < MSE_ITERS; ++u) {  // all loads first: MSE_ITERS x 32 bytes in flight
      const int64_t v = (int64_t)u * MSE_THREADS + threadIdx.x;
      if (v < nvec) {
        pv[u] = load16(p + v * V);
        tv[u] = load16(q + v * V);
      }
    }
#pragma unroll
    for (int u = 0; u < MSE_ITERS; ++u) {
      const int64_t v = (int64_t)u * MSE_THREADS + threadIdx.x;
      if (v < nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A d = to_acc(pv[u].x[e]) - to_acc(tv[u].x[e]);
          sum += d * d;
        }
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < len; i += MSE_THREADS) {
      const A d = to_acc(p[i]) - to_acc(q[i]);
      sum += d * d;
    }
  }
  sum = block_sum<MSE_THREADS>(sum, sh);
  if (threadIdx.x == 0) partials[((first + t) * R + r) * nchunks + c] = sum;
}

// ---- stage 2: one warp per row -------------------------------------------------------
template <typename A>
__global__ void __launch_bounds__(256)
mse_combine_kernel(const A* __restrict__ partials, int64_t rows, int64_t nchunks, int64_t N, A* __restrict__ out) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // the whole warp leaves together
  double s = 0.0;
  for (int64_t c = lane; c < nchunks; c += 32) s += (double)partials[row * nchunks + c];
  s = warp_sum(s);
  if (lane == 0) out[row] = (A)(s / (double)N);
}

// ---- the scalar stage ----------------------------------------------------------------
// (PAIRS_THREADS, 1): without the explicit one block per SM ptxas capped the kernel at 64
// registers and kept a double in local memory across the slow-path calls of double division.
template <typename A>
__global__ void __launch_bounds__(PAIRS_THREADS, 1)
pairs_kernel(const A* __restrict__ mse, int64_t T, int64_t B, int64_t offset, int64_t n, Params p,
             double* __restrict__ ws, PairsOut out) {
  constexpr int NT = PAIRS_THREADS;
  __shared__ double sh[NT / 32 + 1];
  __shared__ unsigned long long qidx;
  const int tid = threadIdx.x;
  const int64_t kp1 = T - 1;  // the policy and the K annotators
  double* Z = ws;             // (K + 1, B) logits
  double* m = Z + kp1 * B;    // (B,) metric
  double* d = m + B;          // (B,) stability
  double* norms = d + B;      // (K + 1,) batch L2 norms

  // Logits z and z^(k) of every pair (batch statistics run over all B pairs).
  for (int64_t i = tid; i < B; i += NT) {
    const double ref_diff = (double)mse[2 * B + i] - (double)mse[3 * B + i];
    Z[i] = ref_diff - ((double)mse[i] - (double)mse[B + i]);
    for (int64_t k = 1; k < kp1; ++k)
      Z[k * B + i] = ref_diff - ((double)mse[(k + 1) * 2 * B + i] - (double)mse[(k + 1) * 2 * B + B + i]);
  }
  __syncthreads();  // publish Z

  // Metric (spec section 4).
  const bool on = p.metric == METRIC_ON;
  if (on && kp1 > 1) {
    if (p.logits_normalize) {
      for (int64_t k = 0; k < kp1; ++k) {
        double ss = 0.0;
        for (int64_t i = tid; i < B; i += NT) ss += Z[k * B + i] * Z[k * B + i];
        const double nrm = sqrt(block_sum<NT>(ss, sh));
        if (tid == 0) norms[k] = nrm < NORM_EPS ? NORM_EPS : nrm;  // NaN stays NaN, like clamp_min
      }
      __syncthreads();
    }
    double dl = 0.0;
    for (int64_t i = tid; i < B; i += NT) {
      double c, di;
      confidence_stability(Z, B, i, kp1, p.logits_normalize ? norms : nullptr, p.rho, &c, &di);
      m[i] = c * di;
      d[i] = di;
      dl += di;
    }
    if (p.std_standardize) {
      const double dmean = block_sum<NT>(dl, sh) / (double)B;
      for (int64_t i = tid; i < B; i += NT) m[i] = dmean == 0.0 ? sigmoid(-p.rho * Z[i]) : m[i] / dmean;
    }
    if (p.weight_normalize) {
      double ml = 0.0;
      for (int64_t i = tid; i < B; i += NT) ml += m[i];
      const double total = block_sum<NT>(ml, sh);
      if (total != 0.0)
        for (int64_t i = tid; i < B; i += NT) m[i] /= total;
    }
  } else {
    for (int64_t i = tid; i < B; i += NT) m[i] = on ? sigmoid(-p.rho * Z[i]) : 0.0;  // 1 - sigmoid(rho z)
  }
  __syncthreads();

  // Flip threshold (section 7): the element of rank k of the NaN-last ascending order is
  // the m_i whose equivalence class [less, less + equal) contains k; the smallest such i
  // wins so the choice does not depend on scheduling.
  double thr = 0.0;
  if (p.flip) {
    if (tid == 0) qidx = ULLONG_MAX;
    __syncthreads();
    const int64_t k = flip_rank(B, p.flip_ratio);
    for (int64_t i = tid; i < B; i += NT) {
      int64_t less = 0, equal = 0;
      for (int64_t j = 0; j < B; ++j) {
        const bool lt = less_nan_last(m[j], m[i]);
        less += lt;
        equal += !lt && !less_nan_last(m[i], m[j]);
      }
      if (less <= k && k < less + equal) atomicMin(&qidx, (unsigned long long)i);
    }
    __syncthreads();
    const double q = m[qidx];
    thr = q < p.flip_threshold ? p.flip_threshold : q;
  }

  // zbar: the mean of the logits as the loss sees them, flipped pairs negated (spec section 7)
  double zs = 0.0;
  for (int64_t i = tid; i < B; i += NT) zs += p.flip && m[i] > thr ? -Z[i] : Z[i];
  const double zbar = block_sum<NT>(zs, sh) / (double)B;

  // This process's pairs: outputs, loss and g_i = d loss / d z_i.
  A* logits = static_cast<A*>(out.logits);
  A* metric = static_cast<A*>(out.metric);
  A* weights = static_cast<A*>(out.weights);
  A* margin = static_cast<A*>(out.margin);
  A* gcoef = static_cast<A*>(out.grad_coef);
  const bool adaptive = p.metric != METRIC_OFF;
  double ls = 0.0, pos = 0.0, zero = 0.0;
  for (int64_t j = tid; j < n; j += NT) {
    const int64_t i = offset + j;
    const double z = Z[i], mi = m[i];
    const double w = adaptive ? weight_fn(mi, p) : 1.0;
    const double gamma = adaptive ? margin_fn(mi, zbar, p) : 0.0;
    const bool flipped = p.flip && mi > thr;
    double l, dz;
    pair_loss(z, mi, w, gamma, zbar, flipped, p, &l, &dz);
    ls += l;
    pos += z > 0.0;
    zero += z == 0.0;
    logits[j] = (A)z;
    metric[j] = (A)mi;
    weights[j] = (A)w;
    margin[j] = (A)gamma;
    gcoef[j] = (A)(dz / (double)n);
  }
  ls = block_sum<NT>(ls, sh);
  pos = block_sum<NT>(pos, sh);
  zero = block_sum<NT>(zero, sh);
  if (tid == 0) {
    *static_cast<A*>(out.loss) = (A)(ls / (double)n);
    *static_cast<A*>(out.acc) = (A)(pos / (double)n + 0.5 * (zero / (double)n));
  }
}

// ---- backward ------------------------------------------------------------------------
constexpr int BWD_BATCH = MSE_ITERS / 2;  // 16-byte vectors per input loaded before the first store
static_assert(MSE_ITERS % BWD_BATCH == 0, "the backward's batches tile a chunk");

template <typename T, bool VEC>
__global__ void __launch_bounds__(MSE_THREADS, 2)
pairs_bwd_kernel(const acc_t<T>* __restrict__ grad_loss, const acc_t<T>* __restrict__ gcoef,
                 const T* __restrict__ mp, const T* __restrict__ target, int64_t R, int64_t Bt, int64_t N,
                 int64_t nchunks, T* __restrict__ grad) {
  using A = acc_t<T>;
  const int64_t blk = blockIdx.x;
  const int64_t r = blk / nchunks, c = blk % nchunks;
  const int64_t B = R / 2;
  const int64_t start = c * kChunk<T>;
  const int64_t len = N - start < kChunk<T> ? N - start : kChunk<T>;
  // winners (r < B) get -2/N, losers +2/N; grad_loss is read on the device, never on the host
  const A coef = (A)((double)grad_loss[0] * (double)gcoef[r % B] * (r < B ? -2.0 : 2.0) / (double)N);
  const T* p = mp + r * N + start;
  const T* q = target + (r % Bt) * N + start;
  T* o = grad + r * N + start;
  if constexpr (VEC) {
    constexpr int V = 16 / sizeof(T);
    const int64_t nvec = len / V;
    // Two batches of BWD_BATCH vectors per input (64 bytes in flight per thread per input):
    // all MSE_ITERS at once spilled the bf16 variant under the (256, 2) launch bounds.
#pragma unroll
    for (int u0 = 0; u0 < MSE_ITERS; u0 += BWD_BATCH) {
      Pack<T> pv[BWD_BATCH], tv[BWD_BATCH];
#pragma unroll
      for (int u = 0; u < BWD_BATCH; ++u) {
        const int64_t v = (int64_t)(u0 + u) * MSE_THREADS + threadIdx.x;
        if (v < nvec) {
          pv[u] = load16(p + v * V);
          tv[u] = load16(q + v * V);
        }
      }
#pragma unroll
      for (int u = 0; u < BWD_BATCH; ++u) {
        const int64_t v = (int64_t)(u0 + u) * MSE_THREADS + threadIdx.x;
        if (v < nvec) {
          Pack<T> g;
#pragma unroll
          for (int e = 0; e < V; ++e) g.x[e] = from_acc<T>(coef * (to_acc(pv[u].x[e]) - to_acc(tv[u].x[e])));
          store16(o + v * V, g);
        }
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < len; i += MSE_THREADS) o[i] = from_acc<T>(coef * (to_acc(p[i]) - to_acc(q[i])));
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void launch_mse_partials(DType dt, const void* const* preds, int64_t T, const void* target, int64_t R,
                         int64_t Bt, int64_t N, void* partials, cudaStream_t stream) {
  const int64_t nchunks = num_chunks(dt, N);
  bool vec = N % (16 / elem_size(dt)) == 0 && aligned16(target);
  for (int64_t t = 0; t < T; ++t) vec = vec && aligned16(preds[t]);
  ADPO_DISPATCH_DTYPE(dt, scalar_t, [&] {
    ADPO_DISPATCH_BOOL(vec, kVec, [&] {
      for (int64_t first = 0; first < T; first += MAX_PREDS_PER_LAUNCH) {
        const int n = (int)(T - first < MAX_PREDS_PER_LAUNCH ? T - first : MAX_PREDS_PER_LAUNCH);
        PredPtrs<scalar_t> ptrs{};
        for (int i = 0; i < n; ++i) ptrs.p[i] = static_cast<const scalar_t*>(preds[first + i]);
        const int64_t blocks = R * nchunks * n;
        ADPO_LAUNCH((unsigned)blocks, MSE_THREADS, 0, stream, mse_partial_kernel<scalar_t, kVec>)(
            ptrs, n, first, static_cast<const scalar_t*>(target), R, Bt, N, nchunks,
            static_cast<acc_t<scalar_t>*>(partials));
      }
    });
  });
}

void launch_mse_combine(bool f64, const void* partials, int64_t rows, int64_t nchunks, int64_t N, void* out,
                        cudaStream_t stream) {
  const unsigned blocks = (unsigned)((rows + 7) / 8);  // 8 warps (rows) per block
  if (f64) {
    ADPO_LAUNCH(blocks, 256, 0, stream, mse_combine_kernel<double>)(static_cast<const double*>(partials), rows, nchunks, N,
                                                           static_cast<double*>(out));
  } else {
    ADPO_LAUNCH(blocks, 256, 0, stream, mse_combine_kernel<float>)(static_cast<const float*>(partials), rows, nchunks, N,
                                                          static_cast<float*>(out));
  }
}

void launch_pairs(bool f64, const void* mse, int64_t T, int64_t B, int64_t offset, int64_t n, const Params& p,
                  double* workspace, PairsOut out, cudaStream_t stream) {
  if (f64) {
    ADPO_LAUNCH(1, PAIRS_THREADS, 0, stream, pairs_kernel<double>)(static_cast<const double*>(mse), T, B, offset, n, p,
                                                           workspace, out);
  } else {
    ADPO_LAUNCH(1, PAIRS_THREADS, 0, stream, pairs_kernel<float>)(static_cast<const float*>(mse), T, B, offset, n, p,
                                                          workspace, out);
  }
}

void launch_pairs_bwd(DType dt, const void* grad_loss, const void* grad_coef, const void* model_pred,
                      const void* target, int64_t R, int64_t Bt, int64_t N, void* grad, cudaStream_t stream) {
  const int64_t nchunks = num_chunks(dt, N);
  const bool vec = N % (16 / elem_size(dt)) == 0 && aligned16(model_pred) && aligned16(target) && aligned16(grad);
  ADPO_DISPATCH_DTYPE(dt, scalar_t, [&] {
    ADPO_DISPATCH_BOOL(vec, kVec, [&] {
      using A = acc_t<scalar_t>;
      ADPO_LAUNCH((unsigned)(R * nchunks), MSE_THREADS, 0, stream, pairs_bwd_kernel<scalar_t, kVec>)(
          static_cast<const A*>(grad_loss), static_cast<const A*>(grad_coef),
          static_cast<const scalar_t*>(model_pred), static_cast<const scalar_t*>(target), R, Bt, N, nchunks,
          static_cast<scalar_t*>(grad));
    });
  });
}

}  // namespace adpo::cuda
